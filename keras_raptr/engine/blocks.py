"""What the loop step assumes of the blocks, checked before it runs.

The loop step (`loop_jax.py`, `loop_tf.py`) trains a drawn path by running
the *first* block's code once per path position `t`, on the weights, state
and optimizer slots of block `idx[t]`. That trains exactly the network the
real path trains only if:

1. **One structure.** Every block has the class, configuration, attributes,
   sub-layers and variables (shapes, dtypes, order) of block 0, so block 0's
   code computes what block `i`'s would; and the optimizer keeps the same
   state for each (`layout`).
2. **One chain.** In the model's Functional graph each block is called once;
   block `i`'s output feeds block `i + 1` alone, as its first input; and every
   block gets the same other arguments (`padding_mask`, `training`, ...) as
   block 0 (`chain_reason`). The loop then replaces the whole chain: block 0
   runs the path, the other blocks pass their input on. A model that is not
   Functional has no graph to check.
3. **Nothing outside the block depends on it.** No weight of a block has a
   regularizer (its loss term would reach every block, on the path or not),
   and the optimizer updates each variable on its own (no `use_ema`; no
   `global_clipnorm` with `gradient_accumulation_steps`, which clips the
   accumulated gradient of the whole model) (`optimizer_reason`).

`check(model)` returns the `Layout` when all hold, else a sentence saying
which assumption fails and where. The model then trains through a step that
makes none of them (`conditional.py`) and reports the sentence
(`RandomPartModel.engine_reason`, and a warning).
"""

import keras
import numpy as np
from keras import ops


class Layout:
    """Where each block's state lives in the model's and optimizer's lists.

    `trainable[i][j]`, `non_trainable[i][m]` and `slots[i][r]` are indices
    into `model.trainable_variables`, `model.non_trainable_variables` and
    `model.optimizer.variables` for block `i`; entry `j` (`m`, `r`) of every
    block has the same shape and role (a *role*). A block's slots are, per
    weight in order, the variables its optimizer update writes (momenta,
    Adam's moments), then its gradient accumulators (with
    `gradient_accumulation_steps`).
    """

    def __init__(self, trainable, non_trainable, slots):
        self.trainable = trainable
        self.non_trainable = non_trainable
        self.slots = slots

    @property
    def num_blocks(self):
        return len(self.trainable)


def check(model):
    """`(Layout, None)` when the loop step trains `model` exactly, else `(None, reason)`."""
    blocks = [skip.block for skip in model.blocks]
    reason = (
        structure_reason(blocks)
        or chain_reason(model.inner, blocks)
        or regularizer_reason(blocks)
        or optimizer_reason(model.optimizer)
    )
    if reason is not None:
        return None, reason
    return layout(model)


# ----------------------------------------------------------------------
# 1. One structure.


def structure_reason(blocks):
    """Why the blocks are not all built alike, or `None`."""
    if len(blocks) < 2:
        return "the model has fewer than two blocks"
    first = signature(blocks[0])
    for i, block in enumerate(blocks[1:], start=1):
        if signature(block) != first:
            return (
                f"block {i} ('{block.name}') differs in structure from block 0 "
                f"('{blocks[0].name}')"
            )
    if not blocks[0].trainable_variables:
        return "the blocks have no trainable weights"
    return None


def signature(layer):
    """What a layer computes, as far as it can be read: equal for equal blocks.

    The class, the configuration (when `get_config` works), the public
    attributes of simple type (numbers, strings, tuples of them, numpy
    arrays: what a layer's code reads besides its weights), the dtype
    policy, and the variables' shapes, dtypes and trainability, in order; the
    same for every sub-layer. Names are left out.
    """
    try:
        config = dict(layer.get_config())
    except Exception:  # keras-hub's Llama decoder: `get_config` fails.
        config = None
    names = _layer_names(layer)
    if config is not None:
        config.pop("name", None)
        config = repr(_without_names(config, names))
    sublayers = layer._flatten_layers(include_self=False, recursive=False)
    return (
        type(layer),
        config,
        [(key, *_without_names(values, names)) for key, *values in _attributes(layer)],
        getattr(layer.dtype_policy, "name", None),
        [(tuple(v.shape), v.dtype, v.trainable) for v in layer.weights],
        [signature(sub) for sub in sublayers],
    )


def _layer_names(layer):
    """Each nested layer's name, mapped to its position in `layer`."""
    names = {}
    for i, sub in enumerate(layer._flatten_layers(include_self=True, recursive=True)):
        names.setdefault(sub.name, f"<layer {i}>")
    return names


def _without_names(config, names):
    """`config` with every layer name replaced by that layer's position.

    A Functional block's configuration names its layers and wires them by
    name (`inbound_nodes`); two blocks built by one function get different
    names (`dense_1`, `dense_4`) for the same graph.
    """
    if isinstance(config, dict):
        return sorted((k, _without_names(v, names)) for k, v in config.items())
    if isinstance(config, (list, tuple)):
        return [_without_names(v, names) for v in config]
    if isinstance(config, str):
        return names.get(config, config)
    return config


_SIMPLE = (bool, int, float, str, type(None))


def _attributes(layer):
    out = []
    for name, value in sorted(vars(layer).items()):
        if name.startswith("_") or name == "name":
            continue
        if isinstance(value, _SIMPLE):
            out.append((name, value))
        elif isinstance(value, (tuple, list)) and all(isinstance(v, _SIMPLE) for v in value):
            out.append((name, tuple(value)))
        elif isinstance(value, np.ndarray):
            out.append((name, value.dtype.str, value.shape, value.tobytes()))
    return tuple(out)


# ----------------------------------------------------------------------
# 2. One chain.


def chain_reason(root, blocks):
    """Why the blocks do not form one chain with the same arguments, or `None`.

    Reads the Functional graphs of `root` (the wrapped model) and of the
    models nested in it: Keras' nodes, one per call of a layer or operation.
    """
    nodes = []
    for i, block in enumerate(blocks):
        inbound = getattr(block, "_inbound_nodes", [])
        if not inbound:
            return (
                f"block {i} ('{block.name}') is not called in a Functional graph "
                "(a subclassed model's `call` cannot be checked), so the blocks "
                "are not known to form one chain"
            )
        if len(inbound) > 1:
            return (
                f"block {i} ('{block.name}') is called {len(inbound)} times in "
                "the model's graphs; each block must be called once"
            )
        nodes.append(inbound[0])
    consumers = _consumers(root)
    first = nodes[0]
    for i, node in enumerate(nodes):
        args = node.arguments.args
        if not args or not isinstance(args[0], keras.KerasTensor):
            return f"block {i} ('{blocks[i].name}') takes no tensor as its first input"
        if i > 0:
            previous = nodes[i - 1].output_tensors
            if len(previous) != 1 or args[0] is not previous[0]:
                return (
                    f"block {i} ('{blocks[i].name}') does not take block {i - 1}'s "
                    "output as its first input"
                )
            reason = _same_arguments(first, node)
            if reason:
                return (
                    f"block {i} ('{blocks[i].name}') is called with other "
                    f"arguments than block 0: {reason}"
                )
        if i < len(nodes) - 1:
            outputs = node.output_tensors
            if len(outputs) != 1:
                return f"block {i} ('{blocks[i].name}') returns {len(outputs)} tensors"
            users = consumers.get(id(outputs[0]), [])
            others = [user for user in users if user is not blocks[i + 1]]
            if others:
                names = ", ".join(_describe(user) for user in others)
                return (
                    f"block {i}'s output also feeds {names}, not only block "
                    f"{i + 1}: the blocks do not form one chain"
                )
    return None


def _consumers(root):
    """`{id(tensor): [what reads it]}` over the Functional graphs in `root`."""
    consumers = {}
    layers = [root]
    if isinstance(root, keras.layers.Layer):
        layers += root._flatten_layers(include_self=False, recursive=True)
    for graph in layers:
        try:
            operations = graph.operations
            outputs = graph.outputs
        except (AttributeError, ValueError):
            continue
        for operation in operations:
            for node in getattr(operation, "_inbound_nodes", []):
                for tensor in node.input_tensors:
                    users = consumers.setdefault(id(tensor), [])
                    if not any(user is operation for user in users):
                        users.append(operation)
        for tensor in keras.tree.flatten(outputs or []):
            consumers.setdefault(id(tensor), []).append(f"the output of model '{graph.name}'")
    return consumers


def _describe(user):
    if isinstance(user, str):
        return user
    return f"'{getattr(user, 'name', type(user).__name__)}'"


def _same_arguments(first, node):
    a = (first.arguments.args[1:], first.arguments.kwargs)
    b = (node.arguments.args[1:], node.arguments.kwargs)
    if set(a[1]) != set(b[1]):
        return f"keyword arguments {sorted(a[1])} against {sorted(b[1])}"
    if len(a[0]) != len(b[0]):
        return f"{len(a[0]) + 1} positional arguments against {len(b[0]) + 1}"
    pairs = list(zip(a[0], b[0])) + [(a[1][k], b[1][k]) for k in a[1]]
    names = [f"argument {n + 2}" for n in range(len(a[0]))] + [f"`{k}`" for k in a[1]]
    for name, (x, y) in zip(names, pairs):
        try:
            flat_x, flat_y = keras.tree.flatten(x), keras.tree.flatten(y)
        except Exception:
            flat_x, flat_y = [x], [y]
        if len(flat_x) != len(flat_y):
            return f"{name} differs"
        for u, v in zip(flat_x, flat_y):
            if isinstance(u, keras.KerasTensor) or isinstance(v, keras.KerasTensor):
                if u is not v:
                    return f"{name} is another tensor"
            elif not _equal(u, v):
                return f"{name} is {v!r}, not {u!r}"
    return None


def _equal(u, v):
    try:
        return bool(np.all(np.asarray(u) == np.asarray(v))) and type(u) is type(v)
    except Exception:
        return u is v


# ----------------------------------------------------------------------
# 3. Nothing outside the block depends on it.


def regularizer_reason(blocks):
    for i, block in enumerate(blocks):
        for variable in block.weights:
            if getattr(variable, "regularizer", None) is not None:
                return (
                    f"the weight '{variable.path}' of block {i} has a regularizer, "
                    "whose loss term trains every block at every step"
                )
    return None


def optimizer_reason(optimizer):
    if optimizer is None:
        return "the model has no optimizer"
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if getattr(inner, "use_ema", False):
        return "the optimizer keeps a moving average of the weights (`use_ema`)"
    if getattr(inner, "gradient_accumulation_steps", None) and getattr(
        inner, "global_clipnorm", None
    ):
        return (
            "the optimizer clips the accumulated gradients of the whole model "
            "(`global_clipnorm` with `gradient_accumulation_steps`)"
        )
    return None


# ----------------------------------------------------------------------
# The layout.


def layout(model):
    """The model's `Layout`, or `None` with the reason the slots can't be laid out."""
    blocks = [skip.block for skip in model.blocks]
    optimizer = model.optimizer
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    trainable = _indices(model.trainable_variables, blocks, "trainable_variables")
    non_trainable = _indices(model.non_trainable_variables, blocks, "non_trainable_variables")
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    slots = []
    for i, block in enumerate(blocks):
        found = optimizer_slots(optimizer, block.trainable_variables)
        if found is None:
            return None, "the optimizer's update could not be traced"
        slots.append(found)
    shapes = [[tuple(optimizer.variables[n].shape) for n in s] for s in slots]
    if any(s != shapes[0] for s in shapes[1:]):
        return None, "the optimizer keeps different state for different blocks"
    decays = [
        [inner._use_weight_decay(v) for v in block.trainable_variables] for block in blocks
    ]
    if any(d != decays[0] for d in decays[1:]):
        first = next(i for i, d in enumerate(decays) if d != decays[0])
        return None, (
            f"the optimizer's weight decay excludes other weights of block {first} "
            "than of block 0 (`exclude_from_weight_decay`)"
        )
    return Layout(trainable, non_trainable, slots), None


def _indices(variables, blocks, attribute):
    position = {id(v): n for n, v in enumerate(variables)}
    return [[position[id(v)] for v in getattr(block, attribute)] for block in blocks]


def optimizer_slots(optimizer, variables):
    """Indices into `optimizer.variables` of the state kept for `variables`.

    Found by running the optimizer's public `update_step` for each variable
    with its public `assign`, `assign_add` and `assign_sub` recording their
    targets instead of writing (every Keras optimizer writes through them),
    then each variable's gradient accumulator, if any. Returns `None` if an
    update does not write its own variable through them (then the slots
    cannot be known).
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
    accumulators = getattr(inner, "_accumulated_gradients", None)
    if getattr(inner, "gradient_accumulation_steps", None) and accumulators:
        for variable in variables:
            found.append(position[id(accumulators[inner._get_variable_index(variable)])])
    return found
