"""The train-step engine: the path as a function of (seed, step), one compiled
loop step for every path that trains what the real path trains, the checks
that send other models to the conditional step, and the compiled structure."""

import importlib.util
import os
import warnings

import keras
import numpy as np
import pytest
from keras import ops

import keras_raptr
from keras_raptr.engine import blocks as engine_blocks
from keras_raptr.engine import path
from keras_raptr.engine.xp import KERAS
from keras_raptr.engine.xp import NUMPY
from toy_models import BatchLogs
from toy_models import LoopedModel
from toy_models import ResidualBlock
from toy_models import block_weights
from toy_models import changed_blocks
from toy_models import fixed_weights
from toy_models import head_reads_block
from toy_models import regression_data
from toy_models import residual_mlp

BACKEND = keras.backend.backend()
COMPILED = BACKEND != "torch"

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


def make_model(num_blocks=8, width=16, seed=7, optimizer=None, dropout=0.0, **compile_kwargs):
    inner, blocks = residual_mlp(num_blocks, width=width, dropout=dropout)
    model = keras_raptr.RandomPartModel(inner, blocks=blocks, seed=seed)
    model.compile(
        optimizer=optimizer or keras.optimizers.SGD(0.01), loss="mse", **compile_kwargs
    )
    return model


def on_blocks(mask):
    return [i for i, on in enumerate(np.asarray(mask)) if on]


@pytest.fixture
def conditional(monkeypatch):
    """Sends every model to the conditional step, as if it failed the checks."""
    monkeypatch.setattr(engine_blocks, "check", lambda model: (None, "forced"))


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
    # paths, so the same losses step for step and the same weights; and the
    # resumed run compiles the same one step.
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
    if COMPILED:
        assert list(resumed.compiled_train_steps) == ["loop"]


def test_a_seed_drawn_at_construction_is_saved():
    inner, blocks = residual_mlp(2)
    model = keras_raptr.RandomPartModel(inner, blocks=blocks)
    assert isinstance(model.seed, int)
    assert model.get_config()["seed"] == model.seed


# ----------------------------------------------------------------------
# One compiled step for every path.

STRATEGIES = {
    "bernoulli": lambda: keras_raptr.StageSchedule.from_spec("2-3-5-6", total_steps=16),
    "subset, none fixed": lambda: keras_raptr.StageSchedule.from_spec(
        "1-3-6", total_steps=16, sampling="subset", fixed_blocks=()
    ),
    "pld": lambda: keras_raptr.ProgressiveLayerDrop(gamma=0.2),
    "stochastic depth": lambda: keras_raptr.StochasticDepth(0.5, distribution="linear"),
    "stacking": lambda: keras_raptr.GradualStacking.from_spec("2-4-6", total_steps=16),
}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_one_compiled_step_for_every_path(strategy):
    # Stages of every length (the fixed blocks alone, drawn paths, the full
    # network), the strategies' own paths, two `fit` calls: one train step.
    model = make_model(6, optimizer=keras.optimizers.Adam(0.01))
    x, y = regression_data(n=64)
    schedule = STRATEGIES[strategy]()
    logs = BatchLogs()
    model.fit(x, y, batch_size=8, epochs=1, callbacks=[schedule, logs], verbose=0)
    model.fit(x, y, batch_size=8, epochs=1, callbacks=[schedule, logs], verbose=0)
    lengths = {
        len(path.host_path(model._steps.plan, model._steps.tables, 7, step))
        for step in range(16)
    }
    assert len(lengths) >= 1
    assert model.engine_reason is None
    if COMPILED:
        assert list(model.compiled_train_steps) == ["loop"]
    else:
        assert model.compiled_train_steps == {}


def test_tensorflow_with_and_without_xla_compiles_one_step():
    if BACKEND != "tensorflow":
        pytest.skip("TensorFlow's two compile modes")
    for jit in (True, False):
        model = make_model(6, jit_compile=jit)
        schedule = keras_raptr.StageSchedule.from_spec("2-4-6", total_steps=12)
        model.fit(*regression_data(n=96), batch_size=8, callbacks=[schedule], verbose=0)
        assert list(model.compiled_train_steps) == ["loop"]


# The loop step against the conditional step, which runs each block's own
# call under its own gate: the same paths must give the same weights,
# optimizer state and losses, whatever the options.
LOOP_CASES = {
    "adamw, dropout": (lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1), {}, {}),
    "clipnorm, subset": (
        lambda: keras.optimizers.Adam(0.01, clipnorm=0.5),
        {"sampling": "subset", "fixed_blocks": ()}, {},
    ),
    "global clipnorm, momentum, inverse scaling": (
        lambda: keras.optimizers.SGD(0.01, momentum=0.9, global_clipnorm=1.0),
        {"scaling": "inverse"}, {},
    ),
    "zero_grad": (
        lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1),
        {"off_path_update": "zero_grad"}, {},
    ),
    "gradient accumulation": (
        lambda: keras.optimizers.Adam(0.01, gradient_accumulation_steps=2), {}, {},
    ),
    "loss scale, skipped steps": (
        lambda: keras.optimizers.LossScaleOptimizer(
            keras.optimizers.Adam(0.01), initial_scale=2.0**40
        ),
        {}, {},
    ),
    "steps_per_execution": (lambda: keras.optimizers.Adam(0.01), {}, {"steps_per_execution": 3}),
    "no jit": (lambda: keras.optimizers.Adam(0.01), {}, {"jit_compile": False}),
    "xla": (lambda: keras.optimizers.Adam(0.01), {}, {"jit_compile": True}),
}


@pytest.mark.parametrize("case", list(LOOP_CASES))
def test_the_loop_step_trains_what_each_block_would(case, monkeypatch):
    if not COMPILED:
        pytest.skip("PyTorch runs each block's own call on the host's path")
    make_optimizer, options, compile_kwargs = LOOP_CASES[case]

    def run():
        model = make_model(6, dropout=0.1, optimizer=make_optimizer(), **compile_kwargs)
        schedule = keras_raptr.StageSchedule.from_spec("2-4-6", total_steps=12, **options)
        logs = BatchLogs()
        model.fit(
            *regression_data(n=64), batch_size=8, epochs=2, shuffle=False, verbose=0,
            callbacks=[schedule, logs],
        )
        return model, [b["loss"] for b in logs.batches]

    loop, loop_losses = run()
    assert list(loop.compiled_train_steps) == ["loop"]
    monkeypatch.setattr(engine_blocks, "check", lambda model: (None, "forced"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference, losses = run()
    assert "conditional" in reference.compiled_train_steps
    np.testing.assert_allclose(loop_losses, losses, rtol=1e-5)
    for a, b in zip(loop.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(loop.optimizer.variables, reference.optimizer.variables):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------
# What the loop step assumes, it checks.

# The model: six identical residual blocks whose head also adds block
# 2's output; paths of 3 (subset, none fixed), SGD, one epoch; the same
# weights (from numpy) on every backend. PyTorch runs each path for real;
# these are its numbers, which every backend must reproduce.
HEAD_READS_BLOCK_2 = {"loss": 1.977407, "weights": -6.498022}


def test_a_model_that_is_not_one_chain_trains_its_real_paths():
    keras.utils.set_random_seed(0)
    inner, blocks = head_reads_block(2)
    fixed_weights(inner)
    model = keras_raptr.RandomPartModel(inner, blocks=blocks, seed=3)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    schedule = keras_raptr.StageSchedule(
        [keras_raptr.Stage(3, 100)], sampling="subset", fixed_blocks=()
    )
    x, y = regression_data(n=64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(
            x, y, batch_size=8, shuffle=False, callbacks=[schedule], verbose=0
        )
    total = float(sum(np.sum(w) for block in block_weights(model) for w in block))
    assert history.history["loss"][-1] == pytest.approx(HEAD_READS_BLOCK_2["loss"], rel=1e-4)
    assert total == pytest.approx(HEAD_READS_BLOCK_2["weights"], rel=1e-4)
    if COMPILED:
        assert "block 2's output also feeds 'skip_head'" in model.engine_reason
        warned = [w for w in caught if "block 2's output also feeds" in str(w.message)]
        # It points at the user's `fit` line, not into the library.
        assert warned
        assert {os.path.abspath(w.filename) for w in warned} == {os.path.abspath(__file__)}
        assert list(model.compiled_train_steps) == ["conditional"]


class _Scaled(keras.layers.Layer):
    """`x + scale * dense(x)`, `scale` an attribute that `get_config` lacks."""

    def __init__(self, scale, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale
        self.dense = keras.layers.Dense(16)

    def call(self, x):
        return x + self.scale * self.dense(x)

    def get_config(self):
        raise NotImplementedError("no config")


def _unchecked_models():
    """`(name, model, blocks, reason)` of models the loop step must not run."""
    keras.utils.set_random_seed(0)
    out = []
    inputs = keras.Input((8,))
    x = keras.layers.Dense(16)(inputs)
    scaled = [_Scaled(1.0 if i != 2 else 0.5, name=f"scaled_{i}") for i in range(4)]
    for block in scaled:
        x = block(x)
    out.append(("attributes", keras.Model(inputs, keras.layers.Dense(1)(x)), scaled,
                "block 2 ('scaled_2') differs in structure from block 0"))

    inputs = keras.Input((8,))
    x = keras.layers.Dense(16)(inputs)
    chain = [ResidualBlock(16, name=f"block_{i}") for i in range(4)]
    for i, block in enumerate(chain):
        x = block(x, training=True if i == 3 else None)
    out.append(("arguments", keras.Model(inputs, keras.layers.Dense(1)(x)), chain,
                "block 3 ('block_3') is called with other arguments than block 0"))

    looped = LoopedModel()
    looped(np.zeros((2, 8), "float32"))
    out.append(("subclassed", looped, looped.stack, "is not called in a Functional graph"))
    return out


@pytest.mark.parametrize("index", range(3))
def test_models_the_loop_step_cannot_run_train_through_conditionals(index):
    name, inner, blocks, reason = _unchecked_models()[index]
    model = keras_raptr.RandomPartModel(inner, blocks=blocks, seed=0)
    model.compile(optimizer="sgd", loss="mse")
    schedule = keras_raptr.StageSchedule([keras_raptr.Stage(2, 10)], sampling="subset",
                                         fixed_blocks=())
    before = block_weights(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(*regression_data(), batch_size=32, callbacks=[schedule], verbose=0)
    expected = on_blocks(path.host_path(model._steps.plan, model._steps.tables, 0, 0))
    assert changed_blocks(before, block_weights(model)) == expected
    if COMPILED:
        assert reason in model.engine_reason, (name, model.engine_reason)
        assert any(reason in str(w.message) for w in caught)
        assert list(model.compiled_train_steps) == ["conditional"]
    else:
        assert model.engine_reason is None


def test_blocks_of_one_structure_pass_the_checks_without_a_config():
    # keras-hub's Llama decoder's `get_config` fails; its attributes and
    # sub-layers still say that its blocks are alike.
    blocks = [_Scaled(1.0), _Scaled(1.0)]
    for block in blocks:
        block(np.zeros((1, 16), "float32"))
    assert engine_blocks.structure_reason(blocks) is None
    blocks.append(_Scaled(2.0))
    blocks[-1](np.zeros((1, 16), "float32"))
    assert "block 2" in engine_blocks.structure_reason(blocks)


def _functional_block(wiring):
    inputs = keras.Input((16,))
    first, second = keras.layers.Dense(16), keras.layers.Dense(16)
    if wiring == "chain":
        outputs = keras.layers.Add()([inputs, second(first(inputs))])
    else:  # the same layers, side by side
        outputs = keras.layers.Add()([first(inputs), second(inputs)])
    return keras.Model(inputs, outputs)


def test_functional_blocks_compare_their_graphs_not_their_layer_names():
    # Blocks built by one function have the same graph under other names.
    blocks = [_functional_block("chain") for _ in range(3)]
    assert engine_blocks.structure_reason(blocks) is None
    # The same layers wired otherwise compute something else.
    blocks.append(_functional_block("parallel"))
    assert "block 3" in engine_blocks.structure_reason(blocks)


# ----------------------------------------------------------------------
# What the optimizer does to the blocks off the path (`off_path_update`).

ENGINES = {
    # JAX and TensorFlow: the loop step (JAX on the stacked state, TF on its
    # stacks); PyTorch: the host path.
    "loop": ({}, None),
    # JAX without `jit_compile`: the loop step on Keras' own state.
    "unstacked": ({"jit_compile": False}, None),
    # One conditional per block.
    "conditional": ({}, "forced"),
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
    compile_kwargs, forced = ENGINES[engine]
    if not COMPILED and engine != "loop":
        pytest.skip("PyTorch runs the host path only")
    if engine == "unstacked" and BACKEND != "jax":
        pytest.skip("the stacked state is JAX's")
    if forced:
        monkeypatch.setattr(engine_blocks, "check", lambda model: (None, forced))
    lr, decay = 0.05, 0.1
    optimizer = keras.optimizers.AdamW(lr, weight_decay=decay)
    model = make_model(4, optimizer=optimizer, **compile_kwargs)
    x, y = regression_data()
    model.fit(x, y, batch_size=32, verbose=0)
    before = _adam_state(model)
    schedule = keras_raptr.StageSchedule(
        [keras_raptr.Stage(3, 10)], sampling="subset", off_path_update=off_path_update
    )
    on = on_blocks(path.host_path(schedule.resolve(4), schedule.resolve(4).tables(), 7, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x, y, batch_size=32, callbacks=[schedule], verbose=0)
    if COMPILED:
        assert ("conditional" if forced else "loop") in model.compiled_train_steps
    after = _adam_state(model)
    assert len(on) == 3
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


def test_a_callback_reading_the_blocks_mid_epoch_sees_each_step():
    # The loop step keeps the blocks' state stacked during `fit` (JAX: the
    # state `fit` threads; TensorFlow: stacks of its own). A callback that
    # reads the blocks' variables after every batch sees the blocks of that
    # step's path changed, and reading changes no loss or weight.
    x, y = regression_data(n=48)

    class Read(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.snapshots = []

        def on_train_batch_end(self, batch, logs=None):
            self.snapshots.append(block_weights(self.model))

    def run(*callbacks):
        model = make_model(4, optimizer=keras.optimizers.Adam(0.01))
        logs = BatchLogs()
        schedule = keras_raptr.StageSchedule.from_spec(
            "1-2-4", total_steps=6, fixed_blocks=(), sampling="subset"
        )
        model.fit(
            x, y, batch_size=8, shuffle=False, verbose=0,
            callbacks=[schedule, logs, *callbacks],
        )
        return model, [b["loss"] for b in logs.batches]

    quiet, quiet_losses = run()
    read = Read()
    model, read_losses = run(read)
    assert read_losses == pytest.approx(quiet_losses, rel=1e-6)
    for a, b in zip(quiet.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    plan, tables = model._steps.plan, model._steps.tables
    for step in range(1, 6):
        expected = on_blocks(path.host_path(plan, tables, 7, step))
        assert changed_blocks(read.snapshots[step - 1], read.snapshots[step]) == expected
    if COMPILED:
        assert list(model.compiled_train_steps) == ["loop"]


# ----------------------------------------------------------------------
# The compiled step: conditionals, matrix products and XLA's FLOPs against
# plain models. Any machine can run these; a wall-clock benchmark on a CPU
# would hide a GPU's fixed cost per op.


def _benchmark(name):
    file = os.path.join(os.path.dirname(__file__), "..", "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def compiled_steps():
    """HLO and FLOPs of the loop step (4 and 8 blocks) and of plain models."""
    if not COMPILED:
        pytest.skip("PyTorch runs eagerly: there is no compiled step to count")
    compiled = _benchmark("compiled_step").compiled
    x, y = regression_data(n=256)
    out = {}
    for num_blocks in (4, 8):
        model = make_model(num_blocks, width=64, optimizer=keras.optimizers.Adam(0.01))
        schedule = keras_raptr.StageSchedule([keras_raptr.Stage(num_blocks / 2, 100)])
        model.fit(x, y, batch_size=256, callbacks=[schedule], verbose=0)
        out[num_blocks, "loop"] = compiled(model, x, y, ("loop",))
        out[num_blocks, "conditional"] = compiled(model, x, y, ("conditional",))
    for k in (1, 2, 4):
        plain, _ = residual_mlp(k, width=64)
        plain.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        plain.fit(x, y, batch_size=256, verbose=0)
        out[k, "plain"] = compiled(plain, x, y)
    return out


@pytest.mark.parametrize("num_blocks", [4, 8])
def test_the_loop_step_holds_one_blocks_code_once(compiled_steps, num_blocks):
    text, cost = compiled_steps[num_blocks, "loop"]
    one, one_cost = compiled_steps[1, "plain"]
    assert text.count("conditional(") == 0
    assert text.count(" while(") >= 2
    # One block's matrix products, forward and backward, whatever the number
    # of blocks: a block run twice (recomputed) or every block run and
    # multiplied by zero would add its own.
    assert text.count(" dot(") == one.count(" dot(")
    # The loops update the stacks in place: a copy of one in a loop's body
    # would cost the whole stack at each iteration.
    assert _benchmark("compiled_step").loop_copies(text, num_blocks) == 0
    if BACKEND == "jax":
        # XLA counts a loop's body once: a path of k blocks costs the loop
        # step's count plus k - 1 more blocks (a plain 2-block model's
        # count minus a 1-block model's).
        block = compiled_steps[2, "plain"][1]["flops"] - one_cost["flops"]
        k = num_blocks // 2
        plain_k = compiled_steps[k, "plain"][1]["flops"]
        assert cost["flops"] + (k - 1) * block <= 1.05 * plain_k
        assert cost["flops"] >= 0.95 * one_cost["flops"]
        # The blocks' state goes in stacked: as many arrays at 8 blocks as
        # at 4.
        arguments = _benchmark("compiled_step").arguments
        assert arguments(text) == arguments(compiled_steps[4, "loop"][0])


def test_the_conditional_step_has_conditionals_that_grow_with_the_blocks(compiled_steps):
    # The contrast that shows the counts above can fail.
    four = compiled_steps[4, "conditional"][0].count("conditional(")
    eight = compiled_steps[8, "conditional"][0].count("conditional(")
    assert 0 < four < eight
