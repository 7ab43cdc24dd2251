"""The train function: one compiled function per variant, each built once.

`train_function(steps, make_base)` returns the function Keras' `fit` calls
for each execution. It looks up the variant the host picked
(`Steps.prepare`), builds Keras' own train function around that variant's
step on first use (`make_base`), times its first call (tracing and
compiling: `RandomPartModel.compiled_train_steps`) and converts what `fit`
threads between executions where consecutive variants need it in different
forms:

- JAX: the loop step threads the blocks' state stacked (`stacked.py`) with
  its workspace; the other variants take Keras' per-variable lists.
- TensorFlow: the loop step keeps the blocks' state in stacked variables;
  before any other variant runs, the blocks' own variables take it back.

A loop step that fails while it is traced (`LoopUnsupported`: the model
broke an assumption only the trace can show) is given up for this model,
with a warning, and the execution runs the conditional step instead.
"""

import time

import keras


def train_function(steps, make_base):
    """A dispatcher to one compiled train function per variant.

    `make_base(step)` makes Keras' train function around `step`: a distinct
    step function per variant, since JAX caches traces by function.
    """
    variants = {}
    compiled = {}
    steps.compiled = compiled
    model = steps.model
    backend = keras.backend.backend()

    def variant(key):
        if key not in variants:

            def step(*args, **kwargs):
                steps.tracing = key
                return type(model).train_step(model, *args, **kwargs)

            variants[key] = make_base(step)
        return variants[key]

    def current_key():
        if steps.plan is None:
            return ("static", (True,) * len(model.blocks))
        return steps.variant

    def call(key, args, kwargs):
        function = variant(key)
        if backend == "jax":
            args = _jax_state_for(steps, key, args)
        elif backend == "tensorflow" and steps.loop is not None:
            if key == ("loop",):
                steps.loop.to_stacks()
            else:
                steps.loop.to_blocks()
        # PyTorch looks `train_step` up at each call: tell it the variant.
        steps.tracing = key
        if key in compiled or backend == "torch":
            return function(*args, **kwargs)
        # The first call traces and compiles (and runs one execution).
        start = time.perf_counter()
        try:
            result = function(*args, **kwargs)
        except Exception:
            _keep_jax_state(steps, args)
            raise
        compiled[key] = time.perf_counter() - start
        return result

    def train_function(*args, **kwargs):
        key = current_key()
        if key != ("loop",):
            return call(key, args, kwargs)
        from keras_raptr.engine.loop_jax import LoopUnsupported

        args = _peekable(args)
        try:
            return call(key, args, kwargs)
        except LoopUnsupported as error:
            if backend == "jax":
                args = (_keras_state(steps, args[0]), *args[1:])
            elif steps.loop is not None:
                steps.loop.to_blocks()
            steps.give_up_loop(error.reason)
            variants.pop(key, None)
            steps.variant = ("conditional",)
            return call(steps.variant, args, kwargs)

    return train_function


def _peekable(args):
    """JAX: the iterator of `(state, iterator)`, able to show its next batch."""
    if keras.backend.backend() != "jax" or len(args) < 2:
        return args
    return (args[0], _Peek(args[1]), *args[2:])


class _Peek:
    def __init__(self, iterator):
        self._iterator = iterator
        self._first = []

    def peek(self):
        if not self._first:
            self._first.append(next(self._iterator))
        return self._first[0]

    def __iter__(self):
        return self

    def __next__(self):
        if self._first:
            return self._first.pop()
        return next(self._iterator)


def _jax_state_for(steps, key, args):
    """The state in the form the variant `key` takes it."""
    if not args or not isinstance(args[0], tuple):
        return args
    state = args[0]
    loop = steps.loop
    if loop is None:
        return args
    stacked = loop.stacks.is_stacked(state)
    if key == ("loop",) and threads_stacked(steps.model):
        if not stacked:
            iterator = args[1]
            data = iterator.peek() if isinstance(iterator, _Peek) else None
            workspace = steps.workspace
            steps.workspace = None
            if workspace is None and data is not None:
                workspace = loop.workspace_for(state, data, steps.plan.scaling != "none")
            state = loop.stack_state(state, workspace or ())
    elif stacked:
        state = _keras_state(steps, state)
    return (state, *args[1:])


def _keras_state(steps, state):
    """Keras' per-variable state from a stacked one (the workspace kept aside)."""
    loop = steps.loop
    if loop is None or not isinstance(state, tuple) or not loop.stacks.is_stacked(state):
        return state
    state, workspace = loop.unstack_state(state)
    steps.workspace = workspace or None
    return state


def threads_stacked(model):
    """JAX: whether `fit` threads the blocks' state stacked between loop steps.

    On one device with a compiled step. Under a `keras.distribution` (whose
    sharding Keras reads off each variable) or without `jit_compile`, the
    loop step stacks Keras' lists itself at each step.
    """
    return (
        not model.run_eagerly
        and model.jit_compile
        and keras.distribution.distribution() is None
    )


def unstack_jax_state(steps):
    """Puts a stacked `fit` state back in Keras' form, before a sync."""
    model = steps.model
    state = getattr(model, "_jax_state", None)
    if not state or getattr(model, "_jax_state_synced", True) or steps.loop is None:
        return
    lists = tuple(state.get(name) for name in _JAX_STATE)
    if any(values is None for values in lists) or not steps.loop.stacks.is_stacked(lists):
        return
    state.update(dict(zip(_JAX_STATE, _keras_state(steps, lists))))


# The four lists of Keras' JAX training state, in `fit`'s order.
_JAX_STATE = (
    "trainable_variables",
    "non_trainable_variables",
    "optimizer_variables",
    "metrics_variables",
)


def _keep_jax_state(steps, args):
    """JAX: hands the state of a step that failed to compile back to Keras.

    Keras' `fit` releases the variables' values before its first step and
    writes the state it threads back when `fit` ends, even by an error;
    a step that fails while it is traced (a block that is not residual)
    returns none, and without this the variables would be left empty.
    """
    model = steps.model
    if keras.backend.backend() != "jax" or not args or not isinstance(args[0], tuple):
        return
    state = _keras_state(steps, args[0])
    object.__setattr__(model, "_jax_state", dict(zip(_JAX_STATE, state)))
    object.__setattr__(model, "_jax_state_synced", False)
