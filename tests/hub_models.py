"""Tiny keras-hub tasks built from config, with in-memory vocabularies.

Nothing is downloaded: tokenizers come from a few words of text (a WordPiece
list, a byte-pair table, or a SentencePiece model trained in memory), and
the backbones have 4 blocks of width 8.
"""

import io

import keras

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "the lazy dog sleeps in the sun",
    "a quick brown dog runs to the fox",
    "the sun is over the brown fox",
]
NUM_LAYERS = 4


def _sentencepiece_proto(bos, eos):
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS),
        model_writer=model,
        vocab_size=len({w for text in TEXTS for w in text.split()}) + 4,
        model_type="WORD",
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        pad_piece="<pad>",
        unk_piece="<unk>",
        bos_piece=bos,
        eos_piece=eos,
        minloglevel=2,
    )
    return model.getvalue()


def bert_backbone(num_layers=NUM_LAYERS, vocabulary_size=50):
    """A keras-hub BERT backbone built from config."""
    import keras_hub

    return keras_hub.models.BertBackbone(
        vocabulary_size=vocabulary_size,
        num_layers=num_layers,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=12,
    )


def bert():
    import keras_hub

    words = sorted({w for text in TEXTS for w in text.split()})
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocabulary)
    preprocessor = keras_hub.models.BertMaskedLMPreprocessor(
        tokenizer, sequence_length=12, mask_selection_rate=0.3
    )
    backbone = bert_backbone(vocabulary_size=len(vocabulary))
    return keras_hub.models.BertMaskedLM(backbone, preprocessor=preprocessor)


def gpt2():
    import keras_hub

    words = sorted({w for text in TEXTS for w in text.split()})
    tokens = ["<|endoftext|>"] + ["\u0120" + w for w in words] + words
    letters = sorted({c for w in words for c in w})
    tokens += [c for c in letters if c not in tokens] + ["\u0120"]
    vocabulary = {token: i for i, token in enumerate(tokens)}
    merges = []
    for word in words:
        # Merge each word left to right, with and without the space marker.
        for prefix in ("", "\u0120"):
            current = prefix + word[0] if prefix else word[0]
            if prefix:
                merges.append(f"{prefix} {word[0]}")
            for c in word[1:]:
                merges.append(f"{current} {c}")
                current += c
    for merge in list(merges):
        left, right = merge.split(" ")
        for piece in (left, right, left + right):
            if piece not in vocabulary:
                vocabulary[piece] = len(vocabulary)
    merges = list(dict.fromkeys(merges))
    tokenizer = keras_hub.models.GPT2Tokenizer(vocabulary=vocabulary, merges=merges)
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer, sequence_length=12
    )
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=len(vocabulary),
        num_layers=NUM_LAYERS,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=16,
    )
    return keras_hub.models.GPT2CausalLM(backbone, preprocessor=preprocessor)


def llama():
    import keras_hub

    tokenizer = keras_hub.models.LlamaTokenizer(
        proto=_sentencepiece_proto("<s>", "</s>")
    )
    preprocessor = keras_hub.models.LlamaCausalLMPreprocessor(
        tokenizer, sequence_length=12
    )
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        num_layers=NUM_LAYERS,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=8,
        intermediate_dim=16,
    )
    return keras_hub.models.LlamaCausalLM(backbone, preprocessor=preprocessor)


def gemma():
    import keras_hub

    tokenizer = keras_hub.models.GemmaTokenizer(
        proto=_sentencepiece_proto("<bos>", "<eos>")
    )
    preprocessor = keras_hub.models.GemmaCausalLMPreprocessor(
        tokenizer, sequence_length=12
    )
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        num_layers=NUM_LAYERS,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=8,
        intermediate_dim=16,
        head_dim=4,
    )
    return keras_hub.models.GemmaCausalLM(backbone, preprocessor=preprocessor)


BUILDERS = {"bert": bert, "gpt2": gpt2, "llama": llama, "gemma": gemma}


def task_weights(task):
    """A numpy copy of every weight of a task, by path."""
    return {w.path: keras.ops.convert_to_numpy(w) for w in task.weights}
