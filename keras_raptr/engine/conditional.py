"""The step that assumes nothing of the blocks: one gate per block.

Every variant but the loop step runs Keras' own train step with a gate per
block, `(on, scale)`, which the block's `RandomSkip` obeys:

- a Python bool, known when the step is traced (a static path) or run
  (PyTorch's host path): an off block is a plain `return x`, absent from
  the step;
- a scalar boolean tensor, computed in the step from the path (the
  *conditional* step, JAX and TensorFlow, for blocks that fail
  `blocks.check`): one conditional per block, forward, backward and in the
  optimizer update (`optimizer_gate.py`).

On JAX a block's conditional (`jax_gated`) has a hand-written backward pass:
the forward runs the block under `lax.cond`; the backward pass is a second
`lax.cond` that recomputes the block from its inputs and takes its VJP when
it was on, and passes the output gradient straight through when it was off.
Differentiating a plain `lax.cond` instead would make the skip branch write
zeros for every residual of the block at every step. This step is correct
for any model, and slow where a conditional has a fixed cost (GPUs).
"""

import contextlib
import warnings

import keras
from keras import ops

from keras_raptr.engine import scopes
from keras_raptr.engine.optimizer_gate import skip_off_path_updates
from keras_raptr.engine.optimizer_gate import zero_off_path_gradients


@contextlib.contextmanager
def gated(model, step_gates):
    """Within the context, the model's blocks obey `step_gates`."""
    object.__setattr__(model, "_gates", step_gates)
    try:
        yield
    finally:
        object.__setattr__(model, "_gates", None)


def run_gated(model, base_step, gates, args, kwargs, fixed, zero_grad, free_variables):
    """Keras' own step, with per-block gates and the optimizer gated alike."""
    gates = [None if i in fixed else gate for i, gate in enumerate(gates)]
    free = [gate[0] for gate in gates if gate is not None]
    if zero_grad:
        # Keras' own optimizer step over every block, the blocks off the
        # path with a zero gradient.
        variables = [v for skip in model.blocks for v in skip.block.trainable_variables]
        with gated(model, gates), zero_off_path_gradients(model.optimizer, variables):
            return base_step(*args, **kwargs)
    if keras.backend.backend() == "tensorflow" and all(isinstance(on, bool) for on in free):
        # A path known when tracing: TensorFlow gives the blocks off it no
        # gradient, and Keras' optimizer leaves out (weight decay included)
        # the variables without one. No gate needed, and none that a
        # `tf.distribute` strategy's cross-replica update would have to run
        # through.
        with gated(model, gates), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Gradients do not exist")
            return base_step(*args, **kwargs)
    with gated(model, gates):
        with skip_off_path_updates(model.optimizer, free_variables, free):
            return base_step(*args, **kwargs)


def jax_gated(skip, block_call, on, scale, args, kwargs, residual):
    """The skip on JAX: a `lax.cond` with a hand-written backward pass.

    The forward pass runs the block under `lax.cond`. Its residuals for the
    backward pass are the block's inputs and weights themselves (references,
    not copies); the backward pass is a second `lax.cond` that recomputes the
    block and takes its VJP when the block was on, and passes the output
    gradient straight through (zero weight gradients) when it was off.

    Random state (dropout seeds) goes in and out of the block explicitly, so
    the recomputation draws the same masks. `residual(x, y, scale)` is the
    block's output, checked and scaled.
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
        with scopes.child_scope(mapping) as scope:
            y = block_call(*call_args, **call_kwargs)
            new_state = scopes.values_of(scope, state)
        y = residual(call_args[0], y, None if scale is None else scale_value)
        return y, new_state

    def skip_block(weights, state_values, floats, others, scale_value):
        # A block may return another floating dtype than its input's (mixed
        # precision): off the path it returns its input in that dtype, known
        # once `run` is traced (else traced for its shape alone: Keras'
        # `compute_output_spec` cannot read the variables inside the step).
        dtype = skip._skipped_dtype(
            args,
            kwargs,
            lambda: jax.eval_shape(run, weights, state_values, floats, others, scale_value)[0],
        )
        return floats[0].astype(dtype), list(state_values)

    def forward(on, weights, state_values, floats, others, scale_value):
        return jax.lax.cond(
            on, run, skip_block, weights, state_values, floats, others, scale_value
        )

    gated_call = jax.custom_vjp(forward)

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

    gated_call.defvjp(gated_fwd, gated_bwd)
    y, new_state = gated_call(on, weights, state_values, floats, others, scale_value)
    for variable, value in zip(state, new_state):
        variable.assign(value)
    return y


def cond_gated(on, run, x):
    """The skip on TensorFlow: `tf.cond`, the block on one side, `x` on the other."""
    return ops.cond(on, run, lambda: x)
