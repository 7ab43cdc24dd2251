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



class Narrowing(keras.layers.Layer):
    """Not residual: 16 features in, 12 out."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(12)

    def call(self, x):
        return self.dense(x)


class ToInt(keras.layers.Layer):
    """Not residual: the input's shape, but integers.

    (A floating dtype change, float32 in and float16 out, is residual: see
    `test_a_custom_residual_layer_under_mixed_float16`.)
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(16)

    def call(self, x):
        return ops.cast(x + self.dense(x), "int32")


@pytest.mark.parametrize("on", [True, False], ids=["on_path", "off_path"])
@pytest.mark.parametrize(
    "block, match",
    [
        (
            Narrowing,
            "block 'bad' to return a tensor of its input's shape.*Input shape: \\(4, 16\\), "
            "output: \\(4, 12\\)\\. Wrap only residual blocks",
        ),
        (
            ToInt,
            "block 'bad' to return its input's dtype.*input: float32, output: int32\\. Wrap "
            "only residual blocks, or cast",
        ),
    ],
    ids=["shape", "dtype"],
)
def test_a_gated_block_that_is_not_residual_is_an_error(block, match, on):
    if not on and keras.backend.backend() != "torch":
        pytest.skip(
            "JAX and TensorFlow check a block when a step traces it on the path"
        )
    skip = keras_raptr.layers.RandomSkip(block(name="bad"))
    x = np.ones((4, 16), "float32")
    skip.block(x)  # Built outside a step: the block runs, unchecked.
    # What a training step sets: a path known on the host (PyTorch, a static
    # path, a gathered position). Off the path, PyTorch traces the block
    # symbolically, once per input shape, so the first step fails.
    skip._gate = (on, None)
    try:
        with pytest.raises(ValueError, match=match):
            skip.block(x)
    finally:
        skip._gate = None


class TwoWidths(keras.Model):
    """A subclassed model that pads a narrowed output back to 16 features."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.stem = keras.layers.Dense(16)
        self.body = [
            ResidualBlock(16, name="first"),
            Narrowing(name="narrowing"),
            ResidualBlock(16, name="third"),
            ResidualBlock(16, name="last"),
        ]
        self.head = keras.layers.Dense(1)

    def call(self, x):
        x = self.stem(x)
        for block in self.body:
            x = block(x)
            if x.shape[-1] != 16:
                x = ops.pad(x, [[0, 0], [0, 16 - x.shape[-1]]])
        return self.head(x)


def test_a_block_that_is_not_residual_fails_fit_before_any_step():
    keras.utils.set_random_seed(0)
    inner = TwoWidths()
    x = np.ones((16, 8), "float32")
    y = np.ones((16, 1), "float32")
    inner(x[:2])
    # Not a Functional model: nothing to check when wrapped.
    model = keras_raptr.RandomPartModel(inner, blocks=inner.body, seed=0)
    model.compile(optimizer="sgd", loss="mse")
    schedule = keras_raptr.StageSchedule(
        [keras_raptr.Stage(3, 2), keras_raptr.Stage(4, 2)], sampling="subset"
    )
    match = "block 'narrowing' to return a tensor of its input's shape.*output: \\(8, 12\\)"
    with pytest.raises(ValueError, match=match):
        model.fit(x, y, batch_size=8, epochs=1, callbacks=[schedule], verbose=0)
    # No step ran, and the model is whole (on JAX, the state of the failed
    # step's trace is handed back to the variables).
    assert int(model.optimizer.iterations) == 0
    np.testing.assert_allclose(model.predict(x, verbose=0), inner.predict(x, verbose=0))
