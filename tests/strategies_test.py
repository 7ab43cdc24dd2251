"""The peers of RaPTr: progressive layer dropping and stochastic depth."""

import keras
import numpy as np
import pytest

import keras_raptr
from toy_models import BatchLogs
from toy_models import block_weights
from toy_models import changed_blocks
from toy_models import regression_data
from toy_models import residual_mlp


def make_model(num_blocks=6, seed=0, lr=0.01):
    inner, blocks = residual_mlp(num_blocks)
    model = keras_raptr.RandomPartModel(inner, blocks=blocks, seed=seed)
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    return model


def test_pld_keep_probabilities_at_known_steps():
    pld = keras_raptr.ProgressiveLayerDrop(theta_bar=0.5, gamma=0.01)
    np.testing.assert_allclose(pld.keep_probabilities_at(0, 4), [1, 1, 1, 1])
    theta = 0.5 * np.exp(-0.01 * 100) + 0.5
    np.testing.assert_allclose(
        pld.keep_probabilities_at(100, 4),
        [1 - (i / 4) * (1 - theta) for i in range(1, 5)],
    )
    # Far out, block i keeps with 1 - (i / L) / 2.
    np.testing.assert_allclose(
        pld.keep_probabilities_at(10**6, 4), [0.875, 0.75, 0.625, 0.5], atol=1e-9
    )


def test_pld_logs_the_expected_path_length_of_each_step():
    model = make_model()
    pld = keras_raptr.ProgressiveLayerDrop(theta_bar=0.5, gamma=0.2)
    logs = BatchLogs()
    x, y = regression_data(n=8 * 10)
    model.fit(x, y, batch_size=8, epochs=1, callbacks=[pld, logs], verbose=0)
    logged = [float(l["path_length"]) for l in logs.batches]
    expected = [pld.path_length_at(step, 6) for step in range(10)]
    np.testing.assert_allclose(logged, expected, rtol=1e-5)
    assert "stage" not in logs.batches[0]


@pytest.mark.parametrize(
    "distribution, expected",
    [("uniform", [0.5] * 4), ("linear", [0.875, 0.75, 0.625, 0.5])],
)
def test_stochastic_depth_keep_probabilities(distribution, expected):
    sd = keras_raptr.StochasticDepth(0.5, distribution=distribution)
    np.testing.assert_allclose(sd.keep_probabilities_at(0, 4), expected)
    np.testing.assert_allclose(sd.keep_probabilities_at(999, 4), expected)
    assert sd.compute_fraction(4) == pytest.approx(np.mean(expected))


def test_stochastic_depth_trains_each_block_about_as_often_as_its_keep_prob():
    # A small step: with residual updates scaled by 1 / 0.5, a large one
    # diverges, and NaN weights compare as changed.
    model = make_model(num_blocks=4, lr=1e-4)
    sd = keras_raptr.StochasticDepth(0.5)
    data = regression_data(n=8)
    counts = np.zeros(4)
    steps = 40
    for _ in range(steps):
        before = block_weights(model)
        model.fit(*data, batch_size=8, epochs=1, callbacks=[sd], verbose=0)
        counts[changed_blocks(before, block_weights(model))] += 1
    assert all(np.isfinite(w).all() for block in block_weights(model) for w in block)
    # Each block is on with probability 1/2: 40 draws land in [8, 32] with
    # probability above 0.9999.
    assert np.all(counts >= 8) and np.all(counts <= 32), counts


def test_compute_fractions_match_raptr():
    raptr = keras_raptr.StageSchedule.from_spec("6-8-10-12", total_steps=10_000)
    assert raptr.compute_fraction(12) == 0.75
    for distribution in ("uniform", "linear"):
        sd = keras_raptr.StochasticDepth.from_compute_fraction(
            0.75, num_blocks=12, distribution=distribution
        )
        assert sd.compute_fraction(12) == pytest.approx(0.75)
    pld = keras_raptr.ProgressiveLayerDrop.from_compute_fraction(
        0.75, num_blocks=12, total_steps=10_000
    )
    assert pld.compute_fraction(12, total_steps=10_000) == pytest.approx(0.75)
    # The host-side expected path lengths average to the same fraction.
    mean = np.mean([pld.path_length_at(t, 12) for t in range(10_000)]) / 12
    assert mean == pytest.approx(0.75, abs=1e-6)


def test_config_round_trips():
    for strategy in (
        keras_raptr.ProgressiveLayerDrop(theta_bar=0.3, gamma=0.01),
        keras_raptr.StochasticDepth(0.8, distribution="linear"),
        keras_raptr.StochasticDepth(0.8, off_path_update="zero_grad"),
        keras_raptr.GradualStacking.from_spec("2-4", 10, off_path_update="zero_grad"),
        keras_raptr.StageSchedule.from_spec("2-4", 10, off_path_update="zero_grad"),
    ):
        clone = type(strategy).from_config(strategy.get_config())
        assert clone.get_config() == strategy.get_config()
        assert repr(clone) == repr(strategy)
        # The option reaches the plan, and with it the compiled steps' key.
        assert clone.resolve(4).off_path_update == strategy.off_path_update


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: keras_raptr.ProgressiveLayerDrop(theta_bar=1.5), "`theta_bar` must be a number in \\[0, 1\\], got 1.5"),
        (
            lambda: keras_raptr.ProgressiveLayerDrop(gamma=-1),
            "`gamma` must be a number >= 0 and finite as a float32 \\(at most .*\\), got -1",
        ),
        (lambda: keras_raptr.StochasticDepth(0), "`keep_prob` must be a number in \\(0, 1\\], got 0"),
        (lambda: keras_raptr.StochasticDepth(0.5, distribution="cubic"), "`distribution` must be one of \\('uniform', 'linear'\\), got 'cubic'"),
        (lambda: keras_raptr.StochasticDepth.from_compute_fraction(0.2, 12, "linear"), "cannot reach a compute fraction of 0.2 on 12 blocks"),
        (lambda: keras_raptr.ProgressiveLayerDrop.from_compute_fraction(0.5, 12, total_steps=100), "cannot reach a compute fraction of 0.5 on 12 blocks over 100 steps"),
        (lambda: keras_raptr.StochasticDepth.from_compute_fraction(1.5, 12), "`fraction` must be a number in \\(0, 1\\], got 1.5"),
        (lambda: keras_raptr.StageSchedule.from_spec("2-4", 10, off_path_update="zero"), "`off_path_update` must be one of \\('skip', 'zero_grad'\\), got 'zero'"),
        (lambda: keras_raptr.ProgressiveLayerDrop(off_path_update=None), "`off_path_update` must be one of .*, got None"),
        (lambda: keras_raptr.GradualStacking.from_spec("2-4", 10, off_path_update="mask"), "got 'mask'"),
    ],
)
def test_bad_parameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


NAN = float("nan")
INF = float("inf")
PLD = keras_raptr.ProgressiveLayerDrop
SD = keras_raptr.StochasticDepth
GS = keras_raptr.GradualStacking


# Nothing here builds a Keras object: no Keras state to clear.
@pytest.mark.keras_free
class TestBadInputsOnTheHost:
    """Hostile inputs to the peers of RaPTr, refused before `fit`."""

    @pytest.mark.parametrize(
        "make, match",
        [
            (lambda: PLD(theta_bar=NAN), "`theta_bar` must be a number in \\[0, 1\\], got nan"),
            (lambda: PLD(theta_bar=-0.1), "got -0.1"),
            (lambda: PLD(theta_bar=True), "got True"),
            (lambda: PLD(theta_bar="0.5"), "got '0.5'"),
            (
                lambda: PLD(gamma=NAN),
                "`gamma` must be a number >= 0 and finite as a float32.*got nan",
            ),
            (lambda: PLD(gamma=INF), "got inf"),
            (lambda: PLD(gamma=1e300), "got 1e\\+300"),
            (lambda: PLD(gamma=False), "got False"),
            (
                lambda: PLD().compute_fraction(12, 0),
                "`total_steps` must be at least 1, got total_steps=0",
            ),
            (lambda: PLD().compute_fraction(12, -3), "got total_steps=-3"),
            (
                lambda: PLD().compute_fraction(12, 2.5),
                "`total_steps` must be an integer number of optimizer steps, got total_steps=2.5",
            ),
            (lambda: PLD().compute_fraction(12, 2**31), "`total_steps` must be at most 2147483647"),
            (
                lambda: PLD().compute_fraction(0, 100),
                "`num_blocks` must be a positive integer.*got num_blocks=0",
            ),
            (
                lambda: PLD().keep_probabilities_at(-1, 4),
                "`step` must be an optimizer step, an integer >= 0, got step=-1",
            ),
            (lambda: PLD().theta_at(0.5), "got step=0.5"),
            (
                lambda: PLD.from_compute_fraction(NAN, 12, 100),
                "`fraction` must be a number in \\(0, 1\\], got nan",
            ),
            (lambda: PLD.from_compute_fraction(0.8, 12, 0), "got total_steps=0"),
            (
                lambda: PLD.from_compute_fraction(0.8, 12, 100, gamma=NAN),
                "`gamma` must be .*got nan",
            ),
            (
                lambda: PLD.from_compute_fraction(0.8, 12, 100, gamma=0),
                "cannot reach a compute fraction of 0.8 on 12 blocks over 100 steps with gamma=0: "
                "it ranges from 1.000",
            ),
            (lambda: PLD.from_compute_fraction(0.8, 0, 100), "got num_blocks=0"),
            (lambda: SD(NAN), "`keep_prob` must be a number in \\(0, 1\\], got nan"),
            (lambda: SD(-0.5), "got -0.5"),
            (lambda: SD(True), "got True"),
            (lambda: SD(1.5), "got 1.5"),
            (
                lambda: SD.from_compute_fraction(NAN, 12),
                "`fraction` must be a number in \\(0, 1\\], got nan",
            ),
            (lambda: SD.from_compute_fraction(0.0, 12), "got 0.0"),
            (lambda: SD.from_compute_fraction(0.8, 0), "got num_blocks=0"),
            (lambda: SD.from_compute_fraction(0.8, 2.5, "linear"), "got num_blocks=2.5"),
            (lambda: SD.from_compute_fraction(0.8, 12, "cubic"), "`distribution` must be one of"),
            (lambda: SD(0.5).compute_fraction(0), "got num_blocks=0"),
            (lambda: SD(0.5).keep_probabilities_at(0, -1), "got num_blocks=-1"),
            (lambda: SD(0.5).keep_probabilities_at(-1, 4), "got step=-1"),
            (lambda: GS.from_spec("2-4", total_steps=0), "got total_steps=0"),
            (lambda: GS.from_spec("2-4", total_steps=2**31), "at most 2147483647"),
            (lambda: GS.from_spec("2-4", total_steps=4.0), "got total_steps=4.0"),
            (lambda: GS.from_spec("2--4", total_steps=4), "stage 1 is empty"),
            (
                lambda: GS.from_spec("4-2", total_steps=4),
                "depths must grow from stage to stage; stage 1 has 2 after 4",
            ),
            (lambda: GS.from_spec("2-2", total_steps=4), "stage 1 has 2 after 2"),
            (lambda: GS.from_spec("0.5-2", total_steps=4), "Stage 0 has depth 0.5"),
            (
                lambda: GS([keras_raptr.Stage(2, 2**30), keras_raptr.Stage(4, 2**30)]),
                "more than 2147483647",
            ),
            (lambda: GS([keras_raptr.Stage(2, 2)]).depth_at(-1, 4), "got step=-1"),
            (lambda: GS([keras_raptr.Stage(2, 2)]).compute_fraction(0), "got num_blocks=0"),
            (
                lambda: GS([keras_raptr.Stage(2, 2)]).compute_fraction(1),
                "stacks 2 blocks, more than the model's 1",
            ),
        ],
    )
    def test_refused(self, make, match):
        with pytest.raises(ValueError, match=match):
            make()

    @pytest.mark.parametrize(
        "theta_bar, gamma, num_blocks, total_steps",
        [(0.0, 1.0, 2, 2), (0.0, 1e-6, 2, 2), (1.0, 0.5, 12, 100)],
    )
    def test_pld_reaches_the_ends_of_its_own_range(
        self, theta_bar, gamma, num_blocks, total_steps
    ):
        # The fraction PLD reports at theta_bar 0 (or 1) solves back to it,
        # not to a theta_bar an ulp outside [0, 1] and an error.
        fraction = PLD(theta_bar, gamma).compute_fraction(num_blocks, total_steps)
        again = PLD.from_compute_fraction(fraction, num_blocks, total_steps, gamma=gamma)
        assert again.theta_bar == pytest.approx(theta_bar, abs=1e-6)

    def test_accepted_edge_values(self):
        # numpy numbers, gamma 0 or tiny, the largest step count.
        pld = PLD(theta_bar=np.float32(0.5), gamma=np.float64(1e-20))
        assert pld.compute_fraction(12, 100) == pytest.approx(1.0)
        assert PLD(gamma=0).compute_fraction(12, 2**31 - 1) == 1.0
        assert PLD.from_compute_fraction(1.0, 12, 100, gamma=0).theta_bar == 1.0
        assert 0.5 < PLD(gamma=1e30).compute_fraction(12, 100) < 0.8
        assert SD(np.float32(0.5)).keep_prob == 0.5
        assert SD(1).keep_probabilities_at(np.int64(5), 2) == [1.0, 1.0]
        assert GS.from_spec("2-4", total_steps=2**31 - 1).total_steps == 2**31 - 1


@pytest.fixture(scope="module")
def flops_model():
    """One model for the FLOPs checks: they only read its weights' shapes."""
    return make_model()


# Builds nothing: the module's model serves every case.
@pytest.mark.keras_free
class TestEstimateTrainFlopsBadSteps:
    @pytest.mark.parametrize(
        "kwargs, match",
        [
            (dict(steps=-1), "`steps` must be at least 0, got steps=-1"),
            (
                dict(steps=2.5),
                "`steps` must be an integer number of optimizer steps, got steps=2.5",
            ),
            (dict(steps=10.0), "got steps=10.0"),
            (dict(steps=True), "got steps=True"),
            (
                dict(steps=2**31),
                "`steps` must be at most 2147483647 \\(2\\*\\*31 - 1\\), got steps=2147483648",
            ),
            (
                dict(steps=10, strategy=keras_raptr.StageSchedule.from_spec("2-8", 10)),
                "more than the model's 6 blocks",
            ),
        ],
    )
    def test_refused(self, flops_model, kwargs, match):
        with pytest.raises(ValueError, match=match):
            keras_raptr.estimate_train_flops(flops_model, batch_size=2, **kwargs)


def test_estimate_train_flops_of_the_longest_run_is_computed_in_closed_form(flops_model):
    model = flops_model
    per_step = keras_raptr.train_flops_per_step(model, batch_size=2)
    blocks = sum(per_step["blocks"])
    steps = 2**31 - 1
    for strategy, fraction in [
        (None, 1.0),
        (keras_raptr.StochasticDepth(0.5), 0.5),
        (keras_raptr.ProgressiveLayerDrop(theta_bar=0.0, gamma=1.0), 1 - 7 / 12),
        (keras_raptr.StageSchedule([keras_raptr.Stage(3, steps)], fixed_blocks=()), 0.5),
        (keras_raptr.GradualStacking([keras_raptr.Stage(3, steps)]), 0.5),
    ]:
        total = keras_raptr.estimate_train_flops(
            model, batch_size=2, strategy=strategy, steps=steps
        )
        expected = steps * (per_step["other"] + fraction * blocks)
        assert total == pytest.approx(expected, rel=1e-6), strategy


def test_two_strategies_in_one_fit_is_an_error():
    model = make_model()
    with pytest.raises(ValueError, match="2 path strategies \\(StochasticDepth, StageSchedule\\); pass one"):
        model.fit(
            *regression_data(),
            epochs=1,
            verbose=0,
            callbacks=[
                keras_raptr.StochasticDepth(0.5),
                keras_raptr.StageSchedule.from_spec("2-4", total_steps=4),
            ],
        )


def test_strategy_on_a_plain_model_is_an_error():
    inner, _ = residual_mlp(4)
    inner.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="`ProgressiveLayerDrop` trains a `keras_raptr.RandomPartModel`"):
        inner.fit(
            *regression_data(), epochs=1, verbose=0,
            callbacks=[keras_raptr.ProgressiveLayerDrop()],
        )


# ----------------------------------------------------------------------
# Gradual stacking.


def test_stacking_depths_and_compute_fraction():
    stacking = keras_raptr.GradualStacking.from_spec("6-9-12", total_steps=3000)
    assert stacking.compute_fraction(12) == 0.75
    assert [stacking.depth_at(t, 12) for t in (0, 999, 1000, 1999, 2000, 5000)] == [
        6, 6, 9, 9, 12, 12
    ]


class WeightsAtBatchBegin(keras.callbacks.Callback):
    """Snapshots block weights and optimizer slots when a step begins."""

    def __init__(self, step):
        super().__init__()
        self.step = step
        self.weights = None
        self.slots = None

    def on_train_batch_begin(self, batch, logs=None):
        model = self.model
        if int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == self.step:
            self.weights = block_weights(model)
            self.slots = {
                v.path: np.array(keras.ops.convert_to_numpy(v))
                for v in model.optimizer.variables
            }


def test_stacking_trains_the_prefix_alone_then_copies_the_top_blocks():
    inner, blocks = residual_mlp(4)
    model = keras_raptr.RandomPartModel(inner, blocks=blocks, seed=0)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss="mse")
    stacking = keras_raptr.GradualStacking(
        [keras_raptr.Stage(2, 3), keras_raptr.Stage(4, 3)]
    )
    data = regression_data(n=8)
    before = block_weights(model)
    model.fit(*data, batch_size=8, epochs=1, callbacks=[stacking], verbose=0)
    # Stage 0: only the prefix of 2 blocks trains.
    assert changed_blocks(before, block_weights(model)) == [0, 1]
    logs = BatchLogs()
    probe = WeightsAtBatchBegin(step=3)
    model.fit(
        *data, batch_size=8, epochs=3, callbacks=[stacking, probe, logs], verbose=0
    )
    assert [float(l["path_length"]) for l in logs.batches] == [2, 2, 4]
    assert [int(l["stage"]) for l in logs.batches] == [0, 0, 1]
    # At the transition (before step 3 runs), blocks 2 and 3 are copies of
    # blocks 0 and 1, with their momentum.
    for source, target in ((0, 2), (1, 3)):
        for a, b in zip(probe.weights[source], probe.weights[target]):
            np.testing.assert_array_equal(a, b)
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(
            _slot(probe.slots, 0, name), _slot(probe.slots, 2, name)
        )
    # Step 3 trained all four blocks.
    after = block_weights(model)
    assert changed_blocks(probe.weights, after) == [0, 1, 2, 3]


def _slot(slots, block, name):
    found = [
        value
        for path, value in slots.items()
        if f"/block_{block}_" in path and path.endswith(f"_{name}_momentum")
    ]
    assert len(found) == 1, sorted(slots)
    return found[0]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: keras_raptr.GradualStacking([keras_raptr.Stage(4, 2), keras_raptr.Stage(3, 2)]), "depths must grow from stage to stage; stage 1 has 3 after 4"),
        (lambda: keras_raptr.GradualStacking([keras_raptr.Stage(2.5, 2)]), "Stage 0 has depth 2.5: stacking trains a whole number of blocks"),
        (lambda: keras_raptr.GradualStacking([]), "`stages` is empty"),
        (lambda: keras_raptr.GradualStacking.from_spec("6-9-12", total_steps=30).compute_fraction(8), "stacks 12 blocks, more than the model's 8"),
    ],
)
def test_bad_stacking(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_stacking_needs_one_step_per_execution():
    if keras.backend.backend() == "torch":
        pytest.skip("PyTorch runs one step per execution")
    model = make_model(num_blocks=4)
    model.compile(optimizer="sgd", loss="mse", steps_per_execution=2)
    stacking = keras_raptr.GradualStacking.from_spec("2-4", total_steps=4)
    with pytest.raises(ValueError, match="needs `steps_per_execution=1`"):
        model.fit(*regression_data(), epochs=1, verbose=0, callbacks=[stacking])


def test_stacking_blocks_of_different_shapes_is_an_error():
    inputs = keras.Input((8,))
    x = keras.layers.Dense(8)(inputs)
    blocks = [
        keras.layers.Dense(8, name="narrow"),
        keras.layers.Dense(8, use_bias=False, name="other"),
    ]
    x = blocks[0](x)
    x = blocks[1](x)
    inner = keras.Model(inputs, keras.layers.Dense(1)(x))
    model = keras_raptr.RandomPartModel(inner, blocks=blocks)
    model.compile(optimizer="sgd", loss="mse")
    stacking = keras_raptr.GradualStacking([keras_raptr.Stage(1, 1), keras_raptr.Stage(2, 1)])
    x_data, y_data = regression_data(n=8)
    with pytest.raises(ValueError, match="copies block 'narrow' into 'other'"):
        model.fit(x_data, y_data, batch_size=4, epochs=1, verbose=0, callbacks=[stacking])
    # Checked when `fit` begins, not at the transition: no step ran.
    assert int(model.optimizer.iterations) == 0


def test_stacking_resumed_from_a_saved_model_stacks_at_the_boundary(tmp_path):
    model = make_model(num_blocks=4)
    stacking = keras_raptr.GradualStacking(
        [keras_raptr.Stage(2, 3), keras_raptr.Stage(4, 3)]
    )
    data = regression_data(n=8)  # one step an epoch
    model.fit(*data, batch_size=8, epochs=2, callbacks=[stacking], verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    probe = WeightsAtBatchBegin(step=3)
    logs = BatchLogs()
    restored.fit(
        *data, batch_size=8, epochs=3, callbacks=[stacking, probe, logs], verbose=0
    )
    # Steps 2, 3 and 4: the transition at step 3 happens in the resumed run.
    assert [int(l["stage"]) for l in logs.batches] == [0, 1, 1]
    for source, target in ((0, 2), (1, 3)):
        for a, b in zip(probe.weights[source], probe.weights[target]):
            np.testing.assert_array_equal(a, b)


def test_the_former_package_name_imports_the_same_strategies():
    import keras_raptr.callbacks

    for name in keras_raptr.callbacks.__all__:
        assert getattr(keras_raptr.callbacks, name) is getattr(keras_raptr, name)
