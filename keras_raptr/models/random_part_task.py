"""`RandomPartModel` around a keras-hub task: the task's pipeline, kept.

`keras_raptr.RandomPartModel(task)` returns a `RandomPartTask` when `task` is
a keras-hub (or keras-nlp) task: a `RandomPartModel` that also behaves like
the task, so that wrapping it changes how it trains and nothing else.

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
`task.fit` does. The class does not inherit `PipelineModel`: keras-hub
rewrites that class's bases at run time for its functional tasks.

This module imports keras-hub, so it is only imported once a task is
wrapped (keras-hub is then already imported).
"""

import keras
from keras_hub.src.utils import pipeline_model

from keras_raptr.models.random_part_model import RandomPartModel


class RandomPartTask(RandomPartModel):
    """A `RandomPartModel` around a keras-hub task, with the task's pipeline.

    Not built directly: `keras_raptr.RandomPartModel(task)` and
    `keras_raptr.RandomPartModel.from_preset(preset, task=...)` return one.
    It takes the same arguments as `RandomPartModel`.

    Example:

    ```python
    import keras_hub
    import keras_raptr

    tokenizer = keras_hub.models.BertTokenizer(
        vocabulary=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the",
                    "quick", "brown", "fox"],
    )
    preprocessor = keras_hub.models.BertMaskedLMPreprocessor(
        tokenizer, sequence_length=8, mask_selection_rate=0.5,
    )
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=9, num_layers=4, num_heads=2, hidden_dim=8,
        intermediate_dim=16, max_sequence_length=8,
    )
    task = keras_hub.models.BertMaskedLM(backbone, preprocessor=preprocessor)
    model = keras_raptr.RandomPartModel(task, seed=0)  # a RandomPartTask
    schedule = keras_raptr.StageSchedule.from_spec("2-4", total_steps=4)
    model.fit(["the quick brown fox"] * 8, batch_size=4, epochs=2,
              callbacks=[schedule], verbose=0)
    ```
    """

    def __init__(self, model, blocks=None, seed=None, **kwargs):
        super().__init__(model, blocks=blocks, seed=seed, **kwargs)
        # Like a keras-hub task: ready to `fit` with the task's defaults.
        self.compile()

    @property
    def preprocessor(self):
        """The task's preprocessor (`None` if it has none)."""
        return getattr(self.inner, "preprocessor", None)

    @property
    def backbone(self):
        """The task's backbone."""
        return self.inner.backbone

    def preprocess_samples(self, x, y=None, sample_weight=None):
        return self.inner.preprocess_samples(x, y, sample_weight)

    def fit(
        self,
        x=None,
        y=None,
        batch_size=None,
        sample_weight=None,
        validation_data=None,
        validation_split=None,
        **kwargs,
    ):
        """`keras.Model.fit`, on inputs preprocessed by the task."""
        if self._plain(x):
            return super().fit(
                x=x, y=y, batch_size=batch_size, sample_weight=sample_weight,
                validation_data=validation_data, validation_split=validation_split,
                **kwargs,
            )
        if validation_split and validation_data is None:
            (x, y, sample_weight), validation_data = (
                pipeline_model._train_validation_split(
                    (x, y, sample_weight), validation_split=validation_split
                )
            )
        x = self._preprocessed(x, y, sample_weight, batch_size)
        if validation_data is not None:
            validation_data = self._preprocessed(
                *keras.utils.unpack_x_y_sample_weight(validation_data),
                batch_size=batch_size,
            )
        return super().fit(x=x, validation_data=validation_data, **kwargs)

    def evaluate(self, x=None, y=None, batch_size=None, sample_weight=None, **kwargs):
        """`keras.Model.evaluate`, on inputs preprocessed by the task."""
        if not kwargs.get("_use_cached_eval_dataset", False) and not self._plain(x):
            x = self._preprocessed(x, y, sample_weight, batch_size)
            y = sample_weight = batch_size = None
        return super().evaluate(
            x=x, y=y, batch_size=batch_size, sample_weight=sample_weight, **kwargs
        )

    def predict(self, x=None, batch_size=None, **kwargs):
        """`keras.Model.predict`, on inputs preprocessed by the task."""
        if self._plain(x):
            return super().predict(x=x, batch_size=batch_size, **kwargs)
        x = self._preprocessed(x, None, None, batch_size)
        return super().predict(x=x, **kwargs)

    def _plain(self, x):
        """Whether `x` goes to Keras as it is: no preprocessor, not a dataset."""
        return self.preprocessor is None and not (
            pipeline_model._is_tf_dataset(x) or pipeline_model._is_grain_dataset(x)
        )

    def _preprocessed(self, x, y=None, sample_weight=None, batch_size=None):
        if pipeline_model._is_tf_dataset(x) or pipeline_model._is_grain_dataset(x):
            return pipeline_model._apply_preprocessing(x, self.preprocess_samples)
        return pipeline_model._build_dataset(
            x, y, sample_weight, batch_size, self.preprocess_samples
        )

    def compile(self, *args, **kwargs):
        """Configures training, with the task's defaults.

        Takes the arguments of the wrapped task's `compile` (for a keras-hub
        `CausalLM`, `sampler=` too); what is left out, or `"auto"`, is the
        task's default optimizer, loss and metrics. The task is compiled with
        the same arguments, so that its `generate()` uses the same sampler.
        """
        self.inner.compile(*args, **kwargs)
        # What the task resolved its defaults to (its optimizer, loss and
        # metrics objects), for this model.
        resolved = dict(self.inner._compile_config.config)
        super().compile(**resolved)

    def compile_from_config(self, config):
        # `compile` is overridden, so Keras leaves restoring it to us.
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def generate(self, *args, **kwargs):
        """The task's `generate()`, on the full network.

        Generation (with or without a cache) never skips a block: the path is
        only drawn inside a training step. Arguments are the task's.
        """
        generate = getattr(self.inner, "generate", None)
        if generate is None:
            raise AttributeError(
                f"The wrapped task {type(self.inner).__name__} has no "
                "`generate()`; only keras-hub causal and seq2seq LMs generate."
            )
        return generate(*args, **kwargs)


# Saved under `RandomPartModel`'s registered name: loading calls
# `RandomPartModel.from_config`, which builds a `RandomPartTask` again around
# the task, so a `.keras` file loads without this module imported first.
keras.saving.register_keras_serializable("keras_raptr", "RandomPartModel")(
    RandomPartTask
)
keras.saving.register_keras_serializable("keras_raptr", "RandomPartModel")(
    RandomPartModel
)
