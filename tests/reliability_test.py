"""Faults a long run meets: a killed process, loss scaling, accumulation.

RELIABILITY.md lists every fault and bad input tried, and where its test is.
"""

import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_raptr
from keras_raptr.engine import path
from toy_models import BatchLogs
from toy_models import block_weights
from toy_models import changed_blocks
from toy_models import regression_data
from toy_models import residual_mlp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import kill_run  # noqa: E402


def test_a_killed_run_resumes_with_backup_and_restore_step_for_step(tmp_path):
    # Uninterrupted, in this process.
    whole = str(tmp_path / "whole")
    model = kill_run.main(whole)
    # Killed by SIGKILL after step 6 (mid-epoch, in stage 1), then resumed
    # from the backup of epoch 0 (steps 0-3).
    part = str(tmp_path / "part")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(HERE)}
    killed = subprocess.run(
        [sys.executable, os.path.join(HERE, "kill_run.py"), part, "--kill-at", "6"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    before = kill_run.read_steps(part)
    assert [int(row[0]) for row in before] == list(range(7))
    resumed = kill_run.main(part)
    after = kill_run.read_steps(part)[len(before):]
    # Keras' backup is per epoch: the resumed run repeats steps 4-6.
    assert [int(row[0]) for row in after] == list(range(4, 12))
    expected = kill_run.read_steps(whole)[4:]
    for got, want in zip(after, expected):
        assert got[:3] == want[:3]  # step, stage, path length
        np.testing.assert_allclose(got[3], want[3], rtol=1e-6)  # loss
    for a, b in zip(resumed.inner.get_weights(), model.inner.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def make_model(optimizer, **compile_kwargs):
    inner, blocks = residual_mlp(6)
    model = keras_raptr.RandomPartModel(inner, blocks=blocks, seed=0)
    model.compile(optimizer=optimizer, loss="mse", **compile_kwargs)
    return model


def test_gradient_accumulation_trains_one_path_per_optimizer_step():
    # Two micro-batches of 8 per optimizer step train exactly as one batch of
    # 16 on the same path: with a path drawn per micro-batch, or the stages
    # counted in micro-batches, the weights would differ.
    def run(batch_size, accumulation):
        kwargs = {"gradient_accumulation_steps": accumulation} if accumulation else {}
        model = make_model(keras.optimizers.Adam(0.01, **kwargs))
        schedule = keras_raptr.StageSchedule(
            [keras_raptr.Stage(2, 2), keras_raptr.Stage(4, 2)]
        )
        logs = BatchLogs()
        x, y = regression_data(n=64)
        model.fit(
            x, y, batch_size=batch_size, epochs=2, shuffle=False,
            callbacks=[schedule, logs], verbose=0,
        )
        return model, logs

    accumulated, logs = run(8, 2)
    plain, _ = run(16, None)
    assert int(accumulated.optimizer.iterations) == 8
    # Stages of 2 optimizer steps: 4 micro-batches each.
    assert [int(log["stage"]) for log in logs.batches[:8]] == [0] * 4 + [1] * 4
    for a, b in zip(block_weights(accumulated), block_weights(plain)):
        for wa, wb in zip(a, b):
            np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)


def configurations():
    if keras.backend.backend() == "torch":
        # PyTorch takes neither `jit_compile=True` nor several steps per
        # execution: eager against the default.
        return [{"run_eagerly": True}]
    return [{"jit_compile": False}, {"steps_per_execution": 3}]


@pytest.mark.parametrize("compile_kwargs", configurations(), ids=str)
def test_jit_compile_and_steps_per_execution_train_the_same_paths(compile_kwargs):
    # Bernoulli paths of varying lengths, and a stage boundary inside an
    # execution of 3 steps (steps 0-2: stage 0 is steps 0-1).
    def run(**kwargs):
        model = make_model(keras.optimizers.Adam(0.01), **kwargs)
        schedule = keras_raptr.StageSchedule(
            [keras_raptr.Stage(2, 2), keras_raptr.Stage(4, 7)]
        )
        logs = BatchLogs()
        x, y = regression_data(n=8 * 9)
        model.fit(
            x, y, batch_size=8, epochs=1, shuffle=False,
            callbacks=[schedule, logs], verbose=0,
        )
        return block_weights(model), logs.epochs[-1]

    (default, default_logs), (other, other_logs) = run(), run(**compile_kwargs)
    assert other_logs["stage"] == default_logs["stage"] == 1
    for a, b in zip(default, other):
        for wa, wb in zip(a, b):
            np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)


class PathCheck(keras.callbacks.Callback):
    """Per step: the optimizer step before it, and the blocks it changed."""

    def __init__(self):
        super().__init__()
        self.steps = []

    def on_train_batch_begin(self, batch, logs=None):
        self.step = int(self.model.optimizer.iterations)
        self.weights = block_weights(self.model)

    def on_train_batch_end(self, batch, logs=None):
        changed = changed_blocks(self.weights, block_weights(self.model))
        self.steps.append((self.step, int(self.model.optimizer.iterations), changed))


def test_a_step_skipped_by_the_loss_scale_keeps_host_and_step_on_one_path():
    # An initial loss scale that overflows float16: the first steps are
    # skipped (the optimizer's count does not advance) until it falls.
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        optimizer = keras.optimizers.LossScaleOptimizer(
            keras.optimizers.Adam(0.01), initial_scale=2.0**40
        )
        model = make_model(optimizer)
        schedule = keras_raptr.StageSchedule(
            [keras_raptr.Stage(2, 2), keras_raptr.Stage(4, 100)]
        )
        check = PathCheck()
        x, y = regression_data(n=8 * 40)
        model.fit(x, y, batch_size=8, epochs=1, callbacks=[schedule, check], verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    skipped = [s for s in check.steps if s[1] == s[0]]
    trained = [s for s in check.steps if s[1] == s[0] + 1]
    assert skipped and len(trained) >= 8 and len(skipped) + len(trained) == 40
    # A skipped step changes no block; a trained one exactly its path.
    assert all(changed == [] for _, _, changed in skipped)
    assert model.schedule is model.strategy  # the kept name
    plan = model.strategy.resolve(6)
    for step, _, changed in trained:
        on = path.host_path(plan, plan.tables(), model.seed, step)
        assert changed == [i for i in range(6) if on[i]], step
