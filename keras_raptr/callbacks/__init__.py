"""The former name of `keras_raptr.strategies`, kept as an alias.

The strategies were callbacks in a package of that name; they now live in
`keras_raptr.strategies` (one module per method). The classes are importable
from here as before, and from the top level (`keras_raptr.StageSchedule`).
"""

from keras_raptr.strategies.gradual_stacking import GradualStacking
from keras_raptr.strategies.path_strategy import PathStrategy
from keras_raptr.strategies.path_strategy import Plan
from keras_raptr.strategies.progressive_layer_drop import ProgressiveLayerDrop
from keras_raptr.strategies.stage_schedule import StageSchedule
from keras_raptr.strategies.stochastic_depth import StochasticDepth

__all__ = [
    "GradualStacking",
    "PathStrategy",
    "Plan",
    "ProgressiveLayerDrop",
    "StageSchedule",
    "StochasticDepth",
]
