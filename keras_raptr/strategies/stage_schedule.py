"""`StageSchedule`: the RaPTr schedule, as a callback for `model.fit`.

Method card
-----------
What it does: RaPTr (Random Part Training) trains, at every optimizer step,
only a random *path* through the network's residual blocks. Blocks in
`fixed_blocks` (by default the first and the last) are always on the path;
every other block is on it with probability `p_s` in stage `s`, so that the
expected path length is the stage's `path_length`. Stages grow the path until
the full network trains. Evaluation always runs the full network.

When it helps: pretraining deep residual networks (transformers) under a
compute budget. The paper trains BERT-base with `6-8-10-12` at 0.75 of the
block compute of full training, reaching equal or better loss, and UL2-1.6B
with 1.2x fewer FLOPs and better downstream scores.

What it costs: nothing in parameters. Per step, only the path's blocks run,
forward, backward and in the optimizer: an off-path block's weights and
optimizer state are left as they are (`off_path_update="skip"`). With
`off_path_update="zero_grad"` the optimizer also updates the off-path blocks,
with a zero gradient, as an implementation that masks the skipped blocks'
outputs would: their moments decay and weight decay applies, at the cost of
every block's optimizer update. `compute_fraction()` gives the expected
block compute. On JAX and TensorFlow every stage, every path length and
the full network train through one compiled step (`engine/loop_jax.py`,
`engine/loop_tf.py`): no block runs twice, and no step is compiled per path
length. What that step adds to the path's blocks is memory traffic: each
block's residuals are copied into a workspace and read back (JAX), and the
blocks' state is copied into row storage and back at each epoch's end
(BENCHMARKS.md measures both). Models whose blocks fail the loop step's
checks (`RandomPartModel.engine_reason`) take one conditional per block,
where a path block's forward pass is recomputed in its backward pass on
JAX.

How to use it: wrap the model in `keras_raptr.RandomPartModel` and pass a
`StageSchedule` to `fit`.

Why these defaults (`fixed_blocks=(0, -1)`, `sampling="bernoulli"`,
`scaling="none"`): measured with `benchmarks/quality.py` (a 12-block BERT,
`6-8-10-12`, 720 steps, 3 seeds, JAX; see BENCHMARKS.md), paired by seed
against the defaults: without fixed blocks the held-out loss was worse on
every seed (+0.020 +/- 0.009); `subset` sampling (-0.000 +/- 0.004) and
`inverse` scaling (+0.003 +/- 0.003) made no difference larger than the
seed-to-seed spread. So the defaults stay the paper's; `subset` remains the
choice when a constant cost per step matters.

What was measured against the paper (same benchmark): at 0.75 of the block
compute RaPTr did not reach the baseline's loss at equal steps (+0.044 +/-
0.007, all seeds): the baseline needed 87% of its steps to reach RaPTr's
final loss. At equal wall-clock RaPTr was ahead (1.32x faster; the baseline's
loss at RaPTr's finishing time was 0.026 higher). These are short runs on a
small corpus, far from the paper's scale.

At 3x the steps on a corpus that is not repeated (2160 steps, the State of
the Union addresses, three seeds, BENCHMARKS.md), the gap at equal steps
was 0.032 ± 0.013, and RaPTr was 0.039 ahead at equal FLOPs. The candidate
explanations did not close it:

- `off_path_update="zero_grad"`, the optimizer's view of a mask-based
  implementation, scored -0.005 against `"skip"` (one seed), inside the
  seeds' spread, at 1.04x to 1.36x the step time;
- a warm-up and cosine decay of the learning rate left RaPTr +0.015 behind a
  baseline with the same schedule (one seed);
- stages of a sixth, a sixth, a sixth and a half of the steps were 0.007
  below equal stages on every seed, but spend 0.83 of the compute, and
  do worse at equal FLOPs.

So `off_path_update` stays `"skip"`, the option that costs nothing for the
blocks off the path, and `from_spec` keeps equal stages. At this scale
`GradualStacking` at the same compute came closer to the baseline (0.012).

Width-wise parts (`Stage(..., width=w)`): each on-path block runs a random
`w` of its attention heads and feed-forward units, as narrower matrices
(`engine/width.py`; the blocks need a width adapter,
`keras_raptr.layers.WidthParts`). Measured with `quality.py` (JAX, 2004
steps, three seeds) at the block compute of `6-8-10-12`: the width-wise
`12@0.5-12@0.75-12@0.75-12` ended 0.006 below depth-wise RaPTr at equal
steps on every seed (still 0.020 above the baseline), but its run was only
1.05x faster than the baseline's (depth-wise: 1.56x): a narrow step costs
well above its share on a CPU (1.11x to 1.38x a plain model built at that
width: the gathers and scatters of its slices, small ops with a fixed cost
each; the optimizer updates the kept slices alone), and each width
compiles a step of its own. So width is an option for loss per step, not
yet for seconds.

Paper: Panigrahi, Saunshi, Lyu, Miryoosefi, Reddi, Kale, Kumar, "Efficient
Stagewise Pretraining via Progressive Subnetworks", ICLR 2025,
arXiv 2402.05913.
"""

import dataclasses

import keras
import numpy as np
from keras import ops

from keras_raptr import schedules
from keras_raptr.strategies.path_strategy import PathStrategy
from keras_raptr.strategies.path_strategy import StagedPlan


@dataclasses.dataclass(frozen=True)
class _Plan(StagedPlan):
    """A schedule resolved for a model with a given number of blocks."""

    stages: tuple
    fixed_blocks: tuple
    sampling: str
    scaling: str
    num_blocks: int
    off_path_update: str = "skip"

    @property
    def key(self):
        return dataclasses.astuple(self)

    def tables(self):
        """Constant tables the compiled step reads, as numpy arrays.

        One row per stage plus a last row for the full network after the
        schedule: `ends` (the step each stage ends at), `keep` (keep
        probability per stage and block; fixed blocks 1), `counts` (free
        blocks on the path per stage, for `subset` sampling), `lengths`
        (expected path length per stage), `fixed` (mask of fixed blocks).
        """
        tables = super().tables()
        fixed = tables["fixed"]
        num_fixed = len(self.fixed_blocks)
        lengths = [stage.path_length for stage in self.stages] + [
            float(self.num_blocks)
        ]
        keep = np.ones((len(lengths), self.num_blocks), dtype="float32")
        counts = np.zeros(len(lengths), dtype="int32")
        for s, length in enumerate(lengths):
            length = schedules.sampled_path_length(length, self.sampling)
            counts[s] = int(round(length)) - num_fixed
            keep[s, ~fixed] = schedules.keep_probability(
                length, self.num_blocks, num_fixed
            )
        tables.update(
            {
                "ends": np.asarray(schedules.stage_boundaries(self.stages), "int32"),
                "keep": keep,
                "counts": counts,
                "lengths": np.asarray(lengths, "float32"),
            }
        )
        if any(stage.width != 1.0 for stage in self.stages):
            widths = [stage.width for stage in self.stages] + [1.0]
            tables["widths"] = np.asarray(widths, "float32")
        return tables

    def count(self, step, tables, xp):
        return xp.take(tables["counts"], self.stage(step, tables, xp))

    def width_over(self, start, stop):
        return schedules.width_over(self.stages, start, stop)

    def logs(self, step, tables):
        logs = super().logs(step, tables)
        if "widths" in tables:
            logs["width"] = ops.take(tables["widths"], logs["stage"])
        return logs

    def static_path(self, start, stop):
        """The path of every step in `[start, stop)`, if it is always the same.

        Every block (stages at the full length, and every step after the
        schedule), or only the fixed blocks (stages whose length is the
        number of fixed blocks); `None` when some step draws its path.
        """
        kinds = set()
        begin = 0
        for stage in self.stages:
            end = begin + stage.steps
            if begin < stop and start < end:
                kinds.add(self._stage_kind(stage))
            begin = end
        if stop > begin:
            kinds.add("full")
        kind = kinds.pop() if len(kinds) == 1 else None
        if kind == "full":
            return self.full_path()
        if kind == "fixed":
            return self.fixed_path()
        return None

    def _stage_kind(self, stage):
        length = schedules.sampled_path_length(stage.path_length, self.sampling)
        if length >= self.num_blocks:
            return "full"
        if length <= len(self.fixed_blocks):
            return "fixed"
        return None


@keras.saving.register_keras_serializable(package="keras_raptr")
class StageSchedule(PathStrategy):
    """Grows the random path of a `RandomPartModel` stage by stage in `fit`.

    Each `Stage(path_length, steps)` lasts `steps` optimizer steps. The stage
    of a step is read from the optimizer's step count inside the compiled
    train step, so `fit` called again, `initial_epoch`, and a restored
    checkpoint all continue in the right stage, and a transition happens
    exactly at its boundary step whatever `steps_per_epoch` is. After the last
    stage, the full network trains.

    Every batch and epoch log carries `stage` (0-based; `len(stages)` after
    the schedule) and `path_length` (the expected path length of the stage
    the step trained in; an epoch log reports its last step's), so the
    progress bar, `History` and TensorBoard show them; a schedule with
    width-wise stages also logs `width`.

    Width-wise parts: a stage's `width` below 1 runs each on-path block
    with a random `width` of its attention heads and feed-forward units,
    drawn per step and block from the model's seed (narrower matrices, not
    masks). The blocks need a width adapter (`keras_raptr.layers.WidthParts`;
    keras-hub's transformer blocks have one). The optimizer moves only the
    kept slices under `off_path_update="skip"` (every slice, with a zero
    gradient, under `"zero_grad"`); `scaling="inverse"` scales the kept
    part's output by the inverse of the kept fraction. A step at a width
    below 1 compiles once per width (the conditional step when the path is
    drawn, the plain step when it is the full network), and
    `steps_per_execution` must not span a change of width.

    Args:
        stages: list of `keras_raptr.Stage`, in training order. Their path
            lengths need not grow (the paper's do); together they last at
            most `2**31 - 1` steps.
        fixed_blocks: block indices that are always on the path; negative
            indices count from the last block. Defaults to `(0, -1)`, the
            first and the last block, as in the paper. Each block once:
            `(0, 0)` is an error here, `(0, -4)` on 4 blocks at `fit`.
        sampling: `"bernoulli"` (each block outside `fixed_blocks` is on the
            path independently, with probability
            `(path_length - len(fixed)) / (num_blocks - len(fixed))`, the
            paper's definition) or `"subset"` (exactly `path_length` blocks
            each step, fixed ones included, the rest uniform without
            replacement: a constant cost per step). With `"subset"` every
            path length must be a whole number.
        scaling: `"none"`, or `"inverse"` to divide the residual update of a
            non-fixed block on the path by its keep probability during
            training, as dropout does. Evaluation never scales.
        off_path_update: `"skip"` (the default: an off-path block's weights
            and optimizer state stay as they are) or `"zero_grad"` (it is
            updated with a zero gradient, at the cost of its optimizer
            update). See `keras_raptr.PathStrategy`.

    Example:

    ```python
    import keras_raptr

    schedule = keras_raptr.StageSchedule(
        [keras_raptr.Stage(6, 1000), keras_raptr.Stage(9, 1000),
         keras_raptr.Stage(12, 1000)],
    )
    schedule = keras_raptr.StageSchedule.from_spec("6-8-10-12", total_steps=4000)
    assert schedule.compute_fraction(12) == 0.75
    # With a RandomPartModel `model`:
    # model.fit(data, epochs=..., callbacks=[schedule])
    ```

    Errors: a `ValueError` that names the bad value, at construction for
    what the schedule alone decides (steps, path lengths, spec strings,
    `fixed_blocks` that are not distinct integers, fractional path lengths
    with `sampling="subset"`), and at `fit`, before any step, for what
    depends on the model (a path length above its block count or below the
    number of fixed blocks, a fixed block out of range or named twice once
    negative indices are resolved).
    """

    def __init__(
        self,
        stages,
        fixed_blocks=(0, -1),
        sampling="bernoulli",
        scaling="none",
        off_path_update="skip",
    ):
        super().__init__(off_path_update)
        stages = schedules.stage_list(stages)
        fixed_blocks = schedules.check_fixed_blocks(fixed_blocks)
        if sampling not in schedules.SAMPLING_MODES:
            raise ValueError(
                f"`sampling` must be one of {schedules.SAMPLING_MODES}, got "
                f"{sampling!r}."
            )
        if scaling not in schedules.SCALING_MODES:
            raise ValueError(
                f"`scaling` must be one of {schedules.SCALING_MODES}, got "
                f"{scaling!r}."
            )
        if sampling == "subset":
            schedules.check_subset_lengths(stages)
        self.stages = tuple(stages)
        self.fixed_blocks = fixed_blocks
        self.sampling = sampling
        self.scaling = scaling

    @classmethod
    def from_spec(cls, spec, total_steps, stage_lengths=None, **kwargs):
        """A schedule in the paper's notation.

        `StageSchedule.from_spec("6-8-10-12", total_steps=N)` has four stages
        of `N // 4` steps with expected path lengths 6, 8, 10 and 12; the
        remainder steps go to the last stage (the paper's equal stages).
        `stage_lengths` sets other lengths, as steps or as fractions of `N`:
        `stage_lengths=(0.2, 0.2, 0.2, 0.4)` gives the full network the last
        40% of the steps.

        Args:
            spec: str, path lengths joined by `-` (plain decimals, e.g.
                `"6-8-10-12"`; whitespace around them is ignored).
            total_steps: int, optimizer steps of the whole schedule: at
                least one per stage, at most `2**31 - 1`.
            stage_lengths: optional, one entry per stage: integer steps that
                add up to `total_steps`, or fractions that add up to 1 (each
                stage `floor(fraction * total_steps)` steps, the last the
                rest). `None`: equal stages.
            **kwargs: `fixed_blocks`, `sampling`, `scaling`,
                `off_path_update`.
        """
        return cls(schedules.parse_spec(spec, total_steps, stage_lengths), **kwargs)

    @property
    def total_steps(self):
        """The number of optimizer steps the stages cover."""
        return sum(stage.steps for stage in self.stages)

    def stage_at(self, step):
        """The 0-based stage of optimizer step `step` (`len(stages)` after)."""
        return schedules.stage_index(self.stages, schedules.check_step(step))

    def path_length_at(self, step, num_blocks):
        """The expected path length at optimizer step `step`."""
        return schedules.path_length_at(
            self.stages,
            schedules.check_step(step),
            schedules.check_num_blocks(num_blocks),
        )

    def width_at(self, step):
        """The width (fraction of heads and units) at optimizer step `step`."""
        return schedules.width_at(self.stages, schedules.check_step(step))

    def keep_probabilities_at(self, step, num_blocks):
        """Each block's probability of being on the path at `step`."""
        step = schedules.check_step(step)
        plan = self.resolve(num_blocks)
        keep = plan.tables()["keep"]
        return [float(k) for k in keep[min(self.stage_at(step), len(keep) - 1)]]

    def compute_fraction(self, num_blocks):
        """Expected block compute relative to training all blocks every step.

        Over the schedule's `total_steps`: 0.75 for `6-8-10-12` on 12 blocks.
        """
        num_blocks = self.resolve(num_blocks).num_blocks
        return schedules.compute_fraction(self.stages, num_blocks, self.sampling)

    def resolve(self, num_blocks):
        """Checks the schedule against a model's block count."""
        num_blocks = schedules.check_num_blocks(num_blocks)
        fixed = schedules.normalize_fixed_blocks(self.fixed_blocks, num_blocks)
        schedules.check_stages(self.stages, num_blocks, len(fixed))
        return _Plan(
            self.stages,
            fixed,
            self.sampling,
            self.scaling,
            num_blocks,
            self.off_path_update,
        )

    def get_config(self):
        return {
            "stages": [stage.get_config() for stage in self.stages],
            "fixed_blocks": list(self.fixed_blocks),
            "sampling": self.sampling,
            "scaling": self.scaling,
            "off_path_update": self.off_path_update,
        }

    def __repr__(self):
        lengths = "-".join(
            f"{s.path_length:g}" + (f"@{s.width:g}" if s.width != 1.0 else "")
            for s in self.stages
        )
        return (
            f"StageSchedule({lengths}, total_steps={self.total_steps}, "
            f"fixed_blocks={self.fixed_blocks}, sampling={self.sampling!r}, "
            f"scaling={self.scaling!r}, off_path_update={self.off_path_update!r})"
        )
