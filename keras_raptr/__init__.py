"""keras-raptr: progressive random-path training (RaPTr) for Keras 3.

Public API:

- `keras_raptr.RandomPartModel`: wraps a model so its residual blocks train
  on a random path.
- `keras_raptr.Stage`, `keras_raptr.StageSchedule`: the stage-by-stage
  schedule, a callback for `model.fit`.
- `keras_raptr.layers.RandomSkip`: the stochastic residual-skip layer.
"""

from keras_raptr import layers
from keras_raptr.callbacks.stage_schedule import StageSchedule
from keras_raptr.models.random_part_model import RandomPartModel
from keras_raptr.schedules import Stage
from keras_raptr.version import __version__

__all__ = [
    "RandomPartModel",
    "Stage",
    "StageSchedule",
    "__version__",
    "layers",
]
