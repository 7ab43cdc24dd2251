import os

import keras
import numpy as np
import pytest
from keras import ops

import keras_raptr
from hub_models import bert_backbone
from toy_models import block_weights
from toy_models import changed_blocks
from toy_models import regression_data
from toy_models import residual_mlp


def make_model(num_blocks=6, dropout=0.0, seed=0, lr=0.01, **kwargs):
    inner, blocks = residual_mlp(num_blocks, dropout=dropout)
    model = keras_raptr.RandomPartModel(inner, blocks=blocks, seed=seed, **kwargs)
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    return model


def one_step(model, schedule, data):
    model.fit(
        *data, batch_size=len(data[0]), epochs=1, callbacks=[schedule], verbose=0
    )


def trained_model(dropout=0.0):
    """A model after one epoch (4 steps) under a 2-4 schedule, and its inputs."""
    model = make_model(dropout=dropout)
    x, y = regression_data()
    schedule = keras_raptr.StageSchedule.from_spec("2-4", total_steps=8)
    model.fit(x, y, batch_size=8, epochs=1, callbacks=[schedule], verbose=0)
    return model, x


def test_blocks_and_inner_share_weights():
    model = make_model()
    assert [s.block.name for s in model.blocks] == [f"block_{i}" for i in range(6)]
    assert all(isinstance(s, keras_raptr.layers.RandomSkip) for s in model.blocks)
    inner_ids = {id(w) for w in model.inner.weights}
    assert {id(w) for w in model.trainable_weights} == inner_ids


@pytest.mark.parametrize("k", [2, 3, 5])
def test_sgd_step_changes_exactly_the_path(k):
    model = make_model()
    schedule = keras_raptr.StageSchedule(
        [keras_raptr.Stage(k, 100)], sampling="subset"
    )
    data = regression_data()
    seen = set()
    for _ in range(4):
        before = block_weights(model)
        one_step(model, schedule, data)
        changed = changed_blocks(before, block_weights(model))
        assert len(changed) == k, changed
        assert 0 in changed and 5 in changed  # fixed first and last
        seen.add(tuple(changed))
    # A fresh path each step: not always the same blocks.
    assert len(seen) > 1 or k == 2


def test_no_schedule_trains_every_block_like_the_inner_model():
    model = make_model()
    inner_copy, _ = residual_mlp(6)
    inner_copy.set_weights(model.inner.get_weights())
    inner_copy.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    x, y = regression_data()
    before = block_weights(model)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    assert changed_blocks(before, block_weights(model)) == list(range(6))
    inner_copy.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(model.inner.get_weights(), inner_copy.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_eval_and_predict_run_the_full_network():
    model = make_model(dropout=0.2)
    x, y = regression_data()
    schedule = keras_raptr.StageSchedule.from_spec("2-4", total_steps=100)
    model.fit(x, y, batch_size=8, epochs=1, callbacks=[schedule], verbose=0)
    expected = ops.convert_to_numpy(model.inner(x, training=False))
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, rtol=1e-5)
    np.testing.assert_allclose(
        ops.convert_to_numpy(model(x)), expected, rtol=1e-5
    )
    inner_loss = float(
        ops.convert_to_numpy(ops.mean(ops.square(expected - y)))
    )
    assert model.evaluate(x, y, verbose=0, batch_size=32) == pytest.approx(
        inner_loss, rel=1e-4
    )


def test_dropout_inside_blocks_trains():
    model = make_model(dropout=0.5)
    schedule = keras_raptr.StageSchedule(
        [keras_raptr.Stage(3, 100)], sampling="subset"
    )
    data = regression_data()
    before = block_weights(model)
    one_step(model, schedule, data)
    assert len(changed_blocks(before, block_weights(model))) == 3
    history = model.fit(*data, batch_size=8, epochs=2, callbacks=[schedule], verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


def paths(model, schedule, steps):
    data = regression_data()
    result = []
    for _ in range(steps):
        before = block_weights(model)
        one_step(model, schedule, data)
        result.append(changed_blocks(before, block_weights(model)))
    return result


def test_seed_makes_the_paths_reproducible():
    def schedule():
        return keras_raptr.StageSchedule(
            [keras_raptr.Stage(3, 100)], sampling="subset"
        )

    first = paths(make_model(seed=7), schedule(), 5)
    second = paths(make_model(seed=7), schedule(), 5)
    assert first == second
    assert len({tuple(p) for p in first}) > 1


def test_inverse_scaling_scales_the_residual_update():
    def run(scaling):
        keras.backend.clear_session()
        model = make_model(num_blocks=2, seed=3)
        model.compile(
            optimizer=keras.optimizers.SGD(0.01),
            loss=lambda y_true, y_pred: ops.mean(y_pred),
        )
        schedule = keras_raptr.StageSchedule(
            [keras_raptr.Stage(1.5, 100)], fixed_blocks=(0,), scaling=scaling
        )
        data = regression_data()
        for _ in range(20):
            before = block_weights(model)
            one_step(model, schedule, data)
            after = block_weights(model)
            if changed_blocks(before, after) == [0, 1]:
                # Block 1 is last: with a loss linear in the output, its
                # kernel's gradient is scaled by 1 / keep_prob = 2.
                return after[1][0] - before[1][0]
        raise AssertionError("block 1 was never on the path")

    np.testing.assert_allclose(run("inverse"), 2 * run("none"), rtol=1e-4, atol=1e-7)


def test_trace_count_across_stages_and_fits():
    traces = []

    class Counting(keras_raptr.RandomPartModel):
        def train_step(self, *args, **kwargs):
            traces.append(self._steps.tracing)
            return super().train_step(*args, **kwargs)

    inner, blocks = residual_mlp(6)
    model = Counting(inner, blocks=blocks, seed=0)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    # Stage 0 runs only the fixed first and last blocks, stage 1 draws its
    # path, stage 2 and after run the full network.
    schedule = keras_raptr.StageSchedule.from_spec("2-4-6", total_steps=12)
    x, y = regression_data()
    model.fit(x, y, batch_size=8, epochs=2, callbacks=[schedule], verbose=0)
    function = model.train_function
    model.fit(x, y, batch_size=8, epochs=3, callbacks=[schedule], verbose=0)
    # The same train function serves every stage and both `fit` calls.
    assert model.train_function is function
    fixed = ("static", (True, False, False, False, False, True))
    full = ("static", (True,) * 6)
    if keras.backend.backend() == "torch":
        # Eager: one call per step, 20 steps; the drawn stage's path is
        # computed on the host.
        assert traces == [fixed] * 4 + [("host",)] * 4 + [full] * 12
    else:
        # One trace in all: the loop step runs every stage, the fixed
        # blocks alone, the drawn paths of every length and the full network.
        assert traces == [("loop",)]


def test_static_and_drawn_paths_give_the_same_run():
    # With two steps per execution, the execution that crosses from the
    # fixed-only stage into a drawn one runs the gated step for both of its
    # steps: the run must not change (same paths, same weights).
    if keras.backend.backend() == "torch":
        pytest.skip("PyTorch runs one step per execution")

    def run(steps_per_execution):
        model = make_model()
        model.compile(
            optimizer=keras.optimizers.SGD(0.05),
            loss="mse",
            steps_per_execution=steps_per_execution,
        )
        schedule = keras_raptr.StageSchedule(
            [keras_raptr.Stage(2, 3), keras_raptr.Stage(4, 6)], sampling="subset"
        )
        x, y = regression_data(n=8 * 9)
        model.fit(x, y, batch_size=8, epochs=1, callbacks=[schedule], verbose=0)
        return block_weights(model)

    one, two = run(1), run(2)
    for a, b in zip(one, two):
        for wa, wb in zip(a, b):
            np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)


def test_save_and_load_keras_file(tmp_path):
    model, x = trained_model(dropout=0.1)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored, keras_raptr.RandomPartModel)
    assert [s.block.name for s in restored.blocks] == [s.block.name for s in model.blocks]
    assert restored.seed == 0
    np.testing.assert_allclose(
        restored.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6
    )
    assert int(restored.optimizer.iterations) == 4


def test_trained_weights_load_into_the_plain_inner_model(tmp_path):
    model, x = trained_model()
    path = os.path.join(tmp_path, "inner.weights.h5")
    model.inner.save_weights(path)
    plain, _ = residual_mlp(6, seed=1)
    plain.load_weights(path)
    np.testing.assert_allclose(
        plain.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6
    )
    # The inner model saved alone is a plain Functional model.
    model.inner.save(os.path.join(tmp_path, "inner.keras"))
    loaded = keras.saving.load_model(os.path.join(tmp_path, "inner.keras"))
    assert not isinstance(loaded, keras_raptr.RandomPartModel)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6
    )


def test_get_config_round_trip():
    model = make_model(seed=5)
    config = model.get_config()
    assert config["blocks"] == [f"block_{i}" for i in range(6)]
    assert config["seed"] == 5
    clone = keras_raptr.RandomPartModel.from_config(config)
    assert [s.block.name for s in clone.blocks] == config["blocks"]


def test_keras_hub_backbone_blocks_found():
    backbone = bert_backbone(3)
    model = keras_raptr.RandomPartModel(backbone)
    assert [s.block for s in model.blocks] == list(backbone.transformer_layers)
    inputs = {
        "token_ids": np.ones((2, 8), "int32"),
        "segment_ids": np.zeros((2, 8), "int32"),
        "padding_mask": np.ones((2, 8), "int32"),
    }
    out = model(inputs)
    ref = backbone(inputs)
    np.testing.assert_allclose(
        ops.convert_to_numpy(out["sequence_output"]),
        ops.convert_to_numpy(ref["sequence_output"]),
        rtol=1e-6,
    )


def test_model_without_blocks_is_an_error():
    inputs = keras.Input((4,))
    plain = keras.Model(inputs, keras.layers.Dense(1)(inputs), name="plain")
    with pytest.raises(ValueError, match="Could not find the residual blocks.*'plain'.*blocks=\\[...\\]"):
        keras_raptr.RandomPartModel(plain)


@pytest.mark.parametrize(
    "pick, match",
    [
        (lambda inner, blocks: [], "`blocks` is empty"),
        (lambda inner, blocks: "block_0", "must be a list"),
        (lambda inner, blocks: [1], "must be a `keras.layers.Layer`"),
        (
            lambda inner, blocks: [keras.layers.Dense(3, name="stranger")],
            "'stranger'\\) is not a layer of model",
        ),
        (
            lambda inner, blocks: [blocks[0], blocks[1], blocks[0]],
            "`blocks\\[2\\]` \\('block_0'\\) is `blocks\\[0\\]` again",
        ),
        # Not residual: the head maps 16 features to 1.
        (
            lambda inner, blocks: [blocks[0], inner.get_layer("head")],
            "block 'head' to return a tensor of its input's shape.*\\(None, 16\\)",
        ),
    ],
)
def test_bad_blocks(pick, match):
    inner, blocks = residual_mlp(2)
    with pytest.raises(ValueError, match=match):
        keras_raptr.RandomPartModel(inner, blocks=pick(inner, blocks))


def test_bad_model_and_seed():
    with pytest.raises(ValueError, match="wraps a `keras.Model`"):
        keras_raptr.RandomPartModel("bert")
    inner, blocks = residual_mlp(2)
    with pytest.raises(ValueError, match="`seed` must be an integer"):
        keras_raptr.RandomPartModel(inner, blocks=blocks, seed="x")


def test_find_blocks_can_be_overridden():
    class ByName(keras_raptr.RandomPartModel):
        def find_blocks(self, model):
            return [l for l in model.layers if l.name.startswith("block_")]

    inner, blocks = residual_mlp(4)
    model = ByName(inner, seed=0)
    assert [s.block for s in model.blocks] == blocks


@pytest.mark.parametrize(
    "optimizer",
    [
        lambda: keras.optimizers.SGD(0.01, momentum=0.9),
        lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1),
    ],
    ids=["momentum", "adamw"],
)
@pytest.mark.parametrize("length", [2, 4], ids=["static", "drawn"])
def test_off_path_blocks_keep_weights_and_optimizer_state(optimizer, length):
    # A block off the path is left out of the optimizer update (momentum and
    # weight decay included), on JAX, TensorFlow and PyTorch alike, whether
    # the path is drawn in the step or, at 2 of 6 with the first and last
    # fixed, the same at every step.
    inner, blocks = residual_mlp(6)
    model = keras_raptr.RandomPartModel(inner, blocks=blocks, seed=0)
    model.compile(optimizer=optimizer(), loss="mse")
    schedule = keras_raptr.StageSchedule(
        [keras_raptr.Stage(6, 1), keras_raptr.Stage(length, 10)], sampling="subset"
    )
    data = regression_data()
    one_step(model, schedule, data)  # step 0: every block

    def slots(i):
        return [
            np.array(v) for v in model.optimizer.variables if f"/block_{i}_" in v.path
        ]

    before_slots = [slots(i) for i in range(6)]
    assert all(before_slots)  # the optimizer keeps state for every block
    before = block_weights(model)
    one_step(model, schedule, data)  # step 1: `length` blocks
    changed = changed_blocks(before, block_weights(model))
    assert len(changed) == length and 0 in changed and 5 in changed
    for i in set(range(6)) - set(changed):
        for a, b in zip(before_slots[i], slots(i)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("jit_compile", [True, False])
def test_trains_with_and_without_jit_compile(jit_compile):
    model = make_model()
    model.compile(
        optimizer=keras.optimizers.SGD(0.01), loss="mse", jit_compile=jit_compile
    )
    schedule = keras_raptr.StageSchedule(
        [keras_raptr.Stage(3, 100)], sampling="subset"
    )
    data = regression_data()
    before = block_weights(model)
    if jit_compile and keras.backend.backend() == "torch":
        with pytest.raises(ValueError, match="does not support `jit_compile=True` on PyTorch"):
            one_step(model, schedule, data)
        return
    one_step(model, schedule, data)
    assert len(changed_blocks(before, block_weights(model))) == 3


def test_save_and_load_weights(tmp_path):
    model, x = trained_model(dropout=0.1)
    path = os.path.join(tmp_path, "model.weights.h5")
    model.save_weights(path)
    other = make_model(seed=0)
    other.load_weights(path)
    np.testing.assert_allclose(
        other.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6
    )


def test_wrapping_the_same_model_twice_reuses_the_skips():
    inner, blocks = residual_mlp(3)
    first = keras_raptr.RandomPartModel(inner, blocks=blocks, seed=0)
    second = keras_raptr.RandomPartModel(inner, blocks=blocks, seed=1)
    assert [id(s) for s in first.blocks] == [id(s) for s in second.blocks]


def test_fit_again_does_not_rebuild_the_model_symbolically():
    # Keras re-runs a symbolic forward pass at every `fit` while any layer is
    # unbuilt; the RandomSkip layers must count as built with their blocks.
    model = make_model()
    schedule = keras_raptr.StageSchedule.from_spec("2-4", total_steps=8)
    data = regression_data()
    one_step(model, schedule, data)
    assert all(layer.built for layer in model._flatten_layers())
    calls = []
    original = model.compute_output_spec

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    model.compute_output_spec = spy
    one_step(model, schedule, data)
    assert calls == []


def test_keras_hub_task_blocks_found_through_its_backbone():
    import keras_hub

    backbone = bert_backbone(2)
    task = keras_hub.models.BertTextClassifier(
        backbone, num_classes=2, preprocessor=None
    )
    model = keras_raptr.RandomPartModel(task, seed=0)
    assert [s.block for s in model.blocks] == list(backbone.transformer_layers)
    assert keras_raptr.__version__


def test_a_task_without_preprocessor_takes_arrays_as_keras_does(monkeypatch):
    # No tf.data or grain pipeline: Keras batches the arrays itself, so the
    # task trains where neither TensorFlow nor grain is installed.
    import keras_hub
    from keras_hub.src.utils import pipeline_model

    def no_pipeline(*args, **kwargs):
        raise AssertionError("built a keras-hub dataset")

    monkeypatch.setattr(pipeline_model, "_build_dataset", no_pipeline)
    task = keras_hub.models.BertTextClassifier(bert_backbone(2), num_classes=2, preprocessor=None)
    model = keras_raptr.RandomPartModel(task, seed=0)
    x = {
        "token_ids": np.ones((4, 8), "int32"),
        "segment_ids": np.zeros((4, 8), "int32"),
        "padding_mask": np.ones((4, 8), "int32"),
    }
    y = np.array([0, 1, 0, 1])
    history = model.fit(x, y, batch_size=2, validation_data=(x, y), verbose=0)
    assert len(history.history["val_loss"]) == 1
    assert model.evaluate(x, y, batch_size=2, verbose=0) is not None
    assert model.predict(x, batch_size=2, verbose=0).shape == (4, 2)


def test_mixed_precision_with_dropout_and_inverse_scaling():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = make_model(dropout=0.1)
        schedule = keras_raptr.StageSchedule(
            [keras_raptr.Stage(3, 100)], sampling="subset", scaling="inverse"
        )
        before = block_weights(model)
        one_step(model, schedule, regression_data())
        assert len(changed_blocks(before, block_weights(model))) == 3
        assert model.blocks[1].dtype_policy.name == "mixed_bfloat16"
    finally:
        keras.mixed_precision.set_global_policy("float32")


class HalfResidual(keras.layers.Layer):
    """`x + dense(x)`; under `mixed_float16` it computes in float16.

    `returns="float32"` casts the sum back, as a block that keeps its
    residual stream in float32 does.
    """

    def __init__(self, returns=None, **kwargs):
        super().__init__(**kwargs)
        self.returns = returns
        self.dense = keras.layers.Dense(8)

    def call(self, x):
        y = x + self.dense(x)
        return y if self.returns is None else ops.cast(y, self.returns)


@pytest.mark.parametrize("returns", [None, "float32"], ids=["compute_dtype", "float32"])
def test_a_custom_residual_layer_under_mixed_float16(returns):
    # The model's float32 `keras.Input` feeds the first block, which
    # computes (and, by default, returns) float16: a floating dtype change,
    # not a block that is not residual.
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        inputs = keras.Input((8,))
        blocks = [HalfResidual(returns, name=f"half_{i}") for i in range(4)]
        x = inputs
        for block in blocks:
            x = block(x)
        inner = keras.Model(inputs, keras.layers.Dense(1)(x))
        model = keras_raptr.RandomPartModel(inner, blocks=blocks, seed=0)
        # A small loss scale: no step is skipped for overflowing float16.
        optimizer = keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD(0.01), initial_scale=4.0
        )
        model.compile(optimizer=optimizer, loss="mse")
        schedule = keras_raptr.StageSchedule([keras_raptr.Stage(3, 100)], sampling="subset")
        data = regression_data()
        for _ in range(2):
            before = block_weights(model)
            one_step(model, schedule, data)
            changed = changed_blocks(before, block_weights(model))
            assert len(changed) == 3 and {0, 3} <= set(changed), changed
        if keras.backend.backend() != "torch":
            if returns is None:
                # Every block returns its input's dtype: the loop step.
                assert list(model.compiled_train_steps) == ["loop"]
                assert model.engine_reason is None
            else:
                # The loop carries one dtype: the conditional step, whose
                # skipped blocks return their input cast to float32.
                assert "conditional" in model.compiled_train_steps
                assert model.engine_reason == (
                    "block 0 ('half_0') returns float32 for a float16 input"
                )
        np.testing.assert_allclose(
            model.predict(data[0], verbose=0), inner.predict(data[0], verbose=0)
        )
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_pytorch_computes_the_path_on_the_host(monkeypatch):
    if keras.backend.backend() != "torch":
        pytest.skip("JAX and TensorFlow decide the path inside the compiled step")
    import torch

    model = make_model(num_blocks=8)
    schedule = keras_raptr.StageSchedule([keras_raptr.Stage(4, 100)])
    x, y = regression_data()
    one_step(model, schedule, (x, y))
    transfers = []
    for name in ("cpu", "item", "__bool__", "numpy", "tolist"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            transfers.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    data = (keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y))
    model.train_function([data])  # one gated step, 6 free blocks
    # The path is a function of (seed, step): no copy from the device.
    assert transfers == []
