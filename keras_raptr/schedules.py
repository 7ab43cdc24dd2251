"""Pure functions that describe a RaPTr schedule.

Everything here is a plain function of its arguments (no Keras state, no
tensors), in the spirit of optax schedules: a schedule is a list of `Stage`s,
and every question about it ("which stage is step 1234 in?", "how likely is
block 5 to be on the path?", "how much compute does the whole run cost?") is
answered by a function of `(stages, step)` or `(stages, num_blocks)`.

The callback (`keras_raptr.StageSchedule`) and the model
(`keras_raptr.RandomPartModel`) both read these functions, so the host-side
bookkeeping and the compiled train step can never disagree. Gradual stacking
reads the stage functions too, and every strategy the argument checks.
PLD's and stochastic depth's maths live with their method cards, in
`strategies/progressive_layer_drop.py` and `strategies/stochastic_depth.py`.
"""

import dataclasses
import math
import numbers
import operator
import re

SAMPLING_MODES = ("bernoulli", "subset")
SCALING_MODES = ("none", "inverse")
# What the optimizer does to a block off the path at a step: "skip" leaves
# its weights and optimizer state as they are (no update, no cost);
# "zero_grad" updates it with a zero gradient, as an implementation that
# masks the block's output would (moments decay, weight decay applies,
# momentum keeps moving it), at the cost of its update.
OFF_PATH_UPDATES = ("skip", "zero_grad")
# The most optimizer steps a schedule can count: the compiled train step
# compares the optimizer's step count with the stage boundaries as int32.
MAX_STEPS = 2**31 - 1
# A path length in a spec: a plain decimal number ("6", "6.5", ".5").
_SPEC_NUMBER = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+")


def check_steps(value, name, minimum=1):
    """`value` as an int in `[minimum, MAX_STEPS]`, or a `ValueError` naming it.

    Bools and floats (even integral ones, such as `3.0`) are refused; numpy
    integers are accepted.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(
            f"`{name}` must be an integer number of optimizer steps, got "
            f"{name}={value!r} ({type(value).__name__}). Pass an int, e.g. "
            f"`int({name})`."
        )
    if value < minimum:
        raise ValueError(
            f"`{name}` must be at least {minimum}, got {name}={value!r}."
        )
    if value > MAX_STEPS:
        raise ValueError(
            f"`{name}` must be at most {MAX_STEPS} (2**31 - 1), got {name}={value!r}: "
            "the compiled train step compares the optimizer's step count as a "
            "32-bit integer. Use fewer steps."
        )
    return int(value)


def is_real(value):
    """A real number that is not a bool (numpy floats and ints included).

    `numpy.bool_` is not a `numbers.Real`; Python's `bool` is.
    """
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_fraction(fraction):
    """Raises a `ValueError` unless `fraction` is a compute fraction in (0, 1]."""
    if not is_real(fraction) or not 0.0 < fraction <= 1.0:
        raise ValueError(
            f"`fraction` must be a number in (0, 1], got {fraction!r}."
        )


def check_step(step):
    """An optimizer step (an integer >= 0) as an int, or a `ValueError`."""
    if not isinstance(step, bool):
        try:
            index = operator.index(step)
        except (TypeError, AttributeError):
            index = None
            # A scalar tensor or variable of an integer dtype, such as
            # `model.optimizer.iterations`.
            if "int" in str(getattr(step, "dtype", "")):
                try:
                    index = int(step)
                except (TypeError, ValueError):
                    index = None
        if index is not None and index >= 0:
            return index
    raise ValueError(
        f"`step` must be an optimizer step, an integer >= 0, got step={step!r}."
    )


def check_num_blocks(num_blocks):
    """`num_blocks` as a positive int, or a `ValueError` naming it."""
    if (
        isinstance(num_blocks, bool)
        or not isinstance(num_blocks, numbers.Integral)
        or num_blocks < 1
    ):
        raise ValueError(
            "`num_blocks` must be a positive integer, the model's number of "
            f"blocks (`len(model.blocks)`), got num_blocks={num_blocks!r}."
        )
    return int(num_blocks)


def check_off_path_update(off_path_update):
    """Raises a `ValueError` unless `off_path_update` is one of `OFF_PATH_UPDATES`."""
    if off_path_update not in OFF_PATH_UPDATES:
        raise ValueError(
            f"`off_path_update` must be one of {OFF_PATH_UPDATES}, got "
            f"{off_path_update!r}: 'skip' leaves an off-path block's weights and "
            "optimizer state as they are; 'zero_grad' updates them with a zero "
            "gradient."
        )
    return off_path_update


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of a RaPTr schedule.

    A stage lasts `steps` optimizer steps; during it, each training step runs
    a random path whose expected length is `path_length` blocks, and each
    block on the path keeps a random `width` of its attention heads and
    feed-forward units (width-wise parts: `keras_raptr.layers.WidthParts`).

    Args:
        path_length: float. The expected number of residual blocks on the
            path during this stage, fixed blocks included. Need not be an
            integer with `sampling="bernoulli"`.
        steps: int. How many optimizer steps the stage lasts, from 1 to
            `2**31 - 1` (the compiled train step counts steps as 32-bit
            integers). Floats, even integral ones, are refused.
        width: float in `(0, 1]`, default 1. The fraction of each on-path
            block's attention heads and feed-forward hidden units that a
            training step runs (the same count in every block, rounded to
            whole heads, or whole key/value groups under grouped-query
            attention, and whole units; at least one of each). 1 runs every
            block at its full width.

    Example:

    ```python
    import keras_raptr

    stages = [keras_raptr.Stage(6, 1000), keras_raptr.Stage(12, 1000)]
    # Width-wise: every block, half of its heads and units, then all.
    stages = [keras_raptr.Stage(12, 1000, width=0.5), keras_raptr.Stage(12, 1000)]
    ```
    """

    path_length: float
    steps: int
    width: float = 1.0

    def __post_init__(self):
        if isinstance(self.path_length, bool) or not isinstance(
            self.path_length, numbers.Real
        ):
            raise ValueError(
                "`Stage.path_length` must be a number of blocks, got "
                f"path_length={self.path_length!r}."
            )
        if not math.isfinite(self.path_length) or self.path_length <= 0:
            raise ValueError(
                "`Stage.path_length` must be a positive number of blocks, "
                f"got path_length={self.path_length!r}."
            )
        if (
            isinstance(self.steps, bool)
            or not isinstance(self.steps, numbers.Integral)
            or self.steps <= 0
        ):
            raise ValueError(
                "`Stage.steps` must be a positive integer number of optimizer "
                f"steps, got steps={self.steps!r}."
            )
        check_steps(self.steps, "Stage.steps")
        check_width(self.width, "Stage.width")
        object.__setattr__(self, "path_length", float(self.path_length))
        object.__setattr__(self, "steps", int(self.steps))
        object.__setattr__(self, "width", float(self.width))

    def get_config(self):
        return {"path_length": self.path_length, "steps": self.steps, "width": self.width}


def check_width(width, name="width"):
    """Raises a `ValueError` unless `width` is a fraction in `(0, 1]`."""
    if not is_real(width) or not math.isfinite(width) or not 0.0 < width <= 1.0:
        raise ValueError(
            f"`{name}` must be the fraction of each block's heads and units a "
            f"step runs, a number in (0, 1], got {name}={width!r}. Use 1 for "
            "the full width."
        )


def stage_list(stages):
    """`stages` as a list of `Stage` (configs accepted), or a clear error."""
    if isinstance(stages, Stage) or not hasattr(stages, "__iter__"):
        raise ValueError(
            f"`stages` must be a list of `keras_raptr.Stage`, got {stages!r}."
        )
    stages = [Stage(**stage) if isinstance(stage, dict) else stage for stage in stages]
    if not stages:
        raise ValueError("`stages` is empty: pass at least one `keras_raptr.Stage`.")
    for i, stage in enumerate(stages):
        if not isinstance(stage, Stage):
            raise ValueError(
                f"`stages[{i}]` must be a `keras_raptr.Stage`, got {stage!r}."
            )
    total = sum(stage.steps for stage in stages)
    if total > MAX_STEPS:
        raise ValueError(
            f"The stages last {total} optimizer steps in all, more than "
            f"{MAX_STEPS} (2**31 - 1): the compiled train step compares the "
            "optimizer's step count with the stage boundaries as 32-bit "
            "integers. Use fewer steps."
        )
    return stages


def parse_spec(spec, total_steps, stage_lengths=None):
    """Parses the paper's notation into stages.

    `"6-8-10-12"` with `total_steps=1000` gives four stages of 250 steps with
    expected path lengths 6, 8, 10 and 12. When `total_steps` does not divide
    evenly, the remainder goes to the last stage.

    `stage_lengths` sets other lengths: one entry per stage, either integer
    steps that add up to `total_steps`, or fractions of `total_steps` that
    add up to 1 (each stage gets `floor(fraction * total_steps)` steps and
    the last stage the rest). `(0.2, 0.2, 0.2, 0.4)` with 1000 steps gives
    stages of 200, 200, 200 and 400 steps.

    Path lengths are plain decimal numbers (`"6"`, `"6.5"`); whitespace
    around them is ignored. They need not grow from stage to stage.

    A stage may add `@width`, the fraction of each block's heads and units
    it runs (`Stage.width`; 1 without it): `"12@0.5-12@0.75-12"` trains
    every block at half, then three quarters, then full width, and
    `"6@0.5-8-10-12"` starts with 6 blocks at half width.

    Args:
        spec: str, path lengths separated by `-`, e.g. `"6-8-10-12"`, each
            optionally with `@width`, e.g. `"12@0.5-12"`.
        total_steps: int, the number of optimizer steps of the whole schedule.
            Must be at least the number of stages and at most `2**31 - 1`.
        stage_lengths: optional sequence, one entry per stage: ints (steps)
            or floats (fractions). `None` splits the steps equally.

    Returns:
        A list of `Stage`.
    """
    if not isinstance(spec, str):
        raise ValueError(
            "A schedule spec must be a string of path lengths joined by '-', "
            f"such as '6-8-10-12'; got {spec!r}."
        )
    if not spec.strip():
        raise ValueError(
            f"The schedule spec {spec!r} is empty. Write positive path lengths "
            "joined by '-', such as '6-8-10-12'."
        )
    lengths, widths = [], []
    for i, part in enumerate(spec.strip().split("-")):
        text, _, width_text = part.strip().partition("@")
        text = text.strip()
        widths.append(_spec_width(spec, i, width_text) if _ else 1.0)
        if not text:
            raise ValueError(
                f"Could not parse the schedule spec {spec!r}: stage {i} is empty "
                "(a '-' at an end, or two in a row). Path lengths are positive "
                "and '-' only separates them: write e.g. '6-8-10-12'."
            )
        value = float(text) if _SPEC_NUMBER.fullmatch(text) else None
        if value is None or value <= 0:
            raise ValueError(
                f"Could not parse the schedule spec {spec!r}: {text!r} is not a "
                "positive number. Write positive path lengths (plain decimals) "
                "joined by '-', such as '6-8-10-12'."
            )
        lengths.append(value)
    if (
        isinstance(total_steps, bool)
        or not isinstance(total_steps, numbers.Integral)
        or total_steps < len(lengths)
    ):
        raise ValueError(
            f"`total_steps` must be an integer of at least {len(lengths)} (one "
            f"step per stage of {spec!r}), got total_steps={total_steps!r}."
        )
    check_steps(total_steps, "total_steps")
    if stage_lengths is None:
        per_stage = int(total_steps) // len(lengths)
        steps = [per_stage] * len(lengths)
        steps[-1] += int(total_steps) - per_stage * len(lengths)
    else:
        steps = _stage_steps(spec, len(lengths), int(total_steps), stage_lengths)
    return [Stage(pl, n, w) for pl, n, w in zip(lengths, steps, widths)]


def _spec_width(spec, i, text):
    """The `@width` of stage `i` of `spec`, or a clear error."""
    text = text.strip()
    value = float(text) if _SPEC_NUMBER.fullmatch(text) else None
    if value is None or not 0.0 < value <= 1.0:
        raise ValueError(
            f"Could not parse the schedule spec {spec!r}: stage {i}'s width "
            f"{text!r} is not a number in (0, 1]. Write `path_length@width`, "
            "such as '12@0.5-12'."
        )
    return value


def _stage_steps(spec, num_stages, total_steps, stage_lengths):
    """Each stage's steps from `stage_lengths` (steps or fractions), checked."""
    if isinstance(stage_lengths, (str, bytes)) or not hasattr(stage_lengths, "__len__"):
        raise ValueError(
            "`stage_lengths` must be a sequence with one length per stage, "
            f"got stage_lengths={stage_lengths!r}."
        )
    values = list(stage_lengths)
    if len(values) != num_stages:
        raise ValueError(
            f"`stage_lengths` has {len(values)} entries but {spec!r} has "
            f"{num_stages} stages; give one length per stage."
        )
    if any(
        isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0
        for v in values
    ):
        raise ValueError(
            "`stage_lengths` must be positive numbers (steps, or fractions of "
            f"`total_steps`), got stage_lengths={values!r}."
        )
    if all(isinstance(v, numbers.Integral) for v in values):
        if sum(values) != total_steps:
            raise ValueError(
                f"`stage_lengths` in steps must add up to total_steps={total_steps}, "
                f"got {values!r} (sum {sum(values)}). Or give fractions that add up to 1."
            )
        return [int(v) for v in values]
    if abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(
            f"`stage_lengths` as fractions must add up to 1, got {values!r} "
            f"(sum {sum(values):.6g}). Or give integer steps that add up to "
            f"total_steps={total_steps}."
        )
    steps = [_floor_product(v, total_steps) for v in values[:-1]]
    steps.append(total_steps - sum(steps))
    if min(steps) < 1:
        raise ValueError(
            f"`stage_lengths` {values!r} of total_steps={total_steps} leave a "
            f"stage with no step ({steps!r}); give every stage at least one step."
        )
    return steps


def _floor_product(fraction, total):
    """`floor(fraction * total)`, exact where the product is an integer.

    The float product can fall an ulp short of an integer (`0.29 * 100` is
    `28.999999999999996`): within a relative 1e-12 of an integer, it is that
    integer.
    """
    product = fraction * total
    nearest = round(product)
    if abs(product - nearest) <= 1e-12 * max(1.0, abs(product)):
        return int(nearest)
    return math.floor(product)


def stage_boundaries(stages):
    """The step at which each stage ends (exclusive), in order."""
    ends, total = [], 0
    for stage in stages:
        total += stage.steps
        ends.append(total)
    return ends


def stage_index(stages, step):
    """The 0-based stage that optimizer step `step` trains in.

    Steps at or after the end of the schedule return `len(stages)`: the
    implicit final stage in which the full network trains.
    """
    return sum(1 for end in stage_boundaries(stages) if step >= end)


def path_length_at(stages, step, num_blocks):
    """The expected path length at optimizer step `step`."""
    index = stage_index(stages, step)
    if index == len(stages):
        return float(num_blocks)
    return stages[index].path_length


def width_at(stages, step):
    """The width (fraction of heads and units) at optimizer step `step`."""
    index = stage_index(stages, step)
    return 1.0 if index == len(stages) else stages[index].width


def width_over(stages, start, stop):
    """The width of every step in `[start, stop)`, or `None` if it changes."""
    widths = {width_at(stages, start)}
    begin = 0
    for stage in stages:
        end = begin + stage.steps
        if begin < stop and start < end:
            widths.add(stage.width)
        begin = end
    if stop > begin:
        widths.add(1.0)
    return widths.pop() if len(widths) == 1 else None


def keep_probability(path_length, num_blocks, num_fixed):
    """The probability that a block outside the fixed set is on the path.

    `(path_length - num_fixed) / (num_blocks - num_fixed)`: the paper's
    definition, which makes the expected path length `path_length`.
    """
    free = num_blocks - num_fixed
    if free <= 0:
        return 1.0
    return min(1.0, max(0.0, (path_length - num_fixed) / free))


def sampled_path_length(path_length, sampling):
    """The path length a step really runs on average for a sampling mode.

    `"subset"` runs exactly `round(path_length)` blocks; `"bernoulli"` runs
    `path_length` blocks in expectation.
    """
    if sampling == "subset":
        return float(round(path_length))
    return float(path_length)


def compute_fraction(stages, num_blocks, sampling="bernoulli"):
    """Expected block compute of a schedule relative to full training.

    The ratio of block evaluations (forward and backward) that the schedule
    runs to the `num_blocks * total_steps` that training every block at every
    step would run. Embeddings and heads are not counted.

    Example: `"6-8-10-12"` on 12 blocks is `(6 + 8 + 10 + 12) / 48 = 0.75`.
    A stage's width counts as that fraction of a block (a block's compute
    scales with its heads and units): `"12@0.5-12"` is 0.75 too.
    """
    total = sum(stage.steps for stage in stages)
    used = sum(
        stage.steps * stage.width * sampled_path_length(stage.path_length, sampling)
        for stage in stages
    )
    return used / (num_blocks * total)


def check_fixed_blocks(fixed_blocks):
    """`fixed_blocks` as a tuple of distinct integers (ranges are not checked).

    Raises a `ValueError` for a non-sequence, a non-integer index or an index
    listed twice; negative indices are resolved against a model's block count
    by `normalize_fixed_blocks`.
    """
    if isinstance(fixed_blocks, (str, bytes, numbers.Number)) or not hasattr(
        fixed_blocks, "__iter__"
    ):
        raise ValueError(
            "`fixed_blocks` must be a tuple of block indices, got "
            f"{fixed_blocks!r}; use e.g. (0, -1) or ()."
        )
    fixed_blocks = tuple(fixed_blocks)
    for index in fixed_blocks:
        if isinstance(index, bool) or not isinstance(index, numbers.Integral):
            raise ValueError(
                f"`fixed_blocks` must hold integer block indices, got {index!r} "
                f"in fixed_blocks={fixed_blocks!r}."
            )
    fixed_blocks = tuple(int(index) for index in fixed_blocks)
    if len(set(fixed_blocks)) != len(fixed_blocks):
        raise ValueError(
            f"`fixed_blocks={fixed_blocks!r}` lists the same block index twice. "
            "List each block once."
        )
    return fixed_blocks


def normalize_fixed_blocks(fixed_blocks, num_blocks):
    """Resolves negative indices and checks that each is in range.

    Returns a sorted tuple of non-negative, distinct block indices.
    """
    resolved = []
    for index in fixed_blocks:
        if isinstance(index, bool) or not isinstance(index, numbers.Integral):
            raise ValueError(
                f"`fixed_blocks` must hold integer block indices, got {index!r} "
                f"in fixed_blocks={tuple(fixed_blocks)!r}."
            )
        if not -num_blocks <= index < num_blocks:
            raise ValueError(
                f"`fixed_blocks` index {index} is out of range for a model with "
                f"{num_blocks} blocks: use indices in [{-num_blocks}, "
                f"{num_blocks - 1}]."
            )
        resolved.append(int(index) % num_blocks)
    if len(set(resolved)) != len(resolved):
        hint = (
            " A model of one block has one block to fix: pass "
            "`fixed_blocks=(0,)` (the default (0, -1) names it twice)."
            if num_blocks == 1
            else ""
        )
        raise ValueError(
            f"`fixed_blocks={tuple(fixed_blocks)!r}` names the same block twice "
            f"on a model with {num_blocks} blocks (indices resolve to "
            f"{resolved}). List each block once.{hint}"
        )
    return tuple(sorted(resolved))


def check_subset_lengths(stages):
    """Raises a `ValueError` unless every path length is a whole number.

    `sampling="subset"` runs exactly `path_length` blocks at every step, so a
    fractional path length would be rounded without a word.
    """
    for i, stage in enumerate(stages):
        length = stage.path_length
        if length != math.floor(length):
            raise ValueError(
                f"Stage {i} has path_length={length:g}, but `sampling='subset'` "
                "runs a whole number of blocks at every step. Use "
                f"path_length={math.floor(length)} or {math.ceil(length)}, or "
                f"`sampling='bernoulli'`, which runs {length:g} blocks in "
                "expectation."
            )


def check_stages(stages, num_blocks, num_fixed):
    """Raises a `ValueError` if a stage's path length cannot be sampled."""
    for i, stage in enumerate(stages):
        if stage.path_length > num_blocks:
            raise ValueError(
                f"Stage {i} has path_length={stage.path_length:g}, more than the "
                f"model's {num_blocks} blocks. Use a path length of at most "
                f"{num_blocks}."
            )
        if stage.path_length < num_fixed:
            raise ValueError(
                f"Stage {i} has path_length={stage.path_length:g}, fewer than "
                f"the {num_fixed} fixed blocks that are always on the path. "
                f"Use a path length of at least {num_fixed}, or fewer "
                "`fixed_blocks`."
            )
