"""What every path strategy shares: the plan the model reads, and the hooks.

A strategy (`StageSchedule`, `ProgressiveLayerDrop`, `StochasticDepth`,
`GradualStacking`) is a `keras.callbacks.Callback` that `RandomPartModel.fit`
finds among its callbacks. At `fit` it resolves itself for the model's block
count into a `Plan`: constant tables plus three functions of the optimizer
step that the compiled train step calls (keep probabilities, the number of
blocks for `subset` sampling, the logs). On the host, before each execution,
it tells the model whether the coming steps all run the same path (a static
path, compiled without conditionals) or draw one.
"""

import keras
import numpy as np
from keras import ops

from keras_raptr.engine.xp import KERAS


class Plan:
    """A strategy resolved for a model with `num_blocks` blocks.

    Subclasses set `num_blocks`, `fixed_blocks` (normalized, sorted indices),
    `sampling` ("bernoulli" or "subset"), `scaling` ("none" or "inverse") and
    `key` (hashable, equal for equal plans), and implement the methods below.
    """

    def tables(self):
        """Constant numpy arrays the step reads; at least `fixed` (a mask)."""
        fixed = np.zeros(self.num_blocks, dtype=bool)
        fixed[list(self.fixed_blocks)] = True
        return {"fixed": fixed}

    def keep(self, step, tables, xp):
        """Per-block keep probabilities at `step`, float32 `(num_blocks,)`.

        Written once against `xp` (numpy on the host, `keras.ops` in the
        step), with `tables` of the same kind.
        """
        raise NotImplementedError

    def count(self, step, tables, xp):
        """Free blocks on the path at `step` (`subset` sampling only)."""
        raise NotImplementedError

    def logs(self, step, tables):
        """The step's log entries (at least `path_length`), in `keras.ops`."""
        return {"path_length": ops.sum(self.keep(step, tables, KERAS))}

    def static_path(self, start, stop):
        """The path of every step in `[start, stop)` if it is always the same.

        A tuple of bools (block on or off), or `None` when some step in the
        range draws its path.
        """
        return None

    def full_path(self):
        return (True,) * self.num_blocks

    def fixed_path(self):
        fixed = set(self.fixed_blocks)
        return tuple(i in fixed for i in range(self.num_blocks))


class StagedPlan(Plan):
    """A plan made of stages: its tables have one row per stage, plus one.

    `tables()` must add `ends` (the step each stage ends at), `keep` (per
    stage and block) and `lengths` (the path length each stage logs); the
    last row is the full network after the stages.
    """

    def stage(self, step, tables, xp):
        """The 0-based stage of `step` (`len(ends)` after the stages)."""
        step = xp.cast(step, "int32")
        return xp.sum(xp.cast(xp.greater_equal(step, tables["ends"]), "int32"))

    def keep(self, step, tables, xp):
        return xp.take(tables["keep"], self.stage(step, tables, xp), axis=0)

    def logs(self, step, tables):
        stage = self.stage(step, tables, KERAS)
        return {"stage": stage, "path_length": ops.take(tables["lengths"], stage)}


class PathStrategy(keras.callbacks.Callback):
    """Base of the strategies: finds the model's plan and the static paths."""

    def __init__(self):
        super().__init__()
        self._epoch_start_step = 0
        self._plan = None

    def _resolve(self, num_blocks):
        """This strategy as a `Plan` for `num_blocks` blocks (checks them)."""
        raise NotImplementedError

    def set_model(self, model):
        from keras_raptr.models.random_part_model import RandomPartModel

        if not isinstance(model, RandomPartModel):
            raise ValueError(
                f"`{type(self).__name__}` trains a `keras_raptr.RandomPartModel`, "
                f"but `fit` was called on {type(model).__name__} '{model.name}'. "
                "Wrap it first: `model = keras_raptr.RandomPartModel(model)`."
            )
        self._plan = self._resolve(len(model.blocks))
        super().set_model(model)

    def on_epoch_begin(self, epoch, logs=None):
        # `self.model` syncs the JAX state, so the counter is current.
        iterations = self.model.optimizer.iterations
        self._epoch_start_step = int(ops.convert_to_numpy(iterations))
        self._update(0)

    def on_train_batch_begin(self, batch, logs=None):
        self._update(batch)

    def _update(self, batch):
        start = self._epoch_start_step + batch
        # `batch` is the first step of the execution: the model picks the
        # train function for the `steps_per_execution` steps that follow.
        stop = start + max(1, int(getattr(self._model, "steps_per_execution", 1) or 1))
        self._model._prepare_steps(start, stop)
