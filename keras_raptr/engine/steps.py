"""Which train step runs the coming steps of a `RandomPartModel`, and the step.

The model holds one `Steps`. At `fit` the strategy's plan is attached; before
each execution the strategy calls `prepare(first, stop)` with the train steps
to come, counted as the optimizer counts them (its `iterations`; with
`gradient_accumulation_steps=A`, micro-batches, of which each run of `A` is
one optimizer step with one path), and the host picks the variant:

- `("loop",)`: JAX and TensorFlow, when the blocks pass `blocks.check`: every
  path, whatever its length, schedule or strategy, in one compiled step
  (`loop_jax.py`, `loop_tf.py`). The path is computed inside the step.
- `("static", path)`: a path the plan knows to be the same at every step of
  the execution (every block: the plain network; the fixed blocks; a
  stacking prefix), when there is no loop step. Its off blocks are not in
  the step.
- `("conditional",)`: JAX and TensorFlow, blocks that fail `blocks.check`:
  one conditional per block (`conditional.py`); `engine_reason` says why.
- `("host",)`: PyTorch, eager: the step's path comes from the host.

Each variant is compiled once, on its first call (`dispatch.py`), and reused
by every stage and every `fit` while the plan stays the same.
"""

import contextlib
import os
import sys
import warnings
import weakref

import keras
import numpy as np
from keras import ops

from keras_raptr.engine import blocks
from keras_raptr.engine import conditional
from keras_raptr.engine import path
from keras_raptr.engine.xp import KERAS
from keras_raptr.engine.xp import NUMPY


class Steps:
    """The train-step variants of one model, and the one for the coming steps."""

    def __init__(self, model):
        self.model = model
        self.plan = None
        self.variant = None
        # The optimizer's count of train steps (micro-batches) at the next
        # train step, as the host counts it (PyTorch reads it in the step).
        self.host_call = 0
        # Set while a variant is traced (JAX, TensorFlow) or run (PyTorch).
        self.tracing = None
        self.compiled = {}
        # The loop step of this `fit` (`None` on PyTorch or when the blocks
        # fail `blocks.check`: `reason` says why), found at the first
        # `prepare` of each `fit`.
        self.loop = None
        self.reason = None
        self._checked = False
        self._loop_cache = None
        self._free_variables = None
        # JAX: the loop step's workspace while `fit` threads Keras' lists.
        self.workspace = None
        # Width-wise stages: `(key, parts per block, slots per variable)`.
        self._width = None

    def attach(self, plan):
        """A strategy's plan for the next `fit` (`None`: the full network)."""
        self.release()
        self.plan = plan
        self.variant = None
        self._free_variables = None
        self._checked = False
        if plan is None:
            return
        # The plan's constant tables for the host (numpy) and the compiled
        # step (tensors made once, outside any trace).
        self.tables = plan.tables()
        self.tensors = {name: ops.convert_to_tensor(t) for name, t in self.tables.items()}

    @property
    def key(self):
        """Equal for plans that can share compiled train steps."""
        return None if self.plan is None else self.plan.key

    def path_at(self, step, xp):
        """The path at `step` and the per-block residual scales (or `None`)."""
        tables = self.tables if xp is NUMPY else self.tensors
        seed = self.model.seed
        with np.errstate(over="ignore"):
            on = path.draw(self.plan, tables, seed, step, xp)
            scale = path.scales(self.plan, tables, step, xp)
        return on, scale

    # ------------------------------------------------------------------
    # The host: which variant runs the coming steps.

    def prepare(self, first, stop):
        """Picks the variant for the train steps (micro-batches) `[first, stop)`."""
        self.host_call = first
        _, every = step_counter(self.model.optimizer)
        # The optimizer steps these train steps belong to.
        start, stop = first // every, (stop - 1) // every + 1
        backend = keras.backend.backend()
        static = self.plan.static_path(start, stop)
        narrow = self._width_over(start, stop)
        if backend == "torch":
            self.variant = (("static", static) if static is not None else ("host",)) + narrow
            return
        if not narrow and self.find_loop() is not None:
            self.variant = ("loop",)
            return
        if static is not None:
            self.variant = ("static", static) + narrow
            return
        self.variant = ("conditional",) + narrow
        strategy = _tf_distribute_strategy(self.model)
        if strategy is not None:
            raise ValueError(
                f"Under `{strategy}`, the steps from optimizer step {start} "
                f"need the conditional train step ({self.reason}), whose "
                "per-block optimizer updates a `tf.distribute` strategy cannot "
                "run. Give the blocks one structure, called in one chain of a "
                "Functional model (see `RandomPartModel.engine_reason`)."
            )

    def _width_over(self, start, stop):
        """`()` at full width, else `(width,)`: the width joins the variant's key."""
        width = self.plan.width_over(start, stop)
        if width is None:
            raise ValueError(
                f"The optimizer steps {start} to {stop - 1} of one execution "
                "span a change of width, which a compiled step cannot follow "
                "(each width is its own step). Use a `steps_per_execution` "
                "that divides the stages' lengths."
            )
        if width == 1.0:
            return ()
        self._width_slots()
        return (float(width),)

    def _width_slots(self):
        """The blocks' adapters and each sliced variable's optimizer slots (host)."""
        model = self.model
        key = (id(model.optimizer), tuple(id(v) for v in model.trainable_variables))
        if self._width is not None and self._width[0] == key:
            return
        from keras_raptr.engine import width
        from keras_raptr.layers.width_parts import width_parts

        self._variables_ready()
        parts = [width_parts(skip.block) for skip in model.blocks]
        sliced = [v for p in parts for v, _, _ in p.slices()]
        slots = width.slot_map(model.optimizer, sliced) if model.optimizer else {}
        self._width = (key, parts, slots)

    def _variables_ready(self):
        """The variables' live values, and the optimizer's slots, on the host."""
        model = self.model
        if keras.backend.backend() == "jax":
            # Variables hold stale (donated) buffers during a JAX `fit`.
            model.jax_state_sync()
        if model.optimizer is not None and not model.optimizer.built:
            # As Keras would at the first step (TensorFlow builds late).
            model.optimizer.build(model.trainable_variables)

    def find_loop(self):
        """The loop step for this `fit`, or `None` (then `reason` says why)."""
        if self._checked:
            return self.loop
        self._checked = True
        model = self.model
        self._variables_ready()
        # Finding each weight's slots runs the optimizer's update once per
        # block variable: done again only when the optimizer or the
        # variables change, not at every `fit`.
        key = tuple(
            tuple(id(v) for v in variables)
            for variables in (
                model.trainable_variables,
                model.non_trainable_variables,
                getattr(model.optimizer, "variables", ()),
            )
        )
        cached = self._loop_cache
        if not (cached and cached[0]() is model.optimizer and cached[1] == key):
            layout, reason = blocks.check(model)
            loop = None
            if layout is not None:
                loop = _make_loop(model, layout)
            owner = model.optimizer and weakref.ref(model.optimizer)
            cached = (owner, key, loop, reason)
            if owner is not None:
                self._loop_cache = cached
        self.loop, self.reason = cached[2], cached[3]
        if self.reason is not None:
            warnings.warn(
                f"RaPTr trains the model '{model.name}' through one conditional per "
                f"block, not the loop step, because {self.reason}. The paths and "
                "weights are the same; only slower on accelerators. "
                "`model.engine_reason` keeps this reason.",
                stacklevel=_caller_level(),
            )
        return self.loop

    def give_up_loop(self, reason):
        """The loop step failed while it was traced: the conditional step instead."""
        self.loop, self.reason = None, reason
        if self._loop_cache is not None:
            owner, key, _, _ = self._loop_cache
            self._loop_cache = (owner, key, None, reason)
        warnings.warn(
            f"RaPTr trains the model '{self.model.name}' through one conditional per "
            f"block, not the loop step, because {reason}.",
            stacklevel=_caller_level(),
        )

    def release(self):
        """Hands the blocks' state back to their variables (TensorFlow's loop)."""
        loop = self.loop
        if loop is not None and hasattr(loop, "to_blocks"):
            loop.to_blocks()

    # ------------------------------------------------------------------
    # Inside the step.

    def train_step(self, base_step, args, kwargs):
        """One train step of the traced variant; `base_step` is Keras' own."""
        model = self.model
        backend = keras.backend.backend()
        kind = self.tracing[0]
        if kind == "loop":
            zero_grad = self._zero_grad()

            def path_at(step):
                return self.path_at(step, KERAS)

            if backend == "jax":
                logs, state, step = self.loop.train_step(
                    base_step, args[0], args[1], path_at, zero_grad
                )
                return {**logs, **self.plan.logs(step, self.tensors)}, state
            logs, step = self.loop.train_step(base_step, args[0], path_at, zero_grad)
            return {**logs, **self.plan.logs(step, self.tensors)}
        step = self._optimizer_step(args)
        if kind == "host" and self.rereads_count():
            # A skipped step did not advance the count: read it (eager).
            self.host_call = self.calls()
        width = variant_width(self.tracing)
        if width < 1.0:
            host_step = None
            if backend == "torch":
                # The host counts PyTorch's steps: draws in numpy.
                host_step = self.host_call // step_counter(model.optimizer)[1]
            with self._narrow(step if host_step is None else host_step, width):
                return self._gated_step(kind, base_step, step, args, kwargs)
        return self._gated_step(kind, base_step, step, args, kwargs)

    def _gated_step(self, kind, base_step, step, args, kwargs):
        model = self.model
        backend = keras.backend.backend()
        if kind == "static":
            static = self.tracing[1]
            if all(static):
                result = base_step(*args, **kwargs)
            else:
                gates = [(bool(on), None) for on in static]
                result = self._run_gated(base_step, gates, args, kwargs)
        elif kind == "host":
            on, scale = self.path_at(self.host_call // step_counter(model.optimizer)[1], NUMPY)
            gates = [
                (bool(on[i]), None if scale is None else float(scale[i]))
                for i in range(len(on))
            ]
            result = self._run_gated(base_step, gates, args, kwargs)
        else:
            on, scale = self.path_at(step, KERAS)
            gates = [
                (on[i], None if scale is None else scale[i])
                for i in range(len(model.blocks))
            ]
            result = self._run_gated(base_step, gates, args, kwargs)
        if backend == "torch":
            self.host_call += 1
        logs = self.plan.logs(step, self.tensors)
        if backend == "jax":
            result_logs, state = result
            return {**result_logs, **logs}, state
        return {**result, **logs}

    @contextlib.contextmanager
    def _narrow(self, step, width_value):
        """Within the context, every block runs its kept heads and units.

        The kept indices are drawn in the step from `(seed, step, block)`;
        under `off_path_update="skip"` the optimizer moves only the kept
        slices of the blocks' variables and slots.
        """
        from keras_raptr.engine import width

        model = self.model
        _, parts, slots = self._width
        inverse = getattr(self.plan, "scaling", "none") == "inverse"
        masked = []
        # PyTorch's step is known on the host: numpy draws, one copy each.
        host = isinstance(step, (int, np.integer))
        for i, (skip, block_parts) in enumerate(zip(model.blocks, parts)):
            if host:
                indices = width.kept_indices(block_parts, width_value, model.seed, step, i, NUMPY)
                indices = {k: ops.convert_to_tensor(v) for k, v in indices.items()}
            else:
                indices = width.kept_indices(block_parts, width_value, model.seed, step, i, KERAS)
            object.__setattr__(skip, "_narrow", _Narrow(skip.block, block_parts, indices, inverse))
            if not self._zero_grad():
                for v, axis, part in block_parts.slices():
                    found, complete = slots.get(id(v), ([], False))
                    masked.append((v, found, axis, indices[part], complete))
        try:
            if masked and model.optimizer is not None:
                with width.kept_slices_only(model.optimizer, masked):
                    yield
            else:
                yield
        finally:
            for skip in model.blocks:
                object.__setattr__(skip, "_narrow", None)

    def optimizer_steps(self, calls):
        """The optimizer step of a train step, from the count of train steps."""
        _, every = step_counter(self.model.optimizer)
        return calls if every == 1 else ops.floor_divide(calls, every)

    def counter_variable(self):
        return step_counter(self.model.optimizer)[0]

    def _optimizer_step(self, args):
        counter, _ = step_counter(self.model.optimizer)
        if keras.backend.backend() != "jax":
            # A copy: the optimizer increments the variable in place later in
            # the step.
            value = ops.copy(counter.value)
        else:
            # JAX: the live value is in the state passed to the step.
            value = args[0][2][self._counter_index()]
        return self.optimizer_steps(value)

    def calls(self):
        """The optimizer's count of train steps now, read on the host.

        On JAX during `fit`, from the state Keras threads between steps
        (without syncing the variables): one scalar copied from the device,
        which waits for the step before to finish.
        """
        model = self.model
        counter, _ = step_counter(model.optimizer)
        state = getattr(model, "_jax_state", None)
        if (
            keras.backend.backend() == "jax"
            and state
            and not getattr(model, "_jax_state_synced", True)
            and state.get("optimizer_variables") is not None
        ):
            values = state["optimizer_variables"]
            loop = self.loop
            if loop is not None and loop.stacks.is_stacked((state["trainable_variables"],)):
                return int(np.asarray(values[loop.counter_position()]))
            return int(np.asarray(values[self._counter_index()]))
        if self.loop is not None and hasattr(self.loop, "calls"):
            return self.loop.calls()
        return int(ops.convert_to_numpy(counter))

    def rereads_count(self):
        """Whether the host must read the count before each execution.

        A `LossScaleOptimizer` (`mixed_float16`) skips a step whose gradients
        are not finite without advancing its count, which the host cannot
        foresee. The loop step computes the path in the step and serves
        every step: the host needs the count only for a strategy that acts
        between steps (`GradualStacking`'s copies).
        """
        if not isinstance(self.model.optimizer, keras.optimizers.LossScaleOptimizer):
            return False
        loop_serves = self._checked and self.loop is not None
        return not loop_serves or getattr(self.plan, "host_steps", False)

    def _run_gated(self, base_step, gates, args, kwargs):
        """Keras' own step, with per-block gates and the optimizer gated alike."""
        return conditional.run_gated(
            self.model,
            base_step,
            gates,
            args,
            kwargs,
            self.plan.fixed_blocks,
            self._zero_grad(),
            self._free_block_variables(),
        )

    def _zero_grad(self):
        """Whether the plan updates off-path blocks with a zero gradient."""
        return getattr(self.plan, "off_path_update", "skip") == "zero_grad"

    def _free_block_variables(self):
        """Per non-fixed block, its trainable variables (cached per plan)."""
        if self._free_variables is None:
            self._free_variables = [
                skip.block.trainable_variables
                for i, skip in enumerate(self.model.blocks)
                if i not in self.plan.fixed_blocks
            ]
        return self._free_variables

    def _counter_index(self):
        """The index of the optimizer's step counter in its variables."""
        optimizer = self.model.optimizer
        counter, _ = step_counter(optimizer)
        for n, variable in enumerate(optimizer.variables):
            if variable is counter:
                return n
        raise RuntimeError("The optimizer's step counter is not among its variables.")

    def train_function(self, make_base):
        from keras_raptr.engine import dispatch

        return dispatch.train_function(self, make_base)

    def unstack_jax_state(self):
        from keras_raptr.engine import dispatch

        dispatch.unstack_jax_state(self)

    def compiled_names(self):
        return {variant_name(key): seconds for key, seconds in self.compiled.items()}


class _Narrow:
    """A block's call narrowed to its kept heads and units (`engine/width.py`)."""

    def __init__(self, block, parts, indices, inverse):
        self.block, self.parts, self.indices, self.inverse = block, parts, indices, inverse

    def __call__(self, block_call):
        from keras_raptr.engine import width

        def call(*args, **kwargs):
            return width.narrow_call(
                self.block, self.parts, self.indices, block_call, args, kwargs, self.inverse
            )

        return call


def variant_width(key):
    """The width a variant's key runs at (1.0 without one)."""
    return key[-1] if key and isinstance(key[-1], float) else 1.0


def _make_loop(model, layout):
    if keras.backend.backend() == "jax":
        from keras_raptr.engine.loop_jax import JaxLoop

        return JaxLoop(model, layout)
    from keras_raptr.engine.loop_tf import TfLoop

    return TfLoop(model, layout)


def _caller_level():
    """The `stacklevel` that points a warning at the user's line (their `fit`).

    The engine is reached through Keras' `fit` and its callbacks, at a depth
    that depends on the backend: the warning names the first frame outside
    this library, Keras and the backends.
    """
    packages = tuple(
        os.path.dirname(module.__file__) + os.sep
        for module in (sys.modules[name] for name in _FRAMEWORKS if name in sys.modules)
        if getattr(module, "__file__", None)
    )
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(packages):
        frame, level = frame.f_back, level + 1
    return level


_FRAMEWORKS = ("keras_raptr", "keras", "keras_hub", "tensorflow", "jax", "torch")


def step_counter(optimizer):
    """The variable counting `optimizer`'s train steps, and the steps per update.

    Keras' `iterations` counts optimizer steps. With
    `gradient_accumulation_steps=A` it is computed from the count of train
    steps (micro-batches), of which every `A` make one optimizer step: that
    count is the variable (Keras keeps it as `_iterations`).
    """
    inner = optimizer
    while hasattr(inner, "inner_optimizer"):
        inner = inner.inner_optimizer
    every = int(getattr(inner, "gradient_accumulation_steps", None) or 1)
    if every == 1:
        return optimizer.iterations, 1
    return inner._iterations, every


def _tf_distribute_strategy(model):
    """The class name of the `tf.distribute` strategy `model` trains under, or `None`."""
    if keras.backend.backend() != "tensorflow":
        return None
    strategy = getattr(model, "distribute_strategy", None)
    name = type(strategy).__name__
    if strategy is None or name == "_DefaultDistributionStrategy":
        return None
    return name


def variant_name(key):
    """`"full"`, `"static 0,11"`, `"loop"`, `"conditional"` or `"host"`.

    A variant at a width below 1 adds it: `"full width 0.5"`.
    """
    width = variant_width(key)
    if width < 1.0:
        return f"{variant_name(key[:-1])} width {width:g}"
    if key[0] == "static":
        if all(key[1]):
            return "full"
        return "static " + ",".join(str(i) for i, on in enumerate(key[1]) if on)
    return key[0]
