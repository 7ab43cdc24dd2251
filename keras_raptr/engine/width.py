"""Width-wise parts: a block run on a random subset of its heads and units.

At a width `w < 1` every on-path block keeps the same number of attention
heads (whole key/value groups under grouped-query attention) and of
feed-forward units, `max(1, round(w * total))` of each, drawn per step and
per block:

- **Which ones** (`kept`): a pure function of `(seed, step, block)`, like the
  path (`path.py`). Each head (unit) gets a 32-bit hash of the seed, the
  step and its index; the kept ones are those with the smallest hashes, in
  index order. The hash is a bijection of distinct inputs, so there are no
  ties and numpy, JAX, TensorFlow and PyTorch keep the same set.
- **Narrower matrices** (`narrow_call`): the kept slices of each variable the
  block's width adapter lists (`layers/width_parts.py`) are gathered and the
  block's own `call` runs on them, in a stateless scope that maps each
  variable to its slice. The block's matrix products have the narrow shapes;
  the gradient of a gather reaches only the kept slices.
- **The optimizer** (`kept_slices_only`): under `off_path_update="skip"`
  Keras' own update runs on the kept slices of each sliced variable, its
  gradient and its optimizer slots, gathered, and the new slices are
  written back; the other slices keep their values bit for bit. Under
  `"zero_grad"` every slice is updated, with a zero gradient off the kept
  ones.
"""

import contextlib
import threading
import weakref

import keras
import numpy as np
from keras import ops

from keras_raptr.engine import path
from keras_raptr.engine import scopes
from keras_raptr.engine.xp import NUMPY

# Salts that keep the width draws apart from the path's and from each other.
_SALTS = {"heads": 0x5BD1E995, "key_value_heads": 0x1B873593, "units": 0x68E31DA4}


def counts(parts, width):
    """Kept `(heads, key_value_heads, units)` at `width` (`None`: no grouping)."""
    groups = parts.num_key_value_heads
    if groups is None:
        heads = _count(parts.num_heads, width)
        return heads, None, _count(parts.num_units, width)
    kept_groups = _count(groups, width)
    return kept_groups * (parts.num_heads // groups), kept_groups, _count(parts.num_units, width)


def _count(total, width):
    return 0 if total == 0 else max(1, min(total, int(round(width * total))))


def kept(seed, step, block, total, count, part, xp):
    """Sorted indices of the `count` parts of `total` kept at `step` in `block`.

    Args:
        seed: int, the model's seed.
        step: int or integer tensor, the optimizer step.
        block: int, the block's index.
        total, count: ints.
        part: `"heads"`, `"key_value_heads"` or `"units"`.
        xp: `xp.NUMPY` or `xp.KERAS`.
    """
    key = path._mix(xp.constant(path.seed_int32(seed ^ _SALTS[part]), "int32"), xp)
    key = path._mix(xp.add(key, xp.cast(step, "int32")), xp)
    key = path._mix(xp.add(key, xp.constant(path.seed_int32(block * 0x27D4EB2F), "int32")), xp)
    index = xp.multiply(xp.arange(total, dtype="int32"), xp.constant(path._GOLDEN, "int32"))
    hashes = path._mix(xp.add(key, index), xp)
    if xp is NUMPY:
        return np.sort(np.argsort(hashes, kind="stable")[:count]).astype("int32")
    order = ops.cast(ops.argsort(hashes), "int32")
    return ops.sort(order[:count])


def kept_indices(parts, width, seed, step, block, xp):
    """The kept `{"heads", "key_value_heads", "units"}` indices of a block."""
    heads, groups, units = counts(parts, width)
    result = {"units": kept(seed, step, block, parts.num_units, units, "units", xp)}
    if not parts.num_heads:
        return result
    if groups is None:
        result["heads"] = kept(seed, step, block, parts.num_heads, heads, "heads", xp)
        return result
    per_group = parts.num_heads // parts.num_key_value_heads
    kv = kept(seed, step, block, parts.num_key_value_heads, groups, "key_value_heads", xp)
    result["key_value_heads"] = kv
    # Query head `q` uses key/value head `q // per_group`: whole groups.
    offsets = xp.arange(per_group, dtype="int32")
    queries = xp.add(xp.multiply(kv, xp.constant(per_group, "int32"))[:, None], offsets[None, :])
    if xp is NUMPY:
        result["heads"] = queries.reshape(-1)
    else:
        result["heads"] = ops.reshape(queries, (-1,))
    return result


def narrow_call(block, parts, indices, block_call, args, kwargs, inverse_scale):
    """Runs `block_call` on the kept slices of the block's weights.

    Args:
        block: the block.
        parts: its `WidthParts`.
        indices: `kept_indices(...)` in `keras.ops`.
        block_call: the block's own `call`.
        args, kwargs: the call's arguments.
        inverse_scale: whether to scale the output slices by the inverse of
            the kept fraction (`scaling="inverse"`).
    """
    heads, groups, units = (
        _length(indices.get("heads")),
        _length(indices.get("key_value_heads")),
        _length(indices["units"]),
    )
    factors = {
        "heads": parts.num_heads / max(heads, 1),
        "key_value_heads": 1.0,
        "units": parts.num_units / max(units, 1),
    }
    outputs = {id(v) for v in parts.outputs}
    scope = scopes.child_scope([])
    sliced = set()
    for variable, axis, part in parts.slices():
        value = _take(variable.value, indices[part], axis)
        if inverse_scale and id(variable) in outputs and factors[part] != 1.0:
            value = ops.multiply(value, ops.cast(factors[part], value.dtype))
        # `add_update`: a value of another shape than its variable's.
        scope.add_update((variable, value))
        sliced.add(id(variable))
    attributes = parts.attributes(heads, groups, units) if parts.attributes else []
    with _narrow_layers(block, attributes), scope:
        y = block_call(*args, **kwargs)
    # Assignments the block made (dropout's seed state) go to the variables.
    for variable in _layers(block)[1]:
        if id(variable) not in sliced and id(variable) in scope.state_mapping:
            variable.assign(scope.state_mapping[id(variable)])
    return y


def _take(value, index, axis):
    """`ops.take` (PyTorch: its own `index_select`, without Keras' conversions)."""
    if keras.backend.backend() == "torch":
        import torch

        return torch.index_select(value, axis, index.to(value.device).long())
    return ops.take(value, index, axis=axis)


def _length(index):
    return 0 if index is None else int(index.shape[0])


_LOCK = threading.Lock()
_ACTIVE = {}
# Each block's sub-layers and state variables, found once (a walk of the
# layer tree at every call costs PyTorch's eager steps).
_LAYERS = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def _narrow_layers(block, attributes):
    """The block's layers without input specs, and `attributes` set.

    A sublayer's input spec pins its input's last axis to the full width
    (a `Dense` after the feed-forward units); the narrow call relaxes it
    while it runs. Counted per layer, so that replicas tracing in threads
    (`tf.distribute`) leave every layer as it was.
    """
    layers = [block, *_layers(block)[0]]
    with _LOCK:
        for layer in layers:
            entry = _ACTIVE.get(id(layer))
            if entry is None:
                _ACTIVE[id(layer)] = [1, layer.input_spec]
                # Not Keras' tracking `__setattr__`: an eager step pays it.
                object.__setattr__(layer, "input_spec", None)
            else:
                entry[0] += 1
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in attributes]
    for obj, name, value in attributes:
        object.__setattr__(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value in saved:
            object.__setattr__(obj, name, value)
        with _LOCK:
            for layer in layers:
                entry = _ACTIVE[id(layer)]
                entry[0] -= 1
                if not entry[0]:
                    object.__setattr__(layer, "input_spec", entry[1])
                    del _ACTIVE[id(layer)]


def _layers(block):
    """The block's sub-layers and its state variables, found once per block."""
    found = _LAYERS.get(block)
    if found is None:
        found = (
            [layer for layer in block._flatten_layers() if layer is not block],
            list(block.non_trainable_variables),
        )
        _LAYERS[block] = found
    return found


def _mask(index, total):
    """A boolean `(total,)` tensor: which of a part's heads or units are kept."""
    if keras.backend.backend() == "torch":
        import torch

        mask = torch.zeros(total, dtype=torch.bool, device=index.device)
        mask[index.long()] = True
        return mask
    return ops.any(
        ops.equal(ops.arange(total, dtype="int32")[:, None], ops.cast(index, "int32")[None, :]),
        axis=1,
    )


def _along(mask, variable, axis):
    """`mask` shaped to broadcast along `axis` of `variable`."""
    shape = [1] * len(variable.shape)
    shape[axis] = variable.shape[axis]
    if keras.backend.backend() == "torch":
        return mask.reshape(shape)
    return ops.reshape(mask, shape)


@contextlib.contextmanager
def kept_slices_only(optimizer, masked):
    """Within the context, `optimizer` moves only the kept slices.

    The update runs on the kept slices alone: each sliced variable, its
    gradient and its optimizer slots are gathered, Keras' own `apply` runs
    on them in a stateless scope (the variables' shapes read as the narrow
    ones while it runs), and the new slices are written back into the full
    values. The update's arithmetic at width `w` is about `w` of a full
    one's (tested on the compiled step), and every elementwise optimizer
    (SGD, Adam, AdamW, RMSprop, Lion, ...) moves the kept slices exactly as
    on the full variable. One that reads a whole variable (LAMB's trust
    ratio) sees the narrow one, as it would in a model built at that width.

    Where that cannot be done (a slot of another shape than its variable,
    slots that cannot be found, an exponential moving average, gradient
    accumulation, a `tf.distribute` strategy), the full update runs and the
    dropped slices of the weights and of their slots are put back.

    Args:
        optimizer: the model's optimizer.
        masked: list of `(variable, slots, axis, index, complete)`: a sliced
            variable, the optimizer variables that hold its state (same
            shape), the axis (one entry per head or unit), the kept indices
            along it and whether `slots` are all of the variable's state.
    """
    from keras_raptr.engine.optimizer_gate import _overridden

    inner = getattr(optimizer, "inner_optimizer", optimizer)
    narrow = _can_narrow(inner, masked)
    apply = _narrow_apply(inner, masked) if narrow else _restoring_apply(inner, masked)
    with _overridden(inner, {"apply": apply}):
        yield


def _can_narrow(inner, masked):
    if not all(complete for *_, complete in masked):
        return False
    if len({id(entry[0]) for entry in masked}) != len(masked):
        return False
    if getattr(inner, "use_ema", False) or getattr(inner, "gradient_accumulation_steps", None):
        return False
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        if tf.distribute.has_strategy():
            return False
    return True


def _narrow_apply(inner, masked):
    from keras.src.optimizers.base_optimizer import BaseOptimizer

    from keras_raptr.engine.optimizer_gate import _overridden
    from keras_raptr.engine.optimizer_gate import _own

    tensorflow = keras.backend.backend() == "tensorflow"
    torch = keras.backend.backend() == "torch"

    def apply(grads, trainable_variables=None):
        variables = list(inner._trainable_variables if trainable_variables is None else trainable_variables)
        grads = list(grads)
        at = {id(v): n for n, v in enumerate(variables)}
        scope = scopes.child_scope([])
        entries = []  # (variable, full value, axis, index)
        shapes = []
        for variable, slots, axis, index, _ in masked:
            n = at.get(id(variable))
            if n is None:
                continue
            if grads[n] is not None:
                grads[n] = _take(grads[n], index, axis)
            for v in [variable, *slots]:
                full = v.value
                value = _take(full, index, axis)
                scope.add_update((v, value))
                entries.append((v, full, axis, index))
                shapes.append((v, v._shape))
                # Read as the narrow shape by `assign`'s check and the update.
                object.__setattr__(v, "_shape", tuple(value.shape))
        overrides = {}
        if tensorflow:
            # TensorFlow's optimizer reaches the `tf.Variable` behind each
            # variable (here, a value in the scope) to key, update and
            # assign it, through the distribution strategy (none is active
            # here): Keras' backend-independent methods instead.
            own_key = _own(inner, "_var_key")

            def var_key(variable):
                if isinstance(variable, keras.Variable):
                    variable = variable._value
                return own_key(variable)

            def update_step(grads, variables, learning_rate):
                return BaseOptimizer._backend_update_step(inner, grads, variables, learning_rate)

            def weight_decay(variables):
                return BaseOptimizer._apply_weight_decay(inner, variables)

            overrides = {
                "_var_key": var_key,
                "_backend_update_step": update_step,
                "_apply_weight_decay": weight_decay,
            }
            for name in ("assign", "assign_add", "assign_sub"):
                overrides[name] = getattr(BaseOptimizer, name).__get__(inner)
        try:
            with _overridden(inner, overrides), scope:
                result = _own(inner, "apply")(grads, variables)
        finally:
            for v, shape in shapes:
                object.__setattr__(v, "_shape", shape)
        sliced = set()
        grids = {}
        for v, full, axis, index in entries:
            sliced.add(id(v))
            new = scope.state_mapping[id(v)]
            if torch:
                # In place, as PyTorch's optimizers write.
                full.data.index_copy_(axis, index.to(full.device).long(), new)
            elif tensorflow:
                # A gather of the new slices and a select: on a CPU, as fast
                # as the full update (a scatter into the variable was slower).
                if id(index) not in grids:
                    mask = _mask(index, full.shape[axis])
                    positions = ops.maximum(ops.cumsum(ops.cast(mask, "int32")) - 1, 0)
                    grids[id(index)] = (mask, positions)
                mask, positions = grids[id(index)]
                v.assign(
                    ops.where(_along(mask, full, axis), ops.take(new, positions, axis=axis), full)
                )
            else:
                # JAX: one scatter of the kept slices (in place under XLA).
                where = (slice(None),) * axis + (index,)
                v.assign(full.at[where].set(new))
        for v in [*variables, *inner.variables]:
            if id(v) in sliced:
                continue
            new = scope.state_mapping.get(id(v))
            if new is not None:
                v.assign(new)
        return result

    return apply


def _restoring_apply(inner, masked):
    from keras_raptr.engine.optimizer_gate import _own

    torch = keras.backend.backend() == "torch"

    def apply(grads, trainable_variables=None):
        before = []
        for variable, slots, axis, index, _ in masked:
            mask = _along(_mask(index, variable.shape[axis]), variable, axis)
            for v in [variable, *slots]:
                # PyTorch runs eagerly: its own ops, without Keras' per-op
                # conversions (hundreds of small tensors a step).
                old = v.value.clone() if torch else ops.copy(v.value)
                before.append((v, old, mask))
        result = _own(inner, "apply")(grads, trainable_variables)
        for v, old, mask in before:
            if torch:
                value = v.value
                value.data.copy_(value.data.where(mask, old))
            else:
                v.assign(ops.where(mask, v.value, old))
        return result

    return apply


def slot_map(optimizer, variables):
    """Per variable, `(slots, complete)`: the optimizer variables of its shape
    that hold its state, and whether they are all of its state."""
    from keras_raptr.engine.blocks import optimizer_slots

    result = {}
    for variable in variables:
        found = optimizer_slots(optimizer, [variable])
        slots = [
            optimizer.variables[n]
            for n in found or []
            if tuple(optimizer.variables[n].shape) == tuple(variable.shape)
        ]
        result[id(variable)] = (slots, found is not None and len(slots) == len(found))
    return result
