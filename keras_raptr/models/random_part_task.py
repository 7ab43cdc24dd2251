"""`RandomPartTask`: kept as an alias of `RandomPartModel`.

Earlier versions returned a `RandomPartTask`, a subclass, from
`RandomPartModel(task)` around a keras-hub task. A `RandomPartModel` (and
any subclass of it) now keeps the task's preprocessing, compile defaults,
`generate()` and `save_to_preset()` itself (`models/_task_pipeline.py`), so
the name is the same class: code that builds a `RandomPartTask` or imports
the name keeps working, and `isinstance(model, RandomPartTask)` holds for
every `RandomPartModel`. Use `model.preprocessor` or `model.backbone` (`None`
around a model that is not a keras-hub task) to tell a wrapped task apart.
"""

from keras_raptr.models.random_part_model import RandomPartModel

RandomPartTask = RandomPartModel
