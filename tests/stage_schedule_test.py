import os
import zipfile

import keras
import numpy as np
import pytest

import keras_raptr
from toy_models import BatchLogs
from toy_models import block_weights
from toy_models import regression_data
from toy_models import residual_mlp


def make_model(num_blocks=6, seed=0):
    inner, blocks = residual_mlp(num_blocks)
    model = keras_raptr.RandomPartModel(inner, blocks=blocks, seed=seed)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    return model


@pytest.mark.parametrize("steps_per_epoch", [2, 3, 4, 7])
def test_logs_at_stage_boundaries(steps_per_epoch):
    model = make_model()
    schedule = keras_raptr.StageSchedule.from_spec("2-4-6", total_steps=15)
    logs = BatchLogs()
    x, y = regression_data(n=8 * 15)
    model.fit(
        x, y, batch_size=8, epochs=15 // steps_per_epoch,
        steps_per_epoch=steps_per_epoch, callbacks=[schedule, logs], verbose=0,
    )
    num_steps = (15 // steps_per_epoch) * steps_per_epoch
    stages = [int(log["stage"]) for log in logs.batches]
    assert stages == ([0] * 5 + [1] * 5 + [2] * 5)[:num_steps]
    assert [log["path_length"] for log in logs.batches] == (
        [2.0] * 5 + [4.0] * 5 + [6.0] * 5
    )[:num_steps]
    # An epoch log reports its last step's stage.
    last_steps = range(steps_per_epoch - 1, num_steps, steps_per_epoch)
    assert [int(log["stage"]) for log in logs.epochs] == [stages[t] for t in last_steps]
    assert "path_length" in model.history.history


@pytest.mark.parametrize("verbose", [1, 2])
def test_the_progress_bar_shows_the_stage_and_path_length_as_they_read(verbose, capsys):
    model = make_model()
    schedule = keras_raptr.StageSchedule.from_spec("2-4", total_steps=8)
    x, y = regression_data()
    model.fit(x, y, batch_size=8, epochs=2, callbacks=[schedule], verbose=verbose)
    out = capsys.readouterr().out
    # Keras prints other values as `0.0000e+00` and `2.0000`.
    assert "path_length: 2 - stage: 0" in out
    assert "path_length: 4 - stage: 1" in out
    assert "e+00" not in out and "stage: 0.0" not in out
    # To everything but the progress bar's two formats, plain floats.
    assert model.history.history["stage"] == [0.0, 1.0]
    assert f"{model.history.history['path_length'][1]:.1f}" == "4.0"


def test_after_the_last_stage_the_full_network_trains():
    model = make_model()
    schedule = keras_raptr.StageSchedule(
        [keras_raptr.Stage(2, 4)], sampling="subset"
    )
    logs = BatchLogs()
    x, y = regression_data()
    model.fit(x, y, batch_size=8, epochs=1, callbacks=[schedule, logs], verbose=0)
    before = block_weights(model)
    model.fit(x, y, batch_size=32, epochs=1, callbacks=[schedule, logs], verbose=0)
    after = block_weights(model)
    assert all(not np.array_equal(b[0], a[0]) for b, a in zip(before, after))
    assert [int(log["stage"]) for log in logs.batches] == [0, 0, 0, 0, 1]
    assert logs.batches[-1]["path_length"] == 6.0


def test_resume_from_a_saved_model_continues_mid_stage(tmp_path):
    x, y = regression_data(n=8 * 10)
    spec = dict(spec="2-4-6", total_steps=12)

    model = make_model()
    logs = BatchLogs()
    schedule = keras_raptr.StageSchedule.from_spec(**spec)
    model.fit(x[:48], y[:48], batch_size=8, epochs=1, callbacks=[schedule, logs], verbose=0)
    path = os.path.join(tmp_path, "checkpoint.keras")
    model.save(path)

    restored = keras.saving.load_model(path)
    resumed = BatchLogs()
    restored.fit(
        x, y, batch_size=8, epochs=4, initial_epoch=2, steps_per_epoch=2,
        callbacks=[keras_raptr.StageSchedule.from_spec(**spec), resumed], verbose=0,
    )
    # Steps 0-5 before the save, 6-9 after it.
    assert [int(l["stage"]) for l in logs.batches] == [0, 0, 0, 0, 1, 1]
    assert [int(l["stage"]) for l in resumed.batches] == [1, 1, 2, 2]


def test_backup_and_restore_resumes_in_the_right_stage(tmp_path):
    model = make_model()
    x, y = regression_data(n=8 * 4)
    schedule = keras_raptr.StageSchedule.from_spec("2-4-6", total_steps=12)
    backup = keras.callbacks.BackupAndRestore(os.path.join(tmp_path, "backup"))

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        model.fit(x, y, batch_size=8, epochs=3, callbacks=[schedule, backup, Interrupt()], verbose=0)
    fresh = make_model(seed=1)
    logs = BatchLogs()
    fresh.fit(x, y, batch_size=8, epochs=3, callbacks=[schedule, backup, logs], verbose=0)
    # Two epochs of 4 steps were backed up; the third epoch is steps 8-11.
    assert [int(l["stage"]) for l in logs.batches] == [2, 2, 2, 2]


def test_compute_fraction():
    schedule = keras_raptr.StageSchedule.from_spec("6-8-10-12", total_steps=100)
    assert schedule.compute_fraction(12) == pytest.approx(0.75)
    assert schedule.total_steps == 100
    with pytest.raises(ValueError, match="more than the model's 8 blocks"):
        schedule.compute_fraction(8)


def test_stage_lengths_move_the_boundaries_and_the_compute():
    # A long full stage: 10%, 10%, 10%, then the full network for 70%.
    schedule = keras_raptr.StageSchedule.from_spec(
        "6-8-10-12", total_steps=100, stage_lengths=(0.1, 0.1, 0.1, 0.7)
    )
    assert [schedule.stage_at(t) for t in (9, 10, 19, 20, 29, 30, 99)] == [0, 1, 1, 2, 2, 3, 3]
    assert schedule.compute_fraction(12) == pytest.approx((6 + 8 + 10 + 7 * 12) / 120)
    stacking = keras_raptr.GradualStacking.from_spec("6-9-12", total_steps=10, stage_lengths=(2, 3, 5))
    assert [stage.steps for stage in stacking.stages] == [2, 3, 5]


def test_config_round_trip():
    schedule = keras_raptr.StageSchedule.from_spec(
        "2-4", total_steps=9, fixed_blocks=(0,), sampling="subset", scaling="inverse"
    )
    restored = keras_raptr.StageSchedule.from_config(schedule.get_config())
    assert restored.stages == schedule.stages
    assert restored.fixed_blocks == (0,)
    assert restored.sampling == "subset" and restored.scaling == "inverse"
    assert "2-4" in repr(restored)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(stages=[]), "`stages` is empty"),
        (dict(stages=keras_raptr.Stage(2, 3)), "must be a list"),
        (dict(stages=[(2, 3)]), "must be a `keras_raptr.Stage`"),
        (dict(stages=[keras_raptr.Stage(2, 3)], sampling="random"), "`sampling` must be one of"),
        (dict(stages=[keras_raptr.Stage(2, 3)], scaling="dropout"), "`scaling` must be one of"),
        (dict(stages=[keras_raptr.Stage(2, 3)], fixed_blocks=0), "`fixed_blocks` must be a tuple"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        keras_raptr.StageSchedule(**kwargs)


# Nothing here builds a Keras object: no Keras state to clear.
@pytest.mark.keras_free
class TestBadInputsOnTheHost:
    """Hostile inputs refused before `fit`, or at `fit` before any step."""

    STAGE = keras_raptr.Stage(2, 3)

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            (
                dict(fixed_blocks=(0, 0)),
                "`fixed_blocks=\\(0, 0\\)` lists the same block index twice",
            ),
            (dict(fixed_blocks="01"), "`fixed_blocks` must be a tuple of block indices, got '01'"),
            (dict(fixed_blocks=None), "`fixed_blocks` must be a tuple of block indices, got None"),
            (dict(fixed_blocks=1.5), "`fixed_blocks` must be a tuple"),
            (
                dict(fixed_blocks=(0, 1.0)),
                "integer block indices, got 1.0 in fixed_blocks=\\(0, 1.0\\)",
            ),
            (dict(fixed_blocks=(0, True)), "integer block indices, got True"),
            (dict(fixed_blocks=(0, "1")), "integer block indices, got '1'"),
            (
                dict(stages=[keras_raptr.Stage(2.5, 3)], sampling="subset"),
                "Stage 0 has path_length=2.5, but `sampling='subset'` runs a whole number of "
                "blocks.*path_length=2 or 3",
            ),
            (
                dict(
                    stages=[keras_raptr.Stage(4, 3), keras_raptr.Stage(5.0001, 3)],
                    sampling="subset",
                ),
                "Stage 1 has path_length=5.0001",
            ),
            (
                dict(stages=[keras_raptr.Stage(2, 2**30), keras_raptr.Stage(4, 2**30)]),
                "last 2147483648 optimizer steps in all, more than 2147483647",
            ),
            (
                dict(stages=[{"path_length": 2, "steps": 0}]),
                "`Stage.steps` must be a positive integer",
            ),
        ],
    )
    def test_refused_at_construction(self, kwargs, match):
        kwargs = {"stages": [self.STAGE], **kwargs}
        with pytest.raises(ValueError, match=match):
            keras_raptr.StageSchedule(**kwargs)

    @pytest.mark.parametrize(
        "spec, kwargs, match",
        [
            ("", dict(total_steps=10), "The schedule spec '' is empty"),
            ("6--8", dict(total_steps=10), "stage 1 is empty"),
            ("a-b", dict(total_steps=10), "'a' is not a positive number"),
            ("2-4", dict(total_steps=0), "got total_steps=0"),
            ("2-4", dict(total_steps=-10), "got total_steps=-10"),
            ("2-4", dict(total_steps=10.0), "got total_steps=10.0"),
            ("2-4", dict(total_steps=True), "got total_steps=True"),
            ("2-4", dict(total_steps=2**31), "at most 2147483647"),
            ("2-4", dict(total_steps=10, stage_lengths=(3, 8)), "must add up to total_steps=10"),
            ("2-4", dict(total_steps=10, stage_lengths=(True, 9)), "must be positive numbers"),
            ("2.5-4", dict(total_steps=10, sampling="subset"), "Stage 0 has path_length=2.5"),
            (
                "2-4",
                dict(total_steps=10, fixed_blocks=(-1, -1)),
                "lists the same block index twice",
            ),
        ],
    )
    def test_refused_by_from_spec(self, spec, kwargs, match):
        with pytest.raises(ValueError, match=match):
            keras_raptr.StageSchedule.from_spec(spec, **kwargs)

    def test_accepted_edge_values(self):
        # An integral float is a whole path length for `subset`; path
        # lengths need not grow; numpy integers index blocks.
        subset = keras_raptr.StageSchedule([keras_raptr.Stage(3.0, 2)], sampling="subset")
        assert subset.compute_fraction(4) == 0.75
        shrinking = keras_raptr.StageSchedule.from_spec("4-2", total_steps=4)
        assert [shrinking.path_length_at(t, 4) for t in range(5)] == [4, 4, 2, 2, 4]
        fixed = keras_raptr.StageSchedule([self.STAGE], fixed_blocks=(np.int64(0),))
        assert fixed.resolve(4).fixed_blocks == (0,)
        assert fixed.get_config()["fixed_blocks"] == [0]
        assert keras_raptr.StageSchedule([keras_raptr.Stage(2, 2**31 - 1)]).total_steps == 2**31 - 1

    @pytest.mark.parametrize(
        "kwargs, num_blocks, match",
        [
            (
                dict(fixed_blocks=(0, -4)),
                4,
                "`fixed_blocks=\\(0, -4\\)` names the same block twice on a model with 4 blocks "
                "\\(indices resolve to \\[0, 0\\]\\)",
            ),
            (
                dict(fixed_blocks=(0, 4)),
                4,
                "`fixed_blocks` index 4 is out of range for a model with 4 blocks: use indices in "
                "\\[-4, 3\\]",
            ),
            (dict(fixed_blocks=(-5,)), 4, "index -5 is out of range"),
            (dict(), 1, "names the same block twice.*pass `fixed_blocks=\\(0,\\)`"),
            (
                dict(stages=[keras_raptr.Stage(4.5, 3)]),
                4,
                "Stage 0 has path_length=4.5, more than the model's 4 blocks",
            ),
            (dict(stages=[keras_raptr.Stage(1e300, 3)]), 4, "more than the model's 4 blocks"),
            (dict(stages=[keras_raptr.Stage(1.5, 3)]), 4, "fewer than the 2 fixed blocks"),
            (dict(), 0, "`num_blocks` must be a positive integer.*got num_blocks=0"),
            (dict(), 4.0, "got num_blocks=4.0"),
            (dict(), True, "got num_blocks=True"),
        ],
    )
    def test_refused_for_a_model(self, kwargs, num_blocks, match):
        schedule = keras_raptr.StageSchedule(**{"stages": [self.STAGE], **kwargs})
        for query in (
            schedule.resolve,
            schedule.compute_fraction,
            lambda n: schedule.keep_probabilities_at(0, n),
        ):
            with pytest.raises(ValueError, match=match):
                query(num_blocks)

    @pytest.mark.parametrize("step", [-1, 2.5, 3.0, float("nan"), True, None, "3"])
    def test_bad_steps_of_the_host_queries(self, step):
        schedule = keras_raptr.StageSchedule([self.STAGE])
        for query in (
            schedule.stage_at,
            lambda t: schedule.path_length_at(t, 4),
            lambda t: schedule.keep_probabilities_at(t, 4),
        ):
            match = "`step` must be an optimizer step, an integer >= 0"
            with pytest.raises(ValueError, match=match):
                query(step)
        # Integer scalars of any kind are steps.
        assert schedule.stage_at(np.int64(3)) == schedule.stage_at(np.array(3)) == 1


@pytest.mark.parametrize(
    "schedule, match",
    [
        (keras_raptr.StageSchedule([keras_raptr.Stage(7, 3)]), "more than the model's 6 blocks"),
        (keras_raptr.StageSchedule([keras_raptr.Stage(1, 3)]), "fewer than the 2 fixed blocks"),
        (keras_raptr.StageSchedule([keras_raptr.Stage(3, 3)], fixed_blocks=(0, 6)), "index 6 is out of range"),
        (
            keras_raptr.StageSchedule([keras_raptr.Stage(3, 3)], fixed_blocks=(0, -6)),
            "names the same block twice on a model with 6 blocks",
        ),
    ],
)
def test_schedule_that_does_not_fit_the_model_fails_before_any_step(schedule, match):
    model = make_model()
    x, y = regression_data()
    before = block_weights(model)
    with pytest.raises(ValueError, match=match):
        model.fit(x, y, batch_size=8, epochs=1, callbacks=[schedule], verbose=0)
    assert int(model.optimizer.iterations) == 0
    np.testing.assert_array_equal(before[1][0], block_weights(model)[1][0])


def test_schedule_on_a_plain_model_is_an_error():
    inner, _ = residual_mlp(4)
    inner.compile(optimizer="sgd", loss="mse")
    schedule = keras_raptr.StageSchedule.from_spec("2-4", total_steps=4)
    with pytest.raises(ValueError, match="trains a `keras_raptr.RandomPartModel`.*Wrap it first"):
        inner.fit(*regression_data(), epochs=1, callbacks=[schedule], verbose=0)


def test_stage_is_exact_with_several_steps_per_execution():
    if keras.backend.backend() == "torch":
        pytest.skip("PyTorch runs one step per execution")
    model = make_model()
    model.compile(
        optimizer=keras.optimizers.SGD(0.01), loss="mse", steps_per_execution=2
    )
    schedule = keras_raptr.StageSchedule.from_spec("2-4-6", total_steps=15)
    logs = BatchLogs()
    x, y = regression_data(n=8 * 15)
    model.fit(x, y, batch_size=8, epochs=1, callbacks=[schedule, logs], verbose=0)
    # One log per execution of two steps, carrying its last step's stage:
    # steps 1, 3, ..., 13 and the lone step 14.
    assert [int(l["stage"]) for l in logs.batches] == [0, 0, 1, 1, 1, 2, 2, 2]
    assert int(model.optimizer.iterations) == 15


@pytest.mark.parametrize("damage", ["truncated", "weights_truncated"])
def test_a_damaged_keras_file_is_refused_not_loaded(tmp_path, damage):
    # What Keras says is its own (a truncated archive reads as "File not
    # found"); what matters here is that nothing loads silently.
    model = make_model(num_blocks=2)
    path = str(tmp_path / "model.keras")
    model.save(path)
    damaged = str(tmp_path / "damaged.keras")
    if damage == "truncated":
        with open(path, "rb") as file:
            data = file.read()
        with open(damaged, "wb") as file:
            file.write(data[: len(data) // 2])
    else:
        with zipfile.ZipFile(path) as source, zipfile.ZipFile(damaged, "w") as target:
            for name in source.namelist():
                content = source.read(name)
                if name.endswith(".weights.h5"):
                    content = content[: len(content) // 2]
                target.writestr(name, content)
    with pytest.raises((ValueError, OSError, zipfile.BadZipFile)):
        keras.saving.load_model(damaged)
