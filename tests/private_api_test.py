"""The private Keras and keras-hub names the library relies on still exist.

CONTRIBUTING.md ("Private API") lists each one and why no public API
serves; an upgrade of Keras or keras-hub that renames one fails here, by
name, before it fails somewhere deep in a train step.
"""

import inspect

import keras
import numpy as np
import pytest


def _parameters(function):
    return list(inspect.signature(function).parameters)


def test_keras_private_names_the_engine_uses():
    from keras.src.backend.common.stateless_scope import get_stateless_scope
    from keras.src.optimizers.base_optimizer import BaseOptimizer

    assert get_stateless_scope() is None
    assert _parameters(keras.layers.Layer._flatten_layers)[1:3] == ["include_self", "recursive"]
    for name, parameters in {
        "_backend_update_step": ["grads", "trainable_variables", "learning_rate"],
        "_apply_weight_decay": ["variables"],
        "_filter_empty_gradients": ["grads", "vars"],
        "_var_key": ["variable"],
        "_get_variable_index": ["variable"],
    }.items():
        assert _parameters(getattr(BaseOptimizer, name))[1:] == parameters, name
    variable = keras.Variable(np.zeros((2, 3), "float32"))
    assert tuple(variable._shape) == (2, 3)
    assert variable._value is not None
    with keras.StatelessScope() as scope:
        scope.add_update((variable, keras.ops.ones((2, 3))))
        assert id(variable) in scope.state_mapping

    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    model.compile(optimizer="sgd", loss="mse")
    assert set(model._compile_config.config) >= {"optimizer", "loss", "metrics"}
    optimizer = model.optimizer
    optimizer.build(model.trainable_variables)
    assert isinstance(optimizer._trainable_variables, list)
    assert isinstance(optimizer._iterations, keras.Variable)
    if keras.backend.backend() == "jax":
        model.fit(np.zeros((2, 3)), np.zeros((2, 2)), verbose=0)
        assert isinstance(model._jax_state_synced, bool)
        assert callable(model._get_state_sharding_spec)


def test_keras_hub_private_names_the_task_wrapper_uses():
    pytest.importorskip("keras_hub")
    from keras_hub.src.utils import pipeline_model

    assert _parameters(pipeline_model._build_dataset) == [
        "x", "y", "sample_weight", "batch_size", "preprocess_samples",
    ]
    assert _parameters(pipeline_model._apply_preprocessing) == ["ds", "preprocess_samples"]
    assert _parameters(pipeline_model._train_validation_split) == [
        "arrays", "validation_split",
    ]
    assert pipeline_model._is_tf_dataset(np.zeros(2)) is False
    assert pipeline_model._is_grain_dataset(np.zeros(2)) is False


def test_keras_private_name_the_example_uses(tmp_path):
    pytest.importorskip("tensorboard")
    callback = keras.callbacks.TensorBoard(log_dir=str(tmp_path), update_freq="batch")
    assert callback._global_train_batch == 0
