"""benchmarks/quality.py, example_speed.py and compile_time.py, in a tiny configuration.

The benchmarks' numbers are not checked here (they are measurements); what
is checked is that they measure what they say: the step losses, the paired
comparisons, the reuse of finished runs, and the ideal speed-up.
"""

import importlib.util
import json
import os
import shlex

import keras
import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = (
    "--num-layers 4 --hidden-dim 16 --num-heads 2 --seq-len 16 --batch-size 4 "
    "--eval-windows 16 --vocabulary-size 300 --corpus-cache none"
)


def load(name):
    path = os.path.join(HERE, "..", "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quality():
    return load("quality")


@pytest.fixture(scope="module")
def quality_run(quality, tmp_path_factory):
    """baseline, raptr, a variant and stacking for 24 steps, two seeds."""
    root = tmp_path_factory.mktemp("quality")
    argv = [
        "--steps", "24", "--eval-every", "2", "--seeds", "0,1",
        "--methods", "baseline,raptr,raptr-long-last,stacking",
        "--example-args", TINY + " --dataset " + shlex.quote(_texts(root)),
        "--results-dir", str(root / "results"), "--runs-dir", str(root / "runs"),
    ]
    # Transitions are at steps 6, 12, 18 (RaPTr) and 8, 16 (stacking).
    quality.JUMP_WINDOW = 2
    assert quality.main(argv) == 0
    backend = keras.backend.backend()
    with open(root / "results" / f"quality_{backend}.json") as f:
        return argv, root, json.load(f)


def test_step_losses_average_to_each_logged_epoch_loss(quality_run):
    _, _, data = quality_run
    for run in data["runs"]:
        losses = run["step_losses"]
        assert len(losses) == 24
        for row in run["curve"]:
            step = int(row["step"])
            # Epochs of 2 steps: Keras logs the mean of the epoch's steps.
            assert np.mean(losses[step - 2:step]) == pytest.approx(row["loss"], rel=1e-4)


def test_table_pairs_each_method_with_the_baseline_of_its_seed(quality_run):
    _, _, data = quality_run
    table = data["methods"]
    assert list(table) == ["baseline", "raptr", "stacking", "raptr-long-last"]
    assert table["baseline"]["diff_vs_baseline"]["mean"] == 0.0
    runs = {(r["name"], r["seed"]): r["summary"]["final_eval_loss"] for r in data["runs"]}
    diffs = [runs["raptr", s] - runs["baseline", s] for s in (0, 1)]
    assert table["raptr"]["diff_vs_baseline"]["mean"] == pytest.approx(np.mean(diffs))
    assert table["raptr"]["final_eval_loss"]["n"] == 2
    # 2-2-3-4 over 4 blocks, and stacking 2-3-4: both 11/16 and 9/12 of the blocks.
    assert table["raptr"]["compute_fraction"] == pytest.approx(11 / 16)
    assert table["stacking"]["compute_fraction"] == pytest.approx(9 / 12)
    long_last = [runs["raptr-long-last", s] - runs["raptr", s] for s in (0, 1)]
    assert table["raptr-long-last"]["diff_vs_raptr"]["mean"] == pytest.approx(np.mean(long_last))
    assert table["raptr"]["diff_vs_raptr"]["n"] == 0
    # (1, 1, 1, 3) of 24 steps: 2-2-3-4 in stages of 4, 4, 4 and 12 steps.
    assert table["raptr-long-last"]["compute_fraction"] == pytest.approx(
        (4 * (2 + 2 + 3) + 12 * 4) / (24 * 4)
    )
    # Equal FLOPs: the baseline's held-out loss at the method's FLOPs,
    # interpolated between its evaluations.
    raptr = next(r for r in data["runs"] if r["name"] == "raptr" and r["seed"] == 0)
    base = next(r for r in data["runs"] if r["name"] == "baseline" and r["seed"] == 0)
    flops = raptr["summary"]["train_flops"]
    assert base["curve"][0]["train_flops"] < flops < base["curve"][-1]["train_flops"]
    at = np.interp(
        flops, [row["train_flops"] for row in base["curve"]],
        [row["eval_loss"] for row in base["curve"]],
    )
    assert table["raptr"]["baseline_loss_at_same_flops"]["min"] <= at + 1e-12
    assert table["raptr"]["baseline_loss_at_same_flops"]["max"] >= at - 1e-12
    flops_diffs = table["raptr"]["diff_at_same_flops"]
    assert flops_diffs["n"] == 2 and table["raptr"]["diff_vs_baseline"]["n"] == 2


def test_transitions_are_measured_at_each_stage_boundary(quality_run):
    _, _, data = quality_run
    table = data["methods"]
    assert [t["step"] for t in table["raptr"]["transitions"]] == [6, 12, 18]
    assert [t["step"] for t in table["stacking"]["transitions"]] == [8, 16]
    long_last = [t["step"] for t in table["raptr-long-last"]["transitions"]]
    assert long_last == [4, 8, 12]
    assert table["baseline"]["transitions"] == []
    run = next(r for r in data["runs"] if r["name"] == "raptr" and r["seed"] == 0)
    base = next(r for r in data["runs"] if r["name"] == "baseline" and r["seed"] == 0)
    jump = next(j for j in table["raptr"]["transitions"] if j["step"] == 12)
    # Means over the two seeds of: the 2 steps after minus the 2 before.
    assert "train_jump" in jump and "baseline_train_jump" in jump
    one = np.mean(run["step_losses"][12:14]) - np.mean(run["step_losses"][10:12])
    other = next(r for r in data["runs"] if r["name"] == "raptr" and r["seed"] == 1)
    two = np.mean(other["step_losses"][12:14]) - np.mean(other["step_losses"][10:12])
    assert jump["train_jump"] == pytest.approx((one + two) / 2)
    # The held-out change over the next evaluation interval, and the baseline's.
    changes, base_changes = [], []
    for seed in (0, 1):
        for name, into in (("raptr", changes), ("baseline", base_changes)):
            r = next(r for r in data["runs"] if r["name"] == name and r["seed"] == seed)
            curve = {int(row["step"]): row["eval_loss"] for row in r["curve"]}
            into.append(curve[14] - curve[12])
    assert jump["eval_change"] == pytest.approx(np.mean(changes))
    assert jump["baseline_eval_change"] == pytest.approx(np.mean(base_changes))
    assert run["boundaries"] == [6, 12, 18] and base["boundaries"] == []


def test_outputs_and_reuse_of_finished_runs(quality, quality_run, capsys):
    argv, root, data = quality_run
    backend = keras.backend.backend()
    text = (root / "results" / "quality.md").read_text()
    for name in ("baseline", "raptr", "stacking", "raptr-long-last"):
        assert f"| {name} |" in text
    for stem in ("quality", "quality_ablations", "quality_transitions", "quality_headline"):
        assert (root / "results" / f"{stem}.png").stat().st_size > 0
    # The figures again from the JSON alone, running nothing.
    replotted = root / "replotted"
    json_path = str(root / "results" / f"quality_{backend}.json")
    assert quality.main(["--replot", json_path, "--results-dir", str(replotted)]) == 0
    assert sorted(p.name for p in replotted.iterdir()) == [
        "quality.png", "quality_ablations.png", "quality_headline.png",
        "quality_transitions.png",
    ]
    capsys.readouterr()
    assert quality.main(argv) == 0
    assert capsys.readouterr().out.count("reusing") == 8
    with open(root / "results" / f"quality_{backend}.json") as f:
        again = json.load(f)
    assert again["methods"]["raptr"]["final_eval_loss"] == data["methods"]["raptr"]["final_eval_loss"]
    # Runs that shared the machine: the table leaves wall-clock out.
    assert "wall-clock is not compared" not in text
    assert quality.main(argv + ["--no-wall-clock"]) == 0
    text = (root / "results" / "quality.md").read_text()
    assert "wall-clock is not compared" in text
    # Each row: the wall-clock seconds and the speed-up.
    assert text.count("| n/a | n/a |") == 4


def test_a_config_under_the_cosine_schedule_pairs_with_the_runs_under_it(quality):
    def run(name, seed, loss):
        curve = [
            {"step": step, "eval_loss": loss + 1.0 - step / 20, "train_flops": step,
             "wall_clock_seconds": step}
            for step in (10, 20)
        ]
        summary = {
            "final_eval_loss": loss, "wall_clock_seconds": 20, "train_flops": 15,
            "full_train_flops": 20, "compute_fraction": 0.75, "strategy": name,
        }
        return {"name": name, "seed": seed, "summary": summary, "curve": curve,
                "step_losses": [], "boundaries": []}

    results = [
        run("baseline", 0, 1.0), run("baseline+cosine", 0, 2.0),
        run("raptr+cosine", 0, 2.5), run("raptr-zero-grad+cosine", 0, 2.75),
    ]
    table = quality.aggregate(results, eval_every=10)
    assert table["raptr+cosine"]["diff_vs_baseline"]["mean"] == pytest.approx(0.5)
    assert table["raptr-zero-grad+cosine"]["diff_vs_raptr"]["mean"] == pytest.approx(0.25)
    # The baseline+cosine curve at 15 FLOPs: 2.0 + 1.0 - 15 / 20.
    assert table["raptr+cosine"]["diff_at_same_flops"]["mean"] == pytest.approx(0.25)
    assert table["baseline+cosine"]["diff_vs_baseline"]["mean"] == 0.0


def test_steps_to_reach_interpolates_between_evaluations(quality):
    curve = [{"step": 10, "eval_loss": 5.0}, {"step": 20, "eval_loss": 4.0}]
    assert quality._steps_to_reach(curve, 4.5) == pytest.approx(15)
    assert quality._steps_to_reach(curve, 5.5) == 10
    assert quality._steps_to_reach(curve, 3.0) is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "100"], "multiple of 12"),
        (["--steps", "120", "--eval-every", "7"], "--eval-every 7 must divide 20, 30 and 40"),
        (["--parallel", "0"], "--parallel 0: give at least 1"),
        (["--methods", "raptr,dropout"], "unknown --methods ['dropout']"),
        (["--seeds", "a"], "--seeds 'a'"),
    ],
)
def test_quality_bad_arguments(quality, capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        quality.parse_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_example_speed_runs_both_methods_and_compares_with_the_ideal(tmp_path, monkeypatch):
    speed = load("example_speed")
    backend = keras.backend.backend()
    argv = [
        "--backends", backend, "--steps", "8", "--eval-every", "4", "--repeats", "1",
        "--example-args", TINY + " --dataset " + shlex.quote(_texts(tmp_path)),
        "--results-dir", str(tmp_path / "results"), "--runs-dir", str(tmp_path / "runs"),
    ]
    assert speed.main(argv) == 0
    with open(tmp_path / "results" / "example_speed.json") as f:
        row = json.load(f)["backends"][0]
    assert row["backend"] == backend
    raptr = row["runs"]["raptr"][0]
    baseline = row["runs"]["baseline"][0]
    assert baseline["steps"] == raptr["steps"] == 8
    assert row["ideal"] == pytest.approx(baseline["train_flops"] / raptr["train_flops"])
    assert row["ideal_masked_head"] > row["ideal"] > 1
    assert row["train_speedup"] == pytest.approx(
        speed.train_seconds(baseline) / speed.train_seconds(raptr)
    )
    assert f"| {backend} |" in (tmp_path / "results" / "example_speed.md").read_text()
    # The train steps each method compiled: the baseline only the full one.
    compiled = row["train_steps_compiled"]
    if backend == "torch":
        assert compiled == {"baseline": 0, "raptr": 0}
    else:
        assert compiled == {"baseline": 1, "raptr": 1}
        assert list(baseline["compiled_train_steps"]) == ["full"]
        assert list(raptr["compiled_train_steps"]) == ["loop"]
    # `--reuse` builds the same table from the finished runs, running nothing;
    # other options run again.
    def no_run(*args, **kwargs):
        raise AssertionError("--reuse ran the example again")

    monkeypatch.setattr(speed.subprocess, "run", no_run)
    assert speed.main(argv + ["--reuse", "--tag", "again"]) == 0
    with open(tmp_path / "results" / "example_speed_again.json") as f:
        assert json.load(f)["backends"][0]["runs"] == row["runs"]
    with pytest.raises(AssertionError, match="ran the example again"):
        speed.main([*argv, "--reuse", "--steps", "9"])


def test_ideal_speedup_with_the_head_at_masked_positions():
    speed = load("example_speed")
    summary = {
        "full_train_flops": 1100.0, "train_flops": 850.0, "compute_fraction": 0.75,
        "block_flops_per_step": 1000.0, "other_flops_per_step": 100.0,
        "head_positions_per_sequence": 3, "options": {"seq_len": 22},
    }
    estimate, masked = speed.ideal(summary)
    assert estimate == pytest.approx(1100 / 850)
    # 15% of the 20 body tokens: 3 of 22 positions run the head.
    other = 100 * 3 / 22
    assert masked == pytest.approx((1000 + other) / (750 + other))
    every_token = {**summary, "head_positions_per_sequence": 22}
    assert speed.ideal(every_token)[1] == pytest.approx(estimate)


def _texts(tmp_path):
    from pydoc_data import topics

    texts = list(topics.topics.values())[:60]
    for i in range(3):
        (tmp_path / f"part_{i}.txt").write_text("\n\n".join(texts[i::3]))
    return str(tmp_path / "part_*.txt")


def test_compile_time_counts_one_raptr_step_against_the_baselines_one(tmp_path):
    compile_time = load("compile_time")
    backend = keras.backend.backend()
    argv = ["--num-blocks", "4", "--steps", "6", "--batch-size", "2",
            "--output-dir", str(tmp_path)]
    if backend == "torch":
        # PyTorch compiles nothing: no mode measures it.
        with pytest.raises(SystemExit) as info:
            compile_time.main(["--modes", "torch", *argv])
        assert info.value.code == 2
        return
    assert compile_time.main(["--modes", backend, *argv]) == 0
    with open(tmp_path / "compile_time.json") as f:
        (result,) = json.load(f)
    (row,) = result["rows"]
    assert (result["backend"], row["num_blocks"]) == (backend, 4)
    # `2-3-4` over 6 steps meets paths of several lengths: one loop step.
    assert list(row["baseline"]["compiled_train_steps"]) == ["full"]
    assert list(row["raptr"]["compiled_train_steps"]) == ["loop"]
    assert f"| {backend} | 4 |" in (tmp_path / "compile_time.md").read_text()
