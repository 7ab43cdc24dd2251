"""Runs examples/pretrain.py and kills it with SIGKILL inside a checkpoint save.

    python tests/kill_example.py [pretrain.py options]

The second time the example opens a `.keras` file to write (its second
checkpoint save), the file is written up to half the size of the first
checkpoint, flushed to disk, and the process sends itself SIGKILL: no
handler, `finally` or `atexit` runs, as when a machine's out-of-memory
killer or a scheduler stops a job. The parent sees the exit status
`-signal.SIGKILL`; a run that finishes instead exits 0, and the caller
knows that the kill did not happen.
"""

import importlib.util
import os
import signal
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


class KillingWriter:
    """A binary file that kills the process once `limit` bytes are written."""

    def __init__(self, file, limit):
        self._file = file
        self._limit = limit
        self._written = 0

    def write(self, data):
        data = bytes(data)
        if self._written + len(data) >= self._limit:
            self._file.write(data[: self._limit - self._written])
            self._file.flush()
            os.fsync(self._file.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        self._written += len(data)
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._file.close()


def kill_in_second_save():
    """Makes Keras' second `.keras` save kill the process halfway."""
    from keras.src.saving import saving_lib

    saves = []

    def open_file(file, mode="r", *args, **kwargs):
        handle = open(file, mode, *args, **kwargs)
        if "w" not in mode or not str(file).endswith(".keras"):
            return handle
        saves.append(str(file))
        if len(saves) < 2:
            return handle
        first = os.path.join(os.path.dirname(str(file)), "checkpoint.keras")
        return KillingWriter(handle, os.path.getsize(first) // 2)

    # `save_model` opens the file with the module's `open`.
    saving_lib.open = open_file


def main(argv):
    path = os.path.join(HERE, "..", "examples", "pretrain.py")
    spec = importlib.util.spec_from_file_location("pretrain_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    kill_in_second_save()
    return example.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
