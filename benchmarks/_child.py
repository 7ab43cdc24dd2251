"""Runs a benchmark's measurement in a process of its own, under one backend.

A script's `--child` mode prints its result as one line, `RESULT <json>`
(`report`); the parent runs the script under `KERAS_BACKEND=backend` and
reads that line back (`run`). A fresh process per backend keeps one
backend's compiles and memory out of another's figures.
"""

import json
import os
import subprocess
import sys

_PREFIX = "RESULT "


def report(result):
    """Prints `result` as the line `run` reads."""
    print(_PREFIX + json.dumps(result), flush=True)


def run(script, argv, backend):
    """`script --child *argv` under `backend`: its result, or `None` if it failed.

    A failure's output tail goes to standard error.
    """
    out = subprocess.run(
        [sys.executable, os.path.abspath(script), "--child", *argv],
        env=dict(os.environ, KERAS_BACKEND=backend), capture_output=True, text=True,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith(_PREFIX)]
    if out.returncode or not lines:
        sys.stderr.write(out.stdout[-2000:] + out.stderr[-3000:])
        return None
    return json.loads(lines[-1][len(_PREFIX):])
