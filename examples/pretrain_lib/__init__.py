"""The helpers of `examples/pretrain.py`, which reads top to bottom as the recipe.

- `options`: the command line, its checks, a resumed run's options;
- `corpus`: the texts, the WordPiece vocabulary, the token windows and
  their cache, the masked-LM and causal-LM batches;
- `model`: the keras-hub task, the method's strategy, the learning rate,
  the preset;
- `distribution`: `--distribute`;
- `checkpoints`: atomic file writes, the checkpoint and dropout's random
  state, for `--resume`;
- `callbacks`: the recorder (curve and checkpoint), the stage starts, the
  stop on a non-finite loss;
- `report`: the loss curve, the stage starts, the plot, the summary line
  and the comparison with the baseline;
- `tensorboard_logs`: the TensorBoard logs;
- `errors`: the errors a run prints, with their exit codes.
"""
