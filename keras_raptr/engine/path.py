"""The path of an optimizer step: a pure function of `(seed, step)`.

Every block gets a uniform draw from a counter-based integer hash of the
model's seed, the optimizer step and the block's index (32-bit integer
arithmetic that wraps, the same on numpy, JAX, TensorFlow and PyTorch). The
strategy's keep probabilities at that step turn the draws into the path.
Nothing is carried from step to step, so:

- the host (numpy) and the compiled step (`keras.ops`) compute the same path,
  which lets the host pick the train function for the step's path length;
- a resumed run, a run with `steps_per_execution`, and every backend train
  the same paths for the same seed.
"""

import numpy as np

from keras_raptr.engine.xp import NUMPY

_C1 = 0x7FEB352D
_C2 = 0x846CA68B - (1 << 32)  # as int32
_GOLDEN = 0x9E3779B9 - (1 << 32)  # as int32
_MANTISSA = 1 << 24


def seed_int32(seed):
    """A Python integer seed as the int32 with the same low 32 bits."""
    return ((int(seed) + (1 << 31)) % (1 << 32)) - (1 << 31)


def _shift_right(x, bits, xp):
    """A logical right shift of int32 values (no sign extension)."""
    shifted = xp.right_shift(x, xp.constant(bits, "int32"))
    return xp.bitwise_and(shifted, xp.constant((1 << (32 - bits)) - 1, "int32"))


def _mix(x, xp):
    """A 32-bit integer finalizer: every output bit depends on every input bit."""
    x = xp.bitwise_xor(x, _shift_right(x, 16, xp))
    x = xp.multiply(x, xp.constant(_C1, "int32"))
    x = xp.bitwise_xor(x, _shift_right(x, 15, xp))
    x = xp.multiply(x, xp.constant(_C2, "int32"))
    return xp.bitwise_xor(x, _shift_right(x, 16, xp))


def uniforms(seed, step, num_blocks, xp):
    """Per-block draws in `[0, 1)` for `step`: float32, `(num_blocks,)`.

    Args:
        seed: int, the model's path seed.
        step: int or integer tensor, the optimizer step.
        num_blocks: int.
        xp: `xp.NUMPY` or `xp.KERAS`.
    """
    key = _mix(xp.constant(seed_int32(seed), "int32"), xp)
    key = _mix(xp.add(key, xp.cast(step, "int32")), xp)
    blocks = xp.multiply(xp.arange(num_blocks, dtype="int32"), xp.constant(_GOLDEN, "int32"))
    bits = _mix(xp.add(key, blocks), xp)
    mantissa = xp.bitwise_and(bits, xp.constant(_MANTISSA - 1, "int32"))
    return xp.multiply(xp.cast(mantissa, "float32"), xp.constant(1.0 / _MANTISSA, "float32"))


def draw(plan, tables, seed, step, xp):
    """The path at `step`: a boolean `(num_blocks,)` array, block on or off.

    `"bernoulli"` sampling: a free block is on when its draw is below its
    keep probability. `"subset"`: the free blocks with the `count` smallest
    draws (ties broken by index). Fixed blocks are always on.
    """
    num_blocks = plan.num_blocks
    fixed = tables["fixed"]
    u = uniforms(seed, step, num_blocks, xp)
    if plan.sampling == "bernoulli":
        return xp.logical_or(fixed, xp.less(u, plan.keep(step, tables, xp)))
    draws = xp.where(fixed, xp.constant(2.0, "float32"), u)
    index = xp.arange(num_blocks, dtype="int32")
    before = xp.logical_or(
        xp.less(draws[None, :], draws[:, None]),
        xp.logical_and(
            xp.equal(draws[None, :], draws[:, None]),
            xp.less(index[None, :], index[:, None]),
        ),
    )
    rank = xp.sum(xp.cast(before, "int32"), axis=1)
    return xp.logical_or(fixed, xp.less(rank, plan.count(step, tables, xp)))


def scales(plan, tables, step, xp):
    """Per-block residual scales at `step` (`None` without inverse scaling).

    A free block's residual update is divided by its keep probability; a
    fixed block is never scaled.
    """
    if plan.scaling != "inverse":
        return None
    keep = plan.keep(step, tables, xp)
    inverse = 1.0 / xp.maximum(keep, xp.constant(1e-6, "float32"))
    return xp.where(tables["fixed"], xp.constant(1.0, "float32"), inverse)


def host_path(plan, tables, seed, step):
    """The path at `step` on the host: a tuple of Python bools."""
    with np.errstate(over="ignore"):
        return tuple(bool(on) for on in draw(plan, tables, seed, step, NUMPY))
