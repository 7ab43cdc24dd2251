"""The loop step on TensorFlow: one traced train step for every path.

The same step as on JAX (`loop_jax.py`), in TensorFlow's terms:

- **Storage.** While `fit` trains through the loop step, the blocks' state
  lives stacked by role in variables of its own (`stacked.py`: one
  `(L, ...)` variable per weight, state and optimizer slot role), so a step
  reads and writes its path's rows only. `to_stacks()` copies the blocks'
  variables into the stacks before the first loop step; `to_blocks()` copies
  them back before any other step runs, at the end of every epoch, before
  `evaluate`, `predict` and saving, when `fit` ends, and after every batch
  when a callback of the user's may read the model mid-epoch
  (`RandomPartModel.fit`). Between those, the blocks' own variables are
  stale, and block 0's serve as scratch space for the optimizer.
- **Forward.** Block 0's call runs a `tf.while_loop` of `n` iterations (a
  tensor; `maximum_iterations=L` for XLA): at position `t` it calls block 0's
  code on row `idx[t]` of the stacked weights and state (a stateless scope);
  the other blocks pass their input on. TensorFlow differentiates the loop
  itself, under Keras' own tape: the stacks are the trainable variables
  Keras differentiates while the step is traced.
- **Optimizer.** Keras' optimizer updates the variables of no block as it
  would; then a second `tf.while_loop`, for each path block in turn, writes
  its rows of weights and slots into block 0's variables, runs Keras' own
  `apply` on them with the gradient row (the optimizer's step count held at
  this step's), and writes the results back to the rows. `global_clipnorm`
  is applied once over every gradient; a `LossScaleOptimizer` wraps all of
  it as Keras' own code does.

One trace (and with `jit_compile=True` one XLA compile) serves every path.
"""

import contextlib

import keras
from keras import ops

from keras_raptr.engine import scopes
from keras_raptr.engine.loop_jax import Head
from keras_raptr.engine.loop_jax import LoopUnsupported
from keras_raptr.engine.loop_jax import Tail
from keras_raptr.engine.loop_jax import _Step
from keras_raptr.engine.loop_jax import positions
from keras_raptr.engine.stacked import NON_TRAINABLE
from keras_raptr.engine.stacked import OPTIMIZER
from keras_raptr.engine.stacked import TRAINABLE
from keras_raptr.engine.stacked import Stacks


class TfLoop:
    """The loop step of one model on TensorFlow (see the module docstring)."""

    def __init__(self, model, layout):
        import tensorflow as tf

        self.model = model
        self.layout = layout
        optimizer = model.optimizer
        self.stacks = Stacks(
            layout,
            (
                len(model.trainable_variables),
                len(model.non_trainable_variables),
                len(optimizer.variables),
            ),
        )
        self.skip = model.blocks[0]
        self.block_weights = self.stacks.block_variables(model.trainable_variables, TRAINABLE)
        self.block_state = self.stacks.block_variables(
            model.non_trainable_variables, NON_TRAINABLE
        )
        self.block_slots = self.stacks.block_variables(optimizer.variables, OPTIMIZER)
        self.rest_weights = self.stacks.rest_variables(model.trainable_variables, TRAINABLE)
        num_blocks = self.stacks.num_blocks
        self.sources = [
            [
                [variables[n] for n in column]
                for column in zip(*self.stacks.tables[which])
            ]
            for which, variables in enumerate(
                (model.trainable_variables, model.non_trainable_variables, optimizer.variables)
            )
        ]

        def stack_variable(variable, trainable, role):
            stack = tf.Variable(
                tf.zeros((num_blocks,) + tuple(variable.shape), variable.dtype),
                trainable=trainable,
                name=f"raptr_stack_{role}",
            )
            # What Keras reads of the variables it differentiates.
            stack.regularizer = None
            return stack

        # Under a `tf.distribute` strategy, the blocks' own variables stay the
        # storage (see `train_step`).
        self.uses_stacks = not tf.distribute.has_strategy() and not _strategy_of(model)
        self.weights, self.state, self.slots = [], [], []
        if self.uses_stacks:
            self.weights = [
                stack_variable(v, True, f"w{j}") for j, v in enumerate(self.block_weights)
            ]
            self.state = [
                stack_variable(v, False, f"s{j}") for j, v in enumerate(self.block_state)
            ]
            self.slots = [
                stack_variable(v, False, f"o{j}") for j, v in enumerate(self.block_slots)
            ]
        self.in_stacks = False
        self.current = None

    # ------------------------------------------------------------------
    # Between steps: the blocks' variables <-> the stacks.

    def _targets(self):
        return (self.weights, self.state, self.slots)

    def _copy_to_stacks(self):
        import tensorflow as tf

        for stacks, columns in zip(self._targets(), self.sources):
            for stack, column in zip(stacks, columns):
                stack.assign(tf.stack([v.value for v in column]))

    def _copy_to_blocks(self):
        for stacks, columns in zip(self._targets(), self.sources):
            for stack, column in zip(stacks, columns):
                for i, variable in enumerate(column):
                    variable.assign(stack[i])

    def to_stacks(self):
        """The stacks take the blocks' variables (before a loop step)."""
        if self.uses_stacks and not self.in_stacks:
            self._copy_to_stacks()
            self.in_stacks = True

    def to_blocks(self):
        """The blocks' variables take the stacks back (before anything reads them)."""
        if self.in_stacks:
            self._copy_to_blocks()
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
                    (v, value)
                    for v, value in zip(self.block_state_all(), self.current.new_state)
                ]
                if not zero_grad:
                    moves += [
                        (v, ops.where(on[i], ops.copy(v.value), old))
                        for i, v, old in before
                    ]
                assign(moves)
        finally:
            self.current = None
        return logs, step

    def _read_blocks(self):
        """`(block, variable, value)` of every block's weights and slots."""
        out = []
        for which in (TRAINABLE, OPTIMIZER):
            for column in self.sources[which]:
                for i, variable in enumerate(column):
                    out.append((i, variable, ops.copy(variable.value)))
        return out

    def block_state_all(self):
        """Every block's state variables, block by block, in role order."""
        columns = self.sources[NON_TRAINABLE]
        return [columns[m][i] for i in range(self.stacks.num_blocks) for m in range(len(columns))]

    def trainable_weights(self, weights):
        """What Keras differentiates while the loop step traces: the stacks
        in place of every block's weights."""
        if not self.uses_stacks:
            return weights
        owned = {id(v) for column in self.sources[TRAINABLE] for v in column}
        return [w for w in weights if id(w) not in owned] + list(self.weights)

    @contextlib.contextmanager
    def _gates(self):
        gates = [Head(self)] + [Tail(self, i) for i in range(1, self.stacks.num_blocks)]
        object.__setattr__(self.model, "_gates", gates)
        try:
            yield
        finally:
            object.__setattr__(self.model, "_gates", None)

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

    def pass_on(self, index, skip, args):
        current = self.current
        if not args or current.last is None or args[0] is not current.last:
            raise LoopUnsupported(
                f"block {index} ('{skip.block.name}') was not called with the "
                f"previous block's output right after it"
            )
        return args[0]

    def run_path(self, skip, block_call, args, kwargs):
        import tensorflow as tf

        current = self.current
        if skip is not self.skip or not args:
            raise LoopUnsupported(f"the block '{skip.block.name}' was called first, not block 0")
        from keras_raptr.layers.random_skip import _check_output

        x = args[0]
        rest_args = args[1:]
        loop = self
        if self.uses_stacks:
            weights, state = self.weights, self.state
        else:
            # The blocks' variables, stacked for this step (under the tape:
            # the gradients reach each block's own variables).
            weights = [tf.stack([v.value for v in column]) for column in self.sources[TRAINABLE]]
            state = [tf.stack([v.value for v in column]) for column in self.sources[NON_TRAINABLE]]

        def body(t, h, carried):
            # Stacked: the state's rows are read and written in its
            # variables; else the state is carried through the loop.
            state = loop.state if loop.uses_stacks else carried
            r = current.idx[t]
            pairs = [(v, tf.gather(w, r)) for v, w in zip(loop.block_weights, weights)]
            pairs += [(v, tf.gather(s, r)) for v, s in zip(loop.block_state, state)]
            with scopes.child_scope(pairs, collect_losses=True) as scope:
                y = block_call(h, *rest_args, **kwargs)
                new_state = scopes.values_of(scope, loop.block_state)
            if scope.losses:
                raise LoopUnsupported(f"block 0 ('{skip.block.name}') adds losses in its call")
            if isinstance(y, (tuple, list, dict)):
                raise LoopUnsupported(f"block 0 ('{skip.block.name}') returns a structure")
            _check_output(skip, h, y)
            if current.scale is not None:
                y = h + (y - h) * tf.cast(tf.gather(current.scale, r), y.dtype)
            if loop.uses_stacks:
                for stack, value in zip(state, new_state):
                    stack.scatter_nd_update([[r]], [tf.cast(value, stack.dtype)])
            else:
                state = [
                    tf.tensor_scatter_nd_update(a, [[r]], [tf.cast(value, a.dtype)])
                    for a, value in zip(state, new_state)
                ]
            y = tf.ensure_shape(y, h.shape)
            return t + 1, y, [] if loop.uses_stacks else state

        carried = [] if self.uses_stacks else list(state)
        _, h, new_state = tf.while_loop(
            lambda t, h, state: t < current.n,
            body,
            (tf.constant(0, tf.int32), x, carried),
            maximum_iterations=self.stacks.num_blocks,
        )
        if not self.uses_stacks:
            current.new_state = [
                new_state[m][i]
                for i in range(self.stacks.num_blocks)
                for m in range(len(new_state))
            ]
        current.out = h
        current.last = h
        return h

    # ------------------------------------------------------------------
    # The optimizer.

    def _apply(self, inner, original, grads, trainable_variables):
        import tensorflow as tf

        grads = list(grads)
        variables = list(trainable_variables if trainable_variables is not None else [])
        position = {id(v): j for j, v in enumerate(self.weights)}
        rest = [(g, v) for g, v in zip(grads, variables) if id(v) not in position]
        block_grads = [None] * len(self.weights)
        for g, v in zip(grads, variables):
            if id(v) in position:
                block_grads[position[id(v)]] = g
        block_grads = [
            tf.zeros(w.shape, w.dtype) if g is None else tf.convert_to_tensor(g)
            for g, w in zip(block_grads, self.weights)
        ]
        rest_grads = [g for g, _ in rest]
        if inner.global_clipnorm:
            from keras.src.optimizers.base_optimizer import clip_by_global_norm

            present = [g for g in rest_grads if g is not None]
            clipped = clip_by_global_norm(present + block_grads, inner.global_clipnorm)
            it = iter(clipped[: len(present)])
            rest_grads = [None if g is None else next(it) for g in rest_grads]
            block_grads = clipped[len(present) :]
        current = self.current
        iterations = inner._iterations
        from keras_raptr.engine.loop_jax import _no_global_clipnorm

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

            def update(t):
                r = current.idx[t]
                iterations.assign(before)
                for v, w in zip(self.block_weights, self.weights):
                    v.assign(tf.gather(w, r))
                for v, s in zip(self.block_slots, self.slots):
                    v.assign(tf.gather(s, r))
                original([tf.gather(g, r) for g in block_grads], self.block_weights)
                for v, w in zip(self.block_weights, self.weights):
                    w.scatter_nd_update([[r]], [v.value])
                for v, s in zip(self.block_slots, self.slots):
                    s.scatter_nd_update([[r]], [v.value])
                return t + 1

            tf.while_loop(
                lambda t: t < current.rows,
                update,
                (tf.constant(0, tf.int32),),
                maximum_iterations=self.stacks.num_blocks,
            )
            iterations.assign(after)


def _strategy_of(model):
    import tensorflow as tf

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
