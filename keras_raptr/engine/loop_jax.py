"""The loop step on JAX: one compiled train step for every path.

The path's length `n` is data, not a constant of the program. Inside Keras'
own JAX `train_step`, on the blocks' state stacked by role (`stacked.py`):

- **Forward.** Block 0's call runs a `lax.while_loop` of `n` iterations: at
  position `t` it calls block 0's code on row `idx[t]` of every stacked weight
  and state array (`idx`: the path's blocks in depth order, then the others).
  The other blocks pass their input on (`blocks.py` checked that they form
  one chain). Iteration `t` keeps what `jax.vjp` of the block saves for its
  backward pass (its *residuals*) in row `t` of a workspace: one `(L, ...)`
  buffer per residual, threaded from step to step by `fit`, so that no step
  zero-fills `L` blocks' activations. A weight or an argument that is itself
  a residual is read again where it lives, not copied.
- **Backward.** A `jax.custom_vjp` runs `n` iterations in reverse: at `t` it
  rebuilds block `idx[t]`'s VJP from row `t` of the workspace and writes the
  weight gradients to row `idx[t]` of one zero `(L, ...)` gradient per role.
  No block's forward runs twice.
- **Optimizer.** Keras' optimizer updates the variables of no block as it
  would (`apply` on them), then, in a second `lax.while_loop`, each path block
  in turn: its rows of weights, gradients and slots are mapped onto block 0's
  variables and slots (a stateless scope) and Keras' `apply` updates them,
  with the optimizer's step count of this step. So per-variable rules
  (`clipnorm`, weight decay and its exclusions, accumulation, constraints,
  any Keras optimizer's maths) are Keras' own. What spans the whole model is
  done once, over every gradient: `global_clipnorm`, and a
  `LossScaleOptimizer`'s finiteness check, unscaling and scale update.
  Rows off the path are not touched (`off_path_update="skip"`) or updated
  with their zero gradient (`"zero_grad"`: the loop runs over every block).

Compiled once, whatever the path, the schedule or the strategy. Its cost is
the path's blocks plus copying each residual into its workspace row and
reading it back (memory traffic, no FLOPs).

Under a `keras.distribution`, or without `jit_compile`, `fit` threads Keras'
own per-variable state: the step stacks it on entry, unstacks it on exit
(one copy of every block's weights and slots each way), and zero-fills the
workspace.
"""

import contextlib

import keras
from keras import ops

from keras_raptr.engine import scopes
from keras_raptr.engine.stacked import NON_TRAINABLE
from keras_raptr.engine.stacked import OPTIMIZER
from keras_raptr.engine.stacked import TRAINABLE
from keras_raptr.engine.stacked import Stacks


class LoopUnsupported(Exception):
    """Raised while a loop step traces, when the model breaks an assumption
    that only the trace can show; the engine then takes the conditional step."""

    @property
    def reason(self):
        """The sentence raised, without the call context Keras wraps it in.

        Raised inside a layer's call, the exception reaches the engine as
        Keras' "Exception encountered when calling ...", with the sentence in
        bold between the layer's name and its arguments.
        """
        text = str(self)
        start, end = text.find("\x1b[1m"), text.find("\x1b[0m")
        return text[start + 4 : end] if 0 <= start < end else text


def check_carried(skip, h, y):
    """Checks block 0's output `y` for `h` as the loop carries it, block to block.

    A residual block (`random_skip`'s check); and of `h`'s dtype, since the
    loop carries one dtype (a block that changes it, as mixed precision
    allows, takes the conditional step).
    """
    from keras_raptr.layers.random_skip import _check_output

    _check_output(skip, h, y)
    h_dtype = keras.backend.standardize_dtype(h.dtype)
    y_dtype = keras.backend.standardize_dtype(y.dtype)
    if y_dtype != h_dtype:
        raise LoopUnsupported(
            f"block 0 ('{skip.block.name}') returns {y_dtype} for a {h_dtype} input"
        )


class Head:
    """The gate of the chain's first block: it runs the whole path."""

    def __init__(self, loop):
        self.loop = loop

    def __call__(self, skip, block_call, args, kwargs):
        return self.loop.run_path(skip, block_call, args, kwargs)


class Tail:
    """The gate of every other block: it passes its input on."""

    def __init__(self, loop, index):
        self.loop = loop
        self.index = index

    def __call__(self, skip, block_call, args, kwargs):
        return self.loop.pass_on(self.index, skip, args)


class _Step:
    """What one traced step knows: the path and the values it threads."""

    def __init__(self, idx, n, rows, scale):
        self.idx = idx
        self.n = n
        self.rows = rows
        self.scale = scale
        self.weights = None
        self.state = None
        self.workspace = None
        self.out = None
        self.last = None
        self.new_state = None


class _Chain:
    """How both loops meet the blocks' calls: block 0 runs the path, the rest pass it on."""

    @contextlib.contextmanager
    def _gates(self):
        gates = [Head(self)] + [Tail(self, i) for i in range(1, self.stacks.num_blocks)]
        object.__setattr__(self.model, "_gates", gates)
        try:
            yield
        finally:
            object.__setattr__(self.model, "_gates", None)

    def check_first(self, skip, args):
        if skip is not self.skip or not args:
            raise LoopUnsupported(f"the block '{skip.block.name}' was called first, not block 0")

    def pass_on(self, index, skip, args):
        current = self.current
        if not args or current.last is None or args[0] is not current.last:
            raise LoopUnsupported(
                f"block {index} ('{skip.block.name}') was not called with the "
                f"previous block's output right after it"
            )
        return args[0]


class JaxLoop(_Chain):
    """The loop step of one model on JAX (see the module docstring).

    Args:
        model: the `RandomPartModel`.
        layout: its blocks' `blocks.Layout`.
    """

    def __init__(self, model, layout):
        import jax

        self.model = model
        self.layout = layout
        self.stacks = Stacks(
            layout,
            (
                len(model.trainable_variables),
                len(model.non_trainable_variables),
                len(model.optimizer.variables),
            ),
        )
        self.skip = model.blocks[0]
        self.block_weights = self.stacks.block_variables(model.trainable_variables, TRAINABLE)
        self.block_state = self.stacks.block_variables(
            model.non_trainable_variables, NON_TRAINABLE
        )
        self.block_slots = self.stacks.block_variables(model.optimizer.variables, OPTIMIZER)
        self.current = None
        # The residuals of one block call: `(treedef, kinds)` from the last
        # trace, and the workspace's `(shape, dtype)`s per input signature.
        self._record = None
        self._specs = {}
        self._stack = jax.jit(self.stacks.stack)
        self._unstack = jax.jit(self.stacks.unstack)

    # ------------------------------------------------------------------
    # Outside the step: Keras' state in, Keras' state out.

    def stack_state(self, state, workspace=()):
        """Keras' four lists -> the stacked state (with `workspace`)."""
        lists = self._stack(tuple(list(values) for values in state[:3]))
        lists[1] = lists[1] + list(workspace)
        return (*lists, state[3])

    def unstack_state(self, state):
        """The stacked state -> Keras' four lists, and the workspace."""
        workspace = self.stacks.extra(state[1], NON_TRAINABLE)
        lists = self._unstack(tuple(list(values) for values in state[:3]))
        return (*lists, state[3]), workspace

    def workspace_for(self, state, data, scaled):
        """Zero buffers for the residuals of a batch like `data`.

        `state`: Keras' lists. Found by tracing the model's forward pass up to
        block 0 (shapes only, once per input signature). The step checks the
        shapes: a batch of another shape zero-fills its own workspace.
        """
        import jax
        import jax.numpy as jnp

        key = (_signature(data), scaled)
        if key not in self._specs:
            box = {}

            def probe(state, data):
                x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
                self.current = _Step(None, None, None, True if scaled else None)
                self.current.probe = box
                tables = self.stacks.tables
                # Block 0's values, with a leading axis as if stacked.
                self.current.weights, self.current.state = [
                    [values[n][None] for n in tables[which][0]]
                    for which, values in ((TRAINABLE, state[0]), (NON_TRAINABLE, state[1]))
                ]
                try:
                    with self._gates():
                        kwargs = {"training": True} if self.model._call_has_training_arg else {}
                        self.model.stateless_call(state[0], state[1], x, **kwargs)
                except _Probed:
                    pass
                finally:
                    self.current = None
                return 0

            jax.eval_shape(probe, tuple(list(values) for values in state[:2]), data)
            if "specs" not in box:
                raise LoopUnsupported("the model's forward pass does not call its first block")
            self._specs[key] = box["specs"]
        return [jnp.zeros(s.shape, s.dtype) for s in self._specs[key]]

    # ------------------------------------------------------------------
    # The step.

    def train_step(self, base_step, state, data, path, zero_grad):
        """Keras' `base_step` on `state` (stacked, or Keras' lists to stack here).

        `path(step)` gives the path at an optimizer step: a boolean `(L,)`
        tensor and the per-block residual scales (or `None`). Returns the
        logs, the new state (in the form it came) and the optimizer step.
        """
        stacked = self.stacks.is_stacked(state)
        if not stacked:
            lists = self.stacks.stack(state[:3])
            state = (*lists, state[3])
        counter = state[2][self.counter_position()]
        step = self.model._steps.optimizer_steps(counter)
        on, scale = path(step)
        idx, n = positions(on)
        rows = self.stacks.num_blocks if zero_grad else n
        self.current = _Step(idx, n, rows, scale)
        try:
            with self._gates(), self._optimizer_hook():
                logs, state = base_step(state, data)
        finally:
            self.current = None
        if not stacked:
            lists = self.stacks.unstack(state[:3])
            state = (*lists, state[3])
        return logs, state, step

    def counter_position(self):
        """Where the optimizer's step counter sits in the stacked optimizer list."""
        model = self.model
        counter = model._steps.counter_variable()
        for position, n in enumerate(self.stacks.rest[OPTIMIZER]):
            if model.optimizer.variables[n] is counter:
                return position
        raise RuntimeError("The optimizer's step counter is not among its variables.")

    @contextlib.contextmanager
    def _optimizer_hook(self):
        optimizer = self.model.optimizer
        object.__setattr__(optimizer, "stateless_apply", self.stateless_apply)
        try:
            yield
        finally:
            optimizer.__dict__.pop("stateless_apply", None)

    def compute_loss_and_updates(self, base, trainable, non_trainable, metrics, *args, **kwargs):
        """Keras' `compute_loss_and_updates` on the stacked state.

        Keras differentiates it with respect to `trainable` (stacked), so the
        gradients come back stacked. The blocks' per-variable entries that
        Keras' own call sees are rows of the stacks, which the loop does not
        read.
        """
        stacks = self.stacks
        current = self.current
        current.weights = stacks.split(trainable, TRAINABLE)[1]
        current.state = stacks.split(non_trainable, NON_TRAINABLE)[1]
        current.workspace = stacks.extra(non_trainable, NON_TRAINABLE)
        optimizer_variables = kwargs.pop("optimizer_variables", None)
        if optimizer_variables is not None:
            optimizer_variables = stacks.views(optimizer_variables, OPTIMIZER)
        loss, (unscaled, y_pred, new_non_trainable, metrics) = base(
            stacks.views(trainable, TRAINABLE),
            stacks.views(non_trainable, NON_TRAINABLE),
            metrics,
            *args,
            optimizer_variables=optimizer_variables,
            **kwargs,
        )
        if current.out is None:
            raise LoopUnsupported("the model's forward pass does not call its first block")
        _, state, workspace = current.out
        rest = [new_non_trainable[n] for n in stacks.rest[NON_TRAINABLE]]
        return loss, (unscaled, y_pred, rest + list(state) + list(workspace), metrics)

    # ------------------------------------------------------------------
    # The forward and backward loops.

    def run_path(self, skip, block_call, args, kwargs):
        import jax
        import jax.numpy as jnp

        current = self.current
        self.check_first(skip, args)
        x = args[0]
        leaves, treedef = jax.tree_util.tree_flatten((args[1:], kwargs))
        kinds = [_kind(leaf) for leaf in leaves]
        floats = [leaf for leaf, k in zip(leaves, kinds) if k == "float"]
        others = [leaf for leaf, k in zip(leaves, kinds) if k == "other"]
        loop = self

        def body(weights, h, floats, state, others, scale):
            """Block 0's call on one block's rows: `(output, new state)`."""
            float_it, other_it = iter(floats), iter(others)
            values = [
                next(float_it) if k == "float" else next(other_it) if k == "other" else leaf
                for leaf, k in zip(leaves, kinds)
            ]
            rest_args, call_kwargs = jax.tree_util.tree_unflatten(treedef, values)
            pairs = list(zip(loop.block_weights, weights)) + list(zip(loop.block_state, state))
            with scopes.child_scope(pairs, collect_losses=True) as scope:
                y = block_call(h, *rest_args, **call_kwargs)
                new_state = scopes.values_of(scope, loop.block_state)
            if scope.losses:
                raise LoopUnsupported(f"block 0 ('{skip.block.name}') adds losses in its call")
            if isinstance(y, (tuple, list, dict)):
                raise LoopUnsupported(f"block 0 ('{skip.block.name}') returns a structure")
            check_carried(skip, h, y)
            if scale is not None:
                y = h + (y - h) * scale.astype(y.dtype)
            return y, new_state

        def residuals(weights, h, floats, state, others, scale):
            """The block's output, new state, and VJP's leaves with their kinds."""

            def f(weights, h, floats):
                return body(weights, h, floats, state, others, scale)

            y, vjp, new_state = jax.vjp(f, weights, h, floats, has_aux=True)
            leaves, vjp_tree = jax.tree_util.tree_flatten(vjp)
            kinds = []
            for leaf in leaves:
                kinds.append(_residual_kind(leaf, weights, floats, others))
            return y, new_state, leaves, (vjp_tree, kinds)

        def stored(weights, h, floats, state, others, scale):
            """The residuals kept in the workspace (the others are read again)."""
            _, _, leaves, (_, kinds) = residuals(weights, h, floats, state, others, scale)
            return [leaf for leaf, k in zip(leaves, kinds) if k[0] == "ws"]

        num_blocks = self.stacks.num_blocks
        # The rows' shapes and dtypes, from the values (a variable's `dtype`
        # reads as the compute dtype inside a mixed-precision call).
        row_specs = [
            [jax.ShapeDtypeStruct(tuple(a.shape[1:]), a.dtype) for a in stacked]
            for stacked in (current.weights, current.state)
        ]
        scale_table = current.scale
        scale_spec = None if scale_table is None else jax.ShapeDtypeStruct((), "float32")
        specs = jax.eval_shape(stored, row_specs[0], x, floats, row_specs[1], others, scale_spec)
        wanted = [
            jax.ShapeDtypeStruct((num_blocks,) + tuple(s.shape), s.dtype) for s in specs
        ]
        if getattr(current, "probe", None) is not None:
            current.probe["specs"] = wanted
            raise _Probed()
        workspace = list(current.workspace or [])
        if len(workspace) != len(wanted) or any(
            tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype
            for a, b in zip(workspace, wanted)
        ):
            # A batch of another shape than the one `fit` prepared for.
            workspace = [jnp.zeros(s.shape, s.dtype) for s in wanted]
        record = {}

        def forward(weights, floats, x, state, others, idx, n, scale, workspace):
            def step(carry):
                t, h, state, workspace = carry
                r = idx[t]
                w = [_row(a, r) for a in weights]
                s = [_row(a, r) for a in state]
                sc = None if scale is None else scale[r]
                y, new_state, leaves, (vjp_tree, kinds) = residuals(w, h, floats, s, others, sc)
                record["tree"], record["kinds"] = vjp_tree, kinds
                kept = [leaf for leaf, k in zip(leaves, kinds) if k[0] == "ws"]
                if [(tuple(a.shape), a.dtype) for a in kept] != [
                    (tuple(b.shape[1:]), b.dtype) for b in workspace
                ]:
                    raise LoopUnsupported(
                        f"block 0 ('{skip.block.name}') keeps other residuals "
                        "inside the loop than outside it"
                    )
                workspace = [_set_row(a, b, t) for a, b in zip(workspace, kept)]
                state = [_set_row(a, b, r) for a, b in zip(state, new_state)]
                return t + 1, y, state, workspace

            zero = jnp.zeros((), "int32")
            _, h, state, workspace = jax.lax.while_loop(
                lambda carry: carry[0] < n, step, (zero, x, list(state), list(workspace))
            )
            return h, state, workspace

        path = jax.custom_vjp(forward)

        def path_fwd(weights, floats, x, state, others, idx, n, scale, workspace):
            out = forward(weights, floats, x, state, others, idx, n, scale, workspace)
            return out, (weights, floats, others, idx, n, out[2])

        def path_bwd(saved, cotangents):
            weights, floats, others, idx, n, workspace = saved
            dh = cotangents[0]
            vjp_tree, kinds = record["tree"], record["kinds"]
            grads = [jnp.zeros(a.shape, a.dtype) for a in weights]
            float_grads = [jnp.zeros(a.shape, a.dtype) for a in floats]

            def step(carry):
                t, dh, grads, float_grads = carry
                r = idx[t]
                stored = iter(workspace)
                leaves = []
                for kind, ref in kinds:
                    if kind == "weight":
                        leaves.append(_row(weights[ref], r))
                    elif kind == "float":
                        leaves.append(floats[ref])
                    elif kind == "other":
                        leaves.append(others[ref])
                    elif kind == "const":
                        leaves.append(ref)
                    else:
                        leaves.append(_row(next(stored), t))
                vjp = jax.tree_util.tree_unflatten(vjp_tree, leaves)
                d_weights, dh, d_floats = vjp(dh)
                grads = [_set_row(g, d, r) for g, d in zip(grads, d_weights)]
                float_grads = [a + b.astype(a.dtype) for a, b in zip(float_grads, d_floats)]
                return t - 1, dh, grads, float_grads

            _, dx, grads, float_grads = jax.lax.while_loop(
                lambda carry: carry[0] >= 0, step, (n - 1, dh, grads, float_grads)
            )
            return grads, float_grads, dx, None, None, None, None, None, None

        path.defvjp(path_fwd, path_bwd)
        h, new_state, new_workspace = path(
            list(current.weights), floats, x, list(current.state), others, current.idx,
            current.n, scale_table, workspace,
        )
        current.out = (h, new_state, new_workspace)
        current.last = h
        return h

    # ------------------------------------------------------------------
    # The optimizer.

    def stateless_apply(self, optimizer_values, grads, trainable):
        """Keras' `optimizer.stateless_apply`, on the stacked lists."""
        optimizer = self.model.optimizer
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            return self._loss_scaled_apply(optimizer, optimizer_values, grads, trainable)
        return self._apply(optimizer, optimizer_values, grads, trainable)

    def _apply(self, optimizer, optimizer_values, grads, trainable):
        import jax

        model = self.model
        stacks = self.stacks
        inner = getattr(optimizer, "inner_optimizer", optimizer)
        rest_grads, block_grads = stacks.split(grads, TRAINABLE)
        if inner.global_clipnorm:
            from keras.src.optimizers.base_optimizer import clip_by_global_norm

            clipped = clip_by_global_norm(rest_grads + block_grads, inner.global_clipnorm)
            rest_grads, block_grads = clipped[: len(rest_grads)], clipped[len(rest_grads) :]
        _, weights = stacks.split(trainable, TRAINABLE)
        rest_slots, slots = stacks.split(optimizer_values, OPTIMIZER)
        base = list(zip(model.trainable_variables, stacks.views(trainable, TRAINABLE)))
        base += list(zip(optimizer.variables, stacks.views(optimizer_values, OPTIMIZER)))
        current = self.current
        rest_variables = stacks.rest_variables(model.trainable_variables, TRAINABLE)
        rest_optimizer = stacks.rest_variables(optimizer.variables, OPTIMIZER)

        with _no_global_clipnorm(inner):

            def update(carry):
                t, weights, slots = carry
                r = current.idx[t]
                pairs = base + list(zip(self.block_weights, [_row(a, r) for a in weights]))
                pairs += list(zip(self.block_slots, [_row(a, r) for a in slots]))
                with keras.StatelessScope(_last_wins(pairs)) as scope:
                    inner.apply([_row(g, r) for g in block_grads], self.block_weights)
                new_weights = scopes.values_of(scope, self.block_weights)
                new_slots = scopes.values_of(scope, self.block_slots)
                weights = [_set_row(a, b, r) for a, b in zip(weights, new_weights)]
                after = _after(r, weights)
                slots = [_set_row(a, b, after) for a, b in zip(slots, new_slots)]
                return t + 1, weights, slots

            zero = ops.zeros((), "int32")
            _, weights, slots = jax.lax.while_loop(
                lambda carry: carry[0] < current.rows, update, (zero, list(weights), list(slots))
            )
            with keras.StatelessScope(base) as scope:
                if rest_variables:
                    inner.apply(rest_grads, rest_variables)
                else:
                    inner._iterations.assign_add(1)
            new_rest = scopes.values_of(scope, rest_variables)
            new_rest_slots = scopes.values_of(scope, rest_optimizer)
        return (
            stacks.join(new_rest, weights, TRAINABLE),
            stacks.join(new_rest_slots, slots, OPTIMIZER),
        )

    def _loss_scaled_apply(self, optimizer, optimizer_values, grads, trainable):
        """A `LossScaleOptimizer`'s `stateless_apply`, as Keras' own does it."""
        import jax

        stacks = self.stacks
        rest = stacks.rest[OPTIMIZER]
        position = {n: p for p, n in enumerate(rest)}
        variables = optimizer.variables
        at = {
            name: position[next(n for n, v in enumerate(variables) if v is var)]
            for name, var in (("counter", optimizer.step_counter), ("scale", optimizer.dynamic_scale))
        }
        counter = optimizer_values[at["counter"]]
        scale = optimizer_values[at["scale"]]
        finite = ops.all(ops.stack([ops.all(ops.isfinite(g)) for g in grads]))

        def with_own(values, new_counter, new_scale):
            values = list(values)
            values[at["counter"]] = new_counter
            values[at["scale"]] = new_scale
            return values

        def apply_finite(_):
            unscaled = [ops.divide(g, scale) for g in grads]
            new_trainable, new_optimizer = self._apply(optimizer, optimizer_values, unscaled, trainable)
            grow = ops.equal(counter, optimizer.dynamic_growth_steps - 1)
            new_counter = ops.where(grow, ops.zeros_like(counter), counter + 1)
            new_scale = ops.where(grow, scale * 2.0, scale)
            return list(new_trainable), with_own(new_optimizer, new_counter, new_scale)

        def skip(_):
            values = with_own(optimizer_values, ops.zeros_like(counter), scale * 0.5)
            return list(trainable), values

        return jax.lax.cond(finite, apply_finite, skip, None)


class _Probed(Exception):
    pass


def positions(on):
    """`idx` (the path's blocks in depth order, then the others) and `n`."""
    num_blocks = on.shape[0]
    index = ops.arange(num_blocks, dtype="int32")
    idx = ops.cast(ops.argsort(ops.where(on, index, index + num_blocks)), "int32")
    return idx, ops.sum(ops.cast(on, "int32"))


def _row(array, r):
    import jax

    return jax.lax.dynamic_index_in_dim(array, r, 0, keepdims=False)


def _set_row(array, value, r):
    import jax

    return jax.lax.dynamic_update_index_in_dim(array, value.astype(array.dtype), r, 0)


def _after(r, written):
    """`r`, read after the arrays `written` are: the slots' writes wait for the weights'.

    A weight's new row is computed from its slots' old rows, and XLA fuses
    those reads into the weight's write. Unless the slots' writes depend on
    that write, XLA cannot order them after it and copies every slot's stack
    at each iteration to keep the old rows readable (measured: about 25 MB a
    row on the encoder of `benchmarks/step_time.py`). The dependence is a
    condition that never holds (`r` is never negative) on one element of
    each written row, which XLA cannot fold away.
    """
    import jax.numpy as jnp

    flags = [
        jnp.isnan(jnp.ravel(_row(a, r))[0])
        for a in written
        if jnp.issubdtype(a.dtype, jnp.floating) and a.size > 0
    ]
    if not flags:
        return r
    return jnp.where(jnp.any(jnp.stack(flags)) & (r < 0), 0, r)


def _kind(leaf):
    import jax
    import jax.numpy as jnp

    if not isinstance(leaf, jax.Array):
        return "static"
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
        return "float"
    return "other"


def _residual_kind(leaf, weights, floats, others):
    import jax

    for j, w in enumerate(weights):
        if leaf is w:
            return ("weight", j)
    for m, f in enumerate(floats):
        if leaf is f:
            return ("float", m)
    for m, o in enumerate(others):
        if leaf is o:
            return ("other", m)
    if not isinstance(leaf, jax.core.Tracer):
        return ("const", leaf)
    return ("ws", None)


def _last_wins(pairs):
    seen = {}
    for variable, value in pairs:
        seen[id(variable)] = (variable, value)
    return list(seen.values())


def _signature(data):
    import jax

    return tuple(
        (tuple(getattr(leaf, "shape", ())), str(getattr(leaf, "dtype", type(leaf).__name__)))
        for leaf in jax.tree_util.tree_leaves(data)
    )


@contextlib.contextmanager
def _no_global_clipnorm(optimizer):
    """Keras' `apply` on rows must not clip by their norm alone: the step
    clipped every gradient together before."""
    clip = optimizer.global_clipnorm
    if not clip:
        yield
        return
    optimizer.global_clipnorm = None
    try:
        yield
    finally:
        optimizer.global_clipnorm = clip
