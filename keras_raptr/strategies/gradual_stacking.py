"""`GradualStacking`: train a growing prefix of the blocks, as a callback.

Method card
-----------
What it does: stage `s` trains only the first `k_s` blocks (a deterministic
prefix; the other blocks are skipped, forward, backward and in the
optimizer). At the step a stage begins, the newly added blocks are
initialised by copying the top blocks trained so far (`6-9` copies blocks
3, 4, 5 into 6, 7, 8; a stage that more than doubles the depth copies the
whole prefix over and over), together with their optimizer state (momentum,
Adam's moments), so each new block continues where its source was. After the
last stage the full network trains.

When it helps: the gradual stacking baselines of the RaPTr paper (Gong et
al. 2019 for BERT; Reddi et al. 2023). Unlike RaPTr, the blocks beyond the
prefix get no training before their stage, and the network's output during
an early stage is that of a shallower model.

What it costs: nothing in parameters; block compute is the mean prefix
length over the steps (`compute_fraction`: `6-9-12` on 12 blocks is 0.75).
On JAX and TensorFlow every stage runs the one loop step that serves every
path (its prefix is a path like any other); the copies happen on the host.

Limits: `evaluate` and `predict` run the full network, as everywhere in this
library, so during an early stage they include blocks that have not been
stacked yet. `steps_per_execution` must be 1 (the copy happens between
steps).

Papers: Gong, He, Li, Qin, Wang, Liu, "Efficient Training of BERT by
Progressively Stacking", ICML 2019; Reddi, Miryoosefi, Karp, Krishnan, Kale,
Kim, Kumar, "Efficient Training of Language Models using Few-Shot
Learning", ICML 2023.
"""

import dataclasses

import keras
import numpy as np
from keras import ops

from keras_raptr import schedules
from keras_raptr.strategies.path_strategy import PathStrategy
from keras_raptr.strategies.path_strategy import StagedPlan
from keras_raptr.engine.blocks import optimizer_slots
from keras_raptr.engine.steps import step_counter


@dataclasses.dataclass(frozen=True)
class _Plan(StagedPlan):
    depths: tuple
    ends: tuple
    num_blocks: int
    fixed_blocks: tuple = ()
    sampling: str = "bernoulli"
    scaling: str = "none"
    off_path_update: str = "skip"

    # The copies happen between steps, at steps the host must know exactly.
    host_steps = True

    @property
    def key(self):
        return ("stacking",) + dataclasses.astuple(self)

    def tables(self):
        tables = super().tables()
        depths = list(self.depths) + [self.num_blocks]
        keep = np.zeros((len(depths), self.num_blocks), dtype="float32")
        for s, depth in enumerate(depths):
            keep[s, :depth] = 1.0
        tables.update(
            {
                "ends": np.asarray(self.ends, "int32"),
                "keep": keep,
                "lengths": np.asarray(depths, "float32"),
            }
        )
        return tables

    def depth_at(self, step):
        stage = int(np.sum(np.asarray(self.ends) <= step))
        return (list(self.depths) + [self.num_blocks])[stage]

    def static_path(self, start, stop):
        depths = {self.depth_at(step) for step in (start, stop - 1)}
        if len(depths) != 1 or any(start < end < stop for end in self.ends):
            return None
        depth = depths.pop()
        return tuple(i < depth for i in range(self.num_blocks))


@keras.saving.register_keras_serializable(package="keras_raptr")
class GradualStacking(PathStrategy):
    """Gradual stacking for a `RandomPartModel` in `fit`.

    Each `Stage(depth, steps)` trains the first `depth` blocks for `steps`
    optimizer steps; at the step a stage begins, its new blocks are copied
    from the top blocks trained so far, with their optimizer state. Logs
    carry `stage` and `path_length` (the prefix depth).

    Args:
        stages: list of `keras_raptr.Stage`, with whole-number depths that
            grow strictly from stage to stage, lasting at most `2**31 - 1`
            steps in all.
        off_path_update: `"skip"` (the default: the weights and optimizer
            state of a block beyond the stacked prefix stay as they are) or
            `"zero_grad"` (it is updated with a zero gradient, at the cost
            of its optimizer update). See `keras_raptr.PathStrategy`.

    Example:

    ```python
    import keras_raptr

    stacking = keras_raptr.GradualStacking.from_spec("6-9-12", total_steps=3000)
    assert stacking.compute_fraction(12) == 0.75
    stacking.depth_at(1000, num_blocks=12)   # 9
    # With a RandomPartModel `model` of 12 blocks:
    # model.fit(data, epochs=..., callbacks=[stacking])
    ```

    Errors: a `ValueError` naming the value, at construction for a
    fractional or non-growing depth and bad steps, and at `fit`, before any
    step, for a depth above the model's block count,
    `steps_per_execution > 1`, or a copy between blocks whose weights differ
    in shape.
    """

    def __init__(self, stages, off_path_update="skip"):
        super().__init__(off_path_update)
        stages = schedules.stage_list(stages)
        for i, stage in enumerate(stages):
            if stage.width != 1.0:
                raise ValueError(
                    f"Stage {i} has width={stage.width:g}: gradual stacking "
                    "grows depth only. Use `keras_raptr.StageSchedule` for "
                    "width-wise parts, or drop `width`."
                )
            if stage.path_length != int(stage.path_length) or stage.path_length < 1:
                raise ValueError(
                    f"Stage {i} has depth {stage.path_length:g}: stacking trains "
                    "a whole number of blocks, at least 1."
                )
        for i in range(1, len(stages)):
            if stages[i].path_length <= stages[i - 1].path_length:
                raise ValueError(
                    f"Stacking depths must grow from stage to stage; stage {i} "
                    f"has {stages[i].path_length:g} after "
                    f"{stages[i - 1].path_length:g}."
                )
        self.stages = tuple(stages)

    @classmethod
    def from_spec(cls, spec, total_steps, stage_lengths=None, off_path_update="skip"):
        """Stages in the paper's notation (`"6-9-12"`), of equal length.

        `stage_lengths` sets other lengths, as for `StageSchedule.from_spec`:
        one entry per stage, integer steps that add up to `total_steps` or
        fractions that add up to 1.
        """
        return cls(
            schedules.parse_spec(spec, total_steps, stage_lengths),
            off_path_update=off_path_update,
        )

    @property
    def total_steps(self):
        """The number of optimizer steps the stages cover."""
        return sum(stage.steps for stage in self.stages)

    def depth_at(self, step, num_blocks):
        """The number of blocks trained at optimizer step `step`."""
        return self.resolve(num_blocks).depth_at(schedules.check_step(step))

    def keep_probabilities_at(self, step, num_blocks):
        """1 for the blocks of the prefix trained at `step`, else 0."""
        depth = self.depth_at(step, num_blocks)
        return [1.0 if i < depth else 0.0 for i in range(num_blocks)]

    def path_length_at(self, step, num_blocks):
        """The number of blocks on the path at `step` (the prefix depth)."""
        return float(self.depth_at(step, num_blocks))

    def compute_fraction(self, num_blocks):
        """Block compute over `total_steps` relative to full training."""
        num_blocks = self.resolve(num_blocks).num_blocks
        return schedules.compute_fraction(self.stages, num_blocks, "subset")

    def resolve(self, num_blocks):
        num_blocks = schedules.check_num_blocks(num_blocks)
        deepest = max(int(stage.path_length) for stage in self.stages)
        if deepest > num_blocks:
            raise ValueError(
                f"A stage stacks {deepest} blocks, more than the model's "
                f"{num_blocks}. Use depths of at most {num_blocks}."
            )
        return _Plan(
            tuple(int(stage.path_length) for stage in self.stages),
            tuple(int(end) for end in schedules.stage_boundaries(self.stages)),
            num_blocks,
            off_path_update=self.off_path_update,
        )

    # ------------------------------------------------------------------
    # The copy at each transition.

    def set_model(self, model):
        super().set_model(model)
        if int(getattr(model, "steps_per_execution", 1) or 1) > 1:
            raise ValueError(
                "`GradualStacking` needs `steps_per_execution=1`: the new blocks "
                "are copied between two steps. Compile the model with "
                "`steps_per_execution=1`."
            )
        # Every copy the transitions will make, checked before any step.
        plan = self._plan
        for begin in plan.ends:
            depth = plan.depth_at(begin - 1)
            new_depth = plan.depth_at(begin)
            for target, source in enumerate(_sources(depth, new_depth), depth):
                _check_shapes(model.blocks[source].block, model.blocks[target].block)

    def on_train_batch_begin(self, batch, logs=None):
        call = self._call_at(batch)
        _, every = step_counter(self._model.optimizer)
        step, micro = divmod(call, every)
        plan = self._plan
        for begin in plan.ends:
            # Before the first micro-batch of the stage's first optimizer step.
            if step == begin and micro == 0:
                previous = plan.depth_at(begin - 1)
                self._stack(previous, plan.depth_at(begin))
        self._update(call)

    def _stack(self, depth, new_depth):
        model = self.model  # On JAX, syncs the state; the step re-reads it.
        # TensorFlow: the blocks' variables take back what the loop step
        # keeps in its stacks, which take the copies back before the next.
        model._steps.release()
        sources = _sources(depth, new_depth)
        optimizer_variables = model.optimizer.variables
        for i, source in enumerate(sources):
            target = model.blocks[depth + i].block
            origin = model.blocks[source].block
            _copy_weights(origin, target)
            # Each weight's optimizer state, in the order its update writes it.
            for src, dst in zip(origin.trainable_weights, target.trainable_weights):
                from_slots = optimizer_slots(model.optimizer, [src]) or []
                to_slots = optimizer_slots(model.optimizer, [dst]) or []
                for a, b in zip(from_slots, to_slots):
                    optimizer_variables[b].assign(ops.copy(optimizer_variables[a].value))

    def get_config(self):
        return {
            "stages": [stage.get_config() for stage in self.stages],
            "off_path_update": self.off_path_update,
        }

    def __repr__(self):
        depths = "-".join(f"{s.path_length:g}" for s in self.stages)
        return (
            f"GradualStacking({depths}, total_steps={self.total_steps}, "
            f"off_path_update={self.off_path_update!r})"
        )


def _sources(depth, new_depth):
    """The block each new block `depth .. new_depth - 1` is copied from."""
    count = new_depth - depth
    return [depth - count + i if count <= depth else i % depth for i in range(count)]


def _copy_weights(origin, target):
    _check_shapes(origin, target)
    for src, dst in zip(origin.weights, target.weights):
        # A copy: on JAX two variables must not hold the same buffer.
        dst.assign(ops.copy(src.value))


def _check_shapes(origin, target):
    if [tuple(w.shape) for w in origin.weights] != [tuple(w.shape) for w in target.weights]:
        raise ValueError(
            f"Gradual stacking copies block '{origin.name}' into "
            f"'{target.name}', but their weights differ in shape: "
            f"{[tuple(w.shape) for w in origin.weights]} against "
            f"{[tuple(w.shape) for w in target.weights]}. Stacking needs blocks "
            "of one architecture."
        )
