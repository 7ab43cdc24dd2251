"""One set of array functions over numpy (the host) and `keras.ops` (the step).

A plan or the path is written once against an `xp` namespace: `NUMPY`
computes it on the host, in `on_train_batch_begin` or a test, without
touching a device; `KERAS` computes it inside the compiled train step. Both
use the same integer and float32 operations, so their results are equal.
"""

import numpy as np
from keras import ops


class _Numpy:
    name = "numpy"

    @staticmethod
    def constant(value, dtype):
        return np.asarray(value, dtype=dtype)

    @staticmethod
    def cast(x, dtype):
        return np.asarray(x).astype(dtype)

    add = staticmethod(np.add)
    multiply = staticmethod(np.multiply)
    bitwise_xor = staticmethod(np.bitwise_xor)
    bitwise_and = staticmethod(np.bitwise_and)
    right_shift = staticmethod(np.right_shift)
    less = staticmethod(np.less)
    equal = staticmethod(np.equal)
    greater_equal = staticmethod(np.greater_equal)
    logical_or = staticmethod(np.logical_or)
    logical_and = staticmethod(np.logical_and)
    where = staticmethod(np.where)
    exp = staticmethod(np.exp)
    maximum = staticmethod(np.maximum)
    arange = staticmethod(np.arange)

    @staticmethod
    def sum(x, axis=None):
        return np.sum(x, axis=axis)

    @staticmethod
    def take(x, index, axis=None):
        return np.take(x, index, axis=axis)


class _Keras:
    name = "keras"

    @staticmethod
    def constant(value, dtype):
        return ops.convert_to_tensor(np.asarray(value, dtype=dtype))

    cast = staticmethod(ops.cast)
    add = staticmethod(ops.add)
    multiply = staticmethod(ops.multiply)
    bitwise_xor = staticmethod(ops.bitwise_xor)
    bitwise_and = staticmethod(ops.bitwise_and)
    right_shift = staticmethod(ops.right_shift)
    less = staticmethod(ops.less)
    equal = staticmethod(ops.equal)
    greater_equal = staticmethod(ops.greater_equal)
    logical_or = staticmethod(ops.logical_or)
    logical_and = staticmethod(ops.logical_and)
    where = staticmethod(ops.where)
    exp = staticmethod(ops.exp)
    maximum = staticmethod(ops.maximum)

    @staticmethod
    def arange(n, dtype="int32"):
        return ops.arange(n, dtype=dtype)

    @staticmethod
    def sum(x, axis=None):
        return ops.sum(x, axis=axis)

    @staticmethod
    def take(x, index, axis=None):
        return ops.take(x, index, axis=axis)


NUMPY = _Numpy()
KERAS = _Keras()
