"""Pretrains a small masked language model with RaPTr, offline.

    KERAS_BACKEND=jax python examples/pretrain.py
    KERAS_BACKEND=torch python examples/pretrain.py --method baseline

The corpus is real English text that every Python install carries: the
language reference of `pydoc_data.topics` and the docstrings of the standard
library modules. It is split into a training part and a held-out part. The
model is a BERT-style encoder (keras-hub `TransformerEncoder` blocks, a token
and position embedding, a byte-level vocabulary) trained to predict 15% of
masked bytes. With `--method raptr` (the default) it trains under the RaPTr
schedule `6-8-10-12` (on 12 blocks); `--method baseline` trains every block
at every step. At the end it prints the held-out loss, the wall-clock time and
the block compute used relative to full training.
"""

import argparse
import importlib
import sys
import time

import keras
import numpy as np

import keras_raptr

MASK_ID, PAD_ID, VOCAB = 256, 257, 258


def corpus():
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
    return "\n\n".join(texts).encode("utf-8", "ignore")


def windows(data, seq_len):
    tokens = np.frombuffer(data, dtype=np.uint8).astype("int32")
    count = len(tokens) // seq_len
    return tokens[: count * seq_len].reshape(count, seq_len)


def mask(batch, rng, rate=0.15):
    """BERT-style masking: returns inputs, targets and per-token weights."""
    chosen = rng.random(batch.shape) < rate
    inputs = np.where(chosen, MASK_ID, batch)
    # Weights that average the loss over the masked bytes only.
    weights = chosen.astype("float32") / max(chosen.mean(), 1e-9)
    return inputs, batch, weights


def build(num_layers, hidden_dim, seq_len):
    import keras_hub

    token_ids = keras.Input((seq_len,), dtype="int32", name="token_ids")
    x = keras_hub.layers.TokenAndPositionEmbedding(
        vocabulary_size=VOCAB, sequence_length=seq_len, embedding_dim=hidden_dim
    )(token_ids)
    blocks = [
        keras_hub.layers.TransformerEncoder(
            intermediate_dim=4 * hidden_dim, num_heads=4, dropout=0.1,
            name=f"transformer_layer_{i}",
        )
        for i in range(num_layers)
    ]
    for block in blocks:
        x = block(x)
    x = keras.layers.LayerNormalization()(x)
    logits = keras.layers.Dense(VOCAB, name="mlm_head")(x)
    return keras.Model(token_ids, logits, name="byte_bert"), blocks


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=("raptr", "baseline"), default="raptr")
    parser.add_argument("--schedule", default="6-8-10-12")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=12)
    parser.add_argument("--hidden-dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    data = windows(corpus(), args.seq_len)
    rng.shuffle(data)
    held_out = data[: max(1, len(data) // 20)]
    train = data[len(held_out):]
    print(f"corpus: {len(train)} training and {len(held_out)} held-out windows "
          f"of {args.seq_len} bytes")

    inner, blocks = build(args.num_layers, args.hidden_dim, args.seq_len)
    model = keras_raptr.RandomPartModel(inner, blocks=blocks, seed=args.seed)
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
    )
    callbacks, fraction = [], 1.0
    if args.method == "raptr":
        try:
            schedule = keras_raptr.StageSchedule.from_spec(args.schedule, total_steps=args.steps)
            fraction = schedule.compute_fraction(args.num_layers)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        callbacks.append(schedule)

    steps_per_epoch = max(1, min(100, args.steps))
    x, y, w = mask(train[rng.integers(0, len(train), args.steps * args.batch_size)], rng)
    vx, vy, vw = mask(held_out, rng)
    start = time.perf_counter()
    model.fit(
        x, y, sample_weight=w, batch_size=args.batch_size,
        epochs=-(-args.steps // steps_per_epoch), steps_per_epoch=steps_per_epoch,
        validation_data=(vx, vy, vw), callbacks=callbacks, verbose=2,
    )
    seconds = time.perf_counter() - start
    loss = model.evaluate(vx, vy, sample_weight=vw, batch_size=64, verbose=0)
    print(f"method: {args.method}  held-out loss: {loss:.4f}  "
          f"wall-clock: {seconds:.1f}s  block compute vs full training: {fraction:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
