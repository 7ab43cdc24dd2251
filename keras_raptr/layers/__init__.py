"""Layers of keras-raptr, and the width adapters of residual blocks."""

from keras_raptr.layers.random_skip import RandomSkip
from keras_raptr.layers.width_parts import WidthParts
from keras_raptr.layers.width_parts import register_width_parts

__all__ = ["RandomSkip", "WidthParts", "register_width_parts"]
