"""`ProgressiveLayerDrop`: progressive layer dropping (PLD), as a callback.

Method card
-----------
What it does: at step `t` a global keep probability
`θ(t) = (1 - θ̄) e^(-γ t) + θ̄` decays from 1 towards `theta_bar`; block `i`
of `L` (1-based depth) is on the path with `1 - (i / L)(1 - θ(t))`, so deeper
blocks are dropped more often, and a kept block's residual update is scaled
by `1 / keep_prob` during training. Evaluation runs the full network.

When it helps: the paper's setting is BERT pretraining with DeepSpeed, where
PLD trained 24% faster per sample at similar accuracy. It is a peer of RaPTr
with no stages: the path shrinks over time instead of growing.

What it costs: nothing in parameters; the expected block compute falls with
`θ(t)` (`compute_fraction(num_blocks, total_steps)`). Off-path blocks cost
nothing, as for RaPTr.

Paper: Zhang and He, "Accelerating Training of Transformer-Based Language
Models with Progressive Layer Dropping", NeurIPS 2020 (defaults
`theta_bar=0.5`, `gamma=0.001` as in DeepSpeed).
"""

import dataclasses
import math

import keras
import numpy as np

from keras_raptr import schedules
from keras_raptr.strategies.path_strategy import PathStrategy
from keras_raptr.strategies.path_strategy import Plan
from keras_raptr.strategies.stochastic_depth import depth_keep_probabilities


# PLD's maths: the keep probabilities as pure functions of the step and
# the block's depth, and the compute they cost.


def pld_theta(step, theta_bar, gamma):
    """PLD's global keep probability at `step`: `(1 - θ̄) e^(-γ t) + θ̄`."""
    return (1.0 - theta_bar) * math.exp(-gamma * step) + theta_bar

def pld_compute_fraction(theta_bar, gamma, num_blocks, total_steps):
    """Expected block compute of PLD over `total_steps` steps.

    Per step the expected fraction is `1 - c (1 - θ(t))` with
    `c = (L + 1) / (2 L)`; the mean of `θ(t)` over the steps is a geometric
    sum.
    """
    c = (num_blocks + 1) / (2 * num_blocks)
    return 1.0 - c * (1.0 - theta_bar) * (1.0 - mean_decay(gamma, total_steps))

def pld_theta_bar_for(fraction, gamma, num_blocks, total_steps):
    """The `θ̄` at which PLD's compute fraction over `total_steps` is `fraction`."""
    c = (num_blocks + 1) / (2 * num_blocks)
    # The share of the steps' keep probability that `θ̄` decides: 0 when
    # `θ(t)` stays at 1 over the steps (gamma 0, or too small to move it).
    decided = c * (1.0 - mean_decay(gamma, total_steps))
    if decided > 0.0:
        theta_bar = 1.0 - (1.0 - fraction) / decided
        # The ends of the range, as `pld_compute_fraction` gives them, may
        # come back just outside [0, 1]: `1 - fraction` is known to an ulp
        # of 1, which the division by `decided` magnifies.
        tolerance = 1e-12 + 1e-15 / decided
        if -tolerance < theta_bar < 0.0 or 1.0 < theta_bar < 1.0 + tolerance:
            theta_bar = min(1.0, max(0.0, theta_bar))
    else:
        theta_bar = 1.0 if fraction >= 1.0 else -1.0
    if not 0.0 <= theta_bar <= 1.0:
        lowest = pld_compute_fraction(0.0, gamma, num_blocks, total_steps)
        raise ValueError(
            f"Progressive layer dropping cannot reach a compute fraction of "
            f"{fraction:g} on {num_blocks} blocks over {total_steps} steps with "
            f"gamma={gamma:g}: it ranges from {lowest:.3f} (theta_bar=0) to 1. "
            "Use a larger fraction, or a larger gamma or more steps."
        )
    return theta_bar

def mean_decay(gamma, total_steps):
    """The mean of `e^(-γ t)` over `t = 0 .. total_steps - 1`.

    `expm1` keeps a tiny `γ` (1e-20) from dividing zero by zero.
    """
    if gamma == 0 or total_steps <= 1:
        return 1.0
    return math.expm1(-gamma * total_steps) / (total_steps * math.expm1(-gamma))


@dataclasses.dataclass(frozen=True)
class _Plan(Plan):
    theta_bar: float
    gamma: float
    num_blocks: int
    fixed_blocks: tuple = ()
    sampling: str = "bernoulli"
    scaling: str = "inverse"
    off_path_update: str = "skip"

    @property
    def key(self):
        return ("pld",) + dataclasses.astuple(self)

    def tables(self):
        tables = super().tables()
        depth = np.arange(1, self.num_blocks + 1, dtype="float32") / self.num_blocks
        tables["depth"] = depth
        return tables

    def keep(self, step, tables, xp):
        step = xp.cast(step, "float32")
        decay = xp.exp(xp.multiply(step, xp.constant(-self.gamma, "float32")))
        theta = xp.add(
            xp.multiply(decay, xp.constant(1.0 - self.theta_bar, "float32")),
            xp.constant(self.theta_bar, "float32"),
        )
        one = xp.constant(1.0, "float32")
        return one - tables["depth"] * (one - theta)

    def static_path(self, start, stop):
        return self.full_path() if self.theta_bar >= 1.0 else None


@keras.saving.register_keras_serializable(package="keras_raptr")
class ProgressiveLayerDrop(PathStrategy):
    """Progressive layer dropping for a `RandomPartModel` in `fit`.

    Every batch and epoch log carries `path_length`: the expected number of
    blocks on the path at that step.

    Args:
        theta_bar: float in [0, 1]. The keep probability `θ(t)` decays to.
        gamma: float >= 0 and finite as a float32 (at most about 3.4e38;
            the compiled step computes `θ(t)` in float32). The decay rate of
            `θ(t)` per optimizer step.
        off_path_update: `"skip"` (the default: an off-path block's weights
            and optimizer state stay as they are) or `"zero_grad"` (it is
            updated with a zero gradient, at the cost of its optimizer
            update). See `keras_raptr.PathStrategy`.

    Example:

    ```python
    import keras_raptr

    pld = keras_raptr.ProgressiveLayerDrop(theta_bar=0.5, gamma=0.001)
    pld.keep_probabilities_at(0, num_blocks=4)      # [1.0, 1.0, 1.0, 1.0]
    pld.compute_fraction(12, total_steps=10_000)    # about 0.76
    # The same compute as RaPTr 6-8-10-12 (0.75) over 10,000 steps:
    pld = keras_raptr.ProgressiveLayerDrop.from_compute_fraction(
        0.75, num_blocks=12, total_steps=10_000)
    # With a RandomPartModel `model`:
    # model.fit(data, epochs=..., callbacks=[pld])
    ```

    Errors: a `ValueError` naming the value for a `theta_bar` outside
    [0, 1], a negative, NaN or infinite `gamma`, bools, and, in the
    methods, a `step` below 0, a `num_blocks` below 1 or a `total_steps`
    outside [1, 2**31 - 1].
    """

    def __init__(self, theta_bar=0.5, gamma=0.001, off_path_update="skip"):
        super().__init__(off_path_update)
        if not schedules.is_real(theta_bar) or not 0.0 <= theta_bar <= 1.0:
            raise ValueError(
                f"`theta_bar` must be a number in [0, 1], got {theta_bar!r}."
            )
        self.theta_bar = float(theta_bar)
        self.gamma = _check_gamma(gamma)

    @classmethod
    def from_compute_fraction(
        cls, fraction, num_blocks, total_steps, gamma=0.001, off_path_update="skip"
    ):
        """The PLD whose expected block compute over `total_steps` is `fraction`.

        Solves for `theta_bar` at the given `gamma`.
        """
        schedules.check_fraction(fraction)
        gamma = _check_gamma(gamma)
        num_blocks = schedules.check_num_blocks(num_blocks)
        total_steps = schedules.check_steps(total_steps, "total_steps")
        return cls(
            theta_bar=pld_theta_bar_for(
                fraction, gamma, num_blocks, total_steps
            ),
            gamma=gamma,
            off_path_update=off_path_update,
        )

    def theta_at(self, step):
        """The global keep probability `θ(t)` at optimizer step `step`."""
        step = schedules.check_step(step)
        return pld_theta(step, self.theta_bar, self.gamma)

    def keep_probabilities_at(self, step, num_blocks):
        """Each block's keep probability at optimizer step `step`."""
        num_blocks = schedules.check_num_blocks(num_blocks)
        return depth_keep_probabilities(self.theta_at(step), num_blocks)

    def path_length_at(self, step, num_blocks):
        """The expected number of blocks on the path at `step`."""
        return float(sum(self.keep_probabilities_at(step, num_blocks)))

    def compute_fraction(self, num_blocks, total_steps):
        """Expected block compute over `total_steps` steps, relative to full."""
        return pld_compute_fraction(
            self.theta_bar,
            self.gamma,
            schedules.check_num_blocks(num_blocks),
            schedules.check_steps(total_steps, "total_steps"),
        )

    def resolve(self, num_blocks):
        return _Plan(
            self.theta_bar,
            self.gamma,
            schedules.check_num_blocks(num_blocks),
            off_path_update=self.off_path_update,
        )

    def get_config(self):
        return {
            "theta_bar": self.theta_bar,
            "gamma": self.gamma,
            "off_path_update": self.off_path_update,
        }

    def __repr__(self):
        return (
            f"ProgressiveLayerDrop(theta_bar={self.theta_bar:g}, gamma={self.gamma:g}, "
            f"off_path_update={self.off_path_update!r})"
        )


def _check_gamma(gamma):
    # The compiled step multiplies the step by `-gamma` in float32: a gamma
    # that overflows float32 would make `θ(0)` NaN there.
    if (
        not schedules.is_real(gamma)
        or not gamma >= 0.0
        or not math.isfinite(gamma)
        or gamma > float(np.finfo("float32").max)
    ):
        raise ValueError(
            "`gamma` must be a number >= 0 and finite as a float32 (at most "
            f"{float(np.finfo('float32').max):.4g}), got {gamma!r}. A gamma of "
            "a few units already decays `θ(t)` to `theta_bar` within a few steps."
        )
    return float(gamma)
