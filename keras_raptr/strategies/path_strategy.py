"""`PathStrategy` and `Plan`: what every strategy is, and how to write one.

A strategy (`StageSchedule`, `ProgressiveLayerDrop`, `StochasticDepth`,
`GradualStacking`, or your own) is a `keras.callbacks.Callback` that
`RandomPartModel.fit` finds among its callbacks. At `fit` it resolves itself
for the model's block count into a `Plan`: constant tables, and pure
functions of the optimizer step (keep probabilities, the number of blocks for
`subset` sampling, the logs), each written once against an `xp` namespace so
that the host (numpy) and the compiled train step (`keras.ops`) compute the
same values. Before each execution the strategy asks the model to pick the
train function for the coming steps (`RandomPartModel` does the rest: the
path of each step is a function of the model's seed and the step).
"""

import keras
import numpy as np
from keras import ops

from keras_raptr import schedules
from keras_raptr.engine.xp import KERAS


class Plan:
    """A strategy resolved for a model with `num_blocks` blocks.

    Subclasses set `num_blocks`, `fixed_blocks` (normalized, sorted indices),
    `sampling` (`"bernoulli"` or `"subset"`), `scaling` (`"none"` or
    `"inverse"`), optionally `off_path_update` (`"skip"`, the default, or
    `"zero_grad"`: see `PathStrategy`) and `key` (hashable, equal for equal
    plans: a model reuses its compiled train steps while the key stays the
    same), and implement
    `keep` (and `count` for `subset` sampling). `keep` and `count` are pure
    functions of the step, written against `xp` (see `PathStrategy` for an
    example).
    """

    off_path_update = "skip"

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

    def width_over(self, start, stop):
        """The width every step in `[start, stop)` runs at, or `None` if it changes.

        1.0 (every head and unit) unless the plan has width-wise stages.
        """
        return 1.0

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


# The log entries that say where the schedule is: the progress bar shows them
# as they are (`stage: 0`, `path_length: 6`, `width: 0.5`).
_SCHEDULE_LOGS = ("stage", "path_length", "width")


class _Shown(float):
    """A log value the progress bar prints as it reads, not as a loss.

    Keras' progress bar prints every value with `.4f`, or `.4e` below 1e-3,
    so that stage 0 reads `0.0000e+00`. This float prints those two formats
    with `.4g` (`0`, `6`, `0.5`, PLD's mean path length `8.533`), and is a
    plain float to everything else (`History`, `CSVLogger`, TensorBoard).
    """

    def __truediv__(self, other):
        # The progress bar divides a value by its count (1) before printing.
        return _Shown(float(self) / other)

    def __format__(self, spec):
        if spec in (".4f", ".4e"):
            return format(float(self), ".4g")
        return super().__format__(spec)


def _show_schedule_logs(logs):
    if logs is None:
        return
    for key in _SCHEDULE_LOGS:
        if isinstance(logs.get(key), float):
            logs[key] = _Shown(logs[key])


class PathStrategy(keras.callbacks.Callback):
    """The base of every path strategy: subclass it to write your own.

    A strategy is a callback that `RandomPartModel.fit` finds among its
    callbacks (one per `fit`). Implement `resolve(num_blocks)`, which checks
    the strategy against the model's block count and returns a `Plan`; the
    model draws each step's path from the plan's keep probabilities, with
    the model's seed, so resume and every backend agree.

    Example: every block on the path with probability one half.

    ```python
    import dataclasses

    import keras
    import numpy as np
    import keras_raptr

    @dataclasses.dataclass(frozen=True)
    class HalfPlan(keras_raptr.Plan):
        num_blocks: int
        fixed_blocks: tuple = ()
        sampling: str = "bernoulli"
        scaling: str = "none"

        @property
        def key(self):
            return ("half", self.num_blocks)

        def tables(self):
            tables = super().tables()
            tables["keep"] = np.full(self.num_blocks, 0.5, "float32")
            return tables

        def keep(self, step, tables, xp):
            return tables["keep"]

    class KeepHalf(keras_raptr.PathStrategy):
        def resolve(self, num_blocks):
            return HalfPlan(num_blocks)

    inputs = keras.Input((8,))
    blocks = [keras.layers.Dense(8) for _ in range(4)]  # shape-preserving
    x = inputs
    for block in blocks:
        x = block(x)
    model = keras_raptr.RandomPartModel(keras.Model(inputs, x), blocks=blocks, seed=0)
    model.compile(optimizer="sgd", loss="mse")
    model.fit(np.ones((8, 8)), np.ones((8, 8)), batch_size=4, callbacks=[KeepHalf()])
    ```
    """

    def __init__(self, off_path_update="skip"):
        super().__init__()
        self.off_path_update = schedules.check_off_path_update(off_path_update)
        self._epoch_start_call = 0
        self._plan = None

    @classmethod
    def from_config(cls, config):
        """The strategy from its `get_config()` (its constructor's arguments)."""
        return cls(**config)

    def resolve(self, num_blocks):
        """This strategy as a `Plan` for `num_blocks` blocks.

        Raises a `ValueError` if the strategy cannot train that many blocks.
        """
        raise NotImplementedError

    def set_model(self, model):
        # Any `RandomPartModel` (subclasses included) picks its train steps.
        if not callable(getattr(model, "_prepare_steps", None)):
            raise ValueError(
                f"`{type(self).__name__}` trains a `keras_raptr.RandomPartModel`, "
                f"but `fit` was called on {type(model).__name__} '{model.name}'. "
                "Wrap it first: `model = keras_raptr.RandomPartModel(model)`."
            )
        self._plan = self.resolve(len(model.blocks))
        super().set_model(model)

    def on_epoch_begin(self, epoch, logs=None):
        # `self.model` syncs the JAX state, so the counter is current.
        self._epoch_start_call = self.model._steps.calls()
        self._update(self._call_at(0))

    def on_train_batch_begin(self, batch, logs=None):
        self._update(self._call_at(batch))

    def on_train_batch_end(self, batch, logs=None):
        # Runs before the progress bar, which Keras adds after the callbacks
        # passed to `fit`.
        _show_schedule_logs(logs)

    def on_epoch_end(self, epoch, logs=None):
        _show_schedule_logs(logs)

    @property
    def async_safe(self):
        # `on_train_batch_end` only rewrites log values, so Keras may call it
        # off the training thread (unless a subclass overrides it).
        return (
            type(self).on_train_batch_end is PathStrategy.on_train_batch_end
            and type(self).on_batch_end is keras.callbacks.Callback.on_batch_end
        )

    def _call_at(self, batch):
        """The optimizer's count of train steps at `batch` of this epoch.

        Micro-batches under `gradient_accumulation_steps`; read from the
        optimizer under a `LossScaleOptimizer`, whose skipped steps do not
        count.
        """
        steps = self._model._steps
        if batch and steps.rereads_count():
            return steps.calls()
        return self._epoch_start_call + batch

    def _update(self, call):
        # `call` is the first train step of the execution: the model picks the
        # train function for the `steps_per_execution` steps that follow.
        stop = call + max(1, int(getattr(self._model, "steps_per_execution", 1) or 1))
        self._model._prepare_steps(call, stop)
