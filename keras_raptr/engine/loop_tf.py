"""The loop step on TensorFlow: one traced train step for every path.

The same step as on JAX (`loop_jax.py`), in TensorFlow's terms:

- **Storage.** While `fit` trains through the loop step, the blocks' state
  lives in variables of its own, a row per block: per dtype, one `(L, P)`
  variable whose row `i` holds block `i`'s weights end to end
  (`stacked.FlatRows`), and so for the non-trainable state and for each
  kind of optimizer slot. A step reads and writes its path's rows only, one
  operation per array, whatever the number of weights (TensorFlow's graph
  runs op by op). `to_stacks()` copies the blocks' variables in before the
  first loop step; `to_blocks()` copies them back before any other step
  runs, at the end of every epoch, before `evaluate`, `predict` and saving,
  when `fit` ends, and after every batch when a callback of the user's may
  read the model mid-epoch (`RandomPartModel.fit`). In between, the blocks'
  own variables are stale, and block 0's serve as scratch space.
- **Forward.** Block 0's call runs a `tf.while_loop` of `n` iterations (a
  tensor; `maximum_iterations=L` for XLA): at position `t` it splits row
  `idx[t]` into block 0's weights and state (a stateless scope) and calls
  block 0's code; the other blocks pass their input on. TensorFlow
  differentiates the loop itself, under Keras' own tape: while the step is
  traced, the row variables stand in for the blocks' weights among the
  variables Keras differentiates.
- **Optimizer.** Keras' optimizer updates the variables of no block as it
  would; then a second `tf.while_loop` updates each path block's row. For
  an optimizer whose update is elementwise (SGD, Adam, AdamW, Nadam,
  Adamax, RMSprop, Adagrad, Adadelta, Lion, Ftrl, without `clipnorm` or
  constraints, with one weight-decay rule for the whole block), a copy of it
  built on one flat variable updates the whole row at once: the same
  arithmetic, element for element, in a handful of operations. Otherwise
  the row is split into block 0's variables and slots and Keras' own
  `apply` updates them, as on JAX. `global_clipnorm` is applied once over
  every gradient; a `LossScaleOptimizer` wraps all of it as Keras' own code
  does.

Under a `tf.distribute` strategy the blocks' own variables stay the storage
(see `TfLoop.train_step`). One trace (and with `jit_compile=True` one XLA
compile) serves every path.
"""

import contextlib

import keras
import numpy as np
from keras import ops

from keras_raptr.engine import scopes
from keras_raptr.engine.blocks import optimizer_slots
from keras_raptr.engine.loop_jax import LoopUnsupported
from keras_raptr.engine.loop_jax import _no_global_clipnorm
from keras_raptr.engine.loop_jax import _Chain
from keras_raptr.engine.loop_jax import _Step
from keras_raptr.engine.loop_jax import check_carried
from keras_raptr.engine.loop_jax import positions
from keras_raptr.engine.stacked import NON_TRAINABLE
from keras_raptr.engine.stacked import OPTIMIZER
from keras_raptr.engine.stacked import TRAINABLE
from keras_raptr.engine.stacked import FlatRows
from keras_raptr.engine.stacked import Stacks

# Keras optimizers whose update of a variable is elementwise: a row of
# several weights laid end to end updates as each weight would.
_ELEMENTWISE = (
    "SGD", "Adam", "AdamW", "Adamax", "Nadam", "RMSprop", "Adagrad", "Adadelta",
    "Lion", "Ftrl",
)


class TfLoop(_Chain):
    """The loop step of one model on TensorFlow (see the module docstring)."""

    def __init__(self, model, layout):
        import tensorflow as tf

        self.model = model
        self.layout = layout
        optimizer = model.optimizer
        inner = getattr(optimizer, "inner_optimizer", optimizer)
        self.stacks = Stacks(
            layout,
            (
                len(model.trainable_variables),
                len(model.non_trainable_variables),
                len(optimizer.variables),
            ),
        )
        num_blocks = self.stacks.num_blocks
        self.skip = model.blocks[0]
        self.block_weights = self.stacks.block_variables(model.trainable_variables, TRAINABLE)
        self.block_state = self.stacks.block_variables(
            model.non_trainable_variables, NON_TRAINABLE
        )
        self.block_slots = self.stacks.block_variables(optimizer.variables, OPTIMIZER)
        # Per list, per block, its variables in role order.
        self.sources = [
            [[variables[n] for n in row] for row in self.stacks.tables[which]]
            for which, variables in enumerate(
                (model.trainable_variables, model.non_trainable_variables, optimizer.variables)
            )
        ]
        # Each weight's slots, in order (their kind: the `k`-th of each).
        per_weight = [optimizer_slots(optimizer, [v]) for v in self.block_weights]
        kind_of = {n: k for slots in per_weight for k, n in enumerate(slots)}
        kinds = [kind_of[n] for n in layout.slots[0]]
        self.rows = (
            FlatRows([(v.shape, _dtype(v)) for v in self.block_weights]),
            FlatRows([(v.shape, _dtype(v)) for v in self.block_state]),
            FlatRows([(v.shape, _dtype(v)) for v in self.block_slots], kinds),
        )
        self.clone = _flat_optimizer(inner, self.block_weights, per_weight, self.rows)
        # Under a `tf.distribute` strategy, the blocks' own variables stay
        # the storage (see `train_step`).
        self.uses_stacks = not tf.distribute.has_strategy() and not _strategy_of(model)
        self.arrays = ([], [], [])
        if self.uses_stacks:
            self.arrays = tuple(
                [
                    _row_variable(num_blocks, width, dtype, which == TRAINABLE, f"{which}_{g}")
                    for g, (width, dtype) in enumerate(zip(rows.widths, rows.dtypes))
                ]
                for which, rows in enumerate(self.rows)
            )
        self.in_stacks = False
        self.current = None
        # One graph each (a callable object: TensorFlow counts retracing per
        # Python function, and every model has its own copies).
        self._copies = {name: tf.function(_Call(self, name)) for name in ("_copy_to_stacks", "_copy_to_blocks")}

    # ------------------------------------------------------------------
    # Between steps: the blocks' variables <-> the row variables.

    def _copy_to_stacks(self):
        import tensorflow as tf

        for rows, arrays, blocks in zip(self.rows, self.arrays, self.sources):
            joined = [rows.join([v.value for v in block]) for block in blocks]
            for g, array in enumerate(arrays):
                array.assign(tf.stack([row[g] for row in joined]))

    def _copy_to_blocks(self):
        for rows, arrays, blocks in zip(self.rows, self.arrays, self.sources):
            for i, block in enumerate(blocks):
                for variable, value in zip(block, rows.split([a[i] for a in arrays])):
                    variable.assign(value)

    def to_stacks(self):
        """The row variables take the blocks' variables (before a loop step)."""
        if self.uses_stacks and not self.in_stacks:
            self._copies["_copy_to_stacks"]()
            self.in_stacks = True

    def to_blocks(self):
        """The blocks' variables take the rows back (before anything reads them)."""
        if self.in_stacks:
            self._copies["_copy_to_blocks"]()
            self.in_stacks = False

    def calls(self):
        from keras_raptr.engine.steps import step_counter

        return int(ops.convert_to_numpy(step_counter(self.model.optimizer)[0]))

    # ------------------------------------------------------------------
    # The step.

    def train_step(self, base_step, data, path, zero_grad):
        """Keras' TensorFlow `base_step(data)` as the loop step; `(logs, step)`.

        Under a `tf.distribute` strategy the blocks' variables stay the
        storage: the forward loop reads them stacked for the step, Keras'
        optimizer updates every block (reducing the gradients once, as
        without RaPTr), and then, under `off_path_update="skip"`, the blocks
        off the path take back their weights and slots of before the step
        (one `merge_call`). That costs every block's optimizer update and a
        copy of every block's state each step, not the path's alone.
        """
        steps = self.model._steps
        step = steps.optimizer_steps(ops.copy(steps.counter_variable().value))
        on, scale = path(step)
        idx, n = positions(on)
        rows = self.stacks.num_blocks if zero_grad else n
        self.current = _Step(idx, n, rows, scale)
        try:
            if self.uses_stacks:
                with self._gates(), self._optimizer_hook():
                    logs = base_step(data)
            else:
                before = [] if zero_grad else self._read_blocks()
                with self._gates():
                    logs = base_step(data)
                moves = [
                    (variable, value)
                    for block, values in zip(self.sources[NON_TRAINABLE], self.current.new_state)
                    for variable, value in zip(block, values)
                ]
                moves += [
                    (variable, ops.where(on[i], ops.copy(variable.value), old))
                    for i, variable, old in before
                ]
                assign(moves)
        finally:
            self.current = None
        return logs, step

    def _read_blocks(self):
        """`(block, variable, value)` of every block's weights and slots."""
        return [
            (i, variable, ops.copy(variable.value))
            for which in (TRAINABLE, OPTIMIZER)
            for i, block in enumerate(self.sources[which])
            for variable in block
        ]

    def trainable_weights(self, weights):
        """What Keras differentiates while the loop step traces: the weight
        rows in place of every block's weights."""
        if not self.uses_stacks:
            return weights
        owned = {id(v) for block in self.sources[TRAINABLE] for v in block}
        return [w for w in weights if id(w) not in owned] + list(self.arrays[TRAINABLE])

    @contextlib.contextmanager
    def _optimizer_hook(self):
        optimizer = self.model.optimizer
        inner = getattr(optimizer, "inner_optimizer", optimizer)
        original = inner.apply

        def apply(grads, trainable_variables=None):
            return self._apply(inner, original, grads, trainable_variables)

        object.__setattr__(inner, "apply", apply)
        try:
            yield
        finally:
            inner.__dict__.pop("apply", None)

    # ------------------------------------------------------------------
    # The forward loop.

    def run_path(self, skip, block_call, args, kwargs):
        import tensorflow as tf

        current = self.current
        self.check_first(skip, args)
        x = args[0]
        rest_args = args[1:]
        loop = self
        weight_rows, state_rows = self.rows[TRAINABLE], self.rows[NON_TRAINABLE]
        if self.uses_stacks:
            weights, state = self.arrays[TRAINABLE], self.arrays[NON_TRAINABLE]
        else:
            # The blocks' variables, as rows for this step (under the tape:
            # the gradients reach each block's own variables).
            weights, state = [
                [tf.stack(group) for group in zip(*[rows.join([v.value for v in block])
                                                    for block in self.sources[which]])]
                for which, rows in ((TRAINABLE, weight_rows), (NON_TRAINABLE, state_rows))
            ]

        def body(t, h, carried):
            # With row variables the state is read and written in place;
            # else it is carried through the loop.
            state_arrays = state if loop.uses_stacks else carried
            r = current.idx[t]
            w = weight_rows.split([tf.gather(a, r) for a in weights])
            s = state_rows.split([tf.gather(a, r) for a in state_arrays])
            pairs = list(zip(loop.block_weights, w)) + list(zip(loop.block_state, s))
            with scopes.child_scope(pairs, collect_losses=True) as scope:
                y = block_call(h, *rest_args, **kwargs)
                new_state = scopes.values_of(scope, loop.block_state)
            if scope.losses:
                raise LoopUnsupported(f"block 0 ('{skip.block.name}') adds losses in its call")
            if isinstance(y, (tuple, list, dict)):
                raise LoopUnsupported(f"block 0 ('{skip.block.name}') returns a structure")
            check_carried(skip, h, y)
            if current.scale is not None:
                y = h + (y - h) * tf.cast(tf.gather(current.scale, r), y.dtype)
            new_rows = state_rows.join(new_state)
            if loop.uses_stacks:
                for array, row in zip(state_arrays, new_rows):
                    array.scatter_nd_update([[r]], [row])
                carried = []
            else:
                carried = [
                    tf.tensor_scatter_nd_update(a, [[r]], [row])
                    for a, row in zip(state_arrays, new_rows)
                ]
            y = tf.ensure_shape(y, h.shape)
            return t + 1, y, carried

        carried = [] if self.uses_stacks else list(state)
        _, h, new_state = tf.while_loop(
            lambda t, h, carried: t < current.n,
            body,
            (tf.constant(0, tf.int32), x, carried),
            maximum_iterations=self.stacks.num_blocks if _xla() else None,
        )
        if not self.uses_stacks:
            current.new_state = [
                state_rows.split([a[i] for a in new_state])
                for i in range(self.stacks.num_blocks)
            ]
        current.out = h
        current.last = h
        return h

    # ------------------------------------------------------------------
    # The optimizer.

    def _apply(self, inner, original, grads, trainable_variables):
        import tensorflow as tf

        weights = self.arrays[TRAINABLE]
        slots = self.arrays[OPTIMIZER]
        position = {id(v): g for g, v in enumerate(weights)}
        pairs = list(zip(grads, trainable_variables))
        rest = [(g, v) for g, v in pairs if id(v) not in position]
        row_grads = [None] * len(weights)
        for g, v in pairs:
            if id(v) in position:
                row_grads[position[id(v)]] = g
        row_grads = [
            tf.zeros(w.shape, w.dtype) if g is None else tf.convert_to_tensor(g)
            for g, w in zip(row_grads, weights)
        ]
        rest_grads = [g for g, _ in rest]
        if inner.global_clipnorm:
            from keras.src.optimizers.base_optimizer import clip_by_global_norm

            present = [g for g in rest_grads if g is not None]
            clipped = clip_by_global_norm(present + row_grads, inner.global_clipnorm)
            it = iter(clipped[: len(present)])
            rest_grads = [None if g is None else next(it) for g in rest_grads]
            row_grads = clipped[len(present) :]
        current = self.current
        iterations = inner._iterations
        weight_rows, slot_rows = self.rows[TRAINABLE], self.rows[OPTIMIZER]
        clone = self.clone

        with _no_global_clipnorm(inner):
            before = tf.identity(iterations.value)
            # The variables of no block first: at an update step with
            # gradient accumulation, Keras' `apply` resets every accumulator,
            # block 0's scratch ones included; the rows' own come after.
            if rest:
                original(rest_grads, [v for _, v in rest])
            else:
                iterations.assign_add(1)
            after = tf.identity(iterations.value)
            if clone is not None:
                clone.sync(inner, before)

            def update(t):
                r = current.idx[t]
                if clone is not None:
                    clone.update(r, weights, slots, row_grads)
                    return t + 1
                iterations.assign(before)
                for v, value in zip(
                    self.block_weights, weight_rows.split([tf.gather(a, r) for a in weights])
                ):
                    v.assign(value)
                for v, value in zip(
                    self.block_slots, slot_rows.split([tf.gather(a, r) for a in slots])
                ):
                    v.assign(value)
                original(
                    weight_rows.split([tf.gather(g, r) for g in row_grads]), self.block_weights
                )
                for array, row in zip(weights, weight_rows.join([v.value for v in self.block_weights])):
                    array.scatter_nd_update([[r]], [row])
                for array, row in zip(slots, slot_rows.join([v.value for v in self.block_slots])):
                    array.scatter_nd_update([[r]], [row])
                return t + 1

            tf.while_loop(
                lambda t: t < current.rows,
                update,
                (tf.constant(0, tf.int32),),
                maximum_iterations=self.stacks.num_blocks,
            )
            iterations.assign(after)


class _Call:
    """`getattr(owner, name)()`, as an object `tf.function` can trace."""

    def __init__(self, owner, name):
        self.owner = owner
        self.name = name

    def __call__(self):
        getattr(self.owner, self.name)()
        return 0


class _FlatOptimizer:
    """A copy of an elementwise optimizer, built on one flat row of weights."""

    def __init__(self, optimizer, template, kinds):
        self.optimizer = optimizer
        self.template = template
        # The copy's slot variables, in kind order (the rows' slot groups).
        self.kinds = kinds

    def sync(self, inner, iterations):
        """This step's learning rate and step count, from the model's optimizer."""
        optimizer = self.optimizer
        self.iterations = iterations
        own, theirs = optimizer._learning_rate, inner._learning_rate
        if isinstance(own, keras.Variable) and isinstance(theirs, keras.Variable):
            own.assign(theirs)

    def update(self, r, weights, slots, grads):
        import tensorflow as tf

        (weight,) = weights
        self.optimizer._iterations.assign(self.iterations)
        self.template.assign(tf.gather(weight, r))
        for variable, array in zip(self.kinds, slots):
            variable.assign(tf.gather(array, r))
        self.optimizer.apply([tf.gather(grads[0], r)], [self.template])
        weight.scatter_nd_update([[r]], [self.template.value])
        for variable, array in zip(self.kinds, slots):
            array.scatter_nd_update([[r]], [variable.value])


def _flat_optimizer(inner, block_weights, per_weight, rows):
    """A `_FlatOptimizer` for `inner`, or `None` where its update is not
    elementwise over a row (then each weight is updated on its own)."""
    weight_rows, _, slot_rows = rows
    if type(inner).__name__ not in _ELEMENTWISE or type(inner).__module__.split(".")[0] != "keras":
        return None
    if inner.clipnorm or len(weight_rows.groups) != 1:
        return None
    if any(getattr(v, "constraint", None) is not None for v in block_weights):
        return None
    if any(getattr(v, "overwrite_with_gradient", False) for v in block_weights):
        return None
    counts = {len(slots) for slots in per_weight}
    decays = {inner._use_weight_decay(v) for v in block_weights}
    if len(counts) != 1 or len(decays) != 1:
        return None
    kinds = counts.pop()
    if len(slot_rows.groups) != kinds or any(
        dtype != weight_rows.dtypes[0] for dtype in slot_rows.dtypes
    ):
        return None
    try:
        config = inner.get_config()
        config["global_clipnorm"] = None
        clone = type(inner).from_config(config)
    except Exception:
        return None
    template = keras.Variable(
        np.zeros((weight_rows.widths[0],), weight_rows.dtypes[0]),
        trainable=False,
        name="raptr_row",
    )
    if not decays.pop():
        clone.exclude_from_weight_decay(var_list=[template])
    clone.build([template])
    found = optimizer_slots(clone, [template])
    if found is None or len(found) != kinds:
        return None
    return _FlatOptimizer(clone, template, [clone.variables[n] for n in found])


def _row_variable(num_blocks, width, dtype, trainable, name):
    import tensorflow as tf

    variable = tf.Variable(
        tf.zeros((num_blocks, width), dtype), trainable=trainable, name=f"raptr_rows_{name}"
    )
    # What Keras reads of the variables it differentiates.
    variable.regularizer = None
    return variable


def _dtype(variable):
    """A variable's own dtype (not the compute dtype of a mixed policy)."""
    return keras.backend.standardize_dtype(variable.value.dtype)


def _strategy_of(model):
    strategy = getattr(model, "distribute_strategy", None)
    return strategy is not None and type(strategy).__name__ != "_DefaultDistributionStrategy"


def assign(moves):
    """Assigns each `(variable, value)`, in the replicas' place if need be.

    Under a `tf.distribute` strategy the step runs once per replica, and a
    replica may not assign a mirrored variable: one `merge_call` hands every
    replica's values to the strategy, which assigns each replica's copy its
    own (equal) value. Nothing is reduced across replicas.
    """
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if not tf.distribute.has_strategy() or context is None:
        for variable, value in moves:
            variable.assign(value)
        return

    def assign_all(strategy, values):
        for (variable, _), value in zip(moves, values):
            strategy.extended.update(variable.value, _assign_one, args=(value,), group=False)

    context.merge_call(assign_all, args=([value for _, value in moves],))


def _assign_one(variable, value):
    variable.assign(value)


def _xla():
    """Whether XLA compiles the step being traced (it needs a static trip bound).

    Graph mode needs no bound, so the forward loop only gets one under XLA.
    """
    import tensorflow as tf

    graph = tf.compat.v1.get_default_graph()
    if getattr(graph, "_xla_compile", False):
        return True
    try:
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - a bound is always correct
        return True
    return bool(control_flow_util.GraphOrParentsInXlaContext(graph))
