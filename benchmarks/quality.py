"""Pretraining quality at equal compute: RaPTr against its peers.

Trains the pretraining example's masked language model (`examples/pretrain.py`:
a keras-hub BERT of 12 blocks, width 128, on the example's default corpus)
once per method and seed, on the backend of `KERAS_BACKEND`, and compares
the held-out loss against steps, training FLOPs and wall-clock:

- `baseline`: every block, every step;
- `raptr`: `6-8-10-12`, Bernoulli sampling, first and last block fixed
  (the library's defaults);
- `raptr-subset`: the same with `sampling="subset"`;
- `stochastic-depth` and `pld`: matched to RaPTr's block compute;
- `stacking`: gradual stacking `6-9-12`;
- the ablations `raptr-inverse` (`scaling="inverse"`) and `raptr-unfixed`
  (`fixed_blocks=()`), each against `raptr`.

For each method it reports the final held-out loss (mean and spread over
seeds, and its paired difference from the baseline of the same seed), the
compute used, the wall-clock, the loss the baseline had reached at the same
wall-clock, the steps the baseline needed to reach the method's final loss,
and, at each stage transition, how the training and held-out losses moved
right after it (next to the baseline's move over the same steps).

    KERAS_BACKEND=jax python benchmarks/quality.py --quick   # under 10 minutes
    KERAS_BACKEND=jax python benchmarks/quality.py           # about 75 minutes here

Writes `benchmarks/results/quality_<backend>[_quick].json`, a Markdown table
`quality[_quick].md`, and the plots `quality[_quick].png` (held-out loss
against steps, FLOPs and wall-clock), `quality_ablations[_quick].png` and
`quality_transitions[_quick].png`. Each run's own files (the example's
`summary.json`, `loss_curve.csv`, ...) go under `--runs-dir` (default
`runs/quality`, or `runs/quality_quick`); a run already
there with the same options is reused, so an interrupted benchmark resumes.
Run it alone on the machine: wall-clock is one of the measures.
"""

import argparse
import importlib.util
import json
import math
import os
import shlex
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

METHODS = {
    "baseline": {"method": "baseline"},
    "raptr": {"method": "raptr"},
    "raptr-subset": {"method": "raptr", "sampling": "subset"},
    "stochastic-depth": {"method": "stochastic-depth"},
    "pld": {"method": "pld"},
    "stacking": {"method": "stacking"},
}
ABLATIONS = {
    "raptr-inverse": {"method": "raptr", "scaling": "inverse"},
    "raptr-unfixed": {"method": "raptr", "fixed_blocks": "none"},
}
CONFIGS = {**METHODS, **ABLATIONS}
# Steps are a multiple of 12, so that RaPTr's four stages and stacking's
# three end on an evaluation.
MODES = {
    "quick": {"steps": 120, "eval_every": 10, "seeds": "0"},
    "full": {"steps": 720, "eval_every": 60, "seeds": "0,1,2"},
}
JUMP_WINDOW = 10  # training steps averaged on each side of a transition


def load_example():
    """`examples/pretrain.py` as a module."""
    path = os.path.join(ROOT, "examples", "pretrain.py")
    spec = importlib.util.spec_from_file_location("pretrain_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def batch_losses():
    """A callback that records each training step's own loss.

    Keras logs the running mean of the epoch; step `n`'s own loss is
    `n * mean_n - (n - 1) * mean_(n-1)`. The means are read in Keras's
    background threads (`async_safe`), so recording them does not make each
    step wait for the previous one.
    """
    import keras

    class BatchLoss(keras.callbacks.Callback):
        async_safe = True

        def __init__(self):
            super().__init__()
            self.losses = []
            self._means = {}

        def on_epoch_begin(self, epoch, logs=None):
            self._means = {}

        def on_train_batch_end(self, batch, logs=None):
            self._means[batch] = float((logs or {}).get("loss", float("nan")))

        def on_epoch_end(self, epoch, logs=None):
            previous = 0.0
            for batch in sorted(self._means):
                mean = self._means[batch]
                self.losses.append((batch + 1) * mean - batch * previous)
                previous = mean

    return BatchLoss()


def run_one(example, name, seed, options, runs_dir):
    """One training run; its summary, curve, step losses and transitions."""
    import keras

    directory = os.path.join(runs_dir, keras.backend.backend(), name, f"seed{seed}")
    result_path = os.path.join(directory, "result.json")
    argv = ["--seed", str(seed), "--verbose", "0", "--output-dir", directory]
    argv += ["--steps", str(options["steps"]), "--eval-every", str(options["eval_every"])]
    for key, value in CONFIGS[name].items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    argv += shlex.split(options["example_args"])
    if os.path.exists(result_path):
        with open(result_path) as f:
            result = json.load(f)
        if result["argv"] == argv:
            print(f"{name} seed {seed}: reusing {result_path}")
            return result
    if os.path.exists(directory):
        for entry in ("checkpoint.keras", "loss_curve.csv"):
            if os.path.exists(os.path.join(directory, entry)):
                os.remove(os.path.join(directory, entry))
    args = example.parse_args(argv)
    os.makedirs(directory, exist_ok=True)
    recorder = batch_losses()
    keras.backend.clear_session()
    summary = example.run(args, directory, callbacks=[recorder])
    curve = example.Curve(os.path.join(directory, "loss_curve.csv")).rows
    strategy = example.make_strategy(args, summary["num_blocks"])
    boundaries = []
    if hasattr(strategy, "stages"):
        boundaries = [int(b) for b in np.cumsum([s.steps for s in strategy.stages])[:-1]]
    result = {
        "name": name,
        "seed": seed,
        "argv": argv,
        "summary": {k: v for k, v in summary.items() if k != "options"},
        "curve": curve,
        "step_losses": recorder.losses,
        "boundaries": boundaries,
    }
    with open(result_path, "w") as f:
        json.dump(result, f)
    return result


# ----------------------------------------------------------------------
# Aggregation.


def _stats(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    array = np.asarray(values, dtype=float)
    return {
        "mean": float(array.mean()),
        "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
        "min": float(array.min()),
        "max": float(array.max()),
        "n": len(values),
    }


def _interp(xs, ys, x):
    """`y` at `x` on the piecewise-linear curve; None outside it."""
    if not xs or x < xs[0] or x > xs[-1]:
        return None
    return float(np.interp(x, xs, ys))


def _steps_to_reach(curve, loss):
    """The first (interpolated) step at which `curve` reaches `loss`."""
    previous = None
    for row in curve:
        if row["eval_loss"] <= loss:
            if previous is None:
                return row["step"]
            # Linear between the two evaluations around the crossing.
            drop = previous["eval_loss"] - row["eval_loss"]
            part = (previous["eval_loss"] - loss) / drop if drop > 0 else 1.0
            return previous["step"] + part * (row["step"] - previous["step"])
        previous = row
    return None


def _eval_at(curve, step):
    for row in curve:
        if int(row["step"]) == step:
            return row["eval_loss"]
    return None


def _jumps(result, baseline, eval_every):
    """The loss moves right after each of `result`'s stage transitions."""
    jumps = []
    losses = result["step_losses"]
    base = baseline["step_losses"] if baseline else None
    k = JUMP_WINDOW
    for b in result["boundaries"]:
        if b < k or b + k > len(losses):
            continue

        def move(values):
            return float(np.mean(values[b:b + k]) - np.mean(values[b - k:b]))

        def held_move(curve):
            before, after = _eval_at(curve, b), _eval_at(curve, b + eval_every)
            return None if before is None or after is None else after - before

        jumps.append({
            "step": b,
            "train_jump": move(losses),
            "baseline_train_jump": move(base) if base else None,
            "eval_change": held_move(result["curve"]),
            "baseline_eval_change": held_move(baseline["curve"]) if baseline else None,
        })
    return jumps


def aggregate(results, eval_every):
    baselines = {r["seed"]: r for r in results if r["name"] == "baseline"}
    raptrs = {r["seed"]: r for r in results if r["name"] == "raptr"}
    table = {}
    for name in CONFIGS:
        runs = [r for r in results if r["name"] == name]
        if not runs:
            continue
        finals, diffs, at_wall, to_reach, jumps, vs_raptr = [], [], [], [], [], []
        speedups = []
        for r in runs:
            s = r["summary"]
            finals.append(s["final_eval_loss"])
            if name.startswith("raptr-") and r["seed"] in raptrs:
                vs_raptr.append(
                    s["final_eval_loss"] - raptrs[r["seed"]]["summary"]["final_eval_loss"]
                )
            base = baselines.get(r["seed"])
            if base is None:
                continue
            diffs.append(s["final_eval_loss"] - base["summary"]["final_eval_loss"])
            speedups.append(base["summary"]["wall_clock_seconds"] / s["wall_clock_seconds"])
            curve = base["curve"]
            at_wall.append(_interp(
                [row["wall_clock_seconds"] for row in curve],
                [row["eval_loss"] for row in curve],
                s["wall_clock_seconds"],
            ))
            to_reach.append(_steps_to_reach(curve, s["final_eval_loss"]))
            jumps.append(_jumps(r, base if name != "baseline" else None, eval_every))
        summaries = [r["summary"] for r in runs]
        transitions = []
        for i, first in enumerate(jumps[0] if jumps else []):
            rows = [j[i] for j in jumps if len(j) > i]
            transitions.append({
                "step": first["step"],
                **{key: _stats([row[key] for row in rows])["mean"]
                   for key in ("train_jump", "baseline_train_jump",
                               "eval_change", "baseline_eval_change")},
            })
        table[name] = {
            "options": CONFIGS[name],
            "seeds": [r["seed"] for r in runs],
            "final_eval_loss": _stats(finals),
            "diff_vs_baseline": _stats(diffs),
            "diff_vs_raptr": _stats(vs_raptr),
            "compute_fraction": summaries[0]["compute_fraction"],
            "flops_fraction": float(np.mean(
                [s["train_flops"] / s["full_train_flops"] for s in summaries])),
            "wall_clock_seconds": _stats([s["wall_clock_seconds"] for s in summaries]),
            "speedup_vs_baseline": _stats(speedups),
            "baseline_loss_at_same_wall_clock": _stats(at_wall),
            "baseline_steps_to_reach_final_loss": _stats(to_reach),
            "baseline_reached_final_loss": sum(v is not None for v in to_reach),
            "transitions": transitions,
            "strategy": summaries[0]["strategy"],
        }
    return table


# ----------------------------------------------------------------------
# Output.


def _at_wall(name, row):
    stats = row["baseline_loss_at_same_wall_clock"]
    if name == "baseline":
        return "(itself)"
    if stats["n"] == 0:
        return "n/a (slower than the baseline's whole run)"
    return _fmt(stats)


def _fmt(stats, digits=3):
    if stats["mean"] is None:
        return "n/a"
    if stats["n"] < 2:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def markdown(table, meta):
    lines = [
        f"Backend {meta['backend']}, {meta['steps']} steps, seeds "
        f"{meta['seeds']}, held-out loss every {meta['eval_every']} steps. "
        "Loss: mean ± standard deviation over seeds; Δ: paired difference "
        "from the baseline of the same seed. Block compute: the strategy's "
        "expected blocks run over the baseline's; FLOPs: the library's "
        "estimate of the whole model's training FLOPs over the baseline's. "
        "Wall-clock: seconds of `fit`, compiles, evaluations and checkpoints "
        "included; speed-up: the baseline's over the method's, same seed.",
        "",
        "| method | final held-out loss | Δ vs baseline | block compute | "
        "FLOPs | wall-clock s | speed-up | baseline loss at that wall-clock | "
        "baseline steps to reach the final loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ablations = []
    for name, row in table.items():
        reach = row["baseline_steps_to_reach_final_loss"]
        n = row["final_eval_loss"]["n"]
        reached = row["baseline_reached_final_loss"]
        if reached == 0:
            reach_text = f"not reached in {meta['steps']}"
        else:
            reach_text = f"{reach['mean']:.0f}"
            if reached < n:
                reach_text += f" ({reached} of {n} seeds; the others never)"
        lines.append(
            f"| {name} | {_fmt(row['final_eval_loss'])} | "
            f"{_fmt(row['diff_vs_baseline'])} | {row['compute_fraction']:.3f} | "
            f"{row['flops_fraction']:.3f} | {row['wall_clock_seconds']['mean']:.0f} | "
            f"{_fmt(row['speedup_vs_baseline'], 2)} | "
            f"{_at_wall(name, row)} | {reach_text} |"
        )
        if row["diff_vs_raptr"]["n"]:
            options = ", ".join(
                f"{k}={v}" for k, v in row["options"].items() if k != "method"
            )
            ablations.append(
                f"| {name} | {options} | {_fmt(row['diff_vs_raptr'])} |"
            )
    if ablations:
        lines += [
            "",
            "Against `raptr` (same seed): final held-out loss of the variant minus RaPTr's.",
            "",
            "| variant | options | Δ vs raptr |",
            "|---|---|---|",
            *ablations,
        ]
    lines += [
        "",
        f"Stage transitions: mean training loss over the {JUMP_WINDOW} steps "
        f"after the transition minus the {JUMP_WINDOW} before (train), and the "
        f"held-out loss change over the next {meta['eval_every']} steps "
        "(held-out); the baseline's over the same steps in brackets.",
        "",
        "| method | step | train | held-out |",
        "|---|---|---|---|",
    ]
    for name, row in table.items():
        for t in row["transitions"]:
            def both(key):
                value, base = t[key], t[f"baseline_{key}"]
                if value is None:
                    return "n/a"
                return f"{value:+.3f} ({base:+.3f})" if base is not None else f"{value:+.3f}"

            lines.append(f"| {name} | {t['step']} | {both('train_jump')} | "
                         f"{both('eval_change')} |")
    return "\n".join(lines) + "\n"


def _mean_curve(axes, results, name, x_key):
    runs = [r for r in results if r["name"] == name]
    if not runs:
        return
    length = min(len(r["curve"]) for r in runs)
    xs = np.mean([[row[x_key] for row in r["curve"][:length]] for r in runs], axis=0)
    ys = np.mean([[row["eval_loss"] for row in r["curve"][:length]] for r in runs], axis=0)
    axes.plot(xs, ys, label=name)


def _paired_band(axes, results, name):
    """The held-out loss minus the baseline's of the same seed, by step."""
    base = {r["seed"]: r for r in results if r["name"] == "baseline"}
    runs = [r for r in results if r["name"] == name and r["seed"] in base]
    if not runs:
        return
    length = min(min(len(r["curve"]), len(base[r["seed"]]["curve"])) for r in runs)
    steps = [row["step"] for row in runs[0]["curve"][:length]]
    diffs = np.asarray([
        [a["eval_loss"] - b["eval_loss"]
         for a, b in zip(r["curve"][:length], base[r["seed"]]["curve"][:length])]
        for r in runs
    ])
    axes.plot(steps, diffs.mean(axis=0), label=name)
    if len(runs) > 1:
        axes.fill_between(steps, diffs.min(axis=0), diffs.max(axis=0), alpha=0.15)


def plots(results, stem, suffix):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (("step", "steps"), ("train_flops", "training FLOPs (estimate)"),
            ("wall_clock_seconds", "wall-clock seconds"))
    figure, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    for ax, (key, label) in zip(axes, keys):
        for name in METHODS:
            _mean_curve(ax, results, name, key)
        ax.set_xlabel(label)
        ax.set_ylabel("held-out loss (mean over seeds)")
        ax.legend()
    for name in METHODS:
        _paired_band(axes[3], results, name)
    axes[3].set_xlabel("steps")
    axes[3].set_ylabel("minus the baseline's, same seed (band: min to max)")
    axes[3].legend()
    figure.tight_layout()
    figure.savefig(f"{stem}{suffix}.png")
    plt.close(figure)

    figure, ax = plt.subplots(figsize=(6, 4.5))
    for name in ("raptr", "raptr-subset", *ABLATIONS):
        _paired_band(ax, results, name)
    ax.set_xlabel("steps")
    ax.set_ylabel("held-out loss minus the baseline's, same seed")
    ax.legend()
    figure.tight_layout()
    figure.savefig(f"{stem}_ablations{suffix}.png")
    plt.close(figure)

    figure, ax = plt.subplots(figsize=(8, 4.5))
    window = JUMP_WINDOW
    for name in ("baseline", "raptr", "raptr-subset", "stacking"):
        runs = [r for r in results if r["name"] == name]
        if not runs:
            continue
        length = min(len(r["step_losses"]) for r in runs)
        mean = np.mean([r["step_losses"][:length] for r in runs], axis=0)
        smooth = np.convolve(mean, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(window, length + 1), smooth, label=name, linewidth=1)
        for b in runs[0]["boundaries"]:
            ax.axvline(b, color=ax.lines[-1].get_color(), linestyle=":", linewidth=1)
    ax.set_xlabel("steps (dotted: stage transitions)")
    ax.set_ylabel(f"training loss ({window}-step mean)")
    ax.legend()
    figure.tight_layout()
    figure.savefig(f"{stem}_transitions{suffix}.png")
    plt.close(figure)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{MODES['quick']['steps']} steps, one seed (under 10 minutes)")
    parser.add_argument("--steps", type=int, default=None, help="default: by mode")
    parser.add_argument("--eval-every", type=int, default=None, help="default: by mode")
    parser.add_argument("--seeds", default=None, help="comma-separated; default: by mode")
    parser.add_argument("--methods", default=",".join(CONFIGS),
                        help="comma-separated, from: " + ", ".join(CONFIGS))
    parser.add_argument("--example-args", default="",
                        help='more options for every run of the example, e.g. "--num-layers 6"')
    parser.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    parser.add_argument("--runs-dir", default=None,
                        help="default: runs/quality, or runs/quality_quick with --quick")
    args = parser.parse_args(argv)
    mode = MODES["quick" if args.quick else "full"]
    args.runs_dir = args.runs_dir or os.path.join(
        "runs", "quality_quick" if args.quick else "quality"
    )
    args.steps = args.steps or mode["steps"]
    args.eval_every = args.eval_every or mode["eval_every"]
    try:
        args.seeds = [int(s) for s in (args.seeds or mode["seeds"]).split(",")]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: give integers separated by commas")
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in args.methods if m not in CONFIGS]
    if unknown:
        parser.error(f"unknown --methods {unknown}; choose from {', '.join(CONFIGS)}")
    if args.steps < 12 or args.steps % 12:
        parser.error(f"--steps {args.steps}: give a multiple of 12, so stages end on whole steps")
    if any(b % args.eval_every for b in (args.steps // 4, args.steps // 3, args.steps)):
        parser.error(
            f"--eval-every {args.eval_every} must divide {args.steps // 4} and "
            f"{args.steps // 3}, so that every stage transition is evaluated"
        )
    return args


def main(argv=None):
    args = parse_args(argv)
    import keras

    example = load_example()
    options = {"steps": args.steps, "eval_every": args.eval_every,
               "example_args": args.example_args}
    start = time.perf_counter()
    results = []
    # Seeds outermost: drift in the machine's speed hits every method alike.
    for seed in args.seeds:
        for name in args.methods:
            results.append(run_one(example, name, seed, options, args.runs_dir))
            print(f"{name} seed {seed}: held-out loss "
                  f"{results[-1]['summary']['final_eval_loss']:.4f}, "
                  f"{results[-1]['summary']['wall_clock_seconds']:.0f}s", flush=True)
    backend = keras.backend.backend()
    suffix = "_quick" if args.quick else ""
    table = aggregate(results, args.eval_every)
    meta = {
        "backend": backend,
        "steps": args.steps,
        "eval_every": args.eval_every,
        "seeds": args.seeds,
        "example_args": args.example_args,
        "benchmark_seconds": time.perf_counter() - start,
        "versions": {"keras": keras.__version__, "python": sys.version.split()[0]},
    }
    os.makedirs(args.results_dir, exist_ok=True)
    stem = os.path.join(args.results_dir, "quality")
    with open(f"{stem}_{backend}{suffix}.json", "w") as f:
        json.dump({"meta": meta, "methods": table, "runs": results}, f, indent=1)
    text = markdown(table, meta)
    with open(f"{stem}{suffix}.md", "w") as f:
        f.write(text)
    plots(results, stem, suffix)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
