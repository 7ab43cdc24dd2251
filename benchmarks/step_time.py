"""Compiled train-step time of a RandomPartModel against plain models.

For each backend, a stack of L keras-hub `TransformerEncoder` blocks is
trained (Adam, MSE on the last hidden states) as:

- a `RandomPartModel` over all L blocks, trained with a one-stage
  `StageSchedule` of path length l (`sampling="subset"`: exactly l blocks a
  step, so that a step costs what a plain l-block step costs). The cases,
  in this order:
  - drawn paths, what a schedule runs: L/4 and L/2 with no fixed block
    (every block drawn), and L/2 with the first and last fixed (two drawn);
  - the fixed blocks alone (2 of L, first and last): a static path, the
    same at every step, with a train step of its own;
  - the full path (L of L);
- a plain Keras model built with exactly l blocks of the same widths.

With `--widths 0.25,0.5,0.75,1` the rows are width-wise instead: the full
path (first and last block fixed) with each on-path block at width w (a
random w of its heads and feed-forward units each step), against a plain
model of L blocks built at that width (the encoder's layers with w of the
heads, each of the full head size, and w of the units: `_NarrowEncoder`).

Both run through `model.fit`, interleaved round by round in one process, so
that the machine's noise hits them alike. A round is one epoch of `--steps`
steps; the step time of a round is its wall-clock time over its steps; the
reported figure is the median over `--rounds` rounds, after one warm-up
epoch (which compiles). The ratio RandomPartModel / plain is what to read.

Usage:

    python benchmarks/step_time.py                   # every backend
    python benchmarks/step_time.py --backends jax    # one
    python benchmarks/step_time.py --quick           # a smoke run

Writes `benchmarks/results/step_time_<backend>.json` per backend and
`benchmarks/results/step_time.md` (a table of every backend in the results);
with `--optimizer sgd`, the same names ending in `_sgd`, with
`--off-path-update zero_grad` (the schedules update off-path blocks with a
zero gradient: the cost of that option), ending in `_zero_grad`, with
`--widths`, ending in `_width`, and with
`--tag NAME` (for example the accelerator's name), ending in `_NAME`.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
BACKENDS = ("jax", "tensorflow", "torch")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--num-blocks", type=int, default=8)
    parser.add_argument("--hidden-dim", type=int, default=128)
    parser.add_argument("--intermediate-dim", type=int, default=512)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="steps per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--optimizer", choices=("adam", "sgd"), default="adam",
        help="sgd (no momentum) leaves out the optimizer's per-weight cost",
    )
    parser.add_argument(
        "--off-path-update", choices=("skip", "zero_grad"), default="skip",
        help="the schedules' off_path_update: zero_grad adds the off-path "
        "blocks' optimizer update (and on JAX and TensorFlow the copies of "
        "every block)",
    )
    parser.add_argument(
        "--widths", default="",
        help="width-wise rows instead: comma-separated widths, e.g. 0.25,0.5,0.75,1",
    )
    parser.add_argument("--quick", action="store_true", help="2 rounds of 3 steps")
    parser.add_argument(
        "--tag", default="",
        help="appended to the result file names, e.g. the accelerator's name",
    )
    parser.add_argument("--output-dir", default=RESULTS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.rounds = 3, 2
    return args


# The width-wise targets: as for depth at a quarter, a half and the whole
# (0.75 has none of its own: the half's).
WIDTH_TARGETS = {0.25: 1.10, 0.5: 1.07, 0.75: 1.07, 1.0: 1.03}


def width_cases(args):
    """`(name, fixed_blocks, path_length, target, width)` of every width row."""
    rows = []
    for text in args.widths.split(","):
        width = float(text)
        target = WIDTH_TARGETS.get(width, 1.10)
        rows.append((f"width {width:g}", (0, -1), args.num_blocks, target, width))
    return rows


def cases(num_blocks):
    """`(name, fixed_blocks, path_length, target)` of every RaPTr row."""
    quarter, half = max(1, num_blocks // 4), max(1, num_blocks // 2)
    rows = [
        ("drawn", (), quarter, 1.10),
        ("drawn", (), half, 1.07),
        ("drawn", (0, -1), half, 1.07),
        ("fixed only", (0, -1), 2, 1.10),
        ("full", (0, -1), num_blocks, 1.03),
    ]
    return [row for row in rows if row[0] != "drawn" or row[2] > len(row[1])]


def build(args, num_blocks, random_part, path_length=None, fixed_blocks=(), width=1.0,
          plain_width=None):
    """A model of `num_blocks` encoder blocks; `plain_width`: `_NarrowEncoder`s."""
    import keras
    import keras_hub

    import keras_raptr

    keras.utils.set_random_seed(0)
    inputs = keras.Input((args.seq_len, args.hidden_dim))
    x = inputs
    blocks = []
    for i in range(num_blocks):
        if plain_width is not None:
            block = _narrow_encoder(args, plain_width, name=f"block_{i}")
        else:
            block = keras_hub.layers.TransformerEncoder(
                intermediate_dim=args.intermediate_dim,
                num_heads=args.num_heads,
                dropout=0.0,
                name=f"block_{i}",
            )
        blocks.append(block)
        x = block(x)
    model = keras.Model(inputs, x)
    callbacks = []
    if random_part:
        model = keras_raptr.RandomPartModel(model, blocks=blocks, seed=0)
        callbacks.append(
            keras_raptr.StageSchedule(
                [keras_raptr.Stage(path_length, 10**9, width=width)],
                fixed_blocks=fixed_blocks,
                sampling="subset",
                off_path_update=args.off_path_update,
            )
        )
    optimizer = (
        keras.optimizers.Adam(1e-4)
        if args.optimizer == "adam"
        else keras.optimizers.SGD(1e-4)
    )
    model.compile(optimizer=optimizer, loss="mse")
    return model, callbacks


def _narrow_encoder(args, width, name):
    """keras-hub's post-norm `TransformerEncoder` (no dropout), built at `width`:
    `width` of the heads, each of the full model's head size, and of the units."""
    import keras

    heads = max(1, round(width * args.num_heads))
    units = max(1, round(width * args.intermediate_dim))
    head_size = args.hidden_dim // args.num_heads

    class NarrowEncoder(keras.layers.Layer):
        def build(self, shape):
            self.attention = keras.layers.MultiHeadAttention(heads, head_size)
            self.attention.build(shape, shape)
            self.norm1 = keras.layers.LayerNormalization(epsilon=1e-5)
            self.norm2 = keras.layers.LayerNormalization(epsilon=1e-5)
            self.up = keras.layers.Dense(units, activation="relu")
            self.down = keras.layers.Dense(shape[-1])
            for layer in (self.norm1, self.norm2, self.up):
                layer.build(shape)
            self.down.build((*shape[:-1], units))

        def call(self, x):
            x = self.norm1(x + self.attention(x, x))
            return self.norm2(x + self.down(self.up(x)))

    return NarrowEncoder(name=name)


class _EpochTimer:
    def __init__(self):
        import keras

        class Timer(keras.callbacks.Callback):
            def on_epoch_begin(self_, epoch, logs=None):
                self_.start = time.perf_counter()

            def on_epoch_end(self_, epoch, logs=None):
                self.times.append(time.perf_counter() - self_.start)

        self.times = []
        self.callback = Timer()


def run_child(args):
    import keras
    import numpy as np

    backend = keras.backend.backend()
    rng = np.random.default_rng(0)
    n = args.batch_size * args.steps
    x = rng.normal(size=(n, args.seq_len, args.hidden_dim)).astype("float32")
    y = rng.normal(size=(n, args.seq_len, args.hidden_dim)).astype("float32")
    num_blocks = args.num_blocks
    variants = []
    if args.widths:
        rows = width_cases(args)
        for name, fixed, length, _, width in rows:
            variants.append((f"plain_{name}", build(args, length, False, plain_width=width)))
            model = build(args, num_blocks, True, length, fixed, width=width)
            variants.append((_key(name, fixed, length), model))
    else:
        rows = [(*row, 1.0) for row in cases(num_blocks)]
        for length in sorted({case[2] for case in rows}):
            variants.append((f"plain_{length}", build(args, length, False)))
        for name, fixed, length, _, _ in rows:
            model = build(args, num_blocks, True, length, fixed)
            variants.append((_key(name, fixed, length), model))
    timers = {name: _EpochTimer() for name, _ in variants}

    def epoch(name, model, callbacks):
        model.fit(
            x, y, batch_size=args.batch_size, epochs=1, shuffle=False, verbose=0,
            callbacks=callbacks + [timers[name].callback],
        )

    for name, (model, callbacks) in variants:  # warm-up: compiles
        epoch(name, model, callbacks)
        timers[name].times.clear()
    for _ in range(args.rounds):
        for name, (model, callbacks) in variants:
            epoch(name, model, callbacks)

    cases_run, rows = rows, []
    for name, fixed, length, target, width in cases_run:
        plain_name = f"plain_{name}" if args.widths else f"plain_{length}"
        plain = statistics.median(timers[plain_name].times) / args.steps
        raptr = statistics.median(timers[_key(name, fixed, length)].times) / args.steps
        rows.append(
            {
                "case": name,
                "fixed_blocks": list(fixed),
                "path_length": length,
                "width": width,
                "plain_ms": round(plain * 1e3, 2),
                "raptr_ms": round(raptr * 1e3, 2),
                "ratio": round(raptr / plain, 3),
                "target": target,
                "meets_target": raptr / plain <= target,
            }
        )
    result = {
        "backend": backend,
        "device": _device(backend),
        "keras": keras.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "config": {
            k: getattr(args, k)
            for k in (
                "num_blocks", "hidden_dim", "intermediate_dim", "num_heads",
                "batch_size", "seq_len", "steps", "rounds",
            )
        },
        "optimizer": args.optimizer,
        "off_path_update": args.off_path_update,
        "sampling": "subset",
        "rows": rows,
    }
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, f"step_time_{backend}{_suffix(args)}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))


def _key(name, fixed, length):
    return f"raptr_{name}_{_fixed_text(fixed)}_{length}"


def _fixed_text(fixed):
    return ", ".join(str(i) for i in fixed) if fixed else "none"


def _suffix(args):
    suffix = "" if args.optimizer == "adam" else f"_{args.optimizer}"
    if args.widths:
        suffix += "_width"
    if args.off_path_update != "skip":
        suffix += f"_{args.off_path_update}"
    return suffix + (f"_{args.tag}" if args.tag else "")


def _device(backend):
    try:
        if backend == "jax":
            import jax

            return str(jax.devices()[0].device_kind)
        if backend == "torch":
            import torch

            if torch.cuda.is_available():
                return torch.cuda.get_device_name(0)
            return "cpu"
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        return gpus[0].name if gpus else "cpu"
    except Exception:  # pragma: no cover - informational only
        return "unknown"


def table(results):
    lines = [
        "| backend | device | optimizer | off-path update | path | fixed blocks | path length | plain ms/step | RaPTr ms/step | ratio | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for row in result["rows"]:
            mark = "ok" if row["meets_target"] else "missed"
            lines.append(
                f"| {result['backend']} | {result['device']} | {result['optimizer']} | "
                f"{result.get('off_path_update', 'skip')} | "
                f"{row.get('case', '')} | "
                f"{_fixed_text(row.get('fixed_blocks', result.get('fixed_blocks', [0, -1])))} | "
                f"{row['path_length']} of "
                f"{result['config']['num_blocks']} | {row['plain_ms']} | "
                f"{row['raptr_ms']} | {row['ratio']:.3f} | "
                f"<= {row['target']:.2f} ({mark}) |"
            )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        run_child(args)
        return 0
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        print(f"Unknown backends {unknown}; choose from {BACKENDS}.", file=sys.stderr)
        return 2
    argv = [a for a in (argv if argv is not None else sys.argv[1:])]
    failed = []
    for backend in backends:
        print(f"== {backend}", flush=True)
        env = dict(os.environ, KERAS_BACKEND=backend)
        code = subprocess.call(
            [sys.executable, os.path.abspath(__file__), "--child", *argv], env=env
        )
        if code:
            failed.append(backend)
    results = []
    for backend in BACKENDS:
        path = os.path.join(args.output_dir, f"step_time_{backend}{_suffix(args)}.json")
        if os.path.exists(path):
            with open(path) as f:
                results.append(json.load(f))
    text = table(results)
    print(text)
    with open(os.path.join(args.output_dir, f"step_time{_suffix(args)}.md"), "w") as f:
        f.write(text + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
