"""What the compiled train step of a drawn path contains, on any machine.

A CPU's wall-clock hides an accelerator's fixed cost per op (a conditional
costs about 0.2 ms on an H100 whatever it guards), so this counts, in the
optimized HLO of one train step (JAX `jit`; TensorFlow with
`jit_compile=True`), the conditionals, the matrix products and the distinct
kernels (what XLA:CPU's code generation time grows with), and reads XLA's
cost analysis (JAX: FLOPs and bytes accessed) and the seconds one compile
takes (JAX), for the model of `step_time.py` (8 keras-hub encoder blocks,
width 128, Adam):

- `gathered`: a drawn path of k blocks, the step RaPTr runs;
- `conditional`: the same path through the fallback (one conditional per
  block), what every drawn path ran before the gathered step;
- `plain`: a Keras model built with exactly k blocks.

    python benchmarks/compiled_step.py                 # jax and tensorflow
    python benchmarks/compiled_step.py --backends jax

Writes `benchmarks/results/compiled_step.json` and `compiled_step.md`.
Compiling is all it does: it takes a few minutes, and only the compile
seconds need a quiet machine.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, HERE)


def compiled(model, x, y, variant=None):
    """`(hlo_text, cost)` of one train step; `variant` forces RaPTr's.

    The loop step is compiled as `fit` runs it: on JAX, on the state with
    the blocks' variables stacked and its workspace
    (`keras_raptr/engine/loop_jax.py`); on TensorFlow, with `jit_compile`.
    """
    import keras

    steps = getattr(model, "_steps", None)

    def step(*args):
        if variant is not None:
            steps.tracing = variant
        return model.train_step(*args)

    if keras.backend.backend() == "jax":
        import jax

        state = tuple(
            [v.value for v in variables]
            for variables in (
                model.trainable_variables,
                model.non_trainable_variables,
                model.optimizer.variables,
                model.metrics_variables,
            )
        )
        if variant == ("loop",):
            loop = steps.find_loop()
            workspace = loop.workspace_for(state, (x, y), steps.plan.scaling != "none")
            state = loop.stack_state(state, workspace)
        lowered = jax.jit(step).lower(state, (x, y))
        start = time.perf_counter()
        executable = lowered.compile()
        seconds = time.perf_counter() - start
        cost = executable.cost_analysis()
        return executable.as_text(), {
            "flops": cost.get("flops"), "bytes_accessed": cost.get("bytes accessed"),
            "compile_s": round(seconds, 2),
        }
    import tensorflow as tf

    if variant == ("loop",):
        steps.find_loop().to_stacks()
    function = tf.function(lambda data: step(data), jit_compile=True)
    text = function.experimental_get_compiler_ir((tf.constant(x), tf.constant(y)))(
        stage="optimized_hlo"
    )
    return text, {}


def arguments(text):
    """How many arrays the compiled step takes (the ENTRY's parameters)."""
    entry = text[text.index("\nENTRY"):]
    entry = entry[: entry.index("\n}")]
    return entry.count(" parameter(")


def kernels(text):
    """`(fused computations, distinct ones)` in the optimized HLO.

    Two fused computations are the same kernel when they differ only in
    names and metadata: XLA:CPU generates code once per distinct one, so
    this, not the op count, is what its compile time grows with.
    """
    bodies = [
        chunk.split("\n", 1)[-1]
        for chunk in re.split(r"\n(?=\S)", text)
        if chunk.startswith("%fused")
    ]
    normal = {
        re.sub(r"%[\w.\-]+", "%", re.sub(r", metadata=\{[^}]*\}", "", body))
        for body in bodies
    }
    return len(bodies), len(normal)


def counts(text, cost):
    fused, distinct = kernels(text)
    return {
        "conditionals": text.count("conditional("),
        "dots": text.count(" dot("),
        "arguments": arguments(text),
        "kernels": fused,
        "distinct_kernels": distinct,
        **cost,
    }


def run_child(args):
    import keras
    import numpy as np

    import step_time

    options = step_time.parse_args(["--batch-size", str(args.batch_size)])
    rng = np.random.default_rng(0)
    shape = (args.batch_size, options.seq_len, options.hidden_dim)
    x = rng.normal(size=shape).astype("float32")
    y = rng.normal(size=shape).astype("float32")
    rows = []
    for k in args.lengths:
        model, callbacks = step_time.build(options, options.num_blocks, True, k + 0.5)
        model.fit(x, y, batch_size=args.batch_size, callbacks=callbacks, verbose=0)
        assert model._steps.layout() is not None, model._steps.fallback_reason
        plain, _ = step_time.build(options, k, False)
        plain.fit(x, y, batch_size=args.batch_size, verbose=0)
        row = {
            "path_length": k,
            "num_blocks": options.num_blocks,
            "gathered": counts(*compiled(model, x, y, ("gather", k))),
            "conditional": counts(*compiled(model, x, y, ("drawn",))),
            "plain": counts(*compiled(plain, x, y)),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"backend": keras.backend.backend(), "batch_size": args.batch_size, "rows": rows}


def table(results):
    lines = [
        "| backend | path | conditionals: gathered / fallback / plain | matrix products: gathered / fallback / plain | arrays passed: gathered / fallback / plain | XLA FLOPs gathered / plain | bytes accessed gathered / plain | distinct kernels: gathered / plain | compile s: gathered / plain |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for row in result["rows"]:
            g, c, p = row["gathered"], row["conditional"], row["plain"]
            flops = bytes_ = "n/a"
            if g.get("flops"):
                flops = f"{g['flops'] / p['flops']:.3f}"
                bytes_ = f"{g['bytes_accessed'] / p['bytes_accessed']:.2f}"
            lines.append(
                f"| {result['backend']} | {row['path_length']} of {row['num_blocks']} | "
                f"{g['conditionals']} / {c['conditionals']} / {p['conditionals']} | "
                f"{g['dots']} / {c['dots']} / {p['dots']} | "
                f"{g.get('arguments', 'n/a')} / {c.get('arguments', 'n/a')} / "
                f"{p.get('arguments', 'n/a')} | {flops} | {bytes_} | "
                f"{g['distinct_kernels']} / {p['distinct_kernels']} | "
                f"{g.get('compile_s', 'n/a')} / {p.get('compile_s', 'n/a')} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="jax,tensorflow")
    parser.add_argument("--lengths", default="2,4")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output-dir", default=RESULTS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.lengths = [int(k) for k in args.lengths.split(",")]
    if args.child:
        print("RESULT " + json.dumps(run_child(args)))
        return 0
    results = []
    for backend in [b for b in args.backends.split(",") if b]:
        if backend not in ("jax", "tensorflow"):
            parser.error(f"--backends: {backend!r} has no compiled XLA step; use jax or tensorflow")
        env = dict(os.environ, KERAS_BACKEND=backend)
        child = [sys.executable, os.path.abspath(__file__), "--child",
                 "--lengths", ",".join(map(str, args.lengths)),
                 "--batch-size", str(args.batch_size)]
        out = subprocess.run(child, env=env, capture_output=True, text=True)
        lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        if out.returncode or not lines:
            sys.stderr.write(out.stdout[-2000:] + out.stderr[-3000:])
            return 1
        results.append(json.loads(lines[-1][len("RESULT "):]))
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "compiled_step.json"), "w") as f:
        json.dump(results, f, indent=1)
    text = table(results)
    with open(os.path.join(args.output_dir, "compiled_step.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
