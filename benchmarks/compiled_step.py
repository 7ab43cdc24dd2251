"""What the compiled loop step contains, and its memory, on any machine.

A CPU's wall-clock hides an accelerator's fixed cost per op (a conditional
costs about 0.2 ms on an H100 whatever it guards), so this reads the
optimized HLO of one train step (JAX `jit`; TensorFlow with
`jit_compile=True`) for the model of `step_time.py` (L keras-hub encoder
blocks, width 128, Adam):

- `loop`: the one step RaPTr compiles for every path (JAX: on the stacked
  state with its workspace, as `fit` runs it);
- `conditional`: the same paths through one conditional per block (what
  models that fail the loop step's checks run);
- `plain k`: a Keras model built with exactly k blocks.

It counts the conditionals, matrix products (a block's forward and backward
once, whatever L and k: a block recomputed, or every block run and
multiplied by zero, would add its own), the copies of a stacked array
inside a loop's body (each would cost the whole stack at every iteration)
and the arrays the step takes; reads
XLA's cost analysis, which counts a loop's body once, so a path of k blocks
is credited the loop step's FLOPs plus k - 1 more blocks (a plain 2-block
model's FLOPs minus a 1-block one's); and (JAX) XLA's memory analysis: the
bytes of the step's arguments (weights, optimizer state, and the loop's
workspace of residuals) plus its temporaries, against a plain L-block
model's, and the seconds one compile takes.

    python benchmarks/compiled_step.py                 # jax and tensorflow
    python benchmarks/compiled_step.py --backends jax

Writes `benchmarks/results/compiled_step.json` and `compiled_step.md`.
Compiling is all it does: a few minutes; only the compile seconds need a
quiet machine.
"""

import argparse
import json
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, HERE)
import _child  # noqa: E402


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
        lowered = jax.jit(step, donate_argnums=0).lower(state, (x, y))
        start = time.perf_counter()
        executable = lowered.compile()
        seconds = time.perf_counter() - start
        cost = executable.cost_analysis()
        memory = executable.memory_analysis()
        return executable.as_text(), {
            "flops": cost.get("flops"), "bytes_accessed": cost.get("bytes accessed"),
            "compile_s": round(seconds, 2),
            "argument_bytes": getattr(memory, "argument_size_in_bytes", None),
            "temp_bytes": getattr(memory, "temp_size_in_bytes", None),
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


def loop_copies(text, num_blocks):
    """Copies of a stacked array (leading axis `num_blocks`) in a loop's body.

    A loop that updates a stack in place must not copy it: a copy there
    costs the whole stack's bytes at each iteration (XLA adds one where it
    cannot order a read of a stack's old rows before the write).
    """
    bodies = set(re.findall(r"body=%?([\w.\-]+)", text))
    found = 0
    for chunk in re.split(r"\n(?=\S)", text):
        name = chunk.split(" ", 1)[0].lstrip("%")
        if name in bodies:
            found += len(re.findall(rf"= \w+\[{num_blocks},[^\n]* copy\(", chunk))
    return found


def counts(text, cost, num_blocks=None):
    fused, distinct = kernels(text)
    return {
        "conditionals": text.count("conditional("),
        "stack_copies_in_loops": None if num_blocks is None else loop_copies(text, num_blocks),
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
    num_blocks = options.num_blocks
    plain = {}
    for k in sorted({1, 2, num_blocks, *args.lengths}):
        model, _ = step_time.build(options, k, False)
        model.fit(x, y, batch_size=args.batch_size, verbose=0)
        plain[k] = counts(*compiled(model, x, y))
    model, callbacks = step_time.build(options, num_blocks, True, num_blocks / 2)
    model.fit(x, y, batch_size=args.batch_size, callbacks=callbacks, verbose=0)
    assert model.engine_reason is None, model.engine_reason
    loop = counts(*compiled(model, x, y, ("loop",)), num_blocks)
    conditional = counts(*compiled(model, x, y, ("conditional",)))
    rows = []
    for k in args.lengths:
        row = {"path_length": k, "plain": plain[k]}
        if loop.get("flops") and plain[1].get("flops"):
            block = plain[2]["flops"] - plain[1]["flops"]
            row["loop_flops_credited"] = loop["flops"] + (k - 1) * block
            row["flops_ratio"] = round(row["loop_flops_credited"] / plain[k]["flops"], 4)
        rows.append(row)
    return {
        "backend": keras.backend.backend(), "batch_size": args.batch_size,
        "num_blocks": num_blocks, "loop": loop, "conditional": conditional,
        "plain_1": plain[1], "plain_full": plain[num_blocks], "rows": rows,
    }


def table(results):
    lines = [
        "| backend | step | conditionals | matrix products | stack copies in loops | arrays passed | XLA FLOPs / plain k | memory MB (arguments + temporaries) | compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def memory(c):
        if c.get("argument_bytes") is None:
            return "n/a"
        return f"{(c['argument_bytes'] + c['temp_bytes']) / 2**20:.1f} ({c['argument_bytes'] / 2**20:.1f} + {c['temp_bytes'] / 2**20:.1f})"

    for result in results:
        b, n = result["backend"], result["num_blocks"]

        def line(name, c, flops="n/a"):
            lines.append(
                f"| {b} | {name} | {c['conditionals']} | {c['dots']} | "
                f"{'n/a' if c.get('stack_copies_in_loops') is None else c['stack_copies_in_loops']} | "
                f"{c.get('arguments', 'n/a')} | {flops} | {memory(c)} | "
                f"{c.get('compile_s', 'n/a')} |"
            )

        line(f"loop (every path of {n} blocks)", result["loop"])
        line(f"conditional ({n} blocks)", result["conditional"])
        line("plain 1 block", result["plain_1"])
        for row in result["rows"]:
            line(f"plain {row['path_length']} blocks", row["plain"],
                 f"loop at {row['path_length']} of {n}: {row.get('flops_ratio', 'n/a')}")
        line(f"plain {n} blocks (the full model)", result["plain_full"])
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="jax,tensorflow")
    parser.add_argument("--lengths", default="2,4,6")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output-dir", default=RESULTS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.lengths = [int(k) for k in args.lengths.split(",")]
    if args.child:
        _child.report(run_child(args))
        return 0
    results = []
    for backend in [b for b in args.backends.split(",") if b]:
        if backend not in ("jax", "tensorflow"):
            parser.error(f"--backends: {backend!r} has no compiled XLA step; use jax or tensorflow")
        child = ["--lengths", ",".join(map(str, args.lengths)),
                 "--batch-size", str(args.batch_size)]
        result = _child.run(__file__, child, backend)
        if result is None:
            return 1
        results.append(result)
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
