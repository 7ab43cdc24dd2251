"""RaPTr on several devices: JAX's `keras.distribution`, TensorFlow's strategies.

`multi_device_run.py` trains on emulated CPU devices (4 on JAX, 2 on
TensorFlow) in a process of its own: a backend fixes its device count when
it starts. Every strategy, under each engine (JAX: `DataParallel`, and
`ModelParallel` with the blocks' kernels split; TensorFlow:
`MirroredStrategy`), must train the paths of the single-device run: the
same losses step for step, the same stage logs, the same weights. So must
`StageSchedule(off_path_update="zero_grad")`, whose optimizer override
TensorFlow's replicas (one thread each) are inside at the same time.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

BACKEND = keras.backend.backend()
HERE = os.path.dirname(os.path.abspath(__file__))
STRATEGIES = (
    "StageSchedule", "ProgressiveLayerDrop", "StochasticDepth", "GradualStacking",
    "StageSchedule/zero_grad",
)
ENGINES = {
    "jax": ("DataParallel", "ModelParallel"),
    "tensorflow": ("MirroredStrategy",),
    "torch": (),
}


def _child(directory, *part):
    env = dict(os.environ, KERAS_BACKEND=BACKEND)
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "multi_device_run.py"), str(directory), *part],
        env=env, capture_output=True, text=True, timeout=900,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not ENGINES[BACKEND]:
        pytest.skip("Keras has no multi-device `fit` on PyTorch")
    return _child(tmp_path_factory.mktemp("multi_device"))


def assert_same_weights(weights, expected):
    # Another path at some step would move the weights of the blocks it
    # trained by about the learning rate (0.01); sums split over devices
    # differ in rounding only.
    for block, expected_block in zip(weights, expected):
        for w, expected_w in zip(block, expected_block):
            np.testing.assert_allclose(w, expected_w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("engine", ["DataParallel", "ModelParallel", "MirroredStrategy"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_strategy_trains_the_single_device_paths(runs, engine, strategy):
    if engine not in ENGINES[BACKEND]:
        pytest.skip(f"{engine} is not a {BACKEND} engine")
    assert runs["devices"] == (4 if BACKEND == "jax" else 2)
    single = runs["runs"][f"single/{strategy}"]
    run = runs["runs"][f"{engine}/{strategy}"]
    assert len(run["losses"]) == 12
    np.testing.assert_allclose(run["losses"], single["losses"], rtol=1e-5, atol=1e-6)
    assert_same_weights(run["weights"], single["weights"])
    # The same stage boundaries and logs, and the same train steps compiled.
    assert len(run["epochs"]) == len(single["epochs"]) == 3
    for epoch, single_epoch in zip(run["epochs"], single["epochs"]):
        assert epoch.keys() == single_epoch.keys()
        for key in ("stage", "path_length"):
            if key in single_epoch:
                assert epoch[key] == pytest.approx(single_epoch[key], rel=1e-6)
    assert run["compiled"] == single["compiled"]


def test_zero_grad_moves_the_off_path_blocks_under_every_engine(runs):
    # The runs above match the single-device run; here that run is not the
    # default's: off-path blocks took Adam updates with a zero gradient.
    for engine in ENGINES[BACKEND] + ("single",):
        skip = runs["runs"][f"{engine}/StageSchedule"]["weights"]
        zero_grad = runs["runs"][f"{engine}/StageSchedule/zero_grad"]["weights"]
        moved = [
            max(np.max(np.abs(np.subtract(a, b))) for a, b in zip(s, z))
            for s, z in zip(skip, zero_grad)
        ]
        # A middle block that trained once and then sat out a step moved
        # on its Adam momentum (about the learning rate, 0.01).
        assert max(moved[1:-1]) > 1e-3, (engine, moved)


@pytest.mark.parametrize("step", ["loop", "conditional"])
def test_two_steps_per_execution_train_the_same_paths_under_a_distribution(runs, step):
    if BACKEND != "jax":
        pytest.skip("TensorFlow's strategies refuse the conditional step (test below)")
    single = runs["runs"]["single/StageSchedule"]
    name = "steps_per_execution=2" if step == "loop" else "conditional"
    run = runs["runs"][f"DataParallel/StageSchedule/{name}"]
    # (The conditional step's runs compile the static paths' own steps too.)
    if step == "loop":
        assert run["compiled"] == ["loop"]
    else:
        assert "conditional" in run["compiled"]
    # One log per execution of two steps: the running mean after each pair.
    np.testing.assert_allclose(run["losses"], single["losses"][1::2], rtol=1e-5)
    assert_same_weights(run["weights"], single["weights"])


def test_a_run_saved_and_loaded_under_an_engine_resumes_exactly(runs):
    # 8 steps, save, `load_model`, 4 steps, against 12 straight.
    straight = runs["runs"][f"{runs['resumed_engine']}/StageSchedule"]
    resumed = runs["resumed"]
    np.testing.assert_allclose(resumed["losses"], straight["losses"][-4:], rtol=1e-6)
    assert_same_weights(resumed["weights"], straight["weights"])
    assert resumed["epochs"][-1]["stage"] == straight["epochs"][-1]["stage"]


def test_model_parallel_splits_the_blocks_kernels(runs):
    if BACKEND != "jax":
        pytest.skip("keras.distribution's ModelParallel runs on JAX")
    assert "'model'" in runs["runs"]["ModelParallel/StageSchedule"]["kernel_sharding"]
    assert "'model'" not in runs["runs"]["DataParallel/StageSchedule"]["kernel_sharding"]
    assert runs["runs"]["single/StageSchedule"]["kernel_sharding"] == "None"


def test_one_gradient_all_reduce_per_step_as_without_raptr(runs):
    if BACKEND != "tensorflow":
        pytest.skip("counted on tf.distribute's replica context")
    # The loop step, as the full network: the blocks' updates do not each
    # reduce their own gradients.
    assert runs["all_reduces_per_step"] == 1


def test_the_example_trains_on_every_device(runs, tmp_path):
    example = _child(tmp_path, "example")
    # 3 sequences do not split over 2 or 4 devices: refused before training.
    assert example["uneven_batch"]["code"] == 2
    assert f"--batch-size 3 does not split over {runs['devices']} devices" in (
        example["uneven_batch"]["message"]
    )
    assert example["code"] == 0
    summary = example["summary"]
    assert summary["devices"] == runs["devices"]
    assert summary["steps"] == 4
    assert np.isfinite(summary["final_eval_loss"])


def test_a_model_that_needs_the_conditional_step_under_tf_distribute_gets_a_clear_error():
    if BACKEND != "tensorflow":
        pytest.skip("tf.distribute is TensorFlow's")
    import tensorflow as tf

    import keras_raptr
    from toy_models import head_reads_block
    from toy_models import regression_data

    with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
        # Not one chain: the head reads block 2's output too.
        inner, blocks = head_reads_block(2)
        model = keras_raptr.RandomPartModel(inner, blocks=blocks, seed=0)
        model.compile(optimizer="adam", loss="mse")
    schedule = keras_raptr.StageSchedule([keras_raptr.Stage(3.5, 8)])
    with pytest.raises(ValueError, match="MirroredStrategy.*block 2's output also feeds"):
        model.fit(*regression_data(n=64), batch_size=8, callbacks=[schedule], verbose=0)
