"""`RandomPartModel`: a Keras model that trains a random path of its blocks."""

import inspect
import random

import keras
import numpy as np

from keras_raptr.engine.steps import Steps
from keras_raptr.layers.random_skip import RandomSkip
from keras_raptr.layers.random_skip import check_functional_shapes
from keras_raptr.layers.random_skip import wrapper_of
from keras_raptr.models import _presets
from keras_raptr.strategies.path_strategy import PathStrategy


@keras.saving.register_keras_serializable(package="keras_raptr")
class RandomPartModel(keras.Model):
    """A model whose residual blocks train on a random path (RaPTr).

    `RandomPartModel` wraps a model with residual blocks (a keras-hub backbone
    or task, a Functional model, any layer) and makes each block skippable by
    wrapping it in a `keras_raptr.layers.RandomSkip`. The wrapped model and the
    `RandomPartModel` share every weight.

    During `fit` with a `keras_raptr.StageSchedule` callback (or another
    `PathStrategy`), each optimizer step trains one random path (the same for
    the whole batch); blocks off the path cost no compute. The path is a pure
    function of `seed` and the optimizer step, so a resumed run trains the
    same paths as an uninterrupted one, on every backend. Without a schedule,
    and always in `evaluate`, `predict` and `model(x)`, the full network runs:
    the output equals `model.inner(x)`.

    On JAX and TensorFlow one compiled train step serves every path, stage
    and strategy (`compiled_train_steps` lists it as `"loop"`): the path's
    length is data inside the step, and a loop runs the path's blocks
    (`keras_raptr/engine/loop_jax.py`, `loop_tf.py`). It requires blocks of
    one structure, called in one chain of a Functional model (a keras-hub
    backbone is one) with the same arguments; other models train the same
    paths through one conditional per block, with a warning, and
    `engine_reason` says why. PyTorch runs each step's path eagerly.

    Args:
        model: `keras.Model` or `keras.layers.Layer`. The model to wrap.
        blocks: optional list of the model's residual block layers, in depth
            order. `None` calls `find_blocks(model)`, which finds keras-hub
            transformer blocks (`model.transformer_layers`, or the task's
            `model.backbone.transformer_layers`) and `RandomSkip` layers the
            model already holds.
        seed: optional int. The path of every step is a function of this
            seed and the step: with the same seed (and the same data and
            initial weights) a run trains the same sequence of paths, on any
            backend and across a save and load. `None` draws a seed here
            (from Python's `random`, which `keras.utils.set_random_seed`
            seeds); the config keeps it.
        **kwargs: base model keyword arguments, such as `name`.

    Attributes:
        inner: the wrapped model. Save or export it to get a plain model.
        blocks: list of the `RandomSkip` layers, in depth order.
        strategy: the strategy (`StageSchedule`, ...) of the last `fit`, or
            `None`. (`schedule` is another name for it, kept.)

    Example:

    ```python
    import keras
    import numpy as np
    import keras_raptr

    def residual_block(width, name):
        inputs = keras.Input((width,))
        x = keras.layers.Dense(width, activation="relu")(inputs)
        return keras.Model(inputs, keras.layers.Add()([inputs, x]), name=name)

    def build():
        inputs = keras.Input((16,))
        x = keras.layers.Dense(32)(inputs)
        blocks = [residual_block(32, f"block_{i}") for i in range(4)]
        for block in blocks:
            x = block(x)
        outputs = keras.layers.Dense(1)(x)
        return keras.Model(inputs, outputs), blocks

    inner, blocks = build()
    model = keras_raptr.RandomPartModel(inner, blocks=blocks, seed=0)
    model.compile(optimizer="adam", loss="mse")
    schedule = keras_raptr.StageSchedule.from_spec("2-3-4", total_steps=30)
    x, y = np.random.rand(64, 16), np.random.rand(64, 1)
    model.fit(x, y, batch_size=8, epochs=4, callbacks=[schedule], verbose=0)
    ```

    Around a keras-hub task (or keras-nlp), the model also behaves like the
    task: `fit`, `evaluate` and `predict` take raw inputs through the task's
    preprocessor, `compile()` with no arguments (done on construction) uses
    the task's defaults, and `generate()`, `preprocessor`, `backbone` and
    `save_to_preset()` are the task's. A subclass of `RandomPartModel` keeps
    all of it.

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
    model = keras_raptr.RandomPartModel(task, seed=0)  # compiled as the task is
    schedule = keras_raptr.StageSchedule.from_spec("2-4", total_steps=4)
    model.fit(["the quick brown fox"] * 8, batch_size=4, epochs=2,
              callbacks=[schedule], verbose=0)
    ```

    Subclassing: to make `RandomPartModel(model)` find the blocks of your own
    architecture, override `find_blocks`:

    ```python
    class MyRandomPartModel(keras_raptr.RandomPartModel):
        def find_blocks(self, model):
            return [layer for layer in model.layers if "block" in layer.name]

    model = MyRandomPartModel(build()[0], seed=0)
    ```

    Register the subclass with `keras.saving.register_keras_serializable` to
    save and load it as a `.keras` file.

    Reference:
        Panigrahi et al., "Efficient Stagewise Pretraining via Progressive
        Subnetworks", ICLR 2025 (arXiv 2402.05913).
    """

    def __init__(self, model, blocks=None, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(model, keras.layers.Layer):
            raise ValueError(
                "`RandomPartModel` wraps a `keras.Model` or `keras.layers.Layer`, "
                f"got {model!r} of type {type(model).__name__}."
            )
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
        ):
            raise ValueError(f"`seed` must be an integer or None, got {seed!r}.")
        self.inner = model
        # The path of every step is a function of this seed and the step; a
        # seed drawn here is kept in the config, so that a saved model resumes
        # with the same paths.
        self.seed = random.randint(0, 2**31 - 1) if seed is None else int(seed)
        found = self.find_blocks(model) if blocks is None else blocks
        wrapped, given = self._wrap_blocks(model, found)
        # Not tracked as sub-layers: the blocks (and their weights) belong to
        # `inner` already, and the `RandomSkip` layers have no weights of
        # their own. Tracking them would make every walk of the layer tree
        # (Keras does several per PyTorch train step) visit each block twice.
        object.__setattr__(self, "blocks", wrapped)
        # Names of the blocks as given (`None`: found by `find_blocks`), for
        # `get_config`.
        self._block_names = None if blocks is None else [b.name for b in given]
        # The strategy (`StageSchedule`, ...) of the last `fit` (`None`: train
        # the full network), and the train-step variants (plain attributes,
        # outside Keras and torch tracking).
        self._strategy = None
        object.__setattr__(self, "_steps", Steps(self))
        # Set while a gated train step is traced (JAX, TensorFlow) or run
        # (PyTorch): the per-block `(on, scale)` gates of the step's path.
        object.__setattr__(self, "_gates", None)
        self._train_function_key = None
        if getattr(model, "built", False):
            self.built = True
        # Around a keras-hub task: its preprocessing and compile defaults
        # (`models/_task_pipeline.py`); `None` for any other model.
        task = None
        if _presets.is_keras_hub_task(model):
            from keras_raptr.models._task_pipeline import TaskPipeline

            task = TaskPipeline(model)
        object.__setattr__(self, "_task", task)
        if task is not None:
            # Like a keras-hub task: ready to `fit` with the task's defaults.
            self.compile()

    @classmethod
    def from_preset(
        cls, preset, task=None, load_weights=True, blocks=None, seed=None, **kwargs
    ):
        """Loads a keras-hub preset and wraps its transformer blocks.

        Args:
            preset: str. A keras-hub preset name (`"bert_base_en_uncased"`), a
                handle (`"kaggle://..."`, `"hf://..."`), or a local preset
                directory (as written by `save_to_preset`).
            task: optional keras-hub task class (`keras_hub.models.GPT2CausalLM`,
                or a `keras_nlp.models` one) or its name (`"GPT2CausalLM"`).
                `None` loads the backbone alone.
            load_weights: bool. `False` builds the model from the preset's
                config with freshly initialized weights.
            blocks: optional list of blocks, as for `RandomPartModel`.
            seed: optional int, as for `RandomPartModel`.
            **kwargs: passed to keras-hub's `from_preset` (for example
                `preprocessor=None`, `dtype=`, or a task's
                `sequence_length=`).

        Returns:
            A `RandomPartModel` (of the class `from_preset` is called on);
            around a task, it keeps the task's preprocessing, compile
            defaults, `generate()` and `save_to_preset()`.

        Raises:
            FileNotFoundError: a local preset directory that does not exist.
            OSError: a preset that is not on this machine and could not be
                downloaded.
            ValueError: an unknown preset or task name (the message lists the
                valid task names), or a model whose blocks cannot be found.

        Example (offline, from a preset saved locally):

        ```python
        import keras_hub
        import keras_raptr

        backbone = keras_hub.models.GPT2Backbone(
            vocabulary_size=16, num_layers=4, num_heads=2, hidden_dim=8,
            intermediate_dim=16, max_sequence_length=8,
        )
        backbone.save_to_preset("./tiny_gpt2")
        model = keras_raptr.RandomPartModel.from_preset("./tiny_gpt2", seed=0)
        assert len(model.blocks) == 4
        ```
        """
        keras_hub = _presets.import_keras_hub()
        task_cls = _presets.resolve_task(keras_hub, task)
        model = _presets.load(keras_hub, preset, task_cls, load_weights, kwargs)
        return cls(model, blocks=blocks, seed=seed)

    def save_to_preset(self, preset_dir, **kwargs):
        """Saves the wrapped keras-hub model as a plain keras-hub preset.

        The same as `model.inner.save_to_preset(preset_dir)`: the preset holds
        the trained weights and loads with keras-hub alone, as an ordinary
        model (keras-raptr is not needed to load it).
        """
        save = getattr(self.inner, "save_to_preset", None)
        if save is None:
            raise ValueError(
                f"The wrapped model {type(self.inner).__name__} '{self.inner.name}' "
                "is not a keras-hub backbone or task, so it has no preset "
                "format. Save it with `model.inner.save(path)` instead."
            )
        return save(preset_dir, **kwargs)

    def find_blocks(self, model):
        """Returns the residual blocks of `model`, in depth order.

        Called when `blocks=None`. Override it in a subclass to support your
        own architecture. The default finds `RandomSkip` layers that `model`
        already holds, and keras-hub transformer blocks:
        `model.transformer_layers`, or `model.backbone.transformer_layers` for
        a task.

        Raises:
            ValueError: if no blocks are found.
        """
        for candidate in (model, getattr(model, "backbone", None)):
            layers = getattr(candidate, "transformer_layers", None)
            if layers:
                return list(layers)
        skips = [
            layer
            for layer in model._flatten_layers(include_self=False, recursive=True)
            if isinstance(layer, RandomSkip)
        ]
        if skips:
            return skips
        raise ValueError(
            f"Could not find the residual blocks of {type(model).__name__} "
            f"'{model.name}': it has no `transformer_layers` (keras-hub "
            "backbones and tasks) and holds no `RandomSkip` layers. Pass them "
            "in depth order, e.g. `RandomPartModel(model, blocks=[...])`, or "
            "subclass `RandomPartModel` and override `find_blocks`."
        )

    def _wrap_blocks(self, model, blocks):
        if isinstance(blocks, (str, bytes)) or not hasattr(blocks, "__iter__"):
            raise ValueError(
                f"`blocks` must be a list of the model's block layers, got {blocks!r}."
            )
        blocks = list(blocks)
        if not blocks:
            raise ValueError(
                f"`blocks` is empty for model '{model.name}': pass the residual "
                "block layers to train on a random path."
            )
        owned = {
            id(layer)
            for layer in model._flatten_layers(include_self=True, recursive=True)
        }
        seen = {}
        for i, block in enumerate(blocks):
            inner = getattr(block, "block", block) if isinstance(block, RandomSkip) else block
            if id(inner) in seen:
                raise ValueError(
                    f"`blocks[{i}]` ('{inner.name}') is `blocks[{seen[id(inner)]}]` "
                    "again: each block is on a path or off it once per step, so "
                    "list each block once, in depth order."
                )
            seen[id(inner)] = i
        wrapped = []
        for i, block in enumerate(blocks):
            if not isinstance(block, keras.layers.Layer):
                raise ValueError(
                    f"`blocks[{i}]` must be a `keras.layers.Layer`, got {block!r}."
                )
            if id(block) not in owned:
                raise ValueError(
                    f"`blocks[{i}]` ('{block.name}') is not a layer of model "
                    f"'{model.name}'. Pass the model's own block layers."
                )
            if not isinstance(block, RandomSkip):
                # A block wrapped before (by another RandomPartModel over the
                # same model) keeps its wrapper.
                block = wrapper_of(block) or RandomSkip(block)
            check_functional_shapes(block)
            wrapped.append(block)
        return wrapped, blocks

    @property
    def compiled_train_steps(self):
        """The train steps compiled so far, and the seconds each took.

        A dict from a variant's name to the wall-clock seconds of its first
        call, which traces and compiles it (and runs its first steps):
        `"loop"` (every path of a strategy), `"full"` (a `fit` without a
        strategy: Keras' own step) and, for models that fail the loop
        step's checks, `"conditional"` (one conditional per block) and
        `"static <on-blocks>"` (a path that is the same at every step of an
        execution: the fixed blocks, a stacking prefix). Empty on PyTorch,
        which runs eagerly.
        """
        return self._steps.compiled_names()

    @property
    def engine_reason(self):
        """Why the last `fit` trained through the conditional step, or `None`.

        On JAX and TensorFlow a drawn path trains through the loop step (one
        compiled step for every path) when the blocks share one structure and
        form one chain of a Functional model (`keras_raptr/engine/blocks.py`);
        otherwise through one conditional per block, which trains the same
        paths to the same weights, more slowly, and this sentence says which
        assumption failed. `None` also on PyTorch, which runs each path
        eagerly, and before any `fit` with a strategy.
        """
        return self._steps.reason

    @property
    def strategy(self):
        """The strategy (`StageSchedule`, ...) of the last `fit`, or `None`."""
        return self._strategy

    @property
    def schedule(self):
        """Another name for `strategy`, kept from earlier versions."""
        return self._strategy

    def call(self, inputs, training=None, **kwargs):
        gates = self._gates
        if not training or gates is None:
            return self.inner(inputs, training=training, **kwargs)
        # Plain attributes, not tracked by Keras: set once per step.
        for skip, gate in zip(self.blocks, gates):
            object.__setattr__(skip, "_gate", gate)
        try:
            return self.inner(inputs, training=training, **kwargs)
        finally:
            for skip in self.blocks:
                object.__setattr__(skip, "_gate", None)

    # ------------------------------------------------------------------
    # Training: the variants and the step itself live in `engine/steps.py`.

    def _prepare_steps(self, start, stop):
        """Picks the train step for optimizer steps `[start, stop)`.

        Called by the strategy before each execution.
        """
        self._steps.prepare(start, stop)

    def train_step(self, *args, **kwargs):
        if self._steps.plan is None:
            return super().train_step(*args, **kwargs)
        return self._steps.train_step(super().train_step, args, kwargs)

    def compute_loss_and_updates(self, *args, **kwargs):
        # JAX: while the loop step traces, on the blocks' stacked state.
        base = super().compute_loss_and_updates
        loop = self._steps.loop
        if loop is not None and getattr(loop, "current", None) is not None:
            return loop.compute_loss_and_updates(base, *args, **kwargs)
        return base(*args, **kwargs)

    def jax_state_sync(self):
        # JAX: a `fit` may hold the blocks' state stacked (`engine/stacked.py`).
        self._steps.unstack_jax_state()
        sync = getattr(super(), "jax_state_sync", None)
        if sync is not None:
            sync()

    def make_train_function(self, force=False):
        key = self._steps.key
        if (
            self.train_function is not None
            and not force
            and key == self._train_function_key
        ):
            return self.train_function

        shardings = None
        if keras.backend.backend() == "jax" and keras.distribution.distribution():
            # Keras reads the state's shardings off the variables when it
            # builds a train function; a variant built mid-`fit` (when Keras
            # has released the variables' values) reuses these.
            shardings = self._get_state_sharding_spec()

        def make_base(step):
            # Keras' own train function around `step` for one variant.
            dispatcher = self.train_function
            object.__setattr__(self, "train_step", step)
            if shardings is not None:
                object.__setattr__(self, "_get_state_sharding_spec", lambda: shardings)
            try:
                super(RandomPartModel, self).make_train_function(force=True)
                return self.train_function
            finally:
                object.__delattr__(self, "train_step")
                if shardings is not None:
                    object.__delattr__(self, "_get_state_sharding_spec")
                self.train_function = dispatcher

        self.train_function = self._steps.train_function(make_base)
        self._train_function_key = key
        return self.train_function

    def fit(self, *args, **kwargs):
        """`keras.Model.fit`; around a keras-hub task, on preprocessed inputs."""
        arguments = _bound(keras.Model.fit, self, args, kwargs)
        if self._task is not None:
            arguments = self._task.fit_arguments(arguments)
        callbacks = arguments.get("callbacks")
        self._attach(_find_strategy(callbacks))
        if keras.backend.backend() == "tensorflow" and self._steps.plan is not None:
            # The loop step keeps the blocks' state in stacks of its own: the
            # blocks' variables take it back whenever they may be read.
            arguments["callbacks"] = [_Release(self, callbacks)] + _as_list(callbacks)
        try:
            return super().fit(**arguments)
        finally:
            self._steps.release()

    def evaluate(self, *args, **kwargs):
        """`keras.Model.evaluate`; around a keras-hub task, on preprocessed inputs."""
        self._steps.release()
        arguments = _bound(keras.Model.evaluate, self, args, kwargs)
        if self._task is not None:
            arguments = self._task.eval_arguments(arguments)
        return super().evaluate(**arguments)

    def predict(self, *args, **kwargs):
        """`keras.Model.predict`; around a keras-hub task, on preprocessed inputs."""
        self._steps.release()
        arguments = _bound(keras.Model.predict, self, args, kwargs)
        if self._task is not None:
            arguments = self._task.eval_arguments(arguments)
        return super().predict(**arguments)

    # ------------------------------------------------------------------
    # Around a keras-hub task: the task's own behaviour.

    @property
    def preprocessor(self):
        """The wrapped task's preprocessor (`None` if it has none, or no task)."""
        return None if self._task is None else self._task.preprocessor

    @property
    def backbone(self):
        """The wrapped task's backbone (`None` if not a keras-hub task)."""
        return None if self._task is None else self.inner.backbone

    def preprocess_samples(self, x, y=None, sample_weight=None):
        """The wrapped task's `preprocess_samples`."""
        if self._task is None:
            raise AttributeError(
                f"{type(self).__name__} '{self.name}' wraps "
                f"{type(self.inner).__name__}, not a keras-hub task: it has no "
                "preprocessing. Pass it preprocessed inputs."
            )
        return self.inner.preprocess_samples(x, y, sample_weight)

    def compile(self, *args, **kwargs):
        """`keras.Model.compile`; around a keras-hub task, with its defaults.

        Around a task it takes the arguments of the task's `compile` (for a
        keras-hub `CausalLM`, `sampler=` too); what is left out, or
        `"auto"`, is the task's default optimizer, loss and metrics. The
        task is compiled with the same arguments, so that its `generate()`
        uses the same sampler.
        """
        if self._task is None:
            return super().compile(*args, **kwargs)
        return super().compile(**self._task.compile_arguments(*args, **kwargs))

    def compile_from_config(self, config):
        # `compile` is overridden, so Keras leaves restoring it to us.
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def generate(self, *args, **kwargs):
        """The wrapped task's `generate()`, on the full network.

        Generation (with or without a cache) never skips a block: the path is
        only drawn inside a training step. Arguments are the task's.
        """
        generate = getattr(self.inner, "generate", None)
        if generate is None:
            raise AttributeError(
                f"The wrapped model {type(self.inner).__name__} has no "
                "`generate()`; only keras-hub causal and seq2seq LMs generate."
            )
        return generate(*args, **kwargs)

    def get_weights(self):
        self._steps.release()
        return super().get_weights()

    def save(self, *args, **kwargs):
        self._steps.release()
        return super().save(*args, **kwargs)

    def save_weights(self, *args, **kwargs):
        self._steps.release()
        return super().save_weights(*args, **kwargs)

    @property
    def trainable_weights(self):
        weights = super().trainable_weights
        loop = self.__dict__.get("_steps") and self._steps.loop
        if loop is not None and getattr(loop, "current", None) is not None:
            # TensorFlow, while the loop step traces: Keras differentiates
            # the blocks' stacks in place of their variables.
            swap = getattr(loop, "trainable_weights", None)
            if swap is not None:
                return swap(weights)
        return weights

    def _attach(self, strategy):
        """Attaches a strategy (or `None`: train the full network)."""
        if strategy is None:
            self._strategy = None
            self._steps.attach(None)
            return
        if keras.backend.backend() == "torch" and getattr(self, "jit_compile", False):
            raise ValueError(
                f"`{type(strategy).__name__}` does not support `jit_compile=True` "
                "on PyTorch: "
                "`torch.compile` would recompile the train step for each new "
                "path. Compile the model with `jit_compile=False`."
            )
        self._steps.attach(strategy.resolve(len(self.blocks)))
        self._strategy = strategy

    # ------------------------------------------------------------------
    # Serialization.

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "model": keras.saving.serialize_keras_object(self.inner),
                "blocks": None if self._block_names is None else list(self._block_names),
                "seed": self.seed,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        model = keras.saving.deserialize_keras_object(config.pop("model"))
        names = config.pop("blocks", None)
        blocks = None
        if names is not None:
            by_name = {}
            for layer in model._flatten_layers(include_self=False, recursive=True):
                by_name.setdefault(layer.name, layer)
            missing = [name for name in names if name not in by_name]
            if missing:
                raise ValueError(
                    f"Could not find the blocks {missing} in the saved model "
                    f"'{model.name}'."
                )
            blocks = [by_name[name] for name in names]
        return cls(model, blocks=blocks, **config)


def _bound(method, model, args, kwargs):
    """`method(model, *args, **kwargs)`'s arguments, by name, as given."""
    arguments = inspect.signature(method).bind(model, *args, **kwargs).arguments
    arguments = dict(arguments)
    arguments.pop("self", None)
    extra = arguments.pop("kwargs", {})
    return {**arguments, **extra}


def _as_list(callbacks):
    if callbacks is None:
        return []
    if isinstance(callbacks, keras.callbacks.CallbackList):
        return list(callbacks.callbacks)
    return list(callbacks)


class _Release(keras.callbacks.Callback):
    """TensorFlow: hands the blocks' state back to their variables.

    First among `fit`'s callbacks: at every epoch's end and when training
    ends, and after every batch when another callback may read the model
    mid-epoch (one with batch hooks, other than Keras' progress bar and
    History and this library's own), the blocks' variables take back the
    state the loop step keeps in its stacks (`engine/loop_tf.py`).
    """

    _QUIET = ("ProgbarLogger", "History", "TrainFlops", "_Release")

    def __init__(self, model, callbacks):
        super().__init__()
        self._target = model
        self._every_batch = any(
            _has_batch_hooks(cb)
            for cb in _as_list(callbacks)
            if type(cb).__name__ not in self._QUIET and not isinstance(cb, PathStrategy)
        )

    def on_train_batch_end(self, batch, logs=None):
        if self._every_batch:
            self._target._steps.release()

    def on_epoch_end(self, epoch, logs=None):
        self._target._steps.release()

    def on_train_end(self, logs=None):
        self._target._steps.release()


def _has_batch_hooks(callback):
    base = keras.callbacks.Callback
    return any(
        getattr(type(callback), name, None) is not getattr(base, name)
        for name in (
            "on_train_batch_begin", "on_train_batch_end", "on_batch_begin", "on_batch_end",
        )
    )


def _find_strategy(callbacks):
    if callbacks is None:
        return None
    if isinstance(callbacks, keras.callbacks.CallbackList):
        callbacks = callbacks.callbacks
    found = [cb for cb in callbacks if isinstance(cb, PathStrategy)]
    if len(found) > 1:
        names = ", ".join(type(cb).__name__ for cb in found)
        raise ValueError(
            f"`fit` got {len(found)} path strategies ({names}); pass one."
        )
    return found[0] if found else None
