"""Layers of keras-raptr."""

from keras_raptr.layers.random_skip import RandomSkip

__all__ = ["RandomSkip"]
