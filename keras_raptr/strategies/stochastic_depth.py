"""`StochasticDepth`: stochastic depth, as a callback for `model.fit`.

Method card
-----------
What it does: every block is on the path with a constant probability, the
same for every block (`distribution="uniform"`) or decreasing linearly with
depth to `keep_prob` at the last block (`"linear"`: block `i` of `L`, 1-based,
keeps with `1 - (i / L)(1 - keep_prob)`). A kept block's residual update is
scaled by `1 / keep_prob` during training (the same as scaling by the keep
probability at test time); evaluation runs the full network.

When it helps: as a regulariser for very deep residual networks, and as the
constant-probability control for RaPTr and PLD at the same compute (no
stages, no schedule): `from_compute_fraction`.

What it costs: nothing in parameters; the expected block compute is the mean
keep probability (`compute_fraction(num_blocks)`).

Paper: Huang, Sun, Liu, Sedra, Weinberger, "Deep Networks with Stochastic
Depth", ECCV 2016.
"""

import dataclasses

import keras
import numpy as np

from keras_raptr import schedules
from keras_raptr.strategies.path_strategy import PathStrategy
from keras_raptr.strategies.path_strategy import Plan

DISTRIBUTIONS = ("uniform", "linear")


# Stochastic depth's maths: per-block keep probabilities, and the one
# that costs a given compute.


def depth_keep_probabilities(theta, num_blocks):
    """Keep probability of block `i` (1-based depth): `1 - (i / L)(1 - θ)`."""
    return [1.0 - (i / num_blocks) * (1.0 - theta) for i in range(1, num_blocks + 1)]

def stochastic_depth_keep_probabilities(keep_prob, num_blocks, distribution):
    """Per-block keep probabilities of stochastic depth."""
    if distribution == "uniform":
        return [float(keep_prob)] * num_blocks
    return depth_keep_probabilities(keep_prob, num_blocks)

def stochastic_depth_keep_prob_for(fraction, num_blocks, distribution):
    """The `keep_prob` at which stochastic depth's compute fraction is `fraction`."""
    if distribution == "uniform":
        keep_prob = fraction
    else:
        keep_prob = 1.0 - (1.0 - fraction) * 2 * num_blocks / (num_blocks + 1)
    if not 0.0 < keep_prob <= 1.0:
        raise ValueError(
            f"Stochastic depth ({distribution}) cannot reach a compute fraction of "
            f"{fraction:g} on {num_blocks} blocks: with the linear rule the "
            f"lowest is {(num_blocks + 1) / (2 * num_blocks):.3f}."
        )
    return keep_prob


@dataclasses.dataclass(frozen=True)
class _Plan(Plan):
    keep_probabilities: tuple
    num_blocks: int
    fixed_blocks: tuple = ()
    sampling: str = "bernoulli"
    scaling: str = "inverse"
    off_path_update: str = "skip"

    @property
    def key(self):
        return ("stochastic_depth",) + dataclasses.astuple(self)

    def tables(self):
        tables = super().tables()
        tables["keep"] = np.asarray(self.keep_probabilities, "float32")
        return tables

    def keep(self, step, tables, xp):
        return tables["keep"]

    def static_path(self, start, stop):
        return self.full_path() if min(self.keep_probabilities) >= 1.0 else None


@keras.saving.register_keras_serializable(package="keras_raptr")
class StochasticDepth(PathStrategy):
    """Stochastic depth for a `RandomPartModel` in `fit`.

    Every batch and epoch log carries `path_length`: the expected number of
    blocks on the path.

    Args:
        keep_prob: float in (0, 1]. The keep probability of every block
            (`"uniform"`) or of the last block (`"linear"`).
        distribution: `"uniform"` or `"linear"` (decreasing with depth).
        off_path_update: `"skip"` (the default: an off-path block's weights
            and optimizer state stay as they are) or `"zero_grad"` (it is
            updated with a zero gradient, at the cost of its optimizer
            update). See `keras_raptr.PathStrategy`.

    Example:

    ```python
    import keras_raptr

    sd = keras_raptr.StochasticDepth(0.5, distribution="linear")
    sd.keep_probabilities_at(0, num_blocks=4)   # [0.875, 0.75, 0.625, 0.5]
    # The same compute as RaPTr 6-8-10-12 (0.75) on 12 blocks:
    sd = keras_raptr.StochasticDepth.from_compute_fraction(0.75, num_blocks=12)
    assert abs(sd.compute_fraction(12) - 0.75) < 1e-9
    ```

    Errors: a `ValueError` naming the value for a `keep_prob` outside
    (0, 1] (NaN and bools included), an unknown `distribution`, and, in the
    methods, a `step` below 0 or a `num_blocks` below 1.
    """

    def __init__(self, keep_prob, distribution="uniform", off_path_update="skip"):
        super().__init__(off_path_update)
        if not schedules.is_real(keep_prob) or not 0.0 < keep_prob <= 1.0:
            raise ValueError(
                f"`keep_prob` must be a number in (0, 1], got {keep_prob!r}."
            )
        if distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"`distribution` must be one of {DISTRIBUTIONS}, got {distribution!r}."
            )
        self.keep_prob = float(keep_prob)
        self.distribution = distribution

    @classmethod
    def from_compute_fraction(
        cls, fraction, num_blocks, distribution="uniform", off_path_update="skip"
    ):
        """The stochastic depth whose expected block compute is `fraction`."""
        schedules.check_fraction(fraction)
        num_blocks = schedules.check_num_blocks(num_blocks)
        if distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"`distribution` must be one of {DISTRIBUTIONS}, got {distribution!r}."
            )
        return cls(
            stochastic_depth_keep_prob_for(fraction, num_blocks, distribution),
            distribution=distribution,
            off_path_update=off_path_update,
        )

    def keep_probabilities_at(self, step, num_blocks):
        """Each block's keep probability (the same at every step)."""
        schedules.check_step(step)
        return stochastic_depth_keep_probabilities(
            self.keep_prob, schedules.check_num_blocks(num_blocks), self.distribution
        )

    def path_length_at(self, step, num_blocks):
        """The expected number of blocks on the path."""
        return float(sum(self.keep_probabilities_at(step, num_blocks)))

    def compute_fraction(self, num_blocks):
        """Expected block compute relative to training every block."""
        num_blocks = schedules.check_num_blocks(num_blocks)
        return self.path_length_at(0, num_blocks) / num_blocks

    def resolve(self, num_blocks):
        return _Plan(
            tuple(self.keep_probabilities_at(0, num_blocks)),
            num_blocks,
            off_path_update=self.off_path_update,
        )

    def get_config(self):
        return {
            "keep_prob": self.keep_prob,
            "distribution": self.distribution,
            "off_path_update": self.off_path_update,
        }

    def __repr__(self):
        return (
            f"StochasticDepth(keep_prob={self.keep_prob:g}, "
            f"distribution={self.distribution!r}, "
            f"off_path_update={self.off_path_update!r})"
        )
