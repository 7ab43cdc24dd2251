"""Atomic file writes, and the checkpoint with dropout's random state (`--resume`)."""

import base64
import contextlib
import glob
import json
import os
import zipfile

import numpy as np

from pretrain_lib.errors import ExampleError


@contextlib.contextmanager
def replacing(path):
    """Yields a temporary path beside `path`, moved over `path` once written.

    Write the file at the yielded path: when the block ends, it is flushed
    to disk and renamed over `path` (`os.replace`, atomic on one file
    system), so that a reader, or a run killed meanwhile, finds the old file
    or the new one, never part of one. If the block raises, the temporary
    file is removed and `path` is left as it was. The temporary name ends
    like `path` (`model.save` and `savefig` read the format from it):
    `.checkpoint.keras.partial-<pid>.keras` for `checkpoint.keras`.
    """
    directory, name = os.path.split(path)
    partial = os.path.join(directory, f".{name}.partial-{os.getpid()}{os.path.splitext(name)[1]}")
    try:
        yield partial
        descriptor = os.open(partial, os.O_RDWR)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def remove_partial_files(directory):
    """Removes the temporary files of saves that did not finish (a killed run)."""
    for partial in glob.glob(os.path.join(glob.escape(directory), ".*.partial-*")):
        with contextlib.suppress(OSError):
            os.remove(partial)


def write_json(value, path):
    with replacing(path) as partial, open(partial, "w") as f:
        json.dump(value, f, indent=2)


# The checkpoint's member with the random state dropout draws its masks from:
# `model.save` keeps the weights and the optimizer, not the states of the
# `SeedGenerator`s (JAX, TensorFlow), nor PyTorch's global generator, which
# Keras' dropout uses on PyTorch when its layer was given no seed.
RANDOM_STATE = "random_state.json"


def seed_generator_states(model):
    """The state variables of the model's `SeedGenerator`s, in a fixed order."""
    return [v for v in model.variables if v.name == "seed_generator_state"]


def random_state(model):
    """What dropout's next masks depend on, as JSON."""
    import keras

    state = {
        "seed_generators": [
            keras.ops.convert_to_numpy(v).tolist() for v in seed_generator_states(model)
        ]
    }
    if keras.backend.backend() == "torch":
        import torch

        state["torch_cpu"] = base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()
        if torch.cuda.is_available():
            state["torch_cuda"] = [
                base64.b64encode(s.numpy().tobytes()).decode()
                for s in torch.cuda.get_rng_state_all()
            ]
    return state


def set_seed_generator_states(model, state):
    """Restores the `SeedGenerator`s of `random_state(model)`."""
    variables = seed_generator_states(model)
    if state is None or len(state["seed_generators"]) != len(variables):
        print(
            "the checkpoint has no random state for dropout: its masks are drawn "
            "afresh, so the losses differ slightly from an uninterrupted run's"
        )
        return
    for variable, value in zip(variables, state["seed_generators"]):
        variable.assign(np.asarray(value, dtype=variable.dtype))


def torch_random_state_restorer(state):
    """A callback that restores PyTorch's generators before the first batch.

    Not earlier: `fit` draws from them when it starts (its data loader's
    seed), which an uninterrupted run did once, before its first step.
    """
    import keras

    class RestoreTorchRandomState(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if self.state is None:
                return
            import torch

            def tensor(text):
                return torch.from_numpy(np.frombuffer(base64.b64decode(text), "uint8").copy())

            torch.set_rng_state(tensor(self.state["torch_cpu"]))
            cuda = self.state.get("torch_cuda")
            if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all([tensor(text) for text in cuda])
            self.state = None

    restorer = RestoreTorchRandomState()
    restorer.state = state if state and "torch_cpu" in state else None
    return restorer


def save_checkpoint(model, path):
    """`model.save(path)`, atomically, with dropout's random state.

    With it, a resumed run draws the same dropout masks as an uninterrupted
    one, so it reproduces its losses.
    """
    state = json.dumps(random_state(model))
    with replacing(path) as partial:
        model.save(partial)
        with zipfile.ZipFile(partial, "a") as archive:
            archive.writestr(RANDOM_STATE, state)


def load_checkpoint(path):
    """The model saved by `save_checkpoint`, and its random state.

    The `SeedGenerator`s are restored; PyTorch's generators are restored by
    the callback of `torch_random_state_restorer(state)`. A checkpoint that
    cannot be read is an `ExampleError` that says how to go on.
    """
    import keras

    problem = error = None
    try:
        if not zipfile.is_zipfile(path):
            problem = "it is not a whole zip archive: cut short?"
        else:
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip()
                names = archive.namelist()
                state = json.loads(archive.read(RANDOM_STATE)) if RANDOM_STATE in names else None
            if damaged is not None:
                problem = f"its member {damaged} fails its checksum"
            else:
                model = keras.saving.load_model(path)
    except Exception as caught:  # a damaged config or weights file
        problem, error = f"{type(caught).__name__}: {caught}", caught
    if problem is not None:
        directory = os.path.dirname(path) or "."
        raise ExampleError(
            f"--resume: the checkpoint {path} cannot be read ({problem}); it is "
            "damaged, and nothing was changed. Restore it from a copy, or delete it "
            f"to train again from step 0 with --resume {directory} (its options are "
            "kept)."
        ) from error
    set_seed_generator_states(model, state)
    return model, state
