"""A drawn path without a conditional per block (JAX and TensorFlow).

When every block has the same structure (class, config, variable shapes), a
path of `k` blocks is trained as a plain `k`-block network:

1. The on-path blocks' indices `idx` (sorted, length `k`) come from the path
   of the step (`engine/path.py`), inside the compiled step.
2. Gather: block position `t < k` takes the weights, non-trainable state
   (dropout seeds) and optimizer slots of block `idx[t]`. Running positions
   `0 .. k-1` in depth order runs the path's blocks in depth order, because
   the blocks are interchangeable in structure.
3. Keras' own train step runs, with positions `k .. L-1` the identity (known
   when tracing: they are not in the compiled step). The loss, the
   gradients, loss scaling, clipping, weight decay and the optimizer's maths
   are Keras' own; positions `>= k` have no gradient, and their updates are
   dropped (dead code that XLA and TensorFlow prune).
4. Scatter: block `i` on the path takes the new values of its position; a
   block off the path keeps its old weights, state and slots exactly.

With `off_path_update="zero_grad"` every block moves: positions `k .. L-1`
take the off-path blocks (in depth order), Keras' optimizer updates them
with a zero gradient (JAX gives one; on TensorFlow `optimizer_gate` fills
it in), and every block takes its position's new values.

The step's cost is that of `k` blocks plus the gather and scatter copies
(memory traffic, no FLOPs). On JAX, `fit` keeps the blocks' state stacked
between these steps (`stacked.py`), so the copies touch the path's `k`
blocks' rows only; on Keras' own state lists (TensorFlow, and JAX under a
distribution or without `jit_compile`) the scatter writes every block's
weights and slots.
One train function is compiled per path length `k` and reused by every stage
and every strategy.

Several devices: under a `keras.distribution` (JAX) the step is the same
program, split by XLA. Under a `tf.distribute` strategy it runs once per
replica, each with the same path (a function of the step); the copies into
and out of the positions go through one `merge_call` each, which writes
every replica's copy of a variable with that replica's (equal) value, and
the optimizer reduces the gradients once, as Keras does.

Blocks of different structures, an optimizer with an exponential moving
average of the weights (`use_ema`), or an optimizer whose update could not
be traced fall back to `optimizer_gate.py` (one conditional per block).
"""

import contextlib
import warnings

from keras import ops


class Layout:
    """Where each block's state lives in the model's and optimizer's lists.

    `trainable[i][j]`, `non_trainable[i][m]` and `slots[i][r]` are indices
    into `model.trainable_variables`, `model.non_trainable_variables` and
    `model.optimizer.variables` for block `i`; entry `j` (`m`, `r`) of every
    block has the same shape and role.
    """

    def __init__(self, trainable, non_trainable, slots):
        self.trainable = trainable
        self.non_trainable = non_trainable
        self.slots = slots


def unsupported_reason(model):
    """Why the blocks of `model` cannot be gathered, or `None`."""
    blocks = [skip.block for skip in model.blocks]
    signatures = [_signature(block) for block in blocks]
    if any(s != signatures[0] for s in signatures[1:]):
        first = next(i for i, s in enumerate(signatures) if s != signatures[0])
        return (
            f"block {first} ('{blocks[first].name}') differs in structure from "
            f"block 0 ('{blocks[0].name}')"
        )
    if not blocks[0].trainable_variables:
        return "the blocks have no trainable weights"
    optimizer = getattr(model, "optimizer", None)
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if optimizer is None or not getattr(optimizer, "built", False):
        return "the optimizer is not built"
    if getattr(inner, "use_ema", False):
        return "the optimizer keeps a moving average of the weights (`use_ema`)"
    return None


def layout(model):
    """The model's `Layout`, or `None` with the reason the blocks can't gather."""
    reason = unsupported_reason(model)
    if reason is not None:
        return None, reason
    blocks = [skip.block for skip in model.blocks]
    trainable = _indices(model.trainable_variables, blocks, "trainable_variables")
    non_trainable = _indices(
        model.non_trainable_variables, blocks, "non_trainable_variables"
    )
    slots = []
    for block in blocks:
        found = optimizer_slots(model.optimizer, block.trainable_variables)
        if found is None:
            return None, "the optimizer's update could not be traced"
        slots.append(found)
    shapes = [[tuple(model.optimizer.variables[n].shape) for n in s] for s in slots]
    if any(s != shapes[0] for s in shapes[1:]):
        return None, "the optimizer keeps different state for different blocks"
    return Layout(trainable, non_trainable, slots), None


def _signature(block):
    try:
        config = dict(block.get_config())
    except Exception:  # Some layers' configs fail (keras-hub's Llama decoder).
        config = {}
    config.pop("name", None)
    return (
        type(block),
        repr(sorted(config.items(), key=lambda item: item[0])),
        [(tuple(v.shape), v.dtype) for v in block.trainable_variables],
        [(tuple(v.shape), v.dtype) for v in block.non_trainable_variables],
    )


def _indices(variables, blocks, attribute):
    position = {id(v): n for n, v in enumerate(variables)}
    return [[position[id(v)] for v in getattr(block, attribute)] for block in blocks]


def optimizer_slots(optimizer, variables):
    """Indices into `optimizer.variables` of the state kept for `variables`.

    Found by running the optimizer's public `update_step` for each variable
    with its public `assign`, `assign_add` and `assign_sub` recording their
    targets instead of writing (every Keras optimizer writes through them).
    Returns `None` if an update does not write its own variable through them
    (then the slots cannot be known).
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    position = {id(v): n for n, v in enumerate(optimizer.variables)}
    targets = []

    def record(variable, value):
        targets.append(variable)

    names = ("assign", "assign_add", "assign_sub")
    for name in names:
        object.__setattr__(inner, name, record)
    found = []
    try:
        for variable in variables:
            targets.clear()
            gradient = ops.zeros(variable.shape, variable.dtype)
            inner.update_step(gradient, variable, ops.convert_to_tensor(0.0))
            if not any(t is variable for t in targets):
                return None
            for target in targets:
                n = position.get(id(target))
                if n is not None and n not in found:
                    found.append(n)
    finally:
        for name in names:
            object.__delattr__(inner, name)
    return found


def path_positions(on, k, every_block=False):
    """`idx` (the `k` on-path blocks, in depth order) and each block's position.

    `every_block=True` (`off_path_update="zero_grad"`): `idx` is every block,
    the path's `k` first, then the others in depth order, and `position` its
    inverse (where each block sits).
    """
    num_blocks = on.shape[0]
    index = ops.arange(num_blocks, dtype="int32")
    order = ops.argsort(ops.where(on, index, index + num_blocks))
    if every_block:
        return order, ops.argsort(order)
    idx = order[:k]
    position = ops.clip(ops.cumsum(ops.cast(on, "int32")) - 1, 0, k - 1)
    return idx, position


def gather(values, table, idx, k):
    """`{list index: value}` moving block `idx[t]`'s entries to position `t`."""
    out = {}
    for j in range(len(table[0])):
        stacked = ops.stack([values[row[j]] for row in table])
        taken = ops.take(stacked, idx, axis=0)
        for t in range(k):
            out[table[t][j]] = taken[t]
    return out


def scatter(old, new, table, on, position, k):
    """`{list index: value}`: on-path blocks from their position, others as before.

    `on=None`: every block from its position (`k` is then every block).
    """
    out = {}
    for j in range(len(table[0])):
        updated = ops.stack([new[table[t][j]] for t in range(k)])
        for i, row in enumerate(table):
            moved = ops.take(updated, position[i], axis=0)
            out[row[j]] = moved if on is None else ops.where(on[i], moved, old[row[j]])
    return out


def _replace(values, updates):
    values = list(values)
    for n, value in updates.items():
        values[n] = value
    return values


def gates(k, num_blocks, idx, scale):
    """Positions `< k` run (scaled as their block), the others are identity."""
    if scale is not None:
        scale = ops.take(scale, idx, axis=0)
    return [
        (True, None if scale is None else scale[t]) if t < k else (False, None)
        for t in range(num_blocks)
    ]


def jax_train_step(model, layout, k, on, scale, state, data, run_step, every_block=False):
    """The gathered step on JAX: the Keras state in, the Keras state out.

    `every_block` (`off_path_update="zero_grad"`): every block moves, the
    path's to positions `< k`; Keras' optimizer updates positions `>= k`
    with their zero gradient, and every block takes its position's values.
    """
    trainable, non_trainable, optimizer_variables, metrics_variables = state
    idx, position = path_positions(on, k, every_block)
    moved, on = (len(model.blocks), None) if every_block else (k, on)
    tables = (
        (trainable, layout.trainable),
        (non_trainable, layout.non_trainable),
        (optimizer_variables, layout.slots),
    )
    compact = [
        _replace(values, gather(values, table, idx, moved)) if table[0] else list(values)
        for values, table in tables
    ]
    with gated(model, gates(k, len(model.blocks), idx, scale)):
        logs, new_state = run_step((*compact, metrics_variables), data)
    new_trainable, new_non_trainable, new_optimizer, new_metrics = new_state
    result = [
        _replace(new, scatter(old, new, table, on, position, moved)) if table[0] else new
        for (old, table), new in zip(
            tables, (new_trainable, new_non_trainable, new_optimizer)
        )
    ]
    return logs, (*result, new_metrics)


def tf_train_step(model, layout, k, on, scale, data, run_step, every_block=False):
    """The gathered step on TensorFlow: assign, run Keras' step, scatter.

    `every_block`: as for `jax_train_step`; the caller gives positions `>= k`
    zero gradients (`optimizer_gate.zero_off_path_gradients`).
    """
    idx, position = path_positions(on, k, every_block)
    moved, on = (len(model.blocks), None) if every_block else (k, on)
    lists = (
        (model.trainable_variables, layout.trainable),
        (model.non_trainable_variables, layout.non_trainable),
        (model.optimizer.variables, layout.slots),
    )
    old = []
    moves = []
    for variables, table in lists:
        values = {n: _read(variables[n]) for row in table for n in row}
        old.append(values)
        if table[0]:
            moves += [
                (variables[n], v) for n, v in gather(values, table, idx, moved).items()
            ]
    _assign(moves)
    with gated(model, gates(k, len(model.blocks), idx, scale)), warnings.catch_warnings():
        # Positions `>= k` have no gradient, by design.
        warnings.filterwarnings("ignore", message="Gradients do not exist")
        logs = run_step(data)
    moves = []
    for (variables, table), values in zip(lists, old):
        if not table[0]:
            continue
        new = {
            row[j]: _read(variables[row[j]])
            for row in table[:moved]
            for j in range(len(row))
        }
        moves += [
            (variables[n], v)
            for n, v in scatter(values, new, table, on, position, moved).items()
        ]
    _assign(moves)
    return logs


def _assign(moves):
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
            strategy.extended.update(
                variable.value, _assign_one, args=(value,), group=False
            )

    context.merge_call(assign_all, args=([value for _, value in moves],))


def _assign_one(variable, value):
    variable.assign(value)


@contextlib.contextmanager
def gated(model, step_gates):
    """Within the context, the model's blocks obey `step_gates`."""
    object.__setattr__(model, "_gates", step_gates)
    try:
        yield
    finally:
        object.__setattr__(model, "_gates", None)


def _read(variable):
    """The variable's current value as a tensor (a read, not a reference)."""
    return ops.copy(variable.value)
