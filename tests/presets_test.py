"""keras-hub presets and tasks: BERT, GPT-2, Llama and Gemma, offline."""

import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_raptr
from hub_models import BUILDERS
from hub_models import TEXTS
from hub_models import bert_backbone
from hub_models import task_weights

keras_hub = pytest.importorskip("keras_hub")

TASKS = {
    "bert": "BertMaskedLM",
    "gpt2": "GPT2CausalLM",
    "llama": "LlamaCausalLM",
    "gemma": "GemmaCausalLM",
}


def block_snapshot(model):
    return [
        [keras.ops.convert_to_numpy(w) for w in skip.block.weights]
        for skip in model.blocks
    ]


def moved_blocks(before, after):
    return [
        i
        for i, (b, a) in enumerate(zip(before, after))
        if any(not np.array_equal(x, y) for x, y in zip(b, a))
    ]


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_preset_to_raptr_and_back_to_plain_keras_hub(arch, tmp_path):
    source = os.path.join(tmp_path, "source")
    original = BUILDERS[arch]()
    original.save_to_preset(source)

    model = keras_raptr.RandomPartModel.from_preset(source, task=TASKS[arch], seed=0)
    assert type(model.inner).__name__ == TASKS[arch]
    assert isinstance(model, keras_raptr.RandomPartModel)
    # The blocks found are the backbone's transformer blocks, in order.
    assert [s.block for s in model.blocks] == list(
        model.inner.backbone.transformer_layers
    )
    # The preset's weights were loaded.
    saved = task_weights(original)
    for path, value in task_weights(model.inner).items():
        np.testing.assert_array_equal(value, saved[path])

    # One step of 3 of the 4 blocks (first and last fixed), on raw text: the
    # task's preprocessor and its default loss, optimizer and metrics.
    schedule = keras_raptr.StageSchedule(
        [keras_raptr.Stage(3, 1), keras_raptr.Stage(4, 1)], sampling="subset"
    )
    before = block_snapshot(model)
    history = model.fit(
        TEXTS * 2, batch_size=8, epochs=1, callbacks=[schedule], verbose=0
    )
    moved = moved_blocks(before, block_snapshot(model))
    assert len(moved) == 3 and 0 in moved and 3 in moved, moved
    assert history.history["stage"] == [0]
    assert history.history["path_length"] == [3.0]
    assert "sparse_categorical_accuracy" in history.history
    # keras-hub's blocks pass the loop step's checks: no fallback.
    assert model.engine_reason is None, model.engine_reason

    if hasattr(model.inner, "generate"):
        generated = model.generate([TEXTS[0][:9]], max_length=8)
        assert len(generated) == 1 and generated[0].startswith(TEXTS[0][:9])

    # The trained model saves as an ordinary keras-hub preset.
    target = os.path.join(tmp_path, "trained")
    model.save_to_preset(target)
    plain = getattr(keras_hub.models, TASKS[arch]).from_preset(target)
    assert not isinstance(plain, keras_raptr.RandomPartModel)
    trained = task_weights(model.inner)
    for path, value in task_weights(plain).items():
        np.testing.assert_array_equal(value, trained[path])


def test_trained_preset_loads_without_keras_raptr(tmp_path):
    model = keras_raptr.RandomPartModel(BUILDERS["gpt2"](), seed=0)
    schedule = keras_raptr.StageSchedule.from_spec("2-4", total_steps=2)
    model.fit(TEXTS * 2, batch_size=8, epochs=1, callbacks=[schedule], verbose=0)
    target = os.path.join(tmp_path, "trained")
    model.save_to_preset(target)
    expected = os.path.join(tmp_path, "expected.npz")
    np.savez(expected, *[keras.ops.convert_to_numpy(w) for w in model.inner.weights])
    script = f"""
import sys
sys.modules["keras_raptr"] = None  # not importable
import keras_hub, numpy as np, keras
task = keras_hub.models.GPT2CausalLM.from_preset({target!r})
expected = np.load({expected!r})
for i, w in enumerate(task.weights):
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(w), expected[f"arr_{{i}}"])
print(type(task).__name__, task.generate(["the quick"], max_length=6)[0][:9])
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "GPT2CausalLM the quick"


def test_backbone_preset_and_load_weights_false(tmp_path):
    source = os.path.join(tmp_path, "source")
    task = BUILDERS["bert"]()
    task.save_to_preset(source)
    model = keras_raptr.RandomPartModel.from_preset(source)
    assert isinstance(model.inner, keras_hub.models.BertBackbone)
    assert len(model.blocks) == 4
    fresh = keras_raptr.RandomPartModel.from_preset(
        source, task="BertMaskedLM", load_weights=False
    )
    saved = task_weights(task)
    assert any(
        not np.array_equal(value, saved[path])
        for path, value in task_weights(fresh.inner).items()
    )


def test_keras_nlp_classes_are_accepted(tmp_path):
    keras_nlp = pytest.importorskip("keras_nlp")
    source = os.path.join(tmp_path, "source")
    BUILDERS["bert"]().save_to_preset(source)
    model = keras_raptr.RandomPartModel.from_preset(
        source, task=keras_nlp.models.BertMaskedLM
    )
    assert isinstance(model.inner, keras_nlp.models.BertMaskedLM)
    again = keras_raptr.RandomPartModel(model.inner)
    assert len(again.blocks) == 4


def test_compile_defaults_come_from_the_task():
    model = keras_raptr.RandomPartModel(BUILDERS["gpt2"]())
    # Compiled on construction, like the task, with the task's defaults.
    assert isinstance(model.optimizer, keras.optimizers.Adam)
    assert isinstance(model.loss, keras.losses.SparseCategoricalCrossentropy)
    model.compile(optimizer=keras.optimizers.SGD(0.1), sampler="greedy")
    assert isinstance(model.optimizer, keras.optimizers.SGD)
    assert isinstance(model.loss, keras.losses.SparseCategoricalCrossentropy)
    # The task's own sampler is set too, for `generate()`.
    assert type(model.inner.sampler).__name__ == "GreedySampler"


class LastBlocksFirst(keras_raptr.RandomPartModel):
    """A user's subclass: its own `find_blocks`, around a task."""

    def find_blocks(self, model):
        return list(model.backbone.transformer_layers)[:3]


def test_a_subclass_around_a_task_keeps_the_task_behaviour():
    model = LastBlocksFirst(BUILDERS["gpt2"](), seed=0)
    assert type(model) is LastBlocksFirst and len(model.blocks) == 3
    # Compiled on construction with the task's defaults; raw text in.
    assert isinstance(model.loss, keras.losses.SparseCategoricalCrossentropy)
    assert model.preprocessor is model.inner.preprocessor
    assert model.backbone is model.inner.backbone
    schedule = keras_raptr.StageSchedule([keras_raptr.Stage(2, 1)], sampling="subset")
    before = block_snapshot(model)
    model.fit(TEXTS[:4], batch_size=4, epochs=1, callbacks=[schedule], verbose=0)
    assert moved_blocks(before, block_snapshot(model)) == [0, 2]
    assert model.evaluate(TEXTS[:4], batch_size=4, verbose=0) is not None
    generated = model.generate([TEXTS[0][:9]], max_length=8)
    assert generated[0].startswith(TEXTS[0][:9])
    # The name of the former task subclass is the same class.
    from keras_raptr.models.random_part_task import RandomPartTask

    assert RandomPartTask is keras_raptr.RandomPartModel


def test_a_model_that_is_not_a_task_has_no_task_behaviour():
    model = keras_raptr.RandomPartModel(bert_backbone(), seed=0)
    assert model.preprocessor is None and model.backbone is None
    with pytest.raises(AttributeError, match="has no `generate\\(\\)`"):
        model.generate(["the"])
    with pytest.raises(AttributeError, match="not a keras-hub task: it has no preprocessing"):
        model.preprocess_samples(["the"])


def test_wrapped_task_saves_and_loads_as_keras_file(tmp_path):
    model = keras_raptr.RandomPartModel(BUILDERS["bert"](), seed=3)
    schedule = keras_raptr.StageSchedule.from_spec("2-4", total_steps=2)
    model.fit(TEXTS * 2, batch_size=8, epochs=1, callbacks=[schedule], verbose=0)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    assert type(restored) is type(model)
    assert restored.seed == 3
    assert int(restored.optimizer.iterations) == int(model.optimizer.iterations) == 1
    for path, value in task_weights(model.inner).items():
        np.testing.assert_array_equal(value, task_weights(restored.inner)[path])


# ----------------------------------------------------------------------
# Errors.


def test_missing_local_preset_directory():
    with pytest.raises(FileNotFoundError, match="'./no_such_preset' is missing locally"):
        keras_raptr.RandomPartModel.from_preset("./no_such_preset")


def test_unknown_preset_name():
    with pytest.raises(ValueError, match="Unknown preset 'bert_tiny_en_uncasd'.*Did you mean 'bert_tiny_en_uncased'"):
        keras_raptr.RandomPartModel.from_preset("bert_tiny_en_uncasd")


def test_preset_that_cannot_be_downloaded(monkeypatch):
    import kagglehub

    def offline(*args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(kagglehub, "model_download", offline)
    with pytest.raises(OSError, match="'bert_tiny_en_uncased'.*not on this machine.*downloaded from Kaggle.*failed.*Name or service not known") as info:
        keras_raptr.RandomPartModel.from_preset("bert_tiny_en_uncased")
    assert isinstance(info.value.__cause__, ConnectionError)


def test_unknown_task_name_lists_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="Unknown keras-hub task 'BertMaskLM'.*Did you mean 'BertMaskedLM'.*Valid task names: .*GPT2CausalLM"):
        keras_raptr.RandomPartModel.from_preset("./anything", task="BertMaskLM")
    with pytest.raises(ValueError, match="`task` must be a keras-hub task class"):
        keras_raptr.RandomPartModel.from_preset("./anything", task=keras.Model)


def test_model_without_transformer_blocks_says_how_to_pass_them():
    inputs = keras.Input((4,))
    plain = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    with pytest.raises(ValueError, match="Pass them in depth order, e.g. `RandomPartModel\\(model, blocks=\\[...\\]\\)`"):
        keras_raptr.RandomPartModel(plain)


def test_save_to_preset_of_a_plain_model_is_an_error(tmp_path):
    inputs = keras.Input((4,))
    x = keras.layers.Dense(4)(inputs)
    block = keras.layers.Dense(4)
    plain = keras.Model(inputs, block(x))
    model = keras_raptr.RandomPartModel(plain, blocks=[block])
    with pytest.raises(ValueError, match="not a keras-hub backbone or task"):
        model.save_to_preset(os.path.join(tmp_path, "p"))


@pytest.fixture(scope="module")
def bert_preset(tmp_path_factory):
    """A tiny BERT backbone preset, saved once for the tests that damage it."""
    source = str(tmp_path_factory.mktemp("bert") / "preset")
    bert_backbone().save_to_preset(source)
    return source


def _damage(source, target, damage):
    shutil.copytree(source, target)
    config = os.path.join(target, "config.json")
    if damage == "no_config":
        os.remove(config)
    elif damage == "empty":
        shutil.rmtree(target)
        os.mkdir(target)
    elif damage == "malformed":
        with open(config) as file:
            text = file.read()
        with open(config, "w") as file:
            file.write(text[: len(text) // 2])
    elif damage == "a_list":
        with open(config, "w") as file:
            file.write("[1, 2]")
    elif damage == "unknown_class":
        with open(config) as file:
            data = json.load(file)
        data["registered_name"] = "keras_hub>NoSuchBackbone"
        data["class_name"] = "NoSuchBackbone"
        with open(config, "w") as file:
            json.dump(data, file)
    return config


# The checks fail before any model is built: no Keras state to clear.
@pytest.mark.keras_free
class TestDamagedPresetDirectory:
    """Local preset directories that keras-hub cannot load, refused early."""

    @pytest.mark.parametrize(
        "damage, error, match",
        [
            (
                "empty",
                FileNotFoundError,
                "The preset directory '.*' has no config.json \\(it is empty\\)"
                ".*'.*config.json' is missing.*save_to_preset",
            ),
            (
                "no_config",
                FileNotFoundError,
                "has no config.json \\(it holds metadata.json, model.weights.h5\\)",
            ),
            (
                "malformed",
                ValueError,
                "The preset's '.*config.json' is not valid JSON \\(.*line 1.*\\).*save the preset "
                "again",
            ),
            (
                "a_list",
                ValueError,
                "The preset's '.*config.json' holds a JSON list, not the object",
            ),
            (
                "unknown_class",
                ValueError,
                "The preset's '.*config.json' names the class 'keras_hub>NoSuchBackbone', which no "
                "installed library registers",
            ),
        ],
    )
    def test_names_the_file(self, bert_preset, tmp_path, damage, error, match):
        target = str(tmp_path / "damaged")
        config = _damage(bert_preset, target, damage)
        for task in (None, "BertMaskedLM"):
            with pytest.raises(error, match=match) as info:
                keras_raptr.RandomPartModel.from_preset(target, task=task)
            assert config in str(info.value)

    def test_a_file_is_not_a_preset_directory(self, bert_preset):
        config = os.path.join(bert_preset, "config.json")
        with pytest.raises(NotADirectoryError, match="is a file, not a preset directory"):
            keras_raptr.RandomPartModel.from_preset(config)
