"""Wall-clock of the whole pretraining example: RaPTr against the baseline.

Runs `examples/pretrain.py` (BERT, 12 blocks, width 128, its default
corpus) with `--method baseline` and `--method raptr` (`6-8-10-12`)
at equal steps, on each backend in its own process, and sets the realised
speed-up next to the ideal one from the FLOPs accounting
(`keras_raptr.estimate_train_flops`: blocks plus embeddings and head):

- `train`: the run's seconds less its evaluations and checkpoints
  (compilation included: it is part of what a user waits for);
- `whole`: every second of `fit`, evaluations and checkpoints included;
- `ideal`: full-training FLOPs over RaPTr's. The library's estimate counts
  the tied output projection at every token; a masked LM runs its head at
  the masked positions only, so `ideal_masked_head` counts it there. The
  latter is the larger of the two, and the target (realised train speed-up
  at least 0.9 of the ideal) is judged against it.

    python benchmarks/example_speed.py                       # all backends
    python benchmarks/example_speed.py --backends jax --repeats 1

The baseline and RaPTr runs alternate, `--repeats` times (3) per backend;
the figures are medians (`--reuse` takes finished runs already under
`--runs-dir`). The table also gives the train steps RaPTr compiled
and the seconds their first calls took. Writes
`benchmarks/results/example_speed[_<tag>].json` and `.md`. Run it alone on
the machine.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BACKENDS = ("jax", "tensorflow", "torch")


def run_example(backend, method, args, directory):
    if args.reuse:
        summary = _finished_run(directory, method, args)
        if summary is not None:
            return summary
    command = [
        sys.executable, os.path.join(ROOT, "examples", "pretrain.py"),
        "--method", method, "--steps", str(args.steps),
        "--eval-every", str(args.eval_every), "--seed", "0",
        "--verbose", "0", "--output-dir", directory,
        *shlex.split(args.example_args),
    ]
    env = {**os.environ, "KERAS_BACKEND": backend}
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout[-3000:] + completed.stderr[-3000:])
        raise SystemExit(f"{backend} {method}: the example failed (exit {completed.returncode})")
    with open(os.path.join(directory, "summary.json")) as f:
        return json.load(f)


def _finished_run(directory, method, args):
    """The summary of a run already in `directory` with these options, if any."""
    try:
        with open(os.path.join(directory, "summary.json")) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    options = summary.get("options", {})
    same = (
        summary.get("method") == method
        and summary.get("steps") == args.steps
        and options.get("eval_every") == args.eval_every
        and options.get("seed") == 0
    )
    return summary if same else None


def train_seconds(summary):
    return summary["wall_clock_seconds"] - summary["eval_seconds"] - summary["checkpoint_seconds"]


def ideal(summary):
    """Full-training FLOPs over RaPTr's: as estimated, and with a masked head."""
    estimate = summary["full_train_flops"] / summary["train_flops"]
    blocks, other = summary["block_flops_per_step"], summary["other_flops_per_step"]
    masked = summary["head_positions_per_sequence"] / summary["options"]["seq_len"]
    fraction = summary["compute_fraction"]
    masked_ideal = (blocks + masked * other) / (fraction * blocks + masked * other)
    return estimate, masked_ideal


def measure(backend, args):
    times = {"baseline": [], "raptr": []}
    for repeat in range(args.repeats):
        for method in ("baseline", "raptr"):
            directory = os.path.join(args.runs_dir, backend, f"{method}-{repeat}")
            summary = run_example(backend, method, args, directory)
            times[method].append(summary)
            print(f"{backend} {method} #{repeat}: {summary['wall_clock_seconds']:.1f}s "
                  f"(train {train_seconds(summary):.1f}s)", flush=True)
    estimate, masked = ideal(times["raptr"][-1])
    median = {
        m: {
            "whole": float(np.median([s["wall_clock_seconds"] for s in runs])),
            "train": float(np.median([train_seconds(s) for s in runs])),
        }
        for m, runs in times.items()
    }
    train_speedup = median["baseline"]["train"] / median["raptr"]["train"]
    return {
        "backend": backend,
        "seconds": median,
        "train_speedup": train_speedup,
        "whole_speedup": median["baseline"]["whole"] / median["raptr"]["whole"],
        "ideal": estimate,
        "ideal_masked_head": masked,
        "realised_over_ideal": train_speedup / max(estimate, masked),
        # Train steps compiled per run, and the seconds their first calls took.
        "train_steps_compiled": {
            m: int(np.median([len(s.get("compiled_train_steps", {})) for s in runs]))
            for m, runs in times.items()
        },
        "compile_seconds": {
            m: float(np.median([s.get("compile_seconds", 0.0) for s in runs]))
            for m, runs in times.items()
        },
        "final_eval_loss": {
            m: float(np.median([s["final_eval_loss"] for s in runs])) for m, runs in times.items()
        },
        "runs": {m: [{k: v for k, v in s.items() if k != "options"} for s in runs]
                 for m, runs in times.items()},
    }


def markdown(rows, args):
    lines = [
        f"`examples/pretrain.py` defaults, {args.steps} steps, held-out loss "
        f"every {args.eval_every}{' ' + args.example_args if args.example_args else ''}; "
        f"median of {args.repeats} run(s) per method.",
        "",
        "| backend | baseline train s | RaPTr train s | train speed-up | baseline whole s | "
        "RaPTr whole s | whole speed-up | ideal (estimate / masked head) | "
        "realised / ideal | target >= 0.9 | train steps compiled (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["seconds"]
        ok = "ok" if r["realised_over_ideal"] >= 0.9 else "missed"
        lines.append(
            f"| {r['backend']} | {s['baseline']['train']:.1f} | {s['raptr']['train']:.1f} | "
            f"{r['train_speedup']:.3f} | {s['baseline']['whole']:.1f} | "
            f"{s['raptr']['whole']:.1f} | {r['whole_speedup']:.3f} | "
            f"{r['ideal']:.3f} / {r['ideal_masked_head']:.3f} | "
            f"{r['realised_over_ideal']:.3f} | {ok} | "
            f"{r['train_steps_compiled']['raptr']} ({r['compile_seconds']['raptr']:.1f}) |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--example-args", default="",
                        help='more options for the example, e.g. "--num-layers 6"')
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tag", default="",
                        help="appended to the result file names, e.g. the accelerator's name")
    parser.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    parser.add_argument("--runs-dir", default=os.path.join("runs", "example_speed"))
    parser.add_argument("--reuse", action="store_true",
                        help="take a run already under --runs-dir with the same steps and "
                             "--eval-every instead of running it again (an interrupted "
                             "benchmark, or a table of runs made with another version)")
    args = parser.parse_args(argv)
    args.backends = [b for b in args.backends.split(",") if b]
    unknown = [b for b in args.backends if b not in BACKENDS]
    if unknown:
        parser.error(f"unknown --backends {unknown}; choose from {', '.join(BACKENDS)}")
    for name in ("steps", "eval_every", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    rows = [measure(backend, args) for backend in args.backends]
    os.makedirs(args.results_dir, exist_ok=True)
    suffix = f"_{args.tag}" if args.tag else ""
    with open(os.path.join(args.results_dir, f"example_speed{suffix}.json"), "w") as f:
        json.dump({"options": vars(args), "backends": rows}, f, indent=1)
    text = markdown(rows, args)
    with open(os.path.join(args.results_dir, f"example_speed{suffix}.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
