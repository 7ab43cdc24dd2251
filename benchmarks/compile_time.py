"""Train steps a RaPTr run compiles, and their seconds, against the baseline's.

For L = 8, 12 and 24 keras-hub encoder blocks (the model of `step_time.py`:
width 128, 4 heads, feed-forward 512; Adam), on each backend that compiles
(JAX; TensorFlow as Keras runs it on this machine, and with `jit_compile=True`):

- `baseline`: the `RandomPartModel` without a strategy, trained for 2
  steps: Keras' own train step of the full L-block network, compiled once;
- `raptr`: the same model under `StageSchedule` `L/2-3L/4-L` (Bernoulli,
  first and last block fixed, the library's defaults) for `--steps` steps
  (default 24: 8 per stage), which meets paths of many lengths.

Each reads `RandomPartModel.compiled_train_steps`: the train steps compiled
and the seconds of each one's first call (tracing, compiling and one step).
What to read: how many steps RaPTr compiled, its compile seconds against the
baseline's (the target: one step, at most 1.5x the baseline's), and whether
that stays flat as L grows.

    python benchmarks/compile_time.py                      # every mode
    python benchmarks/compile_time.py --modes jax --num-blocks 8,12

Writes `benchmarks/results/compile_time[_<tag>].json` and `.md`. Run it
alone on the machine (it measures seconds).
"""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, HERE)
import _child  # noqa: E402
MODES = {"jax": ("jax", False), "tensorflow": ("tensorflow", False), "tensorflow-xla": ("tensorflow", True)}


def run_child(args):
    import keras
    import numpy as np

    import keras_raptr
    import step_time

    options = step_time.parse_args(["--batch-size", str(args.batch_size)])
    rng = np.random.default_rng(0)
    # The process's first train step pays the backend's own start-up (both
    # methods must not): a 1-block model takes it.
    warm, _ = step_time.build(options, 1, True, 1)
    data = rng.normal(size=(args.batch_size, options.seq_len, options.hidden_dim))
    warm.fit(data, data, batch_size=args.batch_size, verbose=0)
    rows = []
    for num_blocks in args.num_blocks:
        n = args.batch_size * args.steps
        shape = (n, options.seq_len, options.hidden_dim)
        x = rng.normal(size=shape).astype("float32")
        y = rng.normal(size=shape).astype("float32")
        row = {"num_blocks": num_blocks}
        for method in ("baseline", "raptr"):
            model, _ = step_time.build(options, num_blocks, True, num_blocks)
            if args.jit:
                model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="mse", jit_compile=True)
            callbacks = []
            steps = 2
            if method == "raptr":
                spec = f"{num_blocks // 2}-{3 * num_blocks // 4}-{num_blocks}"
                callbacks = [keras_raptr.StageSchedule.from_spec(spec, total_steps=args.steps)]
                steps = args.steps
            model.fit(
                x[: steps * args.batch_size], y[: steps * args.batch_size],
                batch_size=args.batch_size, epochs=1, verbose=0, callbacks=callbacks,
            )
            compiled = dict(model.compiled_train_steps)
            row[method] = {
                "compiled_train_steps": {k: round(v, 2) for k, v in compiled.items()},
                "count": len(compiled),
                "seconds": round(sum(compiled.values()), 2),
            }
        row["ratio"] = round(row["raptr"]["seconds"] / row["baseline"]["seconds"], 3)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return {"backend": keras.backend.backend(), "jit_compile": args.jit, "rows": rows}


def table(results):
    lines = [
        "| backend | blocks | baseline: steps compiled (s) | RaPTr: steps compiled (s) | RaPTr / baseline | target <= 1.5, one step |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        name = result["backend"] + (" (XLA)" if result["jit_compile"] else "")
        for row in result["rows"]:
            b, r = row["baseline"], row["raptr"]
            ok = "ok" if r["count"] == 1 and row["ratio"] <= 1.5 else "missed"
            lines.append(
                f"| {name} | {row['num_blocks']} | {b['count']} ({b['seconds']}) | "
                f"{r['count']} ({r['seconds']}) | {row['ratio']:.2f} | {ok} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--num-blocks", default="8,12,24")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--tag", default="")
    parser.add_argument("--output-dir", default=RESULTS)
    parser.add_argument("--jit", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.num_blocks = [int(n) for n in args.num_blocks.split(",")]
    if args.child:
        _child.report(run_child(args))
        return 0
    results = []
    for mode in [m for m in args.modes.split(",") if m]:
        if mode not in MODES:
            parser.error(f"--modes: {mode!r}; choose from {sorted(MODES)}")
        backend, jit = MODES[mode]
        child = [
            "--num-blocks", ",".join(map(str, args.num_blocks)),
            "--steps", str(args.steps), "--batch-size", str(args.batch_size),
        ] + (["--jit"] if jit else [])
        result = _child.run(__file__, child, backend)
        if result is None:
            return 1
        results.append(result)
    suffix = f"_{args.tag}" if args.tag else ""
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, f"compile_time{suffix}.json"), "w") as f:
        json.dump(results, f, indent=1)
    text = table(results)
    with open(os.path.join(args.output_dir, f"compile_time{suffix}.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
