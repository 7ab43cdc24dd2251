"""keras-raptr: progressive random-path training (RaPTr) for Keras 3.

Public API:

- `keras_raptr.RandomPartModel`: wraps a model so its residual blocks train
  on a random path.
- `keras_raptr.Stage`, `keras_raptr.StageSchedule`: the stage-by-stage
  schedule, a callback for `model.fit`.
- `keras_raptr.ProgressiveLayerDrop`, `keras_raptr.StochasticDepth`,
  `keras_raptr.GradualStacking`: the peers of RaPTr, as the same kind of
  callback.
- `keras_raptr.PathStrategy`, `keras_raptr.Plan`: the base classes of a
  strategy, to write your own.
- `keras_raptr.train_flops_per_step`, `keras_raptr.estimate_train_flops`,
  `keras_raptr.TrainFlops`: FLOPs accounting.
- `keras_raptr.layers.RandomSkip`: the stochastic residual-skip layer.
- `keras_raptr.layers.WidthParts`, `keras_raptr.layers.register_width_parts`:
  where a block keeps its heads and units, for width-wise stages
  (`Stage(..., width=w)`).
"""

from keras_raptr import layers
from keras_raptr.flops import TrainFlops
from keras_raptr.flops import estimate_train_flops
from keras_raptr.flops import train_flops_per_step
from keras_raptr.models.random_part_model import RandomPartModel
from keras_raptr.schedules import Stage
from keras_raptr.strategies.gradual_stacking import GradualStacking
from keras_raptr.strategies.path_strategy import PathStrategy
from keras_raptr.strategies.path_strategy import Plan
from keras_raptr.strategies.progressive_layer_drop import ProgressiveLayerDrop
from keras_raptr.strategies.stage_schedule import StageSchedule
from keras_raptr.strategies.stochastic_depth import StochasticDepth
from keras_raptr.version import __version__

__all__ = [
    "GradualStacking",
    "PathStrategy",
    "Plan",
    "ProgressiveLayerDrop",
    "RandomPartModel",
    "Stage",
    "StageSchedule",
    "StochasticDepth",
    "TrainFlops",
    "__version__",
    "estimate_train_flops",
    "layers",
    "train_flops_per_step",
]
