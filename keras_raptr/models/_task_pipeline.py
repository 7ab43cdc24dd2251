"""What a `RandomPartModel` keeps of the keras-hub task it wraps.

`RandomPartModel(task)` (or any subclass of it) around a keras-hub (or
keras-nlp) task also behaves like the task, so that wrapping it changes how
it trains and nothing else:

- `fit`, `evaluate` and `predict` run the task's preprocessor on raw inputs
  (strings, for a text task), as `task.fit` would. A task without a
  preprocessor (`task.preprocessor = None`) takes arrays as a plain Keras
  model does: Keras batches them itself, with no `tf.data` or `grain`
  pipeline, so that it trains without TensorFlow installed.
- `compile()` with no arguments uses the task's defaults (optimizer, loss,
  weighted metrics; for a causal LM also its sampler). The model is compiled
  with them on construction, like a keras-hub task.
- `generate()` (causal LMs) and `save_to_preset()` are the task's own: they
  run the full network, and the preset is an ordinary keras-hub preset.

The preprocessing reuses keras-hub's own dataset helpers (the ones its
`PipelineModel` uses), so inputs are batched and preprocessed exactly as
`task.fit` does. The model holds a `TaskPipeline` rather than inheriting
`PipelineModel`: keras-hub rewrites that class's bases at run time for its
functional tasks.

This module imports keras-hub, so `RandomPartModel` imports it only once a
task is wrapped (keras-hub is then already imported).
"""

import keras
from keras_hub.src.utils import pipeline_model


class TaskPipeline:
    """The task's preprocessing and compile defaults, for the model around it."""

    def __init__(self, task):
        self.task = task

    @property
    def preprocessor(self):
        return getattr(self.task, "preprocessor", None)

    def plain(self, x):
        """Whether `x` goes to Keras as it is: no preprocessor, not a dataset."""
        return self.preprocessor is None and not _is_dataset(x)

    def preprocessed(self, x, y=None, sample_weight=None, batch_size=None):
        """`(x, y, sample_weight)` as one preprocessed, batched dataset."""
        if _is_dataset(x):
            return pipeline_model._apply_preprocessing(x, self.task.preprocess_samples)
        return pipeline_model._build_dataset(
            x, y, sample_weight, batch_size, self.task.preprocess_samples
        )

    def fit_arguments(self, arguments):
        """`keras.Model.fit`'s bound arguments, with the inputs preprocessed."""
        arguments = dict(arguments)
        x = arguments.get("x")
        if self.plain(x):
            return arguments
        y = arguments.pop("y", None)
        sample_weight = arguments.pop("sample_weight", None)
        batch_size = arguments.pop("batch_size", None)
        validation_split = arguments.pop("validation_split", None)
        validation_data = arguments.get("validation_data")
        if validation_split and validation_data is None:
            (x, y, sample_weight), validation_data = pipeline_model._train_validation_split(
                (x, y, sample_weight), validation_split=validation_split
            )
        arguments["x"] = self.preprocessed(x, y, sample_weight, batch_size)
        if validation_data is not None:
            arguments["validation_data"] = self.preprocessed(
                *keras.utils.unpack_x_y_sample_weight(validation_data),
                batch_size=batch_size,
            )
        return arguments

    def eval_arguments(self, arguments):
        """`evaluate`'s or `predict`'s bound arguments, inputs preprocessed."""
        arguments = dict(arguments)
        if arguments.get("_use_cached_eval_dataset") or self.plain(arguments.get("x")):
            return arguments
        arguments["x"] = self.preprocessed(
            arguments.get("x"),
            arguments.pop("y", None),
            arguments.pop("sample_weight", None),
            arguments.pop("batch_size", None),
        )
        return arguments

    def compile_arguments(self, *args, **kwargs):
        """Compiles the task; returns what it resolved its defaults to.

        The task is compiled with the same arguments, so that its
        `generate()` uses the same sampler; the model compiles with the
        task's optimizer, loss and metrics objects.
        """
        self.task.compile(*args, **kwargs)
        return dict(self.task._compile_config.config)


def _is_dataset(x):
    """Whether `x` is a `tf.data` or `grain` dataset (preprocessed per sample)."""
    return pipeline_model._is_tf_dataset(x) or pipeline_model._is_grain_dataset(x)
