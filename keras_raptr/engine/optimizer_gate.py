"""What the optimizer does to the blocks off the path, in a gated step.

The loop step (`loop_jax.py`, `loop_tf.py`) updates the path's rows only
(`off_path_update="skip"`) or every row (`"zero_grad"`) itself. The steps
with a gate per block (`conditional.py`: static paths, PyTorch's host path,
the conditional step) use what is here:

`off_path_update="skip"` (the default): `skip_off_path_updates`, below.
`off_path_update="zero_grad"`: `zero_off_path_gradients`, at the end.

Skipping the optimizer update of the blocks off the path:

A block off the path has no gradient. Left alone, JAX and TensorFlow would
hand the optimizer zeros for it and pay for a full update of its weights and
slots (Adam's moments, weight decay) at every step, and PyTorch would leave it
out. Here every backend leaves it out: inside a gated train step, the update
(weight decay included) of each block's variables runs under that block's
gate, so an off-path block's weights and optimizer state stay exactly as they
are, and its update costs nothing.

- JAX: the optimizer runs in a `StatelessScope`; a block's update runs in a
  `jax.lax.cond` whose outputs are the variables the update assigns (found by
  tracing the update once; that trace is dead code that XLA removes).
- TensorFlow: a `tf.cond` around the block's update ops.
- PyTorch: the path is known on the host; the off-path blocks' (absent)
  gradients are dropped before the optimizer sees them.
- A gate that is a Python bool (PyTorch, or a path that is the same at every
  step of a stage) decides when tracing: no conditional at all. On
  TensorFlow such a step needs no gate (`conditional.run_gated`): the blocks off
  the path have no gradient, and Keras' optimizer leaves them out.
"""

import contextlib
import threading

import keras
from keras import ops


@contextlib.contextmanager
def skip_off_path_updates(optimizer, groups, gates):
    """Within the context, `optimizer` updates block `i` only if `gates[i]`.

    Args:
        optimizer: the model's `keras.optimizers.Optimizer`.
        groups: list, per block, of its trainable variables.
        gates: list, per block, of a scalar boolean tensor, or a Python bool
            when the path is known on the host (always on PyTorch).
    """
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    owner = {id(v): i for i, variables in enumerate(groups) for v in variables}
    backend = keras.backend.backend()
    overrides = {"_filter_empty_gradients": _filter_absent(optimizer, owner, gates)}
    if backend != "torch":
        overrides.update(_graph_overrides(optimizer, owner, gates, backend))
    with _overridden(optimizer, overrides):
        yield


_OVERRIDES_LOCK = threading.Lock()


@contextlib.contextmanager
def _overridden(optimizer, overrides):
    """Replaces methods of `optimizer` for the calling thread, within the context.

    `tf.distribute.MirroredStrategy` traces each replica's train step in a
    thread of its own and switches threads at each `merge_call` (inside the
    optimizer's update), so two replicas can be inside this context at
    once: each method is replaced by one dispatcher that calls
    the calling thread's override (or the optimizer's own method), and the
    last thread to leave restores the optimizer. An override reaches the
    optimizer's own method through `_own`, when it is called.

    Args:
        optimizer: the optimizer whose methods to replace.
        overrides: dict, method name to the function to call instead.
    """
    thread = threading.get_ident()
    outer = {}  # this thread's overrides when the context is entered again
    with _OVERRIDES_LOCK:
        table = optimizer.__dict__.get("_raptr_overrides")
        if table is None:
            table = {}
            object.__setattr__(optimizer, "_raptr_overrides", table)
        for name, function in overrides.items():
            if name not in table:
                table[name] = _dispatch(optimizer, name)
            per_thread, _ = table[name]
            if thread in per_thread:
                outer[name] = per_thread[thread]
            per_thread[thread] = function
    try:
        yield
    finally:
        with _OVERRIDES_LOCK:
            for name in overrides:
                per_thread, _ = table[name]
                if name in outer:
                    per_thread[thread] = outer[name]
                    continue
                del per_thread[thread]
                if not per_thread:
                    del table[name]
                    object.__delattr__(optimizer, name)
            if not table:
                object.__delattr__(optimizer, "_raptr_overrides")


def _dispatch(optimizer, name):
    """Installs the per-thread dispatcher of `optimizer.<name>`; returns its
    table of thread id to override, and the method it replaced."""
    original = getattr(optimizer, name)
    per_thread = {}

    def dispatcher(*args, **kwargs):
        return per_thread.get(threading.get_ident(), original)(*args, **kwargs)

    object.__setattr__(optimizer, name, dispatcher)
    return per_thread, original


def _own(optimizer, name):
    """`optimizer.<name>` as it was before `_overridden` replaced it."""
    entry = optimizer.__dict__.get("_raptr_overrides", {}).get(name)
    return entry[1] if entry else getattr(optimizer, name)


def _filter_absent(optimizer, owner, gates):
    """Drops the absent gradients of blocks known to be off (no warning)."""

    def filter_empty_gradients(grads, variables):
        kept = [
            (g, v)
            for g, v in zip(grads, variables)
            if not (g is None and id(v) in owner and gates[owner[id(v)]] is False)
        ]
        own = _own(optimizer, "_filter_empty_gradients")
        return own([g for g, _ in kept], [v for _, v in kept])

    return filter_empty_gradients


def _graph_overrides(optimizer, owner, gates, backend):
    def apply_weight_decay(variables):
        return _own(optimizer, "_apply_weight_decay")(variables)

    def update_step(grads, variables, learning_rate):
        return _own(optimizer, "_backend_update_step")(grads, variables, learning_rate)

    def gated_weight_decay(variables):
        # Blocks decay inside their gated update below.
        apply_weight_decay([v for v in variables if id(v) not in owner])

    def gated_update_step(grads, variables, learning_rate):
        rest = [(g, v) for g, v in zip(grads, variables) if id(v) not in owner]
        if rest:
            update_step([g for g, _ in rest], [v for _, v in rest], learning_rate)
        by_block = {}
        for g, v in zip(grads, variables):
            if id(v) in owner:
                by_block.setdefault(owner[id(v)], []).append((g, v))
        for i, pairs in sorted(by_block.items()):
            block_grads = [g for g, _ in pairs]
            block_vars = [v for _, v in pairs]

            def update(block_grads=block_grads, block_vars=block_vars):
                apply_weight_decay(block_vars)
                update_step(block_grads, block_vars, learning_rate)

            if isinstance(gates[i], bool):
                # Known when tracing: update or not, no conditional.
                if gates[i]:
                    update()
            elif backend == "jax":
                _jax_cond_update(gates[i], update, list(optimizer.variables) + block_vars)
            else:
                _tf_cond_update(gates[i], update)

    return {
        "_apply_weight_decay": gated_weight_decay,
        "_backend_update_step": gated_update_step,
    }


def _tf_cond_update(on, update):
    def on_path():
        update()
        return ops.zeros((), "int32")

    ops.cond(on, on_path, lambda: ops.zeros((), "int32"))


def _jax_cond_update(on, update, candidates):
    import jax
    from keras.src.backend.common.stateless_scope import get_stateless_scope

    scope = get_stateless_scope()
    if scope is None:
        raise RuntimeError("The JAX optimizer update runs outside a StatelessScope.")
    candidates = [v for v in candidates if scope.get_current_value(v) is not None]
    before = [scope.get_current_value(v) for v in candidates]
    # Trace the update once to learn which variables it assigns; its results
    # are discarded (dead code for XLA) and the variables restored.
    update()
    touched = [
        (v, old)
        for v, old in zip(candidates, before)
        if scope.get_current_value(v) is not old
    ]
    for v, old in touched:
        v.assign(old)
    variables = [v for v, _ in touched]
    old_values = [old for _, old in touched]

    def on_path(values):
        update()
        return [scope.get_current_value(v) for v in variables]

    def off_path(values):
        return values

    new_values = jax.lax.cond(on, on_path, off_path, old_values)
    for v, value in zip(variables, new_values):
        v.assign(value)


@contextlib.contextmanager
def zero_off_path_gradients(optimizer, variables):
    """Within the context, `optimizer` updates `variables` without a gradient
    with a zero gradient (`off_path_update="zero_grad"`).

    A block off the path has no gradient on TensorFlow and PyTorch (it is
    not in the step), and a zero one on JAX. Keras' optimizer leaves out a
    variable without a gradient; here each such variable of a block gets
    zeros instead, so that every backend updates the off-path blocks as an
    implementation that multiplies their output by zero would: Adam's
    moments decay, weight decay applies, momentum moves the weights. Their
    forward and backward passes still cost nothing; their update costs as
    much as an on-path block's.

    Args:
        optimizer: the model's `keras.optimizers.Optimizer`.
        variables: the blocks' trainable variables.
    """
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    blocks = {id(v) for v in variables}

    def filter_empty_gradients(grads, variables):
        grads = [
            ops.zeros(v.shape, v.dtype) if g is None and id(v) in blocks else g
            for g, v in zip(grads, variables)
        ]
        return _own(optimizer, "_filter_empty_gradients")(grads, variables)

    with _overridden(optimizer, {"_filter_empty_gradients": filter_empty_gradients}):
        yield
