"""A small `fit` under a schedule and `BackupAndRestore`, killed on request.

`python tests/kill_run.py OUT [--kill-at STEP] [--dropout RATE]` trains a
6-block toy model under `StageSchedule` `2-4-6` for 3 epochs of 4 steps,
backs it up at each epoch's end (`OUT/backup`) and appends each step's
optimizer step, stage, path length and loss to `OUT/steps.csv`, flushed to
disk before the next step. With `--kill-at`, the process sends itself
SIGKILL after that step: no Python cleanup runs, as when a machine is
preempted. Run again with the same `OUT`, it resumes from the backup.
`tests/reliability_test.py` compares the resumed steps with an uninterrupted
run's.
"""

import argparse
import os
import signal
import sys

import keras
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras_raptr  # noqa: E402
from toy_models import regression_data  # noqa: E402
from toy_models import residual_mlp  # noqa: E402

STEPS_PER_EPOCH = 4
EPOCHS = 3


class StepLog(keras.callbacks.Callback):
    """Appends `step,stage,path_length,loss` per step; kills at `kill_at`."""

    def __init__(self, path, kill_at=None):
        super().__init__()
        self.path = path
        self.kill_at = kill_at
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        step = self.epoch * STEPS_PER_EPOCH + batch
        row = (step, int(logs["stage"]), float(logs["path_length"]), float(logs["loss"]))
        with open(self.path, "a") as f:
            f.write(",".join(repr(v) for v in row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


def build(dropout):
    inner, blocks = residual_mlp(6, dropout=dropout)
    model = keras_raptr.RandomPartModel(inner, blocks=blocks, seed=0)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model


def main(out, kill_at=None, dropout=0.0):
    """Trains (or resumes) the run in `out`; returns the model."""
    os.makedirs(out, exist_ok=True)
    model = build(dropout)
    x, y = regression_data(n=8 * STEPS_PER_EPOCH)
    callbacks = [
        keras_raptr.StageSchedule.from_spec("2-4-6", total_steps=STEPS_PER_EPOCH * EPOCHS),
        keras.callbacks.BackupAndRestore(os.path.join(out, "backup")),
        StepLog(os.path.join(out, "steps.csv"), kill_at),
    ]
    model.fit(x, y, batch_size=8, epochs=EPOCHS, shuffle=False, callbacks=callbacks, verbose=0)
    return model


def read_steps(out):
    """The rows of `OUT/steps.csv`, as `(step, stage, path_length, loss)`."""
    with open(os.path.join(out, "steps.csv")) as f:
        return [tuple(float(v) for v in line.split(",")) for line in f if line.strip()]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--dropout", type=float, default=0.0)
    args = parser.parse_args()
    model = main(args.out, args.kill_at, args.dropout)
    np.save(os.path.join(args.out, "weights.npy"), np.concatenate(
        [np.ravel(w) for w in model.inner.get_weights()]))
