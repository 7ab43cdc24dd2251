import keras
import numpy as np
import pytest
from keras import ops

import keras_raptr
from toy_models import ResidualBlock


def test_outside_training_step_is_the_block():
    block = ResidualBlock(4)
    x = np.random.rand(3, 4).astype("float32")
    expected = ops.convert_to_numpy(block(x))
    skip = keras_raptr.layers.RandomSkip(block)
    np.testing.assert_allclose(ops.convert_to_numpy(skip(x)), expected, rtol=1e-6)
    np.testing.assert_allclose(
        ops.convert_to_numpy(skip(x, training=True)), expected, rtol=1e-6
    )
    # The block itself keeps its class and weights.
    assert isinstance(block, ResidualBlock)
    assert len(skip.weights) == len(block.weights) == 2


def test_config_round_trip():
    skip = keras_raptr.layers.RandomSkip(ResidualBlock(4, dropout=0.1, name="b"))
    config = skip.get_config()
    restored = keras_raptr.layers.RandomSkip.from_config(config)
    assert restored.name == skip.name == "random_skip_b"
    assert isinstance(restored.block, ResidualBlock)
    assert restored.block.get_config() == skip.block.get_config()
    serialized = keras.saving.serialize_keras_object(skip)
    again = keras.saving.deserialize_keras_object(serialized)
    assert again.block.dropout == 0.1


def test_wrapping_twice_is_an_error():
    block = ResidualBlock(4, name="twice")
    keras_raptr.layers.RandomSkip(block)
    with pytest.raises(ValueError, match="'twice' is already wrapped"):
        keras_raptr.layers.RandomSkip(block)


def test_not_a_layer_is_an_error():
    with pytest.raises(ValueError, match="wraps a `keras.layers.Layer`"):
        keras_raptr.layers.RandomSkip(lambda x: x)


def test_shape_changing_block_is_an_error():
    inputs = keras.Input((8,))
    x = keras.layers.Dense(8)(inputs)
    bad = keras.layers.Dense(4, name="narrowing")
    y = bad(x)
    y = keras.layers.Dense(1)(keras.layers.Dense(4)(y))
    inner = keras.Model(inputs, y)
    # Known from the Functional graph: an error when wrapped, before any
    # step could skip the block.
    with pytest.raises(ValueError, match="block 'narrowing' to return a tensor of its input's shape"):
        keras_raptr.RandomPartModel(inner, blocks=[bad], seed=0)

