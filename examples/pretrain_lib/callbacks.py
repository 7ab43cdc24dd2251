"""The run's own callbacks: the recorder, the stage starts, the NaN stop, `--stop-after`."""

import os
import time

import numpy as np

from pretrain_lib.checkpoints import save_checkpoint
from pretrain_lib.errors import LossNotFinite


def recorder(curve, counter, clock, checkpoint, timers, saved):
    """Records the curve and saves the checkpoint at each epoch's end.

    `timers` accumulates the seconds spent evaluating and checkpointing, so
    that the training time can be told apart from them; `saved["step"]` is
    the step of the last checkpoint. The curve is written first: a run
    killed between the two resumes from the older checkpoint and drops the
    rows after it.
    """
    import keras

    class Record(keras.callbacks.Callback):
        def on_test_begin(self, logs=None):
            # Wait for the queued train steps first (JAX dispatches them
            # ahead), so that their time is not counted as evaluation.
            keras.ops.convert_to_numpy(self.model.optimizer.iterations)
            self._test_start = time.perf_counter()

        def on_test_end(self, logs=None):
            timers["eval_seconds"] += time.perf_counter() - self._test_start

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            curve.add(
                {
                    "step": step,
                    "train_flops": counter.train_flops,
                    "wall_clock_seconds": clock(),
                    "loss": float(logs.get("loss", float("nan"))),
                    "eval_loss": float(logs.get("val_loss", float("nan"))),
                }
            )
            if checkpoint is None:  # --no-checkpoint
                return
            start = time.perf_counter()
            save_checkpoint(self.model, checkpoint)
            saved["step"] = step
            timers["checkpoint_seconds"] += time.perf_counter() - start

    return Record()


def stage_recorder(starts, plan, counter, clock):
    """Records where each stage of `plan` begins: its training FLOPs and seconds.

    `plan` is `model.stage_plan(strategy, steps)`: each stage's index, first
    step, path length and width. When a stage's first step is about to run,
    its row gets the training FLOPs (`counter`'s, of the steps before it: the
    callback goes before `counter`) and the run's seconds (`clock()`), and
    is added to `starts` (a `report.StageStarts`, written at once). A resumed
    run records the stages that begin from its checkpoint's step on.
    """
    import keras

    first_steps = {row["step"]: row for row in plan}

    class RecordStageStarts(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self._step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))

        def on_train_batch_begin(self, batch, logs=None):
            row = first_steps.get(self._step)
            if row is None:
                return
            # Wait for the queued train steps first (JAX dispatches them
            # ahead), so that the seconds are those of the steps before it.
            keras.ops.convert_to_numpy(self.model.optimizer.iterations)
            starts.add(
                {**row, "train_flops": counter.train_flops, "wall_clock_seconds": clock()}
            )

        def on_train_batch_end(self, batch, logs=None):
            self._step += 1

    return RecordStageStarts()


def stop_on_non_finite_loss(args, strategy, checkpoint, saved):
    """A callback that stops training when a batch's loss is NaN or infinite.

    It raises `LossNotFinite` at the batch's end, before anything else is
    written: the checkpoint, the curve, the summary and the plot stay as
    they were.
    """
    import keras

    class StopOnNonFiniteLoss(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            loss = (logs or {}).get("loss")
            if loss is None or np.isfinite(loss):
                return
            step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            where = f"at optimizer step {step} of {args.steps}"
            if "stage" in logs:
                stage, stages = int(logs["stage"]), len(getattr(strategy, "stages", ()))
                where += (
                    f", in stage {stage} (of 0 to {stages - 1})" if stage < stages
                    else f", after the last stage ({stages - 1}), on the full network"
                )
            directory = os.path.dirname(checkpoint) or "."
            if saved["step"] is not None:
                then = (
                    f"The last checkpoint, {checkpoint}, holds step {saved['step']}: "
                    f"`--resume {directory}` continues from it, with the same batches "
                    "and learning rate."
                )
            elif getattr(args, "checkpoint", True):
                then = "No checkpoint was saved yet: there is nothing to resume."
            else:
                then = "No checkpoint is kept (--no-checkpoint): there is nothing to resume."
            raise LossNotFinite(
                f"the training loss is {loss} {where}: training stopped there and "
                f"nothing was written after it. {then} A new run with a lower "
                f"--learning-rate (this run's: {args.learning_rate}) or another "
                "--seed may avoid it."
            )

    return StopOnNonFiniteLoss()


class StopAfter:
    """Stops training after a number of steps (to test `--resume`)."""

    def __new__(cls, steps):
        import keras

        class StopAfter(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
                if step >= steps:
                    self.model.stop_training = True

        return StopAfter()
