"""Training FLOPs of a `RandomPartModel`, per block and under a strategy.

An estimate from the weights, the usual `6 N D` rule (Kaplan et al. 2020):
a step on `D` tokens costs 6 FLOPs per token for each weight that multiplies
activations (2 forward, 4 backward), plus `12 s d` per token for each
attention layer over sequences of length `s` with `d` = heads x head size
(the score and value products, forward and backward). Counted:

- every weight with two or more dimensions (kernels of dense, einsum,
  convolution and attention projections);
- keras-hub `ReversibleEmbedding` tables as a tied output projection at every
  token (exact for a causal LM; an overestimate for a masked LM, whose head
  runs on the masked positions only).

Not counted: embedding lookups, biases, normalisation and other elementwise
work, and the loop step's copies (memory traffic, no FLOPs). The loop step
(JAX and TensorFlow) and PyTorch run each on-path block once forward and
once backward, which is what is counted: `tests/engine_test.py` holds XLA's
FLOPs of the loop step, credited with the path's blocks (XLA counts a
loop's body once), within 1.05x of a plain model of the path's length. Only
the conditional step on JAX (models that fail the loop step's checks) does
more than counted: it recomputes each drawn on-path block's forward pass in
the backward pass (`engine/conditional.py`). A width-wise stage
(`Stage(width=w)`) counts `w` of each on-path block: its matrix products
shrink with the kept heads and units (`tests/width_test.py` holds XLA's
FLOPs of a half-width step within 1.05x a plain model built at half width),
while its layer norms and residuals, not counted here, do not. The estimate
is what strategies are compared on, not a measurement.
"""

import numbers

import keras

from keras_raptr import schedules
from keras_raptr.models.random_part_model import RandomPartModel
from keras_raptr.strategies import progressive_layer_drop
from keras_raptr.strategies.gradual_stacking import GradualStacking
from keras_raptr.strategies.path_strategy import PathStrategy
from keras_raptr.strategies.progressive_layer_drop import ProgressiveLayerDrop
from keras_raptr.strategies.stage_schedule import StageSchedule
from keras_raptr.strategies.stochastic_depth import StochasticDepth


def train_flops_per_step(model, batch_size, sequence_length=None):
    """FLOPs of one training step of the full network, split by block.

    Args:
        model: a built `keras_raptr.RandomPartModel`.
        batch_size: int, sequences (or samples) per step.
        sequence_length: optional int, tokens per sequence (`None`: the
            model's inputs are not sequences; attention is not counted).

    Returns:
        dict: `blocks` (list of FLOPs per block, in depth order), `other`
        (everything outside the blocks: embeddings, heads), `total`.

    Example:

    ```python
    import keras
    import keras_raptr

    inputs = keras.Input((8,))
    blocks = [keras.layers.Dense(8) for _ in range(3)]
    x = inputs
    for block in blocks:
        x = block(x)
    model = keras_raptr.RandomPartModel(keras.Model(inputs, x), blocks=blocks)
    flops = keras_raptr.train_flops_per_step(model, batch_size=4)
    assert flops["blocks"] == [6 * 64 * 4] * 3
    ```
    """
    tokens = _check_sizes(batch_size, sequence_length)
    seen = set()
    blocks = []
    for skip in model.blocks:
        blocks.append(_layer_flops(skip.block, tokens, sequence_length, seen))
    other = _layer_flops(model.inner, tokens, sequence_length, seen)
    return {"blocks": blocks, "other": other, "total": other + sum(blocks)}


def expected_step_flops(flops, strategy, step):
    """Expected FLOPs of optimizer step `step` under `strategy` (`None`: full)."""
    if strategy is None:
        return flops["total"]
    keep = strategy.keep_probabilities_at(step, len(flops["blocks"]))
    # Width-wise stages run that fraction of each block's heads and units.
    width = strategy.width_at(step) if hasattr(strategy, "width_at") else 1.0
    return flops["other"] + width * sum(k * f for k, f in zip(keep, flops["blocks"]))


def expected_run_flops(flops, strategy, steps):
    """Expected FLOPs of steps `0 .. steps - 1` under `strategy` (`None`: full).

    The sum of `expected_step_flops` over the steps, in closed form for the
    strategies of this library (their keep probabilities are constant over
    each stage, or, for PLD, a geometric sum), step by step for others.
    """
    num_blocks = len(flops["blocks"])
    if strategy is None:
        return float(steps * flops["total"])
    kept = _kept_steps(strategy, num_blocks, steps)
    return float(
        steps * flops["other"] + sum(k * f for k, f in zip(kept, flops["blocks"]))
    )


def _kept_steps(strategy, num_blocks, steps):
    """Per block, the sum of its keep probabilities over steps `0 .. steps - 1`."""
    if steps == 0:
        return [0.0] * num_blocks
    if isinstance(strategy, (StageSchedule, GradualStacking)):
        kept = [0.0] * num_blocks
        begin = 0
        for end in schedules.stage_boundaries(strategy.stages) + [steps]:
            end = min(end, steps)
            if end > begin:
                keep = strategy.keep_probabilities_at(begin, num_blocks)
                width = strategy.width_at(begin) if hasattr(strategy, "width_at") else 1.0
                kept = [total + (end - begin) * width * k for total, k in zip(kept, keep)]
                begin = end
        return kept
    if isinstance(strategy, StochasticDepth):
        return [steps * k for k in strategy.keep_probabilities_at(0, num_blocks)]
    if isinstance(strategy, ProgressiveLayerDrop):
        # keep_i(t) = 1 - (i / L)(1 - theta_bar)(1 - e^(-gamma t)).
        decay = steps * progressive_layer_drop.mean_decay(strategy.gamma, steps)
        dropped = (1.0 - strategy.theta_bar) * (steps - decay)
        return [steps - (i / num_blocks) * dropped for i in range(1, num_blocks + 1)]
    kept = [0.0] * num_blocks
    for step in range(steps):
        keep = strategy.keep_probabilities_at(step, num_blocks)
        kept = [total + k for total, k in zip(kept, keep)]
    return kept


def estimate_train_flops(
    model, batch_size, sequence_length=None, strategy=None, steps=None
):
    """Expected training FLOPs of `steps` optimizer steps under `strategy`.

    Args:
        model: a built `keras_raptr.RandomPartModel`.
        batch_size, sequence_length: as for `train_flops_per_step`.
        strategy: a `StageSchedule`, `ProgressiveLayerDrop`,
            `StochasticDepth` or `GradualStacking`, or `None` (the full
            network at every step).
        steps: int, steps from step 0, from 0 to `2**31 - 1`; defaults
            to the strategy's `total_steps`. Computed in closed form for
            the strategies of this library, step by step for others.

    Returns:
        float, FLOPs (blocks, embeddings and heads).

    Raises:
        ValueError: for a `strategy` that is not a strategy, a missing,
            negative, non-integer or too large `steps`, or a strategy that
            does not fit the model's blocks.
    """
    if strategy is not None and not isinstance(strategy, PathStrategy):
        raise ValueError(
            "`strategy` must be a keras-raptr strategy (StageSchedule, "
            "ProgressiveLayerDrop, StochasticDepth, GradualStacking) or None, "
            f"got {strategy!r}."
        )
    if steps is None:
        steps = getattr(strategy, "total_steps", None)
        if steps is None:
            raise ValueError(
                "Pass `steps=`: the strategy has no `total_steps` of its own."
            )
    steps = schedules.check_steps(steps, "steps", minimum=0)
    flops = train_flops_per_step(model, batch_size, sequence_length)
    if strategy is not None:
        strategy.resolve(len(flops["blocks"]))
    return expected_run_flops(flops, strategy, steps)


class TrainFlops(keras.callbacks.Callback):
    """Logs the cumulative expected training FLOPs as `train_flops`.

    Each epoch log (and so `History`) gets `train_flops`: the expected FLOPs
    of every optimizer step so far, from step 0 (a resumed run counts the
    steps before it), under the model's strategy in this `fit` (blocks on the
    path weighted by their keep probability), plus embeddings and heads. The
    running total is `callback.train_flops`. It is computed on the host from
    the step count: it adds no work to the train step.

    Args:
        batch_size: int, sequences (or samples) per step.
        sequence_length: optional int, tokens per sequence.

    Example:

    ```python
    import keras
    import numpy as np
    import keras_raptr

    inputs = keras.Input((8,))
    blocks = [keras.layers.Dense(8) for _ in range(4)]
    x = inputs
    for block in blocks:
        x = block(x)
    model = keras_raptr.RandomPartModel(keras.Model(inputs, x), blocks=blocks)
    model.compile(optimizer="sgd", loss="mse")
    schedule = keras_raptr.StageSchedule.from_spec("2-4", total_steps=8)
    history = model.fit(
        np.ones((32, 8)), np.ones((32, 8)), batch_size=8, epochs=2, verbose=0,
        callbacks=[schedule, keras_raptr.TrainFlops(batch_size=8)],
    )
    history.history["train_flops"]   # cumulative, per epoch
    ```
    """

    def __init__(self, batch_size, sequence_length=None):
        super().__init__()
        _check_sizes(batch_size, sequence_length)
        self.batch_size = batch_size
        self.sequence_length = sequence_length
        self.train_flops = 0.0
        self._flops = None
        self._step = 0

    def on_train_begin(self, logs=None):
        model = self.model
        if not isinstance(model, RandomPartModel):
            raise ValueError(
                "`TrainFlops` counts the FLOPs of a `keras_raptr.RandomPartModel`, "
                f"got {type(model).__name__} '{model.name}'."
            )
        self._flops = train_flops_per_step(
            model, self.batch_size, self.sequence_length
        )
        self._strategy = model.strategy
        self._step = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
        self.train_flops = expected_run_flops(self._flops, self._strategy, self._step)

    def on_train_batch_begin(self, batch, logs=None):
        steps = max(1, int(getattr(self._model, "steps_per_execution", 1) or 1))
        for _ in range(steps):
            self.train_flops += expected_step_flops(
                self._flops, self._strategy, self._step
            )
            self._step += 1

    def on_epoch_end(self, epoch, logs=None):
        # The counter is exact at an epoch's end (the last execution of an
        # epoch may be shorter than `steps_per_execution`).
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        while self._step > step:
            self._step -= 1
            self.train_flops -= expected_step_flops(
                self._flops, self._strategy, self._step
            )
        if logs is not None:
            logs["train_flops"] = self.train_flops

    def get_config(self):
        return {"batch_size": self.batch_size, "sequence_length": self.sequence_length}


def _check_sizes(batch_size, sequence_length):
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, numbers.Integral)
        or batch_size < 1
    ):
        raise ValueError(f"`batch_size` must be an integer >= 1, got {batch_size!r}.")
    if sequence_length is not None and (
        isinstance(sequence_length, bool)
        or not isinstance(sequence_length, numbers.Integral)
        or sequence_length < 1
    ):
        raise ValueError(
            f"`sequence_length` must be an integer >= 1 or None, got {sequence_length!r}."
        )
    return int(batch_size) * int(sequence_length or 1)


def _layer_flops(layer, tokens, sequence_length, seen):
    """FLOPs of the weights and attention of `layer` not yet in `seen`."""
    total = 0
    for sub in layer._flatten_layers(include_self=True, recursive=True):
        if id(sub) in seen:
            continue
        seen.add(id(sub))
        total += _attention_flops(sub, tokens, sequence_length)
        embedding = type(sub).__name__ == "ReversibleEmbedding"
        for weight in sub._trainable_variables + sub._non_trainable_variables:
            if not weight.trainable or len(weight.shape) < 2:
                continue
            if isinstance(sub, keras.layers.Embedding) and not embedding:
                continue
            size = 1
            for dim in weight.shape:
                size *= int(dim)
            total += 6 * size * tokens
    return total


def _attention_flops(layer, tokens, sequence_length):
    if sequence_length is None:
        return 0
    heads = getattr(layer, "num_heads", None) or getattr(layer, "num_query_heads", None)
    size = getattr(layer, "key_dim", None) or getattr(layer, "head_dim", None)
    if not isinstance(heads, int) or not isinstance(size, int):
        return 0
    return 12 * sequence_length * heads * size * tokens
