"""The train-step engine (private: users never import it).

Read in this order:

- `xp.py`: the two array namespaces, numpy (the host) and `keras.ops` (the
  compiled step), under one set of names, so that a strategy's plan and the
  path are written once and serve both.
- `path.py`: the path of an optimizer step, a pure function of
  `(seed, step)`, identical on the host and inside the step, on every
  backend.
- `steps.py`: which train step runs the coming steps (picked on the host),
  the step of each kind, and the dispatcher that compiles each once.
- `gather.py`: the drawn-path step on JAX and TensorFlow without a
  conditional per block: the on-path blocks' weights and optimizer slots are
  gathered into the first `k` block positions, a plain `k`-block network
  trains, and the results scatter back.
- `stacked.py`: JAX only: between gathered steps, `fit` threads the blocks'
  state stacked (per dtype, one `(L, P)` array, a row per block), so that a
  step reads and writes only its path's rows.
- `optimizer_gate.py`: what the optimizer does to the off-path blocks: zero
  gradients under `off_path_update="zero_grad"`; and (the default, "skip")
  the fallback for blocks of different structures: one
  conditional per block in the forward, backward and optimizer update.
"""
