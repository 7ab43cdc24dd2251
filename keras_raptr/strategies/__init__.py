"""Path strategies: which blocks train at each step, one module per method.

Each strategy is a `keras.callbacks.Callback` that `RandomPartModel.fit`
finds among its callbacks, and each module opens with its method card (what
it does, when to use it, what it costs) and holds the method's maths:

- `stage_schedule.py`: RaPTr (`StageSchedule`), stage by stage, depth- and
  width-wise;
- `progressive_layer_drop.py`: PLD (`ProgressiveLayerDrop`);
- `stochastic_depth.py`: stochastic depth (`StochasticDepth`);
- `gradual_stacking.py`: gradual stacking (`GradualStacking`);
- `path_strategy.py`: `PathStrategy` and `Plan`, to write your own.

The stage maths RaPTr and stacking share (`Stage`, specs, stage lookups)
live in `keras_raptr/schedules.py`.
"""
