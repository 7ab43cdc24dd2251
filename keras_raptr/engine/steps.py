"""Which train step runs the coming steps of a `RandomPartModel`, and how.

The model holds one `Steps` per instance. At `fit` the strategy's plan is
attached; before each execution the strategy calls `prepare(first, stop)`
with the train steps to come, counted as the optimizer counts them (its
`iterations`; with `gradient_accumulation_steps=A`, micro-batches, of which
each run of `A` is one optimizer step with one path), and the host picks the
variant:

- `("static", path)`: a path the plan knows to be the same at every step
  (every block: the plain network; the fixed blocks; a stacking prefix). Its
  off blocks are not in the step.
- `("gather", k)`: JAX and TensorFlow, blocks of one structure, every step
  of the execution with a path of `k` blocks (`gather.py`); on JAX, on the
  blocks' state stacked (`stacked.py`).
- `("drawn",)`: the fallback, one conditional per block (`optimizer_gate.py`
  and `layers/random_skip.py`): blocks of different structures, or an
  execution whose steps have paths of different lengths.
- `("host",)`: PyTorch, eager: the step's path comes from the host.

Each variant is compiled once, on its first call, and reused by every stage
and every `fit` while the plan stays the same.
"""

import contextlib
import time
import warnings
import weakref

import keras
import numpy as np
from keras import ops

from keras_raptr.engine import gather
from keras_raptr.engine import path
from keras_raptr.engine import stacked
from keras_raptr.engine.optimizer_gate import skip_off_path_updates
from keras_raptr.engine.optimizer_gate import zero_off_path_gradients
from keras_raptr.engine.xp import KERAS
from keras_raptr.engine.xp import NUMPY

# The four lists of Keras' JAX training state, in `fit`'s order.
_JAX_STATE = (
    "trainable_variables",
    "non_trainable_variables",
    "optimizer_variables",
    "metrics_variables",
)


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
        self._layout = False
        # `(optimizer weakref, variable ids, (layout, reason), packing)` of
        # the last layout found (the packing's conversions compile once).
        self._layout_cache = None
        self.fallback_reason = None
        self._free_variables = None
        # JAX: the packing of the blocks' state for this `fit` (or `None`).
        self.packing = None
        # JAX, while a packed gathered step traces: its path's `(idx, scale)`.
        self._gathered = None

    def attach(self, plan):
        """A strategy's plan for the next `fit` (`None`: the full network)."""
        self.plan = plan
        self.variant = None
        self._free_variables = None
        # The gather layout depends on the optimizer: found again per `fit`.
        self._layout = False
        self.packing = None
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

    def prepare(self, first, stop):
        """Picks the variant for the train steps (micro-batches) `[first, stop)`."""
        self.host_call = first
        _, every = step_counter(self.model.optimizer)
        # The optimizer steps these train steps belong to.
        start, stop = first // every, (stop - 1) // every + 1
        num_blocks = len(self.model.blocks)
        if keras.backend.backend() == "jax" and self._layout is False:
            # Before the first step takes the variables' values.
            self.layout()
        static = self.plan.static_path(start, stop)
        if static is not None:
            variant = ("static", static)
        elif keras.backend.backend() == "torch":
            variant = ("host",)
        else:
            lengths = {
                sum(path.host_path(self.plan, self.tables, self.model.seed, step))
                for step in range(start, stop)
            }
            variant = ("drawn",)
            if len(lengths) == 1 and self.layout() is not None:
                k = lengths.pop()
                if k == num_blocks and self.plan.scaling == "none":
                    variant = ("static", self.plan.full_path())
                elif k == 0:
                    variant = ("static", (False,) * num_blocks)
                else:
                    variant = ("gather", k)
            strategy = _tf_distribute_strategy(self.model)
            if variant == ("drawn",) and strategy is not None:
                reason = self.fallback_reason or (
                    f"the {stop - start} steps of one execution "
                    f"(`steps_per_execution={stop - start}`) have paths of "
                    f"{len(lengths)} different lengths"
                )
                raise ValueError(
                    f"Under `{strategy}`, the steps from optimizer step {start} "
                    f"need the fallback train step ({reason}), whose per-block "
                    "optimizer updates a `tf.distribute` strategy cannot run. "
                    "Compile with `steps_per_execution=1` (or sample paths of "
                    "one length per stage: `sampling='subset'`), and give the "
                    "blocks one structure."
                )
        self.variant = variant

    def layout(self):
        """The blocks' `gather.Layout` (checked once per `fit`), or `None`."""
        if self._layout is False:
            model = self.model
            if keras.backend.backend() == "jax":
                # Variables hold stale (donated) buffers during a JAX `fit`.
                model.jax_state_sync()
            if model.optimizer is not None and not model.optimizer.built:
                # As Keras would at the first step (TensorFlow builds late).
                model.optimizer.build(model.trainable_variables)
            # Finding each weight's slots runs the optimizer's update once
            # per block variable: done again only when the optimizer or the
            # variables change, not at every `fit`.
            key = tuple(
                tuple(id(v) for v in variables)
                for variables in (
                    model.trainable_variables,
                    model.non_trainable_variables,
                    getattr(model.optimizer, "variables", ()),
                )
            )
            cached = self._layout_cache
            if not (cached and cached[0]() is model.optimizer and cached[1] == key):
                found = gather.layout(model)
                packing = None
                if found[0] is not None and keras.backend.backend() == "jax":
                    packing = stacked.Packing(found[0], _specs(model))
                owner = model.optimizer and weakref.ref(model.optimizer)
                cached = (owner, key, found, packing)
                if owner is not None:
                    self._layout_cache = cached
            self._layout, self.fallback_reason = cached[2]
            self.packing = cached[3] if self._packs() else None
        return self._layout

    def _packs(self):
        """Whether this `fit` threads the blocks' state packed (`stacked.py`)."""
        model = self.model
        return (
            len(model.blocks) >= 2
            and not model.run_eagerly
            and model.jit_compile
            and keras.distribution.distribution() is None
        )

    def unpack_jax_state(self):
        """Puts a packed `fit` state back in Keras' form, before a sync."""
        model = self.model
        state = getattr(model, "_jax_state", None)
        if not state or getattr(model, "_jax_state_synced", True) or self.packing is None:
            return
        lists = tuple(state.get(name) for name in _JAX_STATE)
        if any(values is None for values in lists) or not self.packing.is_packed(lists):
            return
        state.update(dict(zip(_JAX_STATE, self.packing.unpack(lists))))

    # ------------------------------------------------------------------
    # Inside the step.

    def train_step(self, base_step, args, kwargs):
        """One train step of the traced variant; `base_step` is Keras' own."""
        model = self.model
        backend = keras.backend.backend()
        step = self._optimizer_step(args)
        kind = self.tracing[0]
        if kind == "static":
            static = self.tracing[1]
            if all(static):
                result = base_step(*args, **kwargs)
            else:
                gates = [(bool(on), None) for on in static]
                result = self._run_gated(base_step, gates, args, kwargs)
        elif kind == "host":
            if self.rereads_count():
                # A skipped step did not advance the count: read it (eager).
                self.host_call = self.calls()
            on, scale = self.path_at(self.host_call // step_counter(model.optimizer)[1], NUMPY)
            gates = [
                (bool(on[i]), None if scale is None else float(scale[i]))
                for i in range(len(on))
            ]
            result = self._run_gated(base_step, gates, args, kwargs)
        elif kind == "gather" and self._gathered is not None:
            # JAX, packed: `packed_step` read the path's blocks into the
            # first `k` positions; the rest are the identity.
            idx, scale = self._gathered
            step_gates = gather.gates(self.tracing[1], len(model.blocks), idx, scale)
            with gather.gated(model, step_gates):
                result = base_step(*args, **kwargs)
        elif kind == "gather":
            k = self.tracing[1]
            on, scale = self.path_at(step, KERAS)
            every = self._zero_grad()
            if backend == "jax":
                result = gather.jax_train_step(
                    model, self._layout, k, on, scale, args[0], args[1], base_step, every
                )
            else:
                with self._zero_grad_context():
                    result = gather.tf_train_step(
                        model, self._layout, k, on, scale, args[0], base_step, every
                    )
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

    def _optimizer_step(self, args):
        counter, every = step_counter(self.model.optimizer)
        if keras.backend.backend() != "jax":
            # A copy: the optimizer increments the variable in place later in
            # the step.
            value = ops.copy(counter.value)
        else:
            # JAX: the live value is in the state passed to the step.
            value = args[0][2][self._counter_index()]
        return _optimizer_steps(value, every)

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
            index = self._counter_index()
            if self.packing is not None and self.packing.is_packed(
                (state["trainable_variables"],)
            ):
                index = self.packing.rest[2].index(index)
            return int(np.asarray(state["optimizer_variables"][index]))
        return int(ops.convert_to_numpy(counter))

    def rereads_count(self):
        """Whether the host must read the count before each execution.

        A `LossScaleOptimizer` (`mixed_float16`) skips a step whose gradients
        are not finite without advancing its count, which the host cannot
        foresee.
        """
        return isinstance(self.model.optimizer, keras.optimizers.LossScaleOptimizer)

    def _run_gated(self, base_step, gates, args, kwargs):
        """Keras' own step, with per-block gates and the optimizer gated alike."""
        model = self.model
        fixed = self.plan.fixed_blocks
        gates = [None if i in fixed else gate for i, gate in enumerate(gates)]
        free = [gate[0] for gate in gates if gate is not None]
        if self._zero_grad():
            # Keras' own optimizer step over every block, the blocks off the
            # path with a zero gradient.
            with gather.gated(model, gates), self._zero_grad_context():
                return base_step(*args, **kwargs)
        if keras.backend.backend() == "tensorflow" and all(isinstance(on, bool) for on in free):
            # A path known when tracing: TensorFlow gives the blocks off it no
            # gradient, and Keras' optimizer leaves out (weight decay
            # included) the variables without one. No gate needed, and none
            # that a `tf.distribute` strategy's cross-replica update would
            # have to run through.
            with gather.gated(model, gates), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Gradients do not exist")
                return base_step(*args, **kwargs)
        with gather.gated(model, gates):
            with skip_off_path_updates(model.optimizer, self._free_block_variables(), free):
                return base_step(*args, **kwargs)

    def _zero_grad(self):
        """Whether the plan updates off-path blocks with a zero gradient."""
        return getattr(self.plan, "off_path_update", "skip") == "zero_grad"

    def _zero_grad_context(self):
        if not self._zero_grad():
            return contextlib.nullcontext()
        # Every block's: a gathered step moves a free block's values into a
        # fixed block's position.
        variables = [v for skip in self.model.blocks for v in skip.block.trainable_variables]
        return zero_off_path_gradients(self.model.optimizer, variables)

    def _free_block_variables(self):
        """Per non-fixed block, its trainable variables (cached per plan)."""
        if self._free_variables is None:
            self._free_variables = [
                skip.block.trainable_variables
                for i, skip in enumerate(self.model.blocks)
                if i not in self.plan.fixed_blocks
            ]
        return self._free_variables

    def _packed_step(self, packing, key, packed, data):
        """One gathered JAX train step on the packed state (`stacked.py`)."""
        model = self.model
        counter = packing.rest[2].index(self._counter_index())
        _, every = step_counter(model.optimizer)
        on, scale = self.path_at(_optimizer_steps(packed[2][counter], every), KERAS)
        # "zero_grad": every block's rows, the path's first (a permutation).
        every = self._zero_grad()
        idx, _ = gather.path_positions(on, key[1], every_block=every)
        self._gathered = (idx, scale)
        try:
            lists = packing.read(packed, idx, sorted_indices=not every)
            logs, state = type(model).train_step(model, (*lists, packed[3]), data)
        finally:
            self._gathered = None
        new = packing.write(packed, state[:3], idx, sorted_indices=not every)
        return logs, (*new, state[3])

    def _counter_index(self):
        """The index of the optimizer's step counter in its variables."""
        optimizer = self.model.optimizer
        counter, _ = step_counter(optimizer)
        for n, variable in enumerate(optimizer.variables):
            if variable is counter:
                return n
        raise RuntimeError("The optimizer's step counter is not among its variables.")

    # ------------------------------------------------------------------
    # The train function.

    def train_function(self, make_base):
        """A dispatcher to one compiled train function per variant.

        `make_base(step)` makes Keras' train function around `step`: a
        distinct step function per variant, since JAX caches traces by
        function.
        """
        variants = {}
        compiled = {}
        self.compiled = compiled
        model = self.model

        def variant(key, packing):
            if (key, packing) not in variants:
                if packing is None:

                    def step(*args, **kwargs):
                        self.tracing = key
                        return type(model).train_step(model, *args, **kwargs)

                else:

                    def step(state, data):
                        self.tracing = key
                        return self._packed_step(packing, key, state, data)

                variants[key, packing] = make_base(step)
            return variants[key, packing]

        def train_function(*args, **kwargs):
            if self.plan is None:
                key = ("static", (True,) * len(model.blocks))
            else:
                key = self.variant
            # JAX: the gathered steps thread the packed state; the others,
            # Keras' own. Converted where consecutive executions differ.
            packing = self.packing if key[0] == "gather" and self.plan is not None else None
            function = variant(key, packing)
            if self.packing is not None and args and isinstance(args[0], tuple):
                state = args[0]
                if packing is not None and not packing.is_packed(state):
                    state = packing.pack(state)
                elif packing is None and self.packing.is_packed(state):
                    state = self.packing.unpack(state)
                args = (state, *args[1:])
            # PyTorch looks `train_step` up at each call: tell it the variant.
            self.tracing = key
            if key in compiled or keras.backend.backend() == "torch":
                return function(*args, **kwargs)
            # The first call traces and compiles (and runs one execution).
            start = time.perf_counter()
            try:
                result = function(*args, **kwargs)
            except Exception:
                self._keep_jax_state(args)
                raise
            compiled[key] = time.perf_counter() - start
            return result

        return train_function

    def _keep_jax_state(self, args):
        """JAX: hands the state of a step that failed to compile back to Keras.

        Keras' `fit` releases the variables' values before its first step and
        writes the state it threads back when `fit` ends, even by an error;
        a step that fails while it is traced (a block that is not residual)
        returns none, and without this the variables would be left empty.
        """
        model = self.model
        if keras.backend.backend() != "jax" or not args or not isinstance(args[0], tuple):
            return
        object.__setattr__(model, "_jax_state", dict(zip(_JAX_STATE, args[0])))
        object.__setattr__(model, "_jax_state_synced", False)

    def compiled_names(self):
        return {variant_name(key): seconds for key, seconds in self.compiled.items()}


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


def _optimizer_steps(calls, every):
    """The optimizer step of a train step, from the count of train steps."""
    return calls if every == 1 else ops.floor_divide(calls, every)


def _tf_distribute_strategy(model):
    """The class name of the `tf.distribute` strategy `model` trains under, or `None`."""
    if keras.backend.backend() != "tensorflow":
        return None
    strategy = getattr(model, "distribute_strategy", None)
    name = type(strategy).__name__
    if strategy is None or name == "_DefaultDistributionStrategy":
        return None
    return name


def _specs(model):
    """Per Keras list, the `(shape, dtype)` of each variable."""
    return tuple(
        tuple((tuple(v.shape), v.dtype) for v in variables)
        for variables in (
            model.trainable_variables,
            model.non_trainable_variables,
            model.optimizer.variables,
        )
    )


def variant_name(key):
    """`"full"`, `"static 0,11"`, `"k=7"`, `"conditional"` or `"host"`."""
    if key[0] == "static":
        if all(key[1]):
            return "full"
        return "static " + ",".join(str(i) for i, on in enumerate(key[1]) if on)
    if key[0] == "gather":
        return f"k={key[1]}"
    return "conditional" if key[0] == "drawn" else key[0]
