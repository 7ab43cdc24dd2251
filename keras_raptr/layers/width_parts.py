"""Where a residual block keeps its attention heads and feed-forward units.

Width-wise RaPTr (`keras_raptr.Stage(..., width=w)`) runs each on-path block
with a random subset of its attention heads and feed-forward hidden units. To
do that with narrower matrices, not masks, the engine must know which axis of
which variable holds the heads and the units: a block class's *width
adapter*, a function `block -> WidthParts`, says so. keras-hub's
`TransformerEncoder`, `TransformerDecoder` (BERT, RoBERTa, GPT-2, ...), the
Llama decoder block and the Gemma decoder block have one; register one for
another class with `register_width_parts`.

A narrow step gathers the kept slices of each listed variable and runs the
block's own `call` on them, so the block's code must not depend on the
number of heads or units except through the attributes the adapter lists in
`attributes` (set to the narrow counts while the narrow block runs).
"""

import keras

_ADAPTERS = {}


class WidthParts:
    """The heads and units of one block: which axis of which variable.

    Args:
        num_heads: int, the block's attention (query) heads (0: none).
        heads: list of `(variable, axis)`: each variable whose `axis` has one
            entry per query head (query and output projections, and key and
            value projections without grouped-query attention).
        num_units: int, the feed-forward hidden units.
        units: list of `(variable, axis)`: each variable whose `axis` has one
            entry per hidden unit (the intermediate and gate kernels and
            biases, the output kernel).
        num_key_value_heads: int or `None`. With grouped-query attention, the
            key/value heads; every `num_heads // num_key_value_heads`
            consecutive query heads share one, and a narrow step keeps whole
            groups. `None`: no grouping.
        key_value_heads: list of `(variable, axis)` with one entry per
            key/value head (grouped-query attention only).
        outputs: the variables whose kept slices make a part's output (the
            attention and feed-forward output kernels): `scaling="inverse"`
            scales them by the inverse of the kept fraction.
        attributes: optional function `(num_heads, num_key_value_heads,
            num_units) -> list of (object, name, value)`: attributes set to
            `value` while the narrow block runs, for block code that reads a
            head count (Gemma's attention reshapes by it).

    Example:

    ```python
    import keras
    import keras_raptr

    class Block(keras.layers.Layer):
        def __init__(self, units, **kwargs):
            super().__init__(**kwargs)
            self.units = units

        def build(self, shape):
            self.up = keras.layers.Dense(self.units, activation="relu")
            self.up.build(shape)
            self.down = keras.layers.Dense(shape[-1])
            self.down.build((*shape[:-1], self.units))

        def call(self, x):
            return x + self.down(self.up(x))

    def block_parts(block):
        return keras_raptr.layers.WidthParts(
            num_heads=0,
            heads=[],
            num_units=block.units,
            units=[(block.up.kernel, 1), (block.up.bias, 0), (block.down.kernel, 0)],
            outputs=[block.down.kernel],
        )

    keras_raptr.layers.register_width_parts(Block, block_parts)

    inputs = keras.Input((4, 8))
    blocks = [Block(16), Block(16), Block(16)]
    h = inputs
    for block in blocks:
        h = block(h)
    model = keras_raptr.RandomPartModel(keras.Model(inputs, h), blocks=blocks)
    model.compile(optimizer="adam", loss="mse")
    # Two stages: every block at half of its units, then at full width.
    schedule = keras_raptr.StageSchedule.from_spec("3@0.5-3", total_steps=4)
    x = keras.random.normal((8, 4, 8))
    model.fit(x, x, batch_size=4, epochs=2, callbacks=[schedule], verbose=0)
    ```
    """

    def __init__(
        self,
        num_heads,
        heads,
        num_units,
        units,
        num_key_value_heads=None,
        key_value_heads=(),
        outputs=(),
        attributes=None,
    ):
        self.num_heads = int(num_heads)
        self.heads = list(heads)
        self.num_units = int(num_units)
        self.units = list(units)
        self.num_key_value_heads = (
            None if num_key_value_heads is None else int(num_key_value_heads)
        )
        self.key_value_heads = list(key_value_heads)
        self.outputs = list(outputs)
        self.attributes = attributes
        groups = self.num_key_value_heads
        if groups is not None and (groups < 1 or self.num_heads % groups):
            raise ValueError(
                f"`num_heads={self.num_heads}` must be a multiple of "
                f"`num_key_value_heads={groups}` (grouped-query attention)."
            )
        for name, total, pairs in (
            ("heads", self.num_heads, self.heads),
            ("units", self.num_units, self.units),
            ("key_value_heads", self.num_key_value_heads, self.key_value_heads),
        ):
            for variable, axis in pairs:
                shape = tuple(variable.shape)
                if not -len(shape) <= axis < len(shape) or shape[axis] != total:
                    raise ValueError(
                        f"The width adapter lists '{variable.path}' (shape "
                        f"{shape}) under `{name}` with axis {axis}, which does "
                        f"not have {total} entries. Give the axis that holds "
                        f"one entry per {name.rstrip('s').replace('_', ' ')}."
                    )

    def slices(self):
        """`(variable, axis, part)` for each sliced variable; part names the kept set."""
        return (
            [(v, a, "heads") for v, a in self.heads]
            + [(v, a, "key_value_heads") for v, a in self.key_value_heads]
            + [(v, a, "units") for v, a in self.units]
        )


def register_width_parts(block_class, parts):
    """Registers the width adapter of a block class (and its subclasses).

    Args:
        block_class: a `keras.layers.Layer` subclass.
        parts: a function `block -> keras_raptr.layers.WidthParts`, called on
            a built block.
    """
    if not (isinstance(block_class, type) and issubclass(block_class, keras.layers.Layer)):
        raise ValueError(
            "`register_width_parts` takes a `keras.layers.Layer` subclass, got "
            f"{block_class!r}."
        )
    if not callable(parts):
        raise ValueError(
            "`register_width_parts` takes a function `block -> WidthParts`, got "
            f"{parts!r}."
        )
    _ADAPTERS[block_class] = parts


def width_parts(block):
    """The `WidthParts` of a built block, or a `ValueError` saying how to add one."""
    _register_keras_hub()
    for cls in type(block).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls](block)
    raise ValueError(
        f"Width-wise stages need to know where the block '{block.name}' of class "
        f"`{type(block).__name__}` keeps its attention heads and feed-forward "
        "units, and no width adapter is registered for that class. Register "
        "one with `keras_raptr.layers.register_width_parts("
        f"{type(block).__name__}, parts)`, where `parts(block)` returns a "
        "`keras_raptr.layers.WidthParts`, or train this model with width 1."
    )


def _attention(mha):
    """A Keras `MultiHeadAttention`'s head slices: (heads, output kernel)."""
    heads = []
    for dense in (mha.query_dense, mha.key_dense, mha.value_dense):
        heads.append((dense.kernel, 1))
        if dense.bias is not None:
            heads.append((dense.bias, 0))
    heads.append((mha.output_dense.kernel, 0))
    return heads, mha.output_dense.kernel


def _feedforward(block, intermediate, output, gates=()):
    units = [(intermediate.kernel, 1)]
    if intermediate.bias is not None:
        units.append((intermediate.bias, 0))
    for gate in gates:
        units.append((gate.kernel, 1))
        if getattr(gate, "bias", None) is not None:
            units.append((gate.bias, 0))
    units.append((output.kernel, 0))
    return units, output.kernel


def _transformer_parts(block):
    """keras-hub's `TransformerEncoder` and `TransformerDecoder`."""
    heads, attention_out = _attention(block._self_attention_layer)
    outputs = [attention_out]
    cross = getattr(block, "_cross_attention_layer", None)
    if cross is not None:
        cross_heads, cross_out = _attention(cross)
        heads += cross_heads
        outputs.append(cross_out)
    units, ffn_out = _feedforward(
        block, block._feedforward_intermediate_dense, block._feedforward_output_dense
    )
    return WidthParts(
        num_heads=block.num_heads,
        heads=heads,
        num_units=block.intermediate_dim,
        units=units,
        outputs=outputs + [ffn_out],
    )


def _llama_parts(block):
    """keras-hub's Llama decoder block (grouped-query attention)."""
    attention = block._self_attention_layer
    units, ffn_out = _feedforward(
        block,
        block._feedforward_intermediate_dense,
        block._feedforward_output_dense,
        gates=(block._feedforward_gate_dense,),
    )
    return WidthParts(
        num_heads=attention.num_query_heads,
        heads=[(attention._query_dense.kernel, 1), (attention._output_dense.kernel, 0)],
        num_key_value_heads=attention.num_key_value_heads,
        key_value_heads=[(attention._key_dense.kernel, 1), (attention._value_dense.kernel, 1)],
        num_units=block.intermediate_dim,
        units=units,
        outputs=[attention._output_dense.kernel, ffn_out],
    )


def _gemma_parts(block):
    """keras-hub's Gemma decoder block (grouped-query attention)."""
    attention = block.attention
    units = [(block.gating_ffw.kernel, 1), (block.gating_ffw_2.kernel, 1), (block.ffw_linear.kernel, 0)]

    def attributes(num_heads, num_key_value_heads, num_units):
        values = [
            (attention, "num_query_heads", num_heads),
            (attention, "num_key_value_heads", num_key_value_heads),
        ]
        if not attention.query_head_dim_normalize:
            # Its query scale reads `hidden_dim // num_query_heads`: keep it.
            per_head = attention.hidden_dim // attention.num_query_heads
            values.append((attention, "hidden_dim", per_head * num_heads))
        return values

    return WidthParts(
        num_heads=attention.num_query_heads,
        heads=[(attention.query_dense.kernel, 0), (attention.output_dense.kernel, 0)],
        num_key_value_heads=attention.num_key_value_heads,
        key_value_heads=[(attention.key_dense.kernel, 0), (attention.value_dense.kernel, 0)],
        num_units=block.intermediate_dim // 2,
        units=units,
        outputs=[attention.output_dense.kernel, block.ffw_linear.kernel],
        attributes=attributes,
    )


_REGISTERED_HUB = []


def _register_keras_hub():
    """The built-in adapters, registered on first use (keras-hub is optional)."""
    if _REGISTERED_HUB:
        return
    _REGISTERED_HUB.append(True)
    try:
        import keras_hub
    except ImportError:
        return
    built_in = [
        (keras_hub.layers.TransformerEncoder, _transformer_parts),
        (keras_hub.layers.TransformerDecoder, _transformer_parts),
    ]
    try:
        from keras_hub.src.models.gemma.gemma_decoder_block import GemmaDecoderBlock
        from keras_hub.src.models.llama.llama_decoder import LlamaTransformerDecoder

        built_in += [(LlamaTransformerDecoder, _llama_parts), (GemmaDecoderBlock, _gemma_parts)]
    except ImportError:
        pass
    for cls, parts in built_in:
        _ADAPTERS.setdefault(cls, parts)
