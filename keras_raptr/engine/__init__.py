"""The train-step engine (private: users never import it).

Read in this order:

- `xp.py`: the two array namespaces, numpy (the host) and `keras.ops` (the
  compiled step), under one set of names, so that a strategy's plan and the
  path are written once and serve both.
- `path.py`: the path of an optimizer step, a pure function of
  `(seed, step)`, identical on the host and inside the step, on every
  backend.
- `steps.py`: which train step runs the coming steps (picked on the host:
  the loop step, a static path's, the conditional step or PyTorch's host
  path), and each one's body.
- `blocks.py`: what the loop step assumes of the blocks (one structure, one
  chain, the same call arguments, no cross-block terms), checked before it
  runs; where each block's variables and optimizer slots sit.
- `stacked.py`: the blocks' state stacked by role, a row per block.
- `loop_jax.py`, `loop_tf.py`: the loop step, one compiled train step for
  every path: the path's length is data, a loop runs block 0's code on each
  path block's row, forward, backward and in the optimizer.
- `conditional.py` and `optimizer_gate.py`: the step that assumes nothing:
  a gate per block (a Python bool, or one conditional per block), and what
  the optimizer does to the blocks off the path (`off_path_update`).
- `width.py`: width-wise parts: which heads and units a block keeps at a
  step, the block run on the kept slices of its weights, and the update
  that moves only those slices.
- `scopes.py`: calling a layer or optimizer on values instead of variables.
- `dispatch.py`: the train function `fit` calls: one compiled function per
  variant, built and timed on first use, with the state converted between
  the variants' forms.
"""
