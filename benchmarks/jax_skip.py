"""What a skipped block costs in a JAX gradient step: three ways to skip.

A plain-JAX model (no Keras) of 8 MLP residual blocks; the gradient of a
toy loss is timed (median of 20 runs, after compiling) for:

- `plain_2`: a model built with the 2 blocks only;
- `cond`: every block under `jax.lax.cond`, differentiated as is;
- `cond_vjp`: every block under `lax.cond` with the hand-written VJP that
  `keras_raptr.layers.RandomSkip` uses (residuals are the block's inputs;
  the backward pass recomputes an on-path block and skips an off-path one);

each with 0, 2 and 8 of the 8 blocks on. It shows why RandomSkip does not
differentiate `lax.cond` directly: there, a skipped block still writes zeros
for every residual the block would have saved.

Usage: `KERAS_BACKEND=jax python benchmarks/jax_skip.py`; writes
`benchmarks/results/jax_skip.json`.
"""

import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

HERE = os.path.dirname(os.path.abspath(__file__))
WIDTH, HIDDEN, BATCH, SEQ, BLOCKS = 128, 512, 16, 64, 8


def block(weights, x):
    w1, w2 = weights
    return x + jax.nn.gelu(x @ w1) @ w2


def naive_gate(on, weights, x):
    return jax.lax.cond(on, block, lambda w, x: x, weights, x)


@jax.custom_vjp
def vjp_gate(on, weights, x):
    return jax.lax.cond(on, block, lambda w, x: x, weights, x)


def _vjp_gate_fwd(on, weights, x):
    return vjp_gate(on, weights, x), (on, weights, x)


def _vjp_gate_bwd(residuals, dy):
    on, weights, x = residuals

    def on_path(weights, x):
        return jax.vjp(block, weights, x)[1](dy)

    def off_path(weights, x):
        return [jnp.zeros_like(w) for w in weights], dy

    d_weights, dx = jax.lax.cond(on, on_path, off_path, weights, x)
    return None, d_weights, dx


vjp_gate.defvjp(_vjp_gate_fwd, _vjp_gate_bwd)


def loss(gate, weights, x, on):
    for i, w in enumerate(weights):
        x = gate(on[i], w, x)
    return jnp.mean(x**2)


def plain_loss(weights, x):
    for w in weights:
        x = block(w, x)
    return jnp.mean(x**2)


def median_ms(function, *args, runs=20):
    jax.block_until_ready(function(*args))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(function(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main():
    key = jax.random.PRNGKey(0)
    weights = [
        [
            jax.random.normal(key, (WIDTH, HIDDEN)) * 0.02,
            jax.random.normal(key, (HIDDEN, WIDTH)) * 0.02,
        ]
        for _ in range(BLOCKS)
    ]
    x = jnp.ones((BATCH, SEQ, WIDTH))
    rows = {"plain_2": median_ms(jax.jit(jax.grad(plain_loss)), weights[:2], x)}
    for name, gate in (("cond", naive_gate), ("cond_vjp", vjp_gate)):
        step = jax.jit(jax.grad(lambda w, x, on, gate=gate: loss(gate, w, x, on)))
        for count in (0, 2, BLOCKS):
            on = jnp.arange(BLOCKS) < count
            rows[f"{name}_{count}_of_{BLOCKS}"] = median_ms(step, weights, x, on)
    result = {
        "device": str(jax.devices()[0].device_kind),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "jax": jax.__version__,
        "ms_per_gradient_step": {k: round(v, 2) for k, v in rows.items()},
    }
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "jax_skip.json"), "w") as f:
        json.dump(result, f, indent=2)
    for name, ms in result["ms_per_gradient_step"].items():
        print(f"{name:>16}: {ms:7.2f} ms")


if __name__ == "__main__":
    main()
