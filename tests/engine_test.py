"""The train-step engine: the path as a function of (seed, step), resume, and
the gathered step's compiled structure (no conditional per block)."""

import importlib.util
import os

import keras
import numpy as np
import pytest
from keras import ops

import keras_raptr
from keras_raptr.engine import gather
from keras_raptr.engine import path
from keras_raptr.engine.xp import KERAS
from keras_raptr.engine.xp import NUMPY
from toy_models import BatchLogs
from toy_models import block_weights
from toy_models import changed_blocks
from toy_models import regression_data
from toy_models import residual_mlp

BACKEND = keras.backend.backend()

# Seed 7, 8 blocks, `Stage(4, ...)`, first and last fixed: the paths of steps
# 0 to 7. The same lists on numpy, JAX, TensorFlow and PyTorch.
GOLDEN = {
    "bernoulli": [
        [0, 1, 3, 4, 6, 7], [0, 2, 3, 4, 7], [0, 2, 6, 7], [0, 2, 7],
        [0, 7], [0, 1, 2, 7], [0, 2, 3, 4, 7], [0, 2, 3, 5, 7],
    ],
    "subset": [
        [0, 3, 6, 7], [0, 3, 4, 7], [0, 2, 6, 7], [0, 2, 4, 7],
        [0, 2, 3, 7], [0, 1, 2, 7], [0, 2, 4, 7], [0, 2, 3, 7],
    ],
}


def make_model(num_blocks=8, width=16, seed=7, optimizer=None, **compile_kwargs):
    inner, blocks = residual_mlp(num_blocks, width=width)
    model = keras_raptr.RandomPartModel(inner, blocks=blocks, seed=seed)
    model.compile(
        optimizer=optimizer or keras.optimizers.SGD(0.01), loss="mse", **compile_kwargs
    )
    return model


def on_blocks(mask):
    return [i for i, on in enumerate(np.asarray(mask)) if on]


@pytest.mark.parametrize("sampling", ["bernoulli", "subset"])
def test_paths_are_a_function_of_seed_and_step_on_every_backend(sampling):
    schedule = keras_raptr.StageSchedule([keras_raptr.Stage(4, 100)], sampling=sampling)
    plan = schedule.resolve(8)
    tables = plan.tables()
    tensors = {name: ops.convert_to_tensor(t) for name, t in tables.items()}
    for step, expected in enumerate(GOLDEN[sampling]):
        assert on_blocks(path.host_path(plan, tables, 7, step)) == expected
        in_step = path.draw(plan, tensors, 7, ops.convert_to_tensor(step), KERAS)
        assert on_blocks(ops.convert_to_numpy(in_step)) == expected
    # A training run takes exactly these paths, one step per `fit`.
    model = make_model()
    x, y = regression_data()
    for expected in GOLDEN[sampling][:4]:
        before = block_weights(model)
        model.fit(x, y, batch_size=32, callbacks=[schedule], verbose=0)
        assert changed_blocks(before, block_weights(model)) == expected


def test_uniform_draws_are_uniform_and_independent():
    draws = np.stack([path.uniforms(3, step, 4, NUMPY) for step in range(4000)])
    assert draws.min() >= 0.0 and draws.max() < 1.0
    np.testing.assert_allclose(draws.mean(axis=0), 0.5, atol=0.03)
    correlation = np.corrcoef(draws.T) - np.eye(4)
    assert np.abs(correlation).max() < 0.06
    other_seed = np.stack([path.uniforms(4, step, 4, NUMPY) for step in range(4000)])
    assert abs(np.corrcoef(draws.ravel(), other_seed.ravel())[0, 1]) < 0.05


def test_resumed_run_equals_the_uninterrupted_run(tmp_path):
    # 12 steps straight against 6 steps, save, `load_model`, 6 more: the same
    # paths, so the same losses step for step and the same weights.
    x, y = regression_data(n=48)

    def schedule():
        return keras_raptr.StageSchedule.from_spec("2-4-6", total_steps=12)

    def fit(model, logs):
        model.fit(
            x, y, batch_size=8, epochs=1, shuffle=False, callbacks=[schedule(), logs],
            verbose=0,
        )

    straight, straight_logs = make_model(optimizer=keras.optimizers.Adam(0.01)), BatchLogs()
    fit(straight, BatchLogs())
    fit(straight, straight_logs)

    first = make_model(optimizer=keras.optimizers.Adam(0.01))
    fit(first, BatchLogs())
    file = os.path.join(tmp_path, "half.keras")
    first.save(file)
    resumed, resumed_logs = keras.saving.load_model(file), BatchLogs()
    fit(resumed, resumed_logs)

    assert [b["stage"] for b in resumed_logs.batches] == [1, 1, 2, 2, 2, 2]
    for a, b in zip(straight_logs.batches, resumed_logs.batches):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    for a, b in zip(straight.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_a_seed_drawn_at_construction_is_saved():
    inner, blocks = residual_mlp(2)
    model = keras_raptr.RandomPartModel(inner, blocks=blocks)
    assert isinstance(model.seed, int)
    assert model.get_config()["seed"] == model.seed


def test_train_function_per_path_length():
    # The host knows each step's path, so it picks the gathered step for its
    # length `k` (JAX, TensorFlow); PyTorch computes the path on the host.
    model = make_model()
    schedule = keras_raptr.StageSchedule([keras_raptr.Stage(4, 100)])
    x, y = regression_data()
    variants = []
    for _ in range(4):
        model.fit(x, y, batch_size=32, callbacks=[schedule], verbose=0)
        variants.append(model._steps.variant)
    if BACKEND == "torch":
        assert variants == [("host",)] * 4
    else:
        lengths = [len(p) for p in GOLDEN["bernoulli"][:4]]
        assert variants == [("gather", k) for k in lengths]


def test_blocks_of_different_structures_fall_back_to_conditionals():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,))
    x = keras.layers.Dense(16)(inputs)
    from toy_models import ResidualBlock

    blocks = [ResidualBlock(16, dropout=0.1 * (i == 2), name=f"b{i}") for i in range(4)]
    for block in blocks:
        x = block(x)
    inner = keras.Model(inputs, keras.layers.Dense(1)(x))
    model = keras_raptr.RandomPartModel(inner, blocks=blocks, seed=0)
    model.compile(optimizer="sgd", loss="mse")
    schedule = keras_raptr.StageSchedule([keras_raptr.Stage(3, 10)], sampling="subset")
    before = block_weights(model)
    model.fit(*regression_data(), batch_size=32, callbacks=[schedule], verbose=0)
    assert len(changed_blocks(before, block_weights(model))) == 3
    if BACKEND != "torch":
        assert model._steps.variant == ("drawn",)
        reason = gather.layout(model)[1]
        assert "block 2 ('b2') differs in structure from block 0" in reason


def test_gathered_step_equals_the_conditional_step(monkeypatch):
    # Same paths through both engines: the same weights and Adam state after
    # four steps with weight decay, dropout off.
    if BACKEND == "torch":
        pytest.skip("PyTorch runs the host path, not the gathered step")

    def run():
        model = make_model(optimizer=keras.optimizers.AdamW(0.01, weight_decay=0.1))
        schedule = keras_raptr.StageSchedule([keras_raptr.Stage(4, 100)])
        model.fit(*regression_data(), batch_size=8, callbacks=[schedule], verbose=0)
        return model

    gathered = run()
    assert gathered._steps.variant[0] == "gather"
    monkeypatch.setattr(gather, "unsupported_reason", lambda model: "forced")
    conditional = run()
    assert conditional._steps.variant == ("drawn",)
    for a, b in zip(gathered.get_weights(), conditional.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(gathered.optimizer.variables, conditional.optimizer.variables):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-6)


def test_reading_the_model_mid_epoch_changes_nothing():
    # On JAX a `fit` threads the blocks' state stacked between gathered steps
    # and puts it back in Keras' form when a callback reads the model. Read
    # at every step, across gathered stages and the full stage that follows
    # (each with its own form): the same losses and weights as no reading.
    x, y = regression_data(n=48)

    class Read(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            self.model.get_weights()

    def run(*callbacks):
        model = make_model(4, optimizer=keras.optimizers.Adam(0.01))
        logs = BatchLogs()
        schedule = keras_raptr.StageSchedule.from_spec(
            "1-2-4", total_steps=4, fixed_blocks=(), sampling="subset"
        )
        model.fit(
            x, y, batch_size=8, shuffle=False, verbose=0,
            callbacks=[schedule, logs, *callbacks],
        )
        return model, [b["loss"] for b in logs.batches]

    quiet, quiet_losses = run()
    read, read_losses = run(Read())
    assert read_losses == pytest.approx(quiet_losses, rel=1e-6)
    for a, b in zip(quiet.get_weights(), read.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    if BACKEND == "jax":
        assert set(read.compiled_train_steps) == {"k=1", "k=2", "full"}


# ----------------------------------------------------------------------
# What the optimizer does to the blocks off the path (`off_path_update`).

ENGINES = {
    # A stage of the fixed blocks only: a path known when tracing.
    "static": ({}, ("static",)),
    # A drawn path of one length: the gathered step (JAX: on the stacked
    # state), PyTorch's host path.
    "drawn": ({}, ("gather", 3)),
    # JAX without `jit_compile`: the gathered step on Keras' own state.
    "unpacked": ({"jit_compile": False}, ("gather", 3)),
    # One conditional per block.
    "conditional": ({}, ("drawn",)),
}


def _adam_state(model):
    """Per block, `(weights, momentums, velocities)` as numpy arrays."""
    optimizer = model.optimizer

    def slots(variables, which):
        return [np.array(which[optimizer._get_variable_index(v)]) for v in variables]

    return [
        (
            [np.array(v) for v in skip.block.trainable_variables],
            slots(skip.block.trainable_variables, optimizer._momentums),
            slots(skip.block.trainable_variables, optimizer._velocities),
        )
        for skip in model.blocks
    ]


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("off_path_update", ["skip", "zero_grad"])
def test_off_path_blocks_get_what_the_option_says(engine, off_path_update, monkeypatch):
    # One full step gives every block Adam moments; then one step on a path.
    # "skip": an off-path block's weights and moments stay exactly as they
    # were. "zero_grad": AdamW's update with a zero gradient: the moments
    # decay by beta_1 and beta_2, the weights decay and move along the old
    # momentum. On-path blocks move in both.
    compile_kwargs, variant = ENGINES[engine]
    if BACKEND == "torch" and engine != "static":
        if engine != "drawn":
            pytest.skip("PyTorch runs the host path only")
        variant = ("host",)
    if engine == "unpacked" and BACKEND != "jax":
        pytest.skip("the stacked state is JAX's")
    if engine == "conditional":
        monkeypatch.setattr(gather, "unsupported_reason", lambda model: "forced")
    lr, decay = 0.05, 0.1
    optimizer = keras.optimizers.AdamW(lr, weight_decay=decay)
    model = make_model(4, optimizer=optimizer, **compile_kwargs)
    x, y = regression_data()
    model.fit(x, y, batch_size=32, verbose=0)
    before = _adam_state(model)
    length, sampling = (2, "bernoulli") if engine == "static" else (3, "subset")
    schedule = keras_raptr.StageSchedule(
        [keras_raptr.Stage(length, 10)], sampling=sampling, off_path_update=off_path_update
    )
    on = on_blocks(path.host_path(schedule.resolve(4), schedule.resolve(4).tables(), 7, 1))
    model.fit(x, y, batch_size=32, callbacks=[schedule], verbose=0)
    assert model._steps.variant[: len(variant)] == variant
    after = _adam_state(model)
    assert len(on) == length
    t = 2.0  # Adam's step count at the second step
    alpha = lr * np.sqrt(1 - optimizer.beta_2**t) / (1 - optimizer.beta_1**t)
    for i, ((w0, m0, v0), (w1, m1, v1)) in enumerate(zip(before, after)):
        if i in on:
            assert all(not np.allclose(a, b) for a, b in zip(w0, w1)), i
            continue
        for a0, a1, mo0, mo1, ve0, ve1 in zip(w0, w1, m0, m1, v0, v1):
            if off_path_update == "skip":
                for old, new in ((a0, a1), (mo0, mo1), (ve0, ve1)):
                    np.testing.assert_array_equal(old, new)
                continue
            m, v = optimizer.beta_1 * mo0, optimizer.beta_2 * ve0
            expected = a0 * (1 - lr * decay) - alpha * m / (np.sqrt(v) + optimizer.epsilon)
            np.testing.assert_allclose(mo1, m, rtol=1e-5, atol=1e-9)
            np.testing.assert_allclose(ve1, v, rtol=1e-5, atol=1e-12)
            np.testing.assert_allclose(a1, expected, rtol=1e-5, atol=1e-6)
            assert not np.allclose(a0, a1)


# ----------------------------------------------------------------------
# The compiled step: conditionals, dot products and XLA's FLOPs against a
# plain model of the path's length. Any machine can run these; a wall-clock
# benchmark on a CPU would hide a GPU's fixed cost per conditional.


def _compiled_step(model, x, y, variant=None):
    """The optimized HLO text and XLA cost of one train step of `model`."""
    text, cost = _benchmark("compiled_step").compiled(model, x, y, variant)
    return text, cost.get("flops")


def _arguments(text):
    return _benchmark("compiled_step").arguments(text)


def _benchmark(name):
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def compiled_counts():
    """Conditionals, dots and FLOPs for drawn paths of 4 and 8 blocks."""
    if BACKEND == "torch":
        pytest.skip("PyTorch runs eagerly: there is no compiled step to count")
    x, y = regression_data(n=256)
    counts = {}
    for num_blocks, k in ((4, 2), (8, 4)):
        model = make_model(num_blocks, width=64, optimizer=keras.optimizers.Adam(0.01))
        # A drawn stage (not the static fixed-only path), traced for length k.
        schedule = keras_raptr.StageSchedule([keras_raptr.Stage(k + 0.5, 100)])
        model.fit(x, y, batch_size=256, callbacks=[schedule], verbose=0)
        assert model._steps.layout() is not None
        counts[num_blocks, k, "gather"] = _compiled_step(model, x, y, ("gather", k))
        counts[num_blocks, k, "fallback"] = _compiled_step(model, x, y, ("drawn",))
        plain, _ = residual_mlp(k, width=64)
        plain.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        plain.fit(x, y, batch_size=256, verbose=0)
        counts[num_blocks, k, "plain"] = _compiled_step(plain, x, y)
    return counts


@pytest.mark.parametrize("num_blocks, k", [(4, 2), (8, 4)])
def test_drawn_path_compiles_like_a_plain_model_of_its_length(compiled_counts, num_blocks, k):
    text, flops = compiled_counts[num_blocks, k, "gather"]
    plain_text, plain_flops = compiled_counts[num_blocks, k, "plain"]
    assert text.count("conditional(") == 0
    # Every on-path block runs once, forward and backward: as many matrix
    # products as the plain k-block model (a block multiplied by zero, or
    # recomputed, would add its own).
    assert text.count(" dot(") == plain_text.count(" dot(")
    if flops is not None:
        assert flops <= 1.05 * plain_flops, (flops, plain_flops)
    if BACKEND == "jax":
        # The blocks' state goes in stacked, one array per variable role:
        # no more arrays than the plain k-block model takes, whatever the
        # number of blocks off the path (one array per variable per block
        # would make 4 or 8 blocks' worth).
        assert _arguments(text) <= _arguments(plain_text)


def test_the_fallback_has_conditionals_that_grow_with_the_blocks(compiled_counts):
    # The contrast that shows the count above can fail: the per-block
    # conditional engine, on the same models.
    four = compiled_counts[4, 2, "fallback"][0].count("conditional(")
    eight = compiled_counts[8, 4, "fallback"][0].count("conditional(")
    assert 0 < four < eight


def test_a_plain_models_blocks_share_their_kernels(compiled_counts):
    # What `compiled_step.py`'s distinct-kernel count rests on: twice the
    # blocks make more fused computations, but no new distinct kernel.
    kernels = _benchmark("compiled_step").kernels
    two = kernels(compiled_counts[4, 2, "plain"][0])
    four = kernels(compiled_counts[8, 4, "plain"][0])
    assert four[0] > two[0]
    assert four[1] == two[1]
