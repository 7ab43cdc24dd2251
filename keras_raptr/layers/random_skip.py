"""The stochastic residual-skip layer.

A residual block computes `x + f(x)`. Skipping it means returning `x`: the
block's forward pass and its backward pass are never run. `RandomSkip` wraps
a block so that, inside a training step of a `keras_raptr.RandomPartModel`,
the block runs only when it is on that step's random path. Everywhere else
(evaluation, inference, a model without a schedule) it is the block itself.

How the skip saves compute (`keras_raptr/engine/` does the work):

- A gate that is a Python bool is known when the step is traced (a static
  path) or run (every PyTorch step: its path is computed on the host). An
  off block is then a plain `return x`: it is not in the step at all.
- The loop step (`engine/loop_jax.py`, `engine/loop_tf.py`, JAX and
  TensorFlow) gives the first block of the chain a gate that runs the whole
  path, block by block, on the path's weights, and every other block a gate
  that passes its input on.
- The conditional step (`engine/conditional.py`, blocks that the loop step
  cannot run) gates each block with a scalar boolean tensor: one
  conditional per block.
"""

import functools

import keras
from keras import ops

from keras_raptr.engine import conditional

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
    in keras-hub's transformer layers), or another floating dtype: under a
    mixed precision policy a block that receives float32 and computes in
    float16, or returns float32 from float16, is residual, and off the path
    it returns its input cast to its output's dtype. Otherwise a training
    step that gates it raises a `ValueError` naming the block and both
    shapes (or dtypes):
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
        # Set by `RandomPartModel` while a training step is traced (or run,
        # on PyTorch): `(on, scale)`, where `on` is a scalar boolean tensor
        # or a Python bool and `scale` is `None` or the factor for the
        # residual update; or the loop step's callable gate. `None` means
        # "run the block".
        self._gate = None
        # Set while a step at a width below 1 is traced or run: wraps the
        # block's call to run its kept heads and units (`engine/width.py`).
        self._narrow = None
        _install(block, self)
        # (shape, dtype) of the inputs whose output was found to match.
        self._checked = set()
        # (shape, dtype) of an input -> the dtype of the block's output.
        self._output_dtypes = {}
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
        if self._narrow is not None:
            block_call = self._narrow(block_call)
        if gate is None:
            return block_call(*args, **kwargs)
        if not args:
            raise ValueError(
                f"The block '{self.block.name}' was called without a positional "
                "input. `RandomSkip` returns the first positional argument "
                "when the block is off the path, so pass the hidden states "
                "positionally."
            )
        if callable(gate):
            # The loop step's gate: the whole path, or pass the input on.
            return gate(self, block_call, args, kwargs)
        on, scale = gate
        if isinstance(on, bool):
            # Known when tracing (a static path) or running (PyTorch): a
            # plain `if`, no conditional in the step.
            if not on:
                if keras.backend.backend() == "torch":
                    # An eager step: a block that is not residual would
                    # otherwise be found only at a later step that runs it.
                    self._check_skipped(args, kwargs)
                    return args[0]
                # No conditional: the dtype only if already known (tracing
                # the block here to learn it would cost a trace per block).
                return self._skipped(args, kwargs, trace=False)
            return _residual(self, args[0], block_call(*args, **kwargs), scale)
        if keras.backend.backend() == "jax":
            return conditional.jax_gated(
                self, block_call, on, scale, args, kwargs,
                lambda x, y, s: _residual(self, x, y, s),
            )
        return conditional.cond_gated(
            on,
            lambda: _residual(self, args[0], block_call(*args, **kwargs), scale),
            self._skipped(args, kwargs),
        )

    def _skipped(self, args, kwargs, trace=True):
        """The output of the block off the path: its input, in its output's dtype.

        A block may return another floating dtype than it receives (under a
        mixed precision policy, a block that returns float32 from its float16
        computation). Off the path it returns its input cast to that dtype,
        so that both sides of a conditional, and the layers after the block,
        see one dtype whatever the path. (On PyTorch, which runs each path
        eagerly, the input is returned as it is: no conditional needs the
        sides to agree, the next layer casts its inputs itself, and the
        symbolic output dtype there can differ from the eager one.)
        `trace=False` casts only to a dtype already seen, without working it
        out symbolically.
        """
        x = args[0]
        if not hasattr(x, "dtype"):
            return x
        signature = _signature(x)
        if trace:
            dtype = self._skipped_dtype(args, kwargs)
        else:
            dtype = self._output_dtypes.get(signature, signature[1])
        return x if dtype == signature[1] else ops.cast(x, dtype)

    def _skipped_dtype(self, args, kwargs, output_spec=None):
        """The dtype of the block's output for these inputs.

        `output_spec()` gives the block's output spec (by default its
        `compute_output_spec`); the dtype is kept per input shape and dtype.
        The input's own dtype when the spec cannot be computed.
        """
        signature = _signature(args[0])
        if signature not in self._output_dtypes:
            if output_spec is None:
                y = self._output_spec(args, kwargs)
            else:
                y = output_spec()
            if not hasattr(y, "dtype") or isinstance(y, (list, tuple, dict)):
                return signature[1]
            self._output_dtypes[signature] = keras.backend.standardize_dtype(y.dtype)
        return self._output_dtypes[signature]

    def _output_spec(self, args, kwargs):
        """The block's symbolic output for these inputs, or `None`."""

        def spec(value):
            if ops.is_tensor(value):
                return keras.KerasTensor(tuple(value.shape), dtype=value.dtype)
            return value

        spec_args, spec_kwargs = keras.tree.map_structure(spec, (args, kwargs))
        gate, self._gate = self._gate, None
        narrow, self._narrow = self._narrow, None
        try:
            return self.block.compute_output_spec(*spec_args, **spec_kwargs)
        except Exception:
            # A block that cannot be traced symbolically is checked when a
            # step runs it.
            return None
        finally:
            self._gate = gate
            self._narrow = narrow

    def _check_skipped(self, args, kwargs):
        """Checks an off-path block's output spec, once per input signature."""
        x = args[0]
        if not hasattr(x, "shape") or _signature(x) in self._checked:
            return
        y = self._output_spec(args, kwargs)
        if y is None:
            return
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
    x_dtype = keras.backend.standardize_dtype(x.dtype)
    y_dtype = keras.backend.standardize_dtype(y.dtype)
    floats = keras.backend.is_float_dtype(x_dtype) and keras.backend.is_float_dtype(y_dtype)
    if x_dtype != y_dtype and not floats:
        # A floating dtype change (a block under a mixed precision policy
        # computes in float16 what its float32 input holds) is still a
        # residual block: off the path, `RandomSkip._skipped` returns the
        # input cast to the output's dtype.
        raise ValueError(
            f"`RandomSkip` needs the block '{skip.block.name}' to return its "
            f"input's dtype (or another floating dtype for a floating input), "
            f"so that skipping it (returning the input) is valid; input: "
            f"{x_dtype}, output: {y_dtype}. Wrap only residual blocks, or cast "
            "the block's output to its input's dtype."
        )
    if checked is not None and hasattr(x, "shape"):
        checked.add(_signature(x))


def _residual(skip, x, y, scale):
    """The block's output, with its residual update scaled if asked."""
    _check_output(skip, x, y)
    # What a skipped block returns for this input, now known for free.
    skip._output_dtypes.setdefault(_signature(x), keras.backend.standardize_dtype(y.dtype))
    if scale is None:
        return y
    return ops.add(x, ops.multiply(ops.subtract(y, x), ops.cast(scale, y.dtype)))
