"""Pretraining quality at equal compute: RaPTr against its peers.

Trains the pretraining example's masked language model (`examples/pretrain.py`:
a keras-hub BERT of 12 blocks, width 128, on its default corpus) once per
config and seed, on the backend of `KERAS_BACKEND`, and compares the held-out
loss at equal steps, equal training FLOPs and equal wall-clock. The configs:

- `baseline`: every block, every step;
- `raptr`: `6-8-10-12`, Bernoulli sampling, first and last block fixed
  (the library's defaults);
- `raptr-subset`: the same with `sampling="subset"`;
- `stochastic-depth` and `pld`: matched to RaPTr's block compute;
- `stacking`: gradual stacking `6-9-12`;
- the ablations `raptr-inverse` (`scaling="inverse"`) and `raptr-unfixed`
  (`fixed_blocks=()`);
- the candidate explanations of RaPTr's gap at equal steps: `raptr-zero-grad`
  (`off_path_update="zero_grad"`) and `raptr-long-last` (stages of a sixth,
  a sixth, a sixth and a half of the steps: the full network trains the
  last half);
- width-wise RaPTr at the block compute of `6-8-10-12` (0.75):
  `raptr-width` (`12@0.5-12@0.75-12@0.75-12`: every block, at half, then
  three quarters of its heads and units) and `raptr-depth-width`
  (`8@0.75-9-12@0.75-12`: both), each paired with `raptr`;
- `NAME+cosine`: each of the above but the subset and the ablations under a
  linear warm-up (a tenth of the steps) and a cosine decay of the learning
  rate, paired with `baseline+cosine`.

For each config it reports the final held-out loss (mean and spread over
seeds) and its paired difference from the baseline with the same learning-
rate schedule (same seed) at equal steps, at equal FLOPs (the baseline's
loss when it had spent the config's FLOPs) and at equal wall-clock; a RaPTr
variant's difference from `raptr` (or `raptr+cosine`); the compute used; the
steps the baseline needed to reach the final loss; and, at each stage
transition, how the training and held-out losses moved right after it (next
to the baseline's move over the same steps).

    KERAS_BACKEND=jax python benchmarks/quality.py --quick   # 120 steps, one seed
    KERAS_BACKEND=jax python benchmarks/quality.py --methods baseline,raptr --seeds 0
    bash benchmarks/gpu_quality.sh    # the whole grid on one GPU, runs in parallel

The whole grid (17 configs, 3 seeds, 2160 steps) takes about a day on two
CPU cores; `--parallel N` runs N at a time, each in a process of its own
(a GPU, or many cores), and then leaves wall-clock out of the comparison.

Writes `benchmarks/results/quality_<backend>[_quick][_TAG].json`, a Markdown
table `quality[_quick][_TAG].md`, and the plots `quality[...].png` (held-out
loss against steps, FLOPs and, unless left out, wall-clock; and the paired difference),
`quality_ablations[...].png` (the RaPTr variants, constant and cosine) and
`quality_transitions[...].png`, and, when wall-clock is compared,
`quality_headline[...].png` (held-out loss against wall-clock, baseline and
RaPTr: the README's figure). `--replot JSON` draws the figures again from a
results JSON, running nothing. Each run's own files (the example's
`summary.json`, `loss_curve.csv`, ...) go under `--runs-dir` (default
`runs/quality`, or `runs/quality_quick`); a run already there with the same
options is reused, so an interrupted benchmark resumes, and a table can be
made again from runs made elsewhere. Run it alone on the machine when
wall-clock is to be compared.
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
# What the optimizer does to off-path blocks, and the stage lengths:
# `stage_weights` (1, 1, 1, 3) gives the full network the last half of the
# steps and each shorter stage a sixth.
OPTIONS = {
    "raptr-zero-grad": {"method": "raptr", "off_path_update": "zero_grad"},
    "raptr-long-last": {"method": "raptr", "stage_weights": (1, 1, 1, 3)},
}
# Width-wise parts at the block compute of `6-8-10-12` (0.75 of full
# training): whole heads and units of the example's 4 heads and 512 units.
WIDTH = {
    "raptr-width": {"method": "raptr", "schedule": "12@0.5-12@0.75-12@0.75-12"},
    "raptr-depth-width": {"method": "raptr", "schedule": "8@0.75-9-12@0.75-12"},
}
# The same under a warm-up and cosine decay of the learning rate, each
# against the baseline with that schedule.
COSINE = {
    f"{name}+cosine": {**options, "lr_schedule": "warmup-cosine"}
    for name, options in {**METHODS, **OPTIONS}.items()
    if name != "raptr-subset"
}
CONFIGS = {**METHODS, **ABLATIONS, **OPTIONS, **WIDTH, **COSINE}


def baseline_of(name):
    """The baseline a config is paired with: the one with its learning rate."""
    return "baseline+cosine" if name.endswith("+cosine") else "baseline"


def raptr_of(name):
    """The RaPTr run a variant is paired with, or `None`."""
    if name.split("+")[0].startswith("raptr-"):
        return "raptr+cosine" if name.endswith("+cosine") else "raptr"
    return None
# Steps are a multiple of 12, so that RaPTr's four stages and stacking's
# three end on an evaluation.
MODES = {
    "quick": {"steps": 120, "eval_every": 10, "seeds": "0"},
    "full": {"steps": 2160, "eval_every": 60, "seeds": "0,1,2"},
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


def _stage_steps(weights, steps):
    """`--stage-lengths` in steps: `steps` split in proportion to `weights`."""
    parts = [steps * w // sum(weights) for w in weights[:-1]]
    return ",".join(str(p) for p in parts + [steps - sum(parts)])


def run_dir(runs_dir, backend, name, seed):
    return os.path.join(runs_dir, backend, name, f"seed{seed}")


def run_argv(name, seed, options, directory):
    """The example's options for one run."""
    argv = ["--seed", str(seed), "--verbose", "0", "--output-dir", directory]
    argv += ["--steps", str(options["steps"]), "--eval-every", str(options["eval_every"])]
    for key, value in CONFIGS[name].items():
        if key == "stage_weights":
            key, value = "stage_lengths", _stage_steps(value, options["steps"])
        argv += [f"--{key.replace('_', '-')}", str(value)]
    argv += shlex.split(options["example_args"])
    return argv


def _finished(directory, argv):
    """The run's result if it finished with the same options, else `None`."""
    path = os.path.join(directory, "result.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        result = json.load(f)
    return result if result["argv"] == argv else None


def run_one(example, name, seed, options, runs_dir):
    """One training run; its summary, curve, step losses and transitions."""
    import keras

    directory = run_dir(runs_dir, keras.backend.backend(), name, seed)
    result_path = os.path.join(directory, "result.json")
    argv = run_argv(name, seed, options, directory)
    result = _finished(directory, argv)
    if result is not None:
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


def run_all(args, options):
    """Every (seed, method) run, `args.parallel` at a time.

    One at a time, the runs share this process (the example's corpus is
    loaded once per seed). In parallel, each run is a process of its own
    (`--run-one`); JAX and TensorFlow are told not to take the whole GPU.
    """
    jobs = [(name, seed) for seed in args.seeds for name in args.methods]
    if args.parallel == 1:
        example = load_example()
        results = []
        # Seeds outermost: drift in the machine's speed hits every method alike.
        for name, seed in jobs:
            results.append(run_one(example, name, seed, options, args.runs_dir))
            _report(results[-1])
        return results
    import concurrent.futures
    import subprocess

    backend = os.environ.get("KERAS_BACKEND", "jax")
    env = dict(
        os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", TF_FORCE_GPU_ALLOW_GROWTH="true"
    )

    def launch(job):
        name, seed = job
        directory = run_dir(args.runs_dir, backend, name, seed)
        result = _finished(directory, run_argv(name, seed, options, directory))
        if result is not None:
            print(f"{name} seed {seed}: reusing {directory}", flush=True)
            return result
        os.makedirs(directory, exist_ok=True)
        command = [
            sys.executable, os.path.abspath(__file__), "--run-one", f"{name}:{seed}",
            "--steps", str(options["steps"]), "--eval-every", str(options["eval_every"]),
            "--example-args", options["example_args"], "--runs-dir", args.runs_dir,
        ]
        with open(os.path.join(directory, "log.txt"), "w") as log:
            code = subprocess.call(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        result = _finished(directory, run_argv(name, seed, options, directory))
        if code or result is None:
            print(f"{name} seed {seed}: failed (exit code {code}); see "
                  f"{os.path.join(directory, 'log.txt')}", flush=True)
            return None
        _report(result)
        return result

    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(launch, jobs))
    return [r for r in results if r is not None]


def _report(result):
    print(f"{result['name']} seed {result['seed']}: held-out loss "
          f"{result['summary']['final_eval_loss']:.4f}, "
          f"{result['summary']['wall_clock_seconds']:.0f}s", flush=True)


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
    by_name = {}
    for r in results:
        by_name.setdefault(r["name"], {})[r["seed"]] = r
    table = {}
    for name in CONFIGS:
        runs = [r for r in results if r["name"] == name]
        if not runs:
            continue
        baselines = by_name.get(baseline_of(name), {})
        raptrs = by_name.get(raptr_of(name), {})
        finals, diffs, at_wall, to_reach, jumps, vs_raptr = [], [], [], [], [], []
        speedups, at_flops, wall_diffs, flops_diffs = [], [], [], []
        for r in runs:
            s = r["summary"]
            finals.append(s["final_eval_loss"])
            if r["seed"] in raptrs:
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
            at_flops.append(_interp(
                [row["train_flops"] for row in curve],
                [row["eval_loss"] for row in curve],
                s["train_flops"],
            ))
            for values, diff in ((at_wall, wall_diffs), (at_flops, flops_diffs)):
                if values[-1] is not None:
                    diff.append(s["final_eval_loss"] - values[-1])
            to_reach.append(_steps_to_reach(curve, s["final_eval_loss"]))
            jumps.append(_jumps(r, base if name != baseline_of(name) else None, eval_every))
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
            "diff_at_same_wall_clock": _stats(wall_diffs),
            "baseline_loss_at_same_flops": _stats(at_flops),
            "diff_at_same_flops": _stats(flops_diffs),
            "baseline_steps_to_reach_final_loss": _stats(to_reach),
            "baseline_reached_final_loss": sum(v is not None for v in to_reach),
            "transitions": transitions,
            "strategy": summaries[0]["strategy"],
        }
    return table


# ----------------------------------------------------------------------
# Output.


def _fmt(stats, digits=3):
    if stats["mean"] is None:
        return "n/a"
    if stats["n"] < 2:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def markdown(table, meta):
    shared = not meta.get("wall_clock", meta.get("parallel", 1) == 1)
    lines = [
        f"Backend {meta['backend']} ({meta.get('device', 'cpu')}), {meta['steps']} "
        f"steps, seeds {meta['seeds']}, held-out loss every {meta['eval_every']} "
        "steps. Loss: mean ± standard deviation over seeds. Δ: the method's "
        "final held-out loss minus its baseline's (same seed, same learning-"
        "rate schedule) at equal steps, at equal training FLOPs (the baseline's "
        "loss when it had used the method's FLOPs, interpolated between "
        "evaluations) and at equal wall-clock; negative is better. Block "
        "compute: the strategy's expected blocks run over the baseline's; "
        "FLOPs: the library's estimate of the whole model's training FLOPs "
        "over the baseline's. Wall-clock: seconds of `fit`, compiles, "
        "evaluations and checkpoints included; speed-up: the baseline's over "
        "the method's, same seed."
        + (
            " The runs shared the machine (or ran on different machines), so "
            "wall-clock is not compared."
            if shared else ""
        ),
        "",
        "| method | final held-out loss | Δ equal steps | Δ equal FLOPs | "
        "Δ equal wall-clock | block compute | FLOPs | wall-clock s | speed-up | "
        "baseline steps to reach the final loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
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
        itself = name == baseline_of(name)
        wall = "n/a" if shared else (
            "(itself)" if itself else _fmt(row["diff_at_same_wall_clock"])
        )
        lines.append(
            f"| {name} | {_fmt(row['final_eval_loss'])} | "
            f"{_fmt(row['diff_vs_baseline'])} | "
            f"{'(itself)' if itself else _fmt(row['diff_at_same_flops'])} | {wall} | "
            f"{row['compute_fraction']:.3f} | {row['flops_fraction']:.3f} | "
            f"{'n/a' if shared else format(row['wall_clock_seconds']['mean'], '.0f')} | "
            f"{'n/a' if shared else _fmt(row['speedup_vs_baseline'], 2)} | {reach_text} |"
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
            "Against `raptr` (same seed, same learning-rate schedule): final "
            "held-out loss of the variant minus RaPTr's.",
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
    """The held-out loss minus its baseline's of the same seed, by step."""
    base = {r["seed"]: r for r in results if r["name"] == baseline_of(name)}
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


def plots(results, stem, suffix, wall_clock=True):
    """The figures; `wall_clock=False` leaves out the loss against wall-clock
    (the runs shared the machine, or ran on different machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (("step", "steps"), ("train_flops", "training FLOPs (estimate)"))
    if wall_clock:
        keys += (("wall_clock_seconds", "wall-clock seconds"),)
    figure, axes = plt.subplots(1, len(keys) + 1, figsize=(5 * len(keys) + 5, 4.5))
    for ax, (key, label) in zip(axes, keys):
        for name in METHODS:
            _mean_curve(ax, results, name, key)
        ax.set_xlabel(label)
        ax.set_ylabel("held-out loss (mean over seeds)")
        ax.legend()
    for name in METHODS:
        _paired_band(axes[-1], results, name)
    axes[-1].set_xlabel("steps")
    axes[-1].set_ylabel("minus the baseline's, same seed (band: min to max)")
    axes[-1].legend()
    figure.tight_layout()
    figure.savefig(f"{stem}{suffix}.png")
    plt.close(figure)

    constant = ("raptr", "raptr-subset", *ABLATIONS, *OPTIONS)
    cosine = [name for name in COSINE if name != "baseline+cosine"]
    ran = {r["name"] for r in results}
    panels = [
        (names, title)
        for names, title in ((constant, "constant learning rate"),
                             (cosine, "warm-up and cosine decay"))
        if ran.intersection(names)
    ] or [(constant, "constant learning rate")]
    figure, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (names, title) in zip(axes[0], panels):
        for name in names:
            _paired_band(ax, results, name)
        ax.set_title(title)
        ax.set_xlabel("steps")
        ax.set_ylabel("held-out loss minus the baseline's, same seed")
        if ax.lines:
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


def headline(results, table, path):
    """The README's figure: held-out loss against wall-clock, baseline and RaPTr.

    The mean over seeds of each method's curve, RaPTr's stage starts dotted,
    and in the title the speed-up and the loss difference at RaPTr's
    wall-clock, as the table gives them. Nothing without both methods.
    """
    if {"baseline", "raptr"} - {r["name"] for r in results}:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(7, 4.2))
    for name, label in (("baseline", "full training (baseline)"), ("raptr", "RaPTr 6-8-10-12")):
        _mean_curve(ax, results, name, "wall_clock_seconds")
        ax.lines[-1].set_label(label)
    raptr = [r for r in results if r["name"] == "raptr"]
    # RaPTr's mean seconds by step, over the steps every seed reached (as
    # `_mean_curve` averages them).
    length = min(len(r["curve"]) for r in raptr)
    seconds = np.mean(
        [[row["wall_clock_seconds"] for row in r["curve"][:length]] for r in raptr], axis=0
    )
    steps = [row["step"] for row in raptr[0]["curve"][:length]]
    for boundary in raptr[0]["boundaries"]:
        at = float(np.interp(boundary, steps, seconds))
        ax.axvline(at, color=ax.lines[-1].get_color(), linestyle=":", linewidth=1)
    row = table.get("raptr", {})
    speedup = (row.get("speedup_vs_baseline") or {}).get("mean")
    diff = (row.get("diff_at_same_wall_clock") or {}).get("mean")
    seeds = len(raptr)
    if speedup is not None and diff is not None:
        ax.set_title(
            f"{speedup:.2f}x faster end to end; at RaPTr's last second, "
            f"{-diff:.3f} lower held-out loss\n(mean of {seeds} seed{'s' * (seeds > 1)}; "
            "dotted: RaPTr's stage starts)",
            fontsize=10,
        )
    ax.set_xlabel("wall-clock seconds (compiles, evaluations and checkpoints included)")
    ax.set_ylabel("held-out loss")
    ax.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def _device():
    """The accelerator the runs used (JAX's name for it), or "cpu"."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        device = jax.devices()[0]
        return "cpu" if device.platform == "cpu" else str(device.device_kind)
    return "cpu"


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
    parser.add_argument("--parallel", type=int, default=1,
                        help="runs at a time, each in a process of its own (a machine "
                        "with many cores or a GPU); wall-clock is then not compared")
    parser.add_argument("--no-wall-clock", dest="wall_clock", action="store_false",
                        help="leave wall-clock out of the comparison: the runs shared "
                        "the machine with other work, or ran on different machines")
    parser.add_argument("--tag", default="",
                        help="appended to the result file names, e.g. the accelerator's name")
    parser.add_argument("--replot", default=None, metavar="JSON",
                        help="draw the figures again from a results JSON, running nothing")
    parser.add_argument("--run-one", default=None, help=argparse.SUPPRESS)
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
    if args.parallel < 1:
        parser.error(f"--parallel {args.parallel}: give at least 1")
    stage = (args.steps // 6, args.steps // 4, args.steps // 3, args.steps)
    if any(b % args.eval_every for b in stage):
        parser.error(
            f"--eval-every {args.eval_every} must divide {args.steps // 6}, "
            f"{args.steps // 4} and {args.steps // 3}, so that every stage "
            "transition is evaluated"
        )
    return args


def main(argv=None):
    args = parse_args(argv)
    import keras

    options = {"steps": args.steps, "eval_every": args.eval_every,
               "example_args": args.example_args}
    if args.replot:
        return replot(args.replot, args.results_dir, args.tag)
    if args.run_one:
        name, seed = args.run_one.rsplit(":", 1)
        run_one(load_example(), name, int(seed), options, args.runs_dir)
        return 0
    start = time.perf_counter()
    results = run_all(args, options)
    backend = keras.backend.backend()
    suffix = ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
    table = aggregate(results, args.eval_every)
    meta = {
        "backend": backend,
        "steps": args.steps,
        "eval_every": args.eval_every,
        "seeds": args.seeds,
        "example_args": args.example_args,
        "parallel": args.parallel,
        "wall_clock": args.wall_clock and args.parallel == 1,
        "device": _device(),
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
    plots(results, stem, suffix, wall_clock=meta["wall_clock"])
    if meta["wall_clock"]:
        headline(results, table, f"{stem}_headline{suffix}.png")
    print(text)
    return 0


def replot(path, results_dir, tag):
    """Draws a results JSON's figures again (`--replot`), running nothing."""
    with open(path) as f:
        data = json.load(f)
    os.makedirs(results_dir, exist_ok=True)
    meta = data["meta"]
    suffix = f"_{tag}" if tag else ""
    stem = os.path.join(results_dir, "quality")
    plots(data["runs"], stem, suffix, wall_clock=meta["wall_clock"])
    if meta["wall_clock"]:
        print(headline(data["runs"], data["methods"], f"{stem}_headline{suffix}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
