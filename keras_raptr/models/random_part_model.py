"""`RandomPartModel`: a Keras model that trains a random path of its blocks."""

import inspect

import keras
import numpy as np
from keras import ops

from keras_raptr.layers.random_skip import RandomSkip
from keras_raptr.layers.random_skip import wrapper_of
from keras_raptr.models import _presets
from keras_raptr.models._optimizer_gate import skip_off_path_updates


@keras.saving.register_keras_serializable(package="keras_raptr")
class RandomPartModel(keras.Model):
    """A model whose residual blocks train on a random path (RaPTr).

    `RandomPartModel` wraps a model with residual blocks (a keras-hub backbone
    or task, a Functional model, any layer) and makes each block skippable by
    wrapping it in a `keras_raptr.layers.RandomSkip`. The wrapped model and the
    `RandomPartModel` share every weight.

    During `fit` with a `keras_raptr.StageSchedule` callback, each optimizer
    step samples one random path (one per step, the same for the whole batch)
    inside the compiled train step, from a `keras.random.SeedGenerator`;
    blocks off the path cost no compute. The stage, and so the path length, is
    a function of the optimizer's step count, so a resumed run continues in the
    right stage. Without a schedule, and always in `evaluate`, `predict` and
    `model(x)`, the full network runs: the output equals `model.inner(x)`.

    The compiled train step is built on first use once for the steps that
    sample a path, and once per static path (a path the strategy knows to be
    the same at every step of a stage): every block on (the plain network,
    without any conditional), only the fixed blocks, or a stacking prefix.
    The other blocks are left out of a static path's step entirely.

    Args:
        model: `keras.Model` or `keras.layers.Layer`. The model to wrap.
        blocks: optional list of the model's residual block layers, in depth
            order. `None` calls `find_blocks(model)`, which finds keras-hub
            transformer blocks (`model.transformer_layers`, or the task's
            `model.backbone.transformer_layers`) and `RandomSkip` layers the
            model already holds.
        seed: optional int. Seeds the path sampler: with the same seed (and
            the same data and initial weights), a run samples the same
            sequence of paths.
        **kwargs: base model keyword arguments, such as `name`.

    Attributes:
        inner: the wrapped model. Save or export it to get a plain model.
        blocks: list of the `RandomSkip` layers, in depth order.
        schedule: the strategy (`StageSchedule`, ...) of the last `fit`, or
            `None`.

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

    def __new__(cls, model=None, *args, **kwargs):
        if cls is RandomPartModel and _presets.is_keras_hub_task(model):
            # Around a keras-hub task: keep its preprocessing, compile
            # defaults, `generate()` and `save_to_preset()`.
            from keras_raptr.models.random_part_task import RandomPartTask

            cls = RandomPartTask
        return super().__new__(cls, model, *args, **kwargs)

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
        self.seed = None if seed is None else int(seed)
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
        self._path_seed_generator = keras.random.SeedGenerator(
            self.seed, name="path_seed_generator"
        )
        # The strategy (`StageSchedule`, ...) of the last `fit`, and it
        # resolved for this model's blocks (`None`: train the full network).
        self._schedule = None
        self._plan = None
        # The path of the next train step when it is known on the host, set by
        # the strategy: a tuple of bools (block on or off; all on is the
        # plain network), or `None` (drawn in the step).
        object.__setattr__(self, "_static_path", None)
        # Set while a gated train step is traced (JAX, TensorFlow) or run
        # (PyTorch): the per-block `(on, scale)` gates of the step's path.
        object.__setattr__(self, "_gates", None)
        self._train_function_key = None
        if getattr(model, "built", False):
            self.built = True

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
            A `RandomPartModel` (a `RandomPartTask` for a task: it keeps the
            task's preprocessing, compile defaults, `generate()` and
            `save_to_preset()`).

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
            wrapped.append(block)
        if len({id(s.block) for s in wrapped}) != len(wrapped):
            raise ValueError("`blocks` lists the same block more than once.")
        return wrapped, blocks

    @property
    def schedule(self):
        """The strategy (`StageSchedule`, ...) of the last `fit`, or `None`."""
        return self._schedule

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
    # The path, inside the compiled step.

    def _sample_gates(self, step):
        """Per-block gates for the step: one draw for the whole batch.

        Returns, per block, `None` for a fixed block, else `(on, scale)`: a
        scalar boolean tensor (a Python bool on PyTorch) and the residual
        scale (`None` without `scaling="inverse"`).
        """
        tables = self._plan_tensors
        plan = self._plan
        num_blocks = len(self.blocks)
        keep = plan.keep(step, tables)
        fixed = tables["fixed"]
        uniform = keras.random.uniform(
            (num_blocks,), seed=self._path_seed_generator, dtype="float32"
        )
        if plan.sampling == "bernoulli":
            on = ops.logical_or(fixed, ops.less(uniform, keep))
        else:
            # Exactly `count` free blocks: those with the smallest draws.
            count = plan.count(step, tables)
            draws = ops.where(fixed, 2.0, uniform)
            rank = ops.sum(
                ops.cast(ops.less(draws[None, :], draws[:, None]), "int32"), axis=1
            )
            on = ops.logical_or(fixed, ops.less(rank, count))
        scale = None
        if plan.scaling == "inverse":
            scale = ops.divide(1.0, ops.maximum(keep, 1e-6))
        free = [i not in plan.fixed_blocks for i in range(num_blocks)]
        if keras.backend.backend() == "torch":
            # One device-to-host copy per step, not one per block.
            values = ops.stack(
                [ops.cast(on, "float32"), ops.ones_like(keep) if scale is None else scale]
            )
            host = ops.convert_to_numpy(values)
            gates = [
                (bool(host[0, i]), float(host[1, i]) if scale is not None else None)
                for i in range(num_blocks)
            ]
        else:
            gates = [
                (on[i], scale[i] if scale is not None else None)
                for i in range(num_blocks)
            ]
        # A fixed block is always on and never scaled: no gate, no
        # conditional, it runs as in the plain network.
        return [gate if free[i] else None for i, gate in enumerate(gates)]

    # ------------------------------------------------------------------
    # Training.

    def _free_block_variables(self):
        """Per non-fixed block, its trainable variables (cached per schedule)."""
        if self._free_variables is None:
            variables = [
                skip.block.trainable_variables
                for i, skip in enumerate(self.blocks)
                if i not in self._plan.fixed_blocks
            ]
            object.__setattr__(self, "_free_variables", variables)
        return self._free_variables

    def _optimizer_step(self, args):
        iterations = self.optimizer.iterations
        if keras.backend.backend() != "jax":
            # A copy: the optimizer increments the variable in place later in
            # the step.
            return ops.copy(iterations.value)
        # JAX: the live value is in the state passed to the step.
        optimizer_variables = args[0][2]
        for variable, value in zip(self.optimizer.variables, optimizer_variables):
            if variable is iterations:
                return value
        raise RuntimeError(
            "Could not find the optimizer's step counter in the JAX train state."
        )

    def _draw_path(self, step, args, sample=True):
        """Samples the step's gates; on JAX, threads the seed through `args`.

        With `sample=False` the seed only advances (one draw, as a sampled
        step would take), so the sequence of paths does not depend on which
        steps ran a static path.
        """

        def draw():
            if sample:
                return self._sample_gates(step)
            self._path_seed_generator.next()
            return None

        if keras.backend.backend() != "jax":
            return args, draw()
        seed = self._path_seed_generator.state
        (trainable, non_trainable, optimizer_vars, metrics_vars), *rest = args
        non_trainable = list(non_trainable)
        index = next(
            i for i, v in enumerate(self.non_trainable_variables) if v is seed
        )
        with keras.StatelessScope(state_mapping=[(seed, non_trainable[index])]) as scope:
            gates = draw()
            non_trainable[index] = scope.get_current_value(seed)
        state = (trainable, non_trainable, optimizer_vars, metrics_vars)
        return (state, *rest), gates

    def train_step(self, *args, **kwargs):
        if self._plan is None:
            return super().train_step(*args, **kwargs)
        step = self._optimizer_step(args)
        path = self._tracing_variant
        if path is not None and all(path):
            result = super().train_step(*args, **kwargs)
        else:
            if path is not None:
                # A static path: the blocks off it are known when tracing,
                # so they are left out of the step altogether.
                args, _ = self._draw_path(step, args, sample=False)
                fixed = self._plan.fixed_blocks
                gates = [
                    None if i in fixed else (bool(on), None)
                    for i, on in enumerate(path)
                ]
            else:
                # One path per step, drawn before the forward pass so that
                # the optimizer can skip the same blocks.
                args, gates = self._draw_path(step, args)
            object.__setattr__(self, "_gates", gates)
            try:
                with skip_off_path_updates(
                    self.optimizer,
                    self._free_block_variables(),
                    [gate[0] for gate in gates if gate is not None],
                ):
                    result = super().train_step(*args, **kwargs)
            finally:
                object.__setattr__(self, "_gates", None)
        logs = self._plan.logs(step, self._plan_tensors)
        if keras.backend.backend() == "jax":
            result_logs, state = result
            return {**result_logs, **logs}, state
        return {**result, **logs}

    def make_train_function(self, force=False):
        key = None if self._plan is None else self._plan.key
        if (
            self.train_function is not None
            and not force
            and key == self._train_function_key
        ):
            return self.train_function
        # One train function per kind of path: `None` (drawn in the step)
        # or a static path (a tuple of bools: every block for the plain
        # network, or a fixed set), made and compiled on first use.
        variants = {}

        def variant(path):
            if path not in variants:
                # A distinct step function per variant: JAX caches traces by
                # function, and a bound `self.train_step` would be shared.
                def step(*args, **kwargs):
                    object.__setattr__(self, "_tracing_variant", path)
                    return type(self).train_step(self, *args, **kwargs)

                dispatcher = self.train_function
                object.__setattr__(self, "train_step", step)
                try:
                    super(RandomPartModel, self).make_train_function(force=True)
                    variants[path] = self.train_function
                finally:
                    object.__delattr__(self, "train_step")
                    self.train_function = dispatcher
            return variants[path]

        def train_function(*args, **kwargs):
            if self._plan is None:
                path = (True,) * len(self.blocks)
            else:
                path = self._static_path
            function = variant(path)
            # PyTorch looks `train_step` up at each call: tell it the variant.
            object.__setattr__(self, "_tracing_variant", path)
            return function(*args, **kwargs)

        self.train_function = train_function
        self._train_function_key = key
        return train_function

    _tracing_variant = None

    def fit(self, *args, **kwargs):
        bound = inspect.signature(keras.Model.fit).bind(self, *args, **kwargs)
        callbacks = bound.arguments.get("callbacks")
        self._attach(_find_schedule(callbacks))
        return super().fit(*args, **kwargs)

    def _attach(self, schedule):
        """Attaches a strategy (or `None`: train the full network)."""
        if schedule is None:
            self._schedule = None
            self._plan = None
            object.__setattr__(self, "_static_path", None)
            return
        optimizer = getattr(self, "optimizer", None)
        if optimizer is not None and getattr(
            getattr(optimizer, "inner_optimizer", optimizer),
            "gradient_accumulation_steps",
            None,
        ):
            raise ValueError(
                f"`{type(schedule).__name__}` does not support an optimizer with "
                "`gradient_accumulation_steps`: each step draws its own path, "
                "so accumulated micro-batches would train different blocks. "
                "Use a larger batch instead."
            )
        if keras.backend.backend() == "torch" and getattr(self, "jit_compile", False):
            raise ValueError(
                f"`{type(schedule).__name__}` does not support `jit_compile=True` "
                "on PyTorch: "
                "`torch.compile` would recompile the train step for each new "
                "path. Compile the model with `jit_compile=False`."
            )
        self._plan = schedule._resolve(len(self.blocks))
        # Constants of the compiled step, made once, outside any trace.
        # (Plain attributes: Keras must not track these as the model's own.)
        object.__setattr__(
            self,
            "_plan_tensors",
            {
                name: ops.convert_to_tensor(table)
                for name, table in self._plan.tables().items()
            },
        )
        object.__setattr__(self, "_free_variables", None)
        self._schedule = schedule
        object.__setattr__(self, "_static_path", None)

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


def _find_schedule(callbacks):
    from keras_raptr.callbacks._strategy import PathStrategy

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
