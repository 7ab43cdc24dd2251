"""keras-hub presets and tasks: loading, with errors that say what to do."""

import difflib
import importlib
import json
import os
import sys

_REMOTE_SCHEMES = ("kaggle", "hf", "modelscope", "gs", "s3")


def import_keras_hub():
    try:
        return importlib.import_module("keras_hub")
    except ImportError as e:
        raise ImportError(
            "`RandomPartModel.from_preset` needs keras-hub: install it with "
            "`pip install keras-hub` (or the `hub` extra of keras-raptr)."
        ) from e


def is_keras_hub_task(model):
    """Whether `model` is a keras-hub (or keras-nlp) task with a pipeline."""
    if "keras_hub" not in sys.modules:
        return False
    pipeline = importlib.import_module("keras_hub.src.utils.pipeline_model")
    return isinstance(model, pipeline.PipelineModel)


def task_names(keras_hub):
    """The names of the task classes in `keras_hub.models`, sorted."""
    task = keras_hub.models.Task
    return sorted(
        name
        for name in dir(keras_hub.models)
        if isinstance(getattr(keras_hub.models, name), type)
        and issubclass(getattr(keras_hub.models, name), task)
        and getattr(keras_hub.models, name).backbone_cls is not None
    )


def resolve_task(keras_hub, task):
    """A keras-hub task class from a class or its name (`None`: a backbone)."""
    if task is None:
        return None
    if isinstance(task, str):
        cls = getattr(keras_hub.models, task, None)
        if isinstance(cls, type) and issubclass(cls, keras_hub.models.Task):
            return cls
        names = task_names(keras_hub)
        close = difflib.get_close_matches(task, names, n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"Unknown keras-hub task {task!r}.{hint} Valid task names: "
            f"{', '.join(names)}."
        )
    if isinstance(task, type) and issubclass(task, keras_hub.models.Task):
        return task
    raise ValueError(
        "`task` must be a keras-hub task class (e.g. "
        "`keras_hub.models.BertMaskedLM`) or its name (e.g. `'BertMaskedLM'`), "
        f"got {task!r}."
    )


def load(keras_hub, preset, task_cls, load_weights, kwargs):
    """Loads `preset` as `task_cls` (or a backbone), or explains why not."""
    if not isinstance(preset, (str, os.PathLike)):
        raise ValueError(
            "`preset` must be a keras-hub preset name, a handle such as "
            f"'hf://org/model', or a local directory; got {preset!r}."
        )
    preset = os.fspath(preset)
    scheme = preset.split("://", 1)[0].lower() if "://" in preset else None
    builtin = _builtin_presets()
    loader = task_cls if task_cls is not None else keras_hub.models.Backbone
    what = task_cls.__name__ if task_cls is not None else "backbone"
    if scheme is None and not os.path.exists(preset):
        if preset not in builtin:
            if _looks_like_a_path(preset):
                raise FileNotFoundError(
                    f"The preset directory {preset!r} is missing locally: no "
                    "such directory. Check the path, or save a preset there "
                    "first with `model.save_to_preset(...)`."
                )
            close = difflib.get_close_matches(preset, sorted(builtin), n=3)
            hint = (
                f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            )
            raise ValueError(
                f"Unknown preset {preset!r}: it is not a local directory and "
                f"not a keras-hub preset name.{hint} Pass a keras-hub preset "
                "name (e.g. 'bert_base_en_uncased'), a handle "
                "('kaggle://...', 'hf://...'), or a local preset directory."
            )
    if scheme is None and os.path.exists(preset):
        check_local_preset(preset)
    remote = scheme is not None or not os.path.exists(preset)
    try:
        return loader.from_preset(preset, load_weights=load_weights, **kwargs)
    except Exception as e:
        if not remote or not _is_fetch_failure(e):
            raise
        source = {
            "kaggle": "Kaggle",
            "hf": "Hugging Face",
            "modelscope": "ModelScope",
        }.get(scheme, scheme or "Kaggle")
        raise OSError(
            f"Could not load the preset {preset!r} as a {what}: it is not on "
            f"this machine, so it must be downloaded from {source}, and that "
            f"failed ({type(e).__name__}: {e}). Without network access, "
            "download the preset on a machine that has it, save it with "
            "`save_to_preset(dir)`, and pass that local directory."
        ) from e


def check_local_preset(preset):
    """Checks a local preset directory's `config.json`, naming the file.

    Raises `NotADirectoryError` for a file, `FileNotFoundError` for a
    directory without `config.json`, and `ValueError` for a `config.json`
    that is not JSON, not an object, or names a class that no installed
    library registers with Keras. Formats keras-hub converts (Transformers,
    timm) pass through.
    """
    if not os.path.isdir(preset):
        raise NotADirectoryError(
            f"The preset {preset!r} is a file, not a preset directory. Pass the "
            "directory that `save_to_preset(dir)` wrote (it holds config.json)."
        )
    config_path = os.path.join(preset, "config.json")
    if not os.path.isfile(config_path):
        files = sorted(os.listdir(preset))
        holds = f"it holds {', '.join(files)}" if files else "it is empty"
        raise FileNotFoundError(
            f"The preset directory {preset!r} has no config.json ({holds}), so "
            f"it is not a keras-hub preset: {config_path!r} is missing. Save a "
            "preset there with `model.save_to_preset(dir)`, or pass the "
            "directory that holds config.json."
        )
    try:
        with open(config_path, encoding="utf-8") as file:
            config = json.load(file)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(
            f"The preset's {config_path!r} is not valid JSON ({e}). The file is "
            "damaged or was not written by keras-hub: save the preset again "
            "with `model.save_to_preset(dir)`."
        ) from e
    if not isinstance(config, dict):
        raise ValueError(
            f"The preset's {config_path!r} holds a JSON {type(config).__name__}, "
            "not the object that keras-hub writes. Save the preset again with "
            "`model.save_to_preset(dir)`."
        )
    name = config.get("registered_name")
    if name is None or name in ("Functional", "Sequential"):
        return
    keras = importlib.import_module("keras")
    if not isinstance(name, str) or keras.saving.get_registered_object(name) is None:
        raise ValueError(
            f"The preset's {config_path!r} names the class {name!r}, which no "
            "installed library registers with Keras. Install the version of "
            "keras-hub (or import the library) that defines it, or save the "
            "preset again with `model.save_to_preset(dir)`."
        )


def _is_fetch_failure(error):
    """Whether `error` (or what caused it) is a failed download."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (OSError, ImportError)):
            return True
        # keras-hub reports an unreachable Hugging Face repository as one
        # without a config file.
        if "has no config.json" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _builtin_presets():
    preset_utils = importlib.import_module("keras_hub.src.utils.preset_utils")
    return getattr(preset_utils, "BUILTIN_PRESETS", {})


def _looks_like_a_path(preset):
    return (
        os.sep in preset
        or (os.altsep is not None and os.altsep in preset)
        or preset.startswith((".", "~"))
    )
