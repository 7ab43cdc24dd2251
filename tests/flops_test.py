"""FLOPs accounting: per block, under a strategy, and logged during fit."""

import keras
import numpy as np
import pytest

import keras_raptr
from hub_models import bert_backbone
from toy_models import regression_data
from toy_models import residual_mlp


def make_model(num_blocks=6):
    inner, blocks = residual_mlp(num_blocks)
    model = keras_raptr.RandomPartModel(inner, blocks=blocks, seed=0)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    return model


def test_flops_of_a_residual_mlp():
    model = make_model()
    flops = keras_raptr.train_flops_per_step(model, batch_size=10)
    # Blocks: a 16x16 kernel each; stem 8x16 and head 16x1 kernels; biases
    # are not counted. 6 FLOPs per weight and sample.
    assert flops["blocks"] == [6 * 16 * 16 * 10] * 6
    assert flops["other"] == 6 * (8 * 16 + 16 * 1) * 10
    assert flops["total"] == flops["other"] + sum(flops["blocks"])


def test_flops_of_transformer_blocks_count_attention():
    backbone = bert_backbone(num_layers=2)
    model = keras_raptr.RandomPartModel(backbone)
    without = keras_raptr.train_flops_per_step(model, batch_size=2)
    with_seq = keras_raptr.train_flops_per_step(model, batch_size=2, sequence_length=12)
    # Per token, the weights cost the same; attention adds 12 * s * d.
    tokens = 2 * 12
    attention = 12 * 12 * 8 * tokens
    assert with_seq["blocks"][0] == without["blocks"][0] * 12 + attention
    # Embedding lookups are free; the pooler's dense layer is not.
    assert with_seq["other"] > 0


def test_schedule_flops_match_the_compute_fractions():
    model = make_model(num_blocks=12)
    per_step = keras_raptr.train_flops_per_step(model, batch_size=4)
    block_flops = sum(per_step["blocks"])
    for strategy, fraction in [
        (keras_raptr.StageSchedule.from_spec("6-8-10-12", total_steps=400, fixed_blocks=()), 0.75),
        (keras_raptr.GradualStacking.from_spec("6-9-12", total_steps=300), 0.75),
        (keras_raptr.StochasticDepth(0.5, distribution="linear"), 1 - 0.5 * 13 / 24),
    ]:
        steps = getattr(strategy, "total_steps", 100)
        total = keras_raptr.estimate_train_flops(model, batch_size=4, strategy=strategy, steps=steps)
        expected = steps * (per_step["other"] + fraction * block_flops)
        assert total == pytest.approx(expected), type(strategy).__name__
    full = keras_raptr.estimate_train_flops(model, batch_size=4, steps=10)
    assert full == 10 * per_step["total"]


def test_train_flops_logged_per_epoch_and_continued_on_resume():
    model = make_model()
    schedule = keras_raptr.StageSchedule.from_spec("2-4-6", total_steps=12)
    counter = keras_raptr.TrainFlops(batch_size=8)
    x, y = regression_data(n=32)  # 4 steps an epoch
    history = model.fit(x, y, batch_size=8, epochs=2, callbacks=[schedule, counter], verbose=0)
    per_step = keras_raptr.train_flops_per_step(model, batch_size=8)

    def expected(steps):
        return sum(
            keras_raptr.flops.expected_step_flops(per_step, schedule, t)
            for t in range(steps)
        )

    np.testing.assert_allclose(history.history["train_flops"], [expected(4), expected(8)])
    # A new callback in a later fit starts from the optimizer's step count.
    again = keras_raptr.TrainFlops(batch_size=8)
    history = model.fit(x, y, batch_size=8, epochs=1, callbacks=[schedule, again], verbose=0)
    np.testing.assert_allclose(history.history["train_flops"], [expected(12)])
    assert expected(12) < 12 * per_step["total"]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda m: keras_raptr.train_flops_per_step(m, batch_size=0), "`batch_size` must be an integer >= 1, got 0"),
        (lambda m: keras_raptr.train_flops_per_step(m, batch_size=2, sequence_length=-3), "`sequence_length` must be an integer >= 1 or None, got -3"),
        (lambda m: keras_raptr.estimate_train_flops(m, batch_size=2, strategy="raptr"), "`strategy` must be a keras-raptr strategy"),
        (lambda m: keras_raptr.estimate_train_flops(m, batch_size=2, strategy=keras_raptr.StochasticDepth(0.5)), "Pass `steps=`"),
    ],
)
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make(make_model())


def test_train_flops_on_a_plain_model_is_an_error():
    inner, _ = residual_mlp(2)
    inner.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="`TrainFlops` counts the FLOPs of a `keras_raptr.RandomPartModel`"):
        inner.fit(*regression_data(), epochs=1, verbose=0, callbacks=[keras_raptr.TrainFlops(batch_size=8)])
