"""The run's TensorBoard logs, under `<output-dir>/tensorboard/`.

Keras' `keras.callbacks.TensorBoard` writes them, in TensorBoard's usual
layout (`train/` and `validation/`, one event file each):

- `train/`: every `--tensorboard-every` optimizer steps (10: written at
  every step, the scalars cost about 2 ms each on two CPU cores, 7% of a
  400-step RaPTr run's seconds), the fit logs of the step:
  `batch_loss` (the epoch's running mean, as the progress bar shows it),
  `batch_stage`, `batch_path_length` (and `batch_width` for width-wise
  stages), and what this module adds to them: `batch_learning_rate` (the
  step's learning rate) and `batch_train_flops` (the cumulative training
  FLOPs after the step); at each evaluation, Keras' `epoch_*` summaries,
  whose step is the evaluation's index.
- `validation/`: `evaluation_loss_vs_iterations`, the held-out loss at each
  evaluation, at its optimizer step (the curve's `eval_loss`).

The steps are optimizer steps, counted from the run's start: a resumed run
appends to the same folders from its checkpoint's step on. `tf.summary`
writes the files, so the logs need TensorFlow and the `tensorboard` package
(`scripts/setup.sh` installs both); without them, the run goes on without
logs and says so.
"""

import os


def tensorboard_callback(directory, counter, rate, every=1):
    """The callback writing the run's logs under `directory`, or `None`.

    `counter` is the run's `keras_raptr.TrainFlops` (its running total is
    read at each step's end), `rate` the optimizer's learning rate (a number
    or a `keras.optimizers.schedules.LearningRateSchedule`); the train
    step's scalars are written at every optimizer step that `every` divides.
    """
    import keras

    if not _tensorflow_summaries():
        return None

    class TensorBoard(keras.callbacks.TensorBoard):
        def __init__(self):
            # No graph, histograms or profile: per-step scalars, cheap to
            # write on every backend.
            super().__init__(
                log_dir=directory, update_freq="batch", write_graph=False,
                profile_batch=0,
            )

        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            self._step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            # Keras counts the batches of each `fit` from 0, and logs each at
            # its count: a resumed run continues from its checkpoint's step.
            self._global_train_batch = self._step

        def on_train_batch_end(self, batch, logs=None):
            # The learning rate the step used (a schedule's at the step's
            # count before it ran), computed on the host.
            step, self._step = self._step, self._step + 1
            if self._step % every:
                # Not a step to write: Keras' callback (its graph, profile
                # and steps-per-second off) would only write the scalars.
                # (Its `update_freq=N` would also drop the held-out losses
                # of evaluations whose test-batch count N does not divide.)
                return
            rate_now = rate(step) if callable(rate) else rate
            logs = {
                **(logs or {}),
                "learning_rate": float(keras.ops.convert_to_numpy(rate_now)),
                "train_flops": float(counter.train_flops),
            }
            super().on_train_batch_end(batch, logs)

    return TensorBoard()


def _tensorflow_summaries():
    """Whether `tf.summary` can write the logs (TensorFlow and TensorBoard installed).

    On the JAX and PyTorch backends, TensorFlow is kept off the GPUs, so
    that it does not take their memory from the backend's.
    """
    try:
        import tensorboard  # noqa: F401 (it implements `tf.summary.scalar`)
        import tensorflow as tf
    except ImportError as error:
        print(
            f"tensorboard: no logs written: they need TensorFlow and TensorBoard "
            f"({error}); install them (`pip install tensorflow tensorboard`), or "
            "pass --no-tensorboard"
        )
        return False
    import keras

    if keras.backend.backend() != "tensorflow":
        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:  # TensorFlow already set its devices up
            pass
    return True


def log_directory(output_dir):
    """Where a run in `output_dir` writes its TensorBoard logs."""
    return os.path.join(output_dir, "tensorboard")
