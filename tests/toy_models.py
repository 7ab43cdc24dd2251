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
