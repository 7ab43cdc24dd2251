"""Tiny models shared by the tests: built from config in milliseconds."""

import keras
import numpy as np


@keras.saving.register_keras_serializable(package="keras_raptr_tests")
class ResidualBlock(keras.layers.Layer):
    """`x + dropout(relu(dense(x)))`: a residual block with random state."""

    def __init__(self, width, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.width = width
        self.dropout = dropout
        self.dense = keras.layers.Dense(width, activation="relu")
        self.drop = keras.layers.Dropout(dropout)

    def build(self, input_shape):
        self.dense.build(input_shape)

    def call(self, x, training=None):
        return x + self.drop(self.dense(x), training=training)

    def get_config(self):
        config = super().get_config()
        config.update({"width": self.width, "dropout": self.dropout})
        return config


def residual_mlp(num_blocks=6, width=16, dropout=0.0, seed=0):
    """A Functional model: Dense, `num_blocks` residual blocks, Dense head."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8,), name="features")
    x = keras.layers.Dense(width, name="stem")(inputs)
    blocks = [
        ResidualBlock(width, dropout=dropout, name=f"block_{i}")
        for i in range(num_blocks)
    ]
    for block in blocks:
        x = block(x)
    outputs = keras.layers.Dense(1, name="head")(x)
    return keras.Model(inputs, outputs, name="residual_mlp"), blocks


def regression_data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype("float32")
    y = rng.normal(size=(n, 1)).astype("float32")
    return x, y


def block_weights(model):
    """A numpy copy of each block's weights, in depth order."""
    return [[np.array(w) for w in skip.block.weights] for skip in model.blocks]


def changed_blocks(before, after):
    """Indices of the blocks whose weights differ between two snapshots."""
    return [
        i
        for i, (b, a) in enumerate(zip(before, after))
        if any(not np.array_equal(x, y) for x, y in zip(b, a))
    ]


class BatchLogs(keras.callbacks.Callback):
    """Records every batch and epoch log of a `fit`."""

    def __init__(self):
        super().__init__()
        self.batches = []
        self.epochs = []

    def on_train_batch_end(self, batch, logs=None):
        self.batches.append(dict(logs))

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(dict(logs))


def fixed_weights(model, seed=0, scale=0.3):
    """Sets every weight from numpy: the same model on every backend."""
    rng = np.random.default_rng(seed)
    model.set_weights(
        [rng.normal(scale=scale, size=w.shape).astype(w.dtype) for w in model.get_weights()]
    )


def head_reads_block(index, num_blocks=6, width=8):
    """Residual blocks whose head also reads block `index`'s output.

    Not one chain: block `index`'s output feeds the next block *and* an
    `Add` before the head, so a step may not run the blocks as a loop.
    """
    inputs = keras.Input((8,), name="features")
    x = keras.layers.Dense(width, name="stem")(inputs)
    blocks = [ResidualBlock(width, name=f"block_{i}") for i in range(num_blocks)]
    outputs = []
    for block in blocks:
        x = block(x)
        outputs.append(x)
    x = keras.layers.Add(name="skip_head")([outputs[index], outputs[-1]])
    outputs = keras.layers.Dense(1, name="head")(x)
    return keras.Model(inputs, outputs, name="head_reads_block"), blocks


class LoopedModel(keras.Model):
    """A subclassed model calling its blocks in a Python loop: no graph."""

    def __init__(self, num_blocks=4, width=16, **kwargs):
        super().__init__(**kwargs)
        self.stem = keras.layers.Dense(width)
        self.stack = [ResidualBlock(width, name=f"block_{i}") for i in range(num_blocks)]
        self.head = keras.layers.Dense(1)

    def call(self, x, training=None):
        x = self.stem(x)
        for block in self.stack:
            x = block(x, training=training)
        return self.head(x)
