"""Runs the `Example:` code blocks of the public docstrings and the README."""

import re
import textwrap

import pytest

import keras_raptr

PUBLIC = {
    "RandomPartModel": keras_raptr.RandomPartModel,
    "RandomPartModel.from_preset": keras_raptr.RandomPartModel.from_preset,
    "ProgressiveLayerDrop": keras_raptr.ProgressiveLayerDrop,
    "StochasticDepth": keras_raptr.StochasticDepth,
    "GradualStacking": keras_raptr.GradualStacking,
    "PathStrategy": keras_raptr.PathStrategy,
    "train_flops_per_step": keras_raptr.train_flops_per_step,
    "TrainFlops": keras_raptr.TrainFlops,
    "RandomSkip": keras_raptr.layers.RandomSkip,
    "WidthParts": keras_raptr.layers.WidthParts,
    "Stage": keras_raptr.Stage,
    "StageSchedule": keras_raptr.StageSchedule,
}


def code_blocks(obj):
    return re.findall(r"```python\n(.*?)```", obj.__doc__, flags=re.S)


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples may write files
    blocks = code_blocks(PUBLIC[name])
    assert blocks, f"{name} has no example"
    namespace = {}
    for block in blocks:
        code = textwrap.dedent(block)
        exec(compile(code, f"<{name} example>", "exec"), namespace)


def test_readme_examples_run(tmp_path, monkeypatch):
    import os

    readme = os.path.join(os.path.dirname(__file__), "..", "README.md")
    with open(readme) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for block in blocks:
        exec(compile(block, "<README example>", "exec"), namespace)
