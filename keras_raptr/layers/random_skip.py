"""The stochastic residual-skip layer.

A residual block computes `x + f(x)`. Skipping it means returning `x`: the
block's forward pass and its backward pass are never run. `RandomSkip` wraps
a block so that, inside a training step of a `keras_raptr.RandomPartModel`,
the block runs only when it is on that step's random path. Everywhere else
(evaluation, inference, a model without a schedule) it is the block itself.

How the skip saves compute:

- Most steps know each block's gate when they are traced (a Python bool): a
  static path, the gathered step of `engine/gather.py` (positions past the
  path's length are off), and every PyTorch step (its path is computed on
  the host). An off block is then a plain `return x`: it is not in the
  step at all.
- The fallback (blocks of different structures, on JAX and TensorFlow) gates
  each block with a tensor, inside the compiled step:
  - JAX: `jax.lax.cond`, forward and backward, with a hand-written VJP: the
    backward pass recomputes an on-path block from its inputs (which are its
    only residuals) and skips an off-path one. Layers with random state
    (dropout) run through their variables' values, and their new seed state
    leaves the branch as an output.
  - TensorFlow: `tf.cond`, in `tf.function` with and without XLA.
"""

import functools

import keras
from keras import ops

_WRAPPED_ATTR = "_keras_raptr_random_skip"


@keras.saving.register_keras_serializable(package="keras_raptr")
class RandomSkip(keras.layers.Layer):
    """A stochastic residual skip around a residual block.

    On the path, `RandomSkip(block)(x, *args, **kwargs)` returns
    `block(x, *args, **kwargs)`, with every extra argument forwarded. Off the
    path it returns `x` and runs none of the block, forward or backward. The
    path is decided by the enclosing `keras_raptr.RandomPartModel` during a
    training step; outside one (evaluation, `predict`, a direct call), the
    block always runs, so a `RandomSkip` is then exactly its block.

    The block must be a residual block whose output has the shape and dtype
    of its first input (`x + f(x)`, with the residual add inside the block, as
    in keras-hub's transformer layers). Otherwise a training step that gates
    it raises a `ValueError` naming the block and both shapes (or dtypes):
    when it is wrapped, if it is called in a Functional model; else when a
    step first runs it, or, on PyTorch, first skips it (its output is then
    worked out symbolically, once per input shape, without running it).

    Wrapping installs the skip on the block object itself, so a model that
    already calls the block (a Functional model, a keras-hub backbone) calls
    it through the skip too, and keeps its class, weights and saving. A block
    can be wrapped only once.

    Args:
        block: `keras.layers.Layer`. The residual block to make skippable.
        **kwargs: base layer keyword arguments, such as `name`.

    Example:

    ```python
    import keras
    import keras_raptr

    class Residual(keras.layers.Layer):
        def __init__(self, units, **kwargs):
            super().__init__(**kwargs)
            self.units = units
            self.dense = keras.layers.Dense(units, activation="relu")

        def call(self, x):
            return x + self.dense(x)

        def get_config(self):
            return {**super().get_config(), "units": self.units}

    skip = keras_raptr.layers.RandomSkip(Residual(8))
    y = skip(keras.ops.ones((2, 8)))  # the block runs: no training step.
    ```

    Reference:
        Panigrahi et al., "Efficient Stagewise Pretraining via Progressive
        Subnetworks", ICLR 2025 (arXiv 2402.05913).
    """

    def __init__(self, block, **kwargs):
        if not isinstance(block, keras.layers.Layer):
            raise ValueError(
                "`RandomSkip` wraps a `keras.layers.Layer` residual block, got "
                f"{block!r} of type {type(block).__name__}."
            )
        if wrapper_of(block) is not None:
            raise ValueError(
                f"The block '{block.name}' is already wrapped in a "
                "`RandomSkip`. Wrap each block once, or reuse the existing "
                "wrapper."
            )
        kwargs.setdefault("name", f"random_skip_{block.name}")
        kwargs.setdefault("dtype", block.dtype_policy)
        super().__init__(**kwargs)
        self.block = block
        # Set by `RandomPartModel` while a gated training step is traced:
        # `(on, scale)`, where `on` is a scalar boolean tensor (a Python bool
        # on PyTorch) and `scale` is `None` or the factor for the residual
        # update. `None` means "run the block".
        self._gate = None
        _install(block, self)
        # (shape, dtype) of the inputs whose output was found to match.
        self._checked = set()
        # A model that calls the block directly never calls this layer: it is
        # built when its block is (see `_gated_call`). Keras rebuilds a model
        # symbolically at every `fit` while any of its layers is unbuilt.
        self.built = block.built

    def build(self, *args, **kwargs):
        # The block builds itself on its first call.
        self.built = True

    def call(self, inputs, *args, **kwargs):
        return self.block(inputs, *args, **kwargs)

    def compute_output_spec(self, inputs, *args, **kwargs):
        return self.block.compute_output_spec(inputs, *args, **kwargs)

    def get_config(self):
        config = super().get_config()
        config.pop("dtype", None)
        config["block"] = keras.saving.serialize_keras_object(self.block)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        block = keras.saving.deserialize_keras_object(config.pop("block"))
        return cls(block, **config)

    def _gated_call(self, block_call, *args, **kwargs):
        if not self.built:
            self.built = True
        gate = self._gate
        if gate is None:
            return block_call(*args, **kwargs)
        if not args:
            raise ValueError(
                f"The block '{self.block.name}' was called without a positional "
                "input. `RandomSkip` returns the first positional argument "
                "when the block is off the path, so pass the hidden states "
                "positionally."
            )
        on, scale = gate
        if isinstance(on, bool):
            # Known when tracing (a static path, a gathered position, PyTorch):
            # a plain `if`, no conditional in the step.
            if not on:
                if keras.backend.backend() == "torch":
                    # An eager step: a block that is not residual would
                    # otherwise be found only at a later step that runs it.
                    self._check_skipped(args, kwargs)
                return args[0]
            return _residual(self, args[0], block_call(*args, **kwargs), scale)
        if keras.backend.backend() == "jax":
            return _jax_gated(self, block_call, on, scale, args, kwargs)
        return ops.cond(
            on,
            lambda: _residual(self, args[0], block_call(*args, **kwargs), scale),
            lambda: args[0],
        )

    def _check_skipped(self, args, kwargs):
        """Checks an off-path block's output spec, once per input signature."""
        x = args[0]
        if not hasattr(x, "shape") or _signature(x) in self._checked:
            return

        def spec(value):
            if ops.is_tensor(value):
                return keras.KerasTensor(tuple(value.shape), dtype=value.dtype)
            return value

        spec_args, spec_kwargs = keras.tree.map_structure(spec, (args, kwargs))
        gate, self._gate = self._gate, None
        try:
            y = self.block.compute_output_spec(*spec_args, **spec_kwargs)
        except Exception:
            # The check is a courtesy: a block that cannot be traced
            # symbolically is checked when a step runs it.
            return
        finally:
            self._gate = gate
        if isinstance(y, (list, tuple, dict)):
            return
        _check_output(self, x, y)


def _signature(x):
    return tuple(x.shape), keras.backend.standardize_dtype(x.dtype)


def wrapper_of(block):
    """The `RandomSkip` that wraps `block`, or `None`."""
    return getattr(block.call, _WRAPPED_ATTR, None)


def _install(block, skip):
    """Routes every call of `block` through `skip`'s gate."""
    block_call = block.call

    @functools.wraps(block_call)
    def call(*args, **kwargs):
        return skip._gated_call(block_call, *args, **kwargs)

    setattr(call, _WRAPPED_ATTR, skip)
    # `object.__setattr__`: a function attribute, not tracked by Keras (and
    # not registered by torch.nn.Module), so the block's config, weights and
    # saving are those of the plain block.
    object.__setattr__(block, "call", call)


def check_functional_shapes(skip):
    """Checks a block called in a Functional model (or a keras-hub backbone).

    Such a block's symbolic input and output are known before any training
    step, so a block that is not residual (its output's shape or dtype
    differs from its first input's) is an error when it is wrapped, even if
    no step ever runs it. Blocks outside a Functional graph are checked when
    they run.
    """
    try:
        inputs, outputs = skip.block.input, skip.block.output
    except (AttributeError, ValueError):
        return
    first = keras.tree.flatten(inputs)
    if not first or isinstance(outputs, (list, tuple, dict)):
        return
    _check_output(skip, first[0], outputs)


def _check_output(skip, x, y):
    checked = getattr(skip, "_checked", None)
    if checked is not None and hasattr(x, "shape") and _signature(x) in checked:
        return
    if not hasattr(y, "shape") or tuple(y.shape) != tuple(x.shape):
        output = tuple(y.shape) if hasattr(y, "shape") else type(y).__name__
        raise ValueError(
            f"`RandomSkip` needs the block '{skip.block.name}' to return a "
            "tensor of its input's shape, so that skipping it (returning the "
            f"input) is valid. Input shape: {tuple(x.shape)}, output: "
            f"{output}. Wrap only residual blocks."
        )
    if keras.backend.standardize_dtype(y.dtype) != keras.backend.standardize_dtype(
        x.dtype
    ):
        raise ValueError(
            f"`RandomSkip` needs the block '{skip.block.name}' to return its "
            f"input's dtype, so that skipping it (returning the input) is valid; "
            f"input: {keras.backend.standardize_dtype(x.dtype)}, output: "
            f"{keras.backend.standardize_dtype(y.dtype)}. Wrap only residual "
            "blocks, or cast the block's output to its input's dtype."
        )
    if checked is not None and hasattr(x, "shape"):
        checked.add(_signature(x))


def _residual(skip, x, y, scale):
    """The block's output, with its residual update scaled if asked."""
    _check_output(skip, x, y)
    if scale is None:
        return y
    return ops.add(x, ops.multiply(ops.subtract(y, x), ops.cast(scale, y.dtype)))


def _jax_gated(skip, block_call, on, scale, args, kwargs):
    """The skip on JAX: a `lax.cond` with a hand-written backward pass.

    The forward pass runs the block under `lax.cond`. Its residuals for the
    backward pass are the block's inputs and weights themselves (references,
    not copies); the backward pass is a second `lax.cond` that recomputes the
    block and takes its VJP when the block was on, and passes the output
    gradient straight through (zero weight gradients) when it was off.
    Differentiating a plain `lax.cond` instead would make the skip branch
    write zeros for every residual of the block (activations, or with
    `jax.checkpoint` copies of its weights) at every step.

    Random state (dropout seeds) goes in and out of the block explicitly, so
    the recomputation draws the same masks.
    """
    import jax

    block = skip.block
    trainable = block.trainable_variables
    state = block.non_trainable_variables
    weights = [v.value for v in trainable]
    state_values = [v.value for v in state]
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    if not leaves or leaves[0] is not args[0]:
        raise ValueError(
            f"`RandomSkip` needs the first positional input of the block "
            f"'{block.name}' to be a tensor, got {args[0]!r}."
        )
    kinds = []
    for leaf in leaves:
        if not isinstance(leaf, jax.Array):
            kinds.append("static")
        elif jax.numpy.issubdtype(leaf.dtype, jax.numpy.inexact):
            kinds.append("float")
        else:
            kinds.append("other")
    floats = [leaf for leaf, k in zip(leaves, kinds) if k == "float"]
    others = [leaf for leaf, k in zip(leaves, kinds) if k == "other"]
    scale_value = jax.numpy.ones((), floats[0].dtype) if scale is None else scale

    def run(weights, state_values, floats, others, scale_value):
        float_it, other_it = iter(floats), iter(others)
        values = [
            next(float_it) if k == "float" else next(other_it) if k == "other" else leaf
            for leaf, k in zip(leaves, kinds)
        ]
        call_args, call_kwargs = jax.tree_util.tree_unflatten(treedef, values)
        mapping = list(zip(trainable, weights)) + list(zip(state, state_values))
        with _ChildScope(mapping) as scope:
            y = block_call(*call_args, **call_kwargs)
            new_state = [scope.get_current_value(v) for v in state]
        y = _residual(skip, call_args[0], y, None if scale is None else scale_value)
        return y, new_state

    def skip_block(weights, state_values, floats, others, scale_value):
        return floats[0], list(state_values)

    def forward(on, weights, state_values, floats, others, scale_value):
        return jax.lax.cond(
            on, run, skip_block, weights, state_values, floats, others, scale_value
        )

    gated = jax.custom_vjp(forward)

    def gated_fwd(*inputs):
        return forward(*inputs), inputs

    def gated_bwd(residuals, cotangents):
        on, weights, state_values, floats, others, scale_value = residuals
        dy = cotangents[0]

        def on_path(weights, floats, scale_value):
            def output(weights, floats, scale_value):
                return run(weights, state_values, floats, others, scale_value)[0]

            return jax.vjp(output, weights, floats, scale_value)[1](dy)

        def off_path(weights, floats, scale_value):
            zeros = [jax.numpy.zeros_like(f) for f in floats[1:]]
            return (
                [jax.numpy.zeros_like(w) for w in weights],
                [dy.astype(floats[0].dtype)] + zeros,
                jax.numpy.zeros_like(scale_value),
            )

        d_weights, d_floats, d_scale = jax.lax.cond(
            on, on_path, off_path, weights, floats, scale_value
        )
        return None, d_weights, None, d_floats, None, d_scale

    gated.defvjp(gated_fwd, gated_bwd)
    y, new_state = gated(on, weights, state_values, floats, others, scale_value)
    for variable, value in zip(state, new_state):
        variable.assign(value)
    return y


def _child_scope_class():
    from keras.src.backend.common.stateless_scope import get_stateless_scope

    class ChildScope(keras.StatelessScope):
        """A `StatelessScope` that reads unmapped variables from its parent."""

        def __init__(self, state_mapping):
            self._parent = get_stateless_scope()
            super().__init__(state_mapping=state_mapping)

        def get_current_value(self, variable):
            value = super().get_current_value(variable)
            if value is None and self._parent is not None:
                value = self._parent.get_current_value(variable)
            return value

    return ChildScope


def _ChildScope(state_mapping):
    global _CHILD_SCOPE
    if _CHILD_SCOPE is None:
        _CHILD_SCOPE = _child_scope_class()
    return _CHILD_SCOPE(state_mapping)


_CHILD_SCOPE = None
