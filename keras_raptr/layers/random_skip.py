"""The stochastic residual-skip layer.

A residual block computes `x + f(x)`. Skipping it means returning `x`: the
block's forward pass and its backward pass are never run. `RandomSkip` wraps
a block so that, inside a training step of a `keras_raptr.RandomPartModel`,
the block runs only when it is on that step's random path. Everywhere else
(evaluation, inference, a model without a schedule) it is the block itself.

How the skip saves compute on each backend:

- JAX: `jax.lax.cond`. Only the taken branch runs, forward and backward. The
  block's call is wrapped in `jax.checkpoint` inside its branch, so that the
  skip branch does not have to produce (zero) copies of every activation the
  block would have saved for the backward pass; only the block's inputs are
  kept. Layers with random state (dropout) run through their variables'
  values, and their new seed state leaves the branch as an output.
- TensorFlow: `tf.cond`, in `tf.function` with and without XLA.
- PyTorch: a Python `if` on a path that was copied to the host once per step
  (not once per block).
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
    in keras-hub's transformer layers).

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
        if getattr(block.call, _WRAPPED_ATTR, None) is not None:
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
        backend = keras.backend.backend()
        if backend == "jax":
            return _jax_gated(self, block_call, on, scale, args, kwargs)
        if backend == "torch":
            if not on:
                return args[0]
            return _residual(self, args[0], block_call(*args, **kwargs), scale)
        return ops.cond(
            on,
            lambda: _residual(self, args[0], block_call(*args, **kwargs), scale),
            lambda: args[0],
        )


def _install(block, skip):
    """Routes every call of `block` through `skip`'s gate."""
    block_call = block.call

    @functools.wraps(block_call)
    def call(*args, **kwargs):
        return skip._gated_call(block_call, *args, **kwargs)

    setattr(call, _WRAPPED_ATTR, True)
    # `object.__setattr__`: a function attribute, not tracked by Keras (and
    # not registered by torch.nn.Module), so the block's config, weights and
    # saving are those of the plain block.
    object.__setattr__(block, "call", call)


def _check_output(skip, x, y):
    if not hasattr(y, "shape") or tuple(y.shape) != tuple(x.shape):
        raise ValueError(
            f"`RandomSkip` needs the block '{skip.block.name}' to return a "
            "tensor of its input's shape, so that skipping it (returning the "
            f"input) is valid. Input shape: {tuple(x.shape)}, output: "
            f"{getattr(y, 'shape', type(y).__name__)}. Wrap only residual "
            "blocks."
        )
    if keras.backend.standardize_dtype(y.dtype) != keras.backend.standardize_dtype(
        x.dtype
    ):
        raise ValueError(
            f"`RandomSkip` needs the block '{skip.block.name}' to return its "
            f"input's dtype; input: {keras.backend.standardize_dtype(x.dtype)}, "
            f"output: {keras.backend.standardize_dtype(y.dtype)}."
        )


def _residual(skip, x, y, scale):
    """The block's output, with its residual update scaled if asked."""
    _check_output(skip, x, y)
    if scale is None:
        return y
    return ops.add(x, ops.multiply(ops.subtract(y, x), ops.cast(scale, y.dtype)))


def _jax_gated(skip, block_call, on, scale, args, kwargs):
    """`jax.lax.cond` around the block, with its random state threaded out."""
    import jax

    x = args[0]
    state = skip.block.non_trainable_variables
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    is_array = [isinstance(leaf, jax.Array) for leaf in leaves]
    arrays = [leaf for leaf, a in zip(leaves, is_array) if a]

    def rebuild(array_values):
        it = iter(array_values)
        values = [next(it) if a else leaf for leaf, a in zip(leaves, is_array)]
        return jax.tree_util.tree_unflatten(treedef, values)

    def on_path(array_values):
        call_args, call_kwargs = rebuild(array_values)
        y = _residual(skip, call_args[0], block_call(*call_args, **call_kwargs), scale)
        # Assignments made inside the branch (seed state) leave it as outputs.
        return y, [v.value for v in state]

    before = [v.value for v in state]

    def off_path(array_values):
        return x, before

    y, new_state = jax.lax.cond(on, jax.checkpoint(on_path), off_path, arrays)
    for variable, value in zip(state, new_state):
        variable.assign(value)
    return y
