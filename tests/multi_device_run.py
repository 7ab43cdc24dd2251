"""Child process of `multi_device_test.py`: RaPTr on emulated CPU devices.

A backend fixes its device count when it starts, so the test runs this file
in a process of its own: JAX with 4 host devices
(`--xla_force_host_platform_device_count=4`), TensorFlow with 2 logical CPU
devices. It trains the same tiny model, data and strategy on one device and
under each multi-device engine (JAX: `keras.distribution.DataParallel`, and
`ModelParallel` with the blocks' kernels split over a "model" axis;
TensorFlow: `tf.distribute.MirroredStrategy`), saves and resumes a run under
the engine, or runs the example with `--distribute`, and prints one JSON
line with what each run logged and the weights it ended with.

    KERAS_BACKEND=jax python tests/multi_device_run.py OUTPUT_DIR
    KERAS_BACKEND=jax python tests/multi_device_run.py OUTPUT_DIR example
"""

import contextlib
import importlib.util
import io
import json
import os
import sys

BACKEND = os.environ.get("KERAS_BACKEND", "jax")
if BACKEND == "jax":
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    )
else:
    import tensorflow as tf

    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration()] * 2,
    )
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import keras  # noqa: E402

import keras_raptr  # noqa: E402
from toy_models import BatchLogs  # noqa: E402
from toy_models import block_weights  # noqa: E402
from toy_models import regression_data  # noqa: E402
from toy_models import residual_mlp  # noqa: E402

STRATEGIES = {
    "StageSchedule": lambda: keras_raptr.StageSchedule.from_spec("2-3-4", total_steps=12),
    "ProgressiveLayerDrop": lambda: keras_raptr.ProgressiveLayerDrop(gamma=0.1),
    "StochasticDepth": lambda: keras_raptr.StochasticDepth(0.5),
    "GradualStacking": lambda: keras_raptr.GradualStacking.from_spec("2-3-4", total_steps=12),
    # Off-path blocks updated with a zero gradient: every block written back.
    "StageSchedule/zero_grad": lambda: keras_raptr.StageSchedule.from_spec(
        "2-3-4", total_steps=12, off_path_update="zero_grad"
    ),
}


class _Jax:
    """`keras.distribution`: set globally, around building and training."""

    def __init__(self, distribution):
        self.distribution = distribution

    @contextlib.contextmanager
    def scope(self):
        keras.distribution.set_distribution(self.distribution)
        try:
            yield
        finally:
            keras.distribution.set_distribution(None)


class _TensorFlow:
    """`tf.distribute`: the model and optimizer built in the strategy's scope."""

    def __init__(self, strategy):
        self.strategy = strategy

    def scope(self):
        return self.strategy.scope() if self.strategy else contextlib.nullcontext()


def engines():
    if BACKEND == "jax":
        devices = keras.distribution.list_devices()
        mesh = keras.distribution.DeviceMesh((2, 2), ["batch", "model"], devices)
        layout_map = keras.distribution.LayoutMap(mesh)
        layout_map["block_.*kernel"] = (None, "model")
        return {
            "single": _Jax(None),
            "DataParallel": _Jax(keras.distribution.DataParallel(devices=devices)),
            "ModelParallel": _Jax(
                keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")
            ),
        }
    return {
        "single": _TensorFlow(None),
        "MirroredStrategy": _TensorFlow(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])),
    }


def record(model, logs):
    kernel = model.blocks[1].block.dense.kernel
    sharding = getattr(kernel.value, "sharding", None)
    return {
        "losses": [batch["loss"] for batch in logs.batches],
        "epochs": logs.epochs,
        "weights": [[w.tolist() for w in block] for block in block_weights(model)],
        "compiled": sorted(model.compiled_train_steps),
        "kernel_sharding": str(getattr(sharding, "spec", None)),
    }


def train(engine, strategy, epochs=3, model=None, steps_per_execution=1):
    """`epochs` of 4 steps (64 samples, global batch 16), data in order."""
    with engine.scope():
        if model is None:
            inner, blocks = residual_mlp(4, width=16)
            model = keras_raptr.RandomPartModel(inner, blocks=blocks, seed=7)
            model.compile(
                optimizer=keras.optimizers.Adam(0.01), loss="mse",
                steps_per_execution=steps_per_execution,
            )
        x, y = regression_data(n=64)
        logs = BatchLogs()
        model.fit(
            x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0,
            callbacks=[STRATEGIES[strategy](), logs],
        )
    return model, record(model, logs)


def resumed(engine, path):
    """8 steps, save, load (under the engine), 4 more."""
    model, _ = train(engine, "StageSchedule", epochs=2)
    model.save(path)
    with engine.scope():
        loaded = keras.saving.load_model(path)
    return train(engine, "StageSchedule", epochs=1, model=loaded)[1]


def all_reduces(engine):
    """Gradient all-reduces traced per replica, for each train step compiled."""
    calls = []
    original = tf.distribute.ReplicaContext.all_reduce

    def all_reduce(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    tf.distribute.ReplicaContext.all_reduce = all_reduce
    try:
        model, _ = train(engine, "StageSchedule")
    finally:
        tf.distribute.ReplicaContext.all_reduce = original
    replicas = engine.strategy.num_replicas_in_sync
    return len(calls) / (replicas * len(model.compiled_train_steps))


def example(directory):
    """`examples/pretrain.py --distribute`, tiny, on a few pages of text."""
    from pydoc_data import topics

    os.makedirs(directory, exist_ok=True)
    texts = list(topics.topics.values())[:40]
    for i in range(2):
        with open(os.path.join(directory, f"text_{i}.txt"), "w") as f:
            f.write("\n\n".join(texts[i::2]))
    path = os.path.join(HERE, "..", "examples", "pretrain.py")
    spec = importlib.util.spec_from_file_location("pretrain_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # A batch that does not split over the devices: a message, exit code 2.
    message = io.StringIO()
    with contextlib.redirect_stderr(message):
        uneven = module.main([
            "--dataset", os.path.join(directory, "*.txt"), "--output-dir",
            os.path.join(directory, "uneven"), "--distribute", "--batch-size", "3",
            "--verbose", "0",
        ])
    out = os.path.join(directory, "run")
    code = module.main([
        "--dataset", os.path.join(directory, "*.txt"), "--output-dir", out, "--distribute",
        "--num-layers", "4", "--hidden-dim", "16", "--num-heads", "2", "--seq-len", "16",
        "--batch-size", "4", "--steps", "4", "--eval-every", "4", "--eval-windows", "8",
        "--vocabulary-size", "300", "--verbose", "0", "--corpus-cache", "none",
    ])
    with open(os.path.join(out, "summary.json")) as f:
        return {
            "code": code, "summary": json.load(f),
            "uneven_batch": {"code": uneven, "message": message.getvalue()},
        }


def main(directory, part):
    if part == "example":
        # A process of its own: on TensorFlow, a second `MirroredStrategy`
        # in one process can clash with the first one's collective ops.
        print("RESULT " + json.dumps(example(directory)))
        return
    all_engines = engines()
    out = {"devices": len(keras.distribution.list_devices()) if BACKEND == "jax"
           else len(tf.config.list_logical_devices("CPU")), "runs": {}}
    for name, engine in all_engines.items():
        for strategy in STRATEGIES:
            out["runs"][f"{name}/{strategy}"] = train(engine, strategy)[1]
    several = [name for name in all_engines if name != "single"][0]
    if BACKEND == "jax":
        # Two steps per execution (paths of different lengths in one call),
        # through the loop step, then through the conditional step (as for
        # blocks that fail the loop step's checks).
        out["runs"]["DataParallel/StageSchedule/steps_per_execution=2"] = train(
            all_engines["DataParallel"], "StageSchedule", steps_per_execution=2
        )[1]
        from keras_raptr.engine import blocks

        check = blocks.check
        blocks.check = lambda model: (None, "forced")
        try:
            out["runs"]["DataParallel/StageSchedule/conditional"] = train(
                all_engines["DataParallel"], "StageSchedule", steps_per_execution=2
            )[1]
        finally:
            blocks.check = check
    out["resumed"] = resumed(all_engines[several], os.path.join(directory, "checkpoint.keras"))
    out["resumed_engine"] = several
    if BACKEND == "tensorflow":
        out["all_reduces_per_step"] = all_reduces(all_engines[several])
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "engines")
