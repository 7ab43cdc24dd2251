"""What a run reports: the loss curve, the stage starts, the plot, the summary line.

With `--compare`, also the comparison of the method with the baseline.
"""

import csv
import math
import os

import numpy as np

from pretrain_lib.checkpoints import replacing


class Curve:
    """Records the loss curve at each evaluation, and writes it as CSV."""

    FIELDS = ("step", "train_flops", "wall_clock_seconds", "loss", "eval_loss")
    INTEGERS = ("step",)

    def __init__(self, path):
        self.path = path
        self.rows = []
        if os.path.exists(path):
            with open(path) as f:
                self.rows = [
                    {k: int(float(v)) if k in self.INTEGERS else float(v) for k, v in row.items()}
                    for row in csv.DictReader(f)
                ]

    def truncate(self, step):
        """Forgets the rows after `step` (a resumed run's checkpoint)."""
        self.rows = [row for row in self.rows if row["step"] <= step]

    def add(self, row):
        self.rows.append(row)
        with replacing(self.path) as partial, open(partial, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.FIELDS)
            writer.writeheader()
            writer.writerows(self.rows)


class StageStarts(Curve):
    """Records where each stage began, and writes it as CSV (`stage_starts.csv`).

    One row per stage: its index, its first step (the optimizer steps
    before it), its path length and width, and the training FLOPs and
    wall-clock seconds of the run when it began.
    """

    FIELDS = ("stage", "step", "path_length", "width", "train_flops", "wall_clock_seconds")
    INTEGERS = ("stage", "step")

    def truncate(self, step):
        """Forgets the stages from `step` on: a resumed run records them again."""
        self.rows = [row for row in self.rows if row["step"] < step]


def plot(curves, path, stage_starts=None):
    """Held-out loss against training FLOPs and against wall-clock, one line per run.

    `curves` are `(name, rows)` pairs (rows of `Curve`); `stage_starts`
    maps a name to its run's `StageStarts` rows: a dashed vertical line, in
    the run's colour and labelled with the stage's path length, marks where
    each stage began.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stage_starts = stage_starts or {}
    figure, (by_flops, by_time) = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in curves:
        if not rows:
            continue
        loss = [r["eval_loss"] for r in rows]
        by_flops.plot([r["train_flops"] for r in rows], loss, marker="o", label=name)
        (line,) = by_time.plot(
            [r["wall_clock_seconds"] for r in rows], loss, marker="o", label=name
        )
        for axes, key in ((by_flops, "train_flops"), (by_time, "wall_clock_seconds")):
            for i, start in enumerate(stage_starts.get(name, ())):
                axes.axvline(
                    start[key], color=line.get_color(), linestyle="--", linewidth=1,
                    alpha=0.7, label=f"{name}: stage starts" if i == 0 else None,
                )
                axes.text(
                    start[key], 0.98, f" {stage_label(start)}", rotation=90,
                    transform=axes.get_xaxis_transform(), ha="right", va="top",
                    fontsize=7, color=line.get_color(),
                )
    by_flops.set_xlabel("training FLOPs (estimate)")
    by_time.set_xlabel("wall-clock seconds")
    for axes in (by_flops, by_time):
        axes.set_ylabel("held-out loss")
        axes.legend()
    figure.tight_layout()
    try:
        with replacing(path) as partial:
            figure.savefig(partial)
    finally:
        plt.close(figure)


def stage_label(start):
    """A stage start's label on the plot: "stage 1: 8 blocks" (", width 0.5")."""
    label = f"stage {start['stage']}: {start['path_length']:g} blocks"
    if start.get("width", 1.0) != 1.0:
        label += f", width {start['width']:g}"
    return label


def summary_line(summary):
    """The line a run prints at its end: loss, time and compute against full training."""
    return (
        f"method: {summary['method']}  held-out loss: {summary['final_eval_loss']:.4f}  "
        f"wall-clock: {summary['wall_clock_seconds']:.1f}s  block compute vs full training: "
        f"{summary['compute_fraction']:.2f}  training FLOPs vs full: "
        f"{summary['train_flops'] / max(summary['full_train_flops'], 1):.2f}  "
        f"train steps compiled: {len(summary['compiled_train_steps'])} "
        f"({summary['compile_seconds']:.1f}s)"
    )


# The last line of a run of a method without --compare.
NO_BASELINE = (
    "against the baseline: not measured; pass --compare to train the baseline "
    "too and print the wall-clock saved and the held-out loss at equal steps "
    "and at equal seconds"
)


def comparison(name, summary, rows, baseline, baseline_rows):
    """The method against the baseline, as `comparison.json` holds it.

    `summary` and `rows` are the method's summary and curve, `baseline` and
    `baseline_rows` the baseline's. The training FLOPs and the wall-clock
    (`saved`: the baseline's less the method's; `saved_fraction`: of the
    baseline's); the held-out loss at equal steps (the last step both
    curves reach; `difference`: the method's less the baseline's); and at
    equal seconds: the seconds at which the method's last held-out loss was
    measured, where the baseline's curve is interpolated linearly (`None`,
    with a `note`, when its curve does not reach them).
    """

    def saved(key):
        theirs, ours = baseline[key], summary[key]
        return {
            "baseline": theirs, "method": ours, "saved": theirs - ours,
            "saved_fraction": (theirs - ours) / theirs if theirs else float("nan"),
        }

    result = {
        "method": name,
        "train_flops": saved("train_flops"),
        "wall_clock_seconds": saved("wall_clock_seconds"),
    }
    steps = {r["step"]: r["eval_loss"] for r in rows}
    theirs = {r["step"]: r["eval_loss"] for r in baseline_rows}
    common = max(set(steps) & set(theirs), default=None)
    if common is not None:
        result["eval_loss_at_equal_steps"] = {
            "step": common, "baseline": theirs[common], "method": steps[common],
            "difference": steps[common] - theirs[common],
        }
    if rows:
        seconds, loss = rows[-1]["wall_clock_seconds"], rows[-1]["eval_loss"]
        loss_then, note = interpolate(baseline_rows, seconds)
        result["eval_loss_at_equal_seconds"] = {
            "seconds": seconds, "baseline": loss_then, "method": loss,
            "difference": None if loss_then is None else loss - loss_then,
            "note": note,
        }
    return result


def interpolate(rows, seconds):
    """The held-out loss of a curve at `seconds`, linearly, and a note.

    `(None, why)` when the curve does not reach `seconds` (it ends before
    them, or its first held-out loss is later).
    """
    if not rows:
        return None, "the baseline has no held-out loss"
    times = [r["wall_clock_seconds"] for r in rows]
    if seconds > times[-1]:
        return None, f"the baseline's curve ends at {times[-1]:.1f}s, before {seconds:.1f}s"
    if seconds < times[0]:
        return None, (
            f"the baseline's first held-out loss is at {times[0]:.1f}s, after {seconds:.1f}s"
        )
    loss = float(np.interp(seconds, times, [r["eval_loss"] for r in rows]))
    return loss, f"the baseline's curve interpolated at {seconds:.1f}s"


def comparison_line(result):
    """The last line of a `--compare` run: what the method saved, and its loss."""
    flops, clock = result["train_flops"], result["wall_clock_seconds"]
    parts = [
        f"{result['method']} against the baseline: training FLOPs "
        f"{flops['method'] / max(flops['baseline'], 1):.2f} of the baseline's, "
        f"{_saved(flops, format(abs(flops['saved']), '.3g') + ' FLOPs')}",
        f"wall-clock {clock['method']:.1f}s against {clock['baseline']:.1f}s, "
        f"{_saved(clock, format(abs(clock['saved']), '.1f') + 's')}",
    ]
    steps = result.get("eval_loss_at_equal_steps")
    if steps:
        parts.append(
            f"held-out loss at equal steps ({steps['step']}): {steps['method']:.4f} "
            f"against {steps['baseline']:.4f} ({steps['difference']:+.4f})"
        )
    seconds = result.get("eval_loss_at_equal_seconds")
    if seconds:
        if seconds["baseline"] is None:
            parts.append(
                f"at equal seconds ({seconds['seconds']:.1f}s): not compared, "
                f"{seconds['note']}"
            )
        else:
            parts.append(
                f"at equal seconds ({seconds['seconds']:.1f}s): {seconds['method']:.4f} "
                f"against {seconds['baseline']:.4f} ({seconds['difference']:+.4f})"
            )
    return "; ".join(parts)


def _saved(entry, amount):
    """`amount` saved and the share of the baseline's: `2.7s saved (18%)`, or `more`."""
    share = entry["saved_fraction"]
    fraction = f" ({abs(share):.0%})" if math.isfinite(share) else ""
    return f"{amount} {'saved' if entry['saved'] >= 0 else 'more'}{fraction}"
