"""The blocks' state stacked between JAX train steps.

On JAX, Keras threads the training state through `fit` as four lists of
arrays, one array per variable. A drawn path changes `k` of the `L` blocks,
but with one array per variable the step must still return a new array for
every variable of every block (a copy, for a block off the path), and JAX
passes the arrays of all `L` blocks in and out of every step.

While a `fit` trains a `RandomPartModel` whose blocks share one structure
(`gather.layout`), its state is instead threaded in the packed form:

- the variables of no block (embeddings, heads, the step counter) stay one
  array each, in their order;
- variable `j` of every block (block `i`'s entry `j` of the `Layout`) is one
  array of shape `(L, *shape)`, row `i` being block `i`'s.

A step then reads its path's rows (`take`) and writes them back in place
(`.at[rows].set` on a donated buffer): the step touches the `k` on-path
blocks' rows only, whatever `L` is.

The packed state keeps Keras' four lists (trainable, non-trainable,
optimizer, metrics), so `fit` threads it as it would its own. Keras' state
is packed at the first gathered step and after any sync (`pack`); it is
unpacked before a step of another kind (a static path's) and by the model's
`jax_state_sync` before Keras writes it to the variables. Each conversion
copies the blocks' weights and slots once, and holds both copies for the
moment it runs.
"""


class Packing:
    """How a `Layout`'s block variables pack into stacked arrays, and back."""

    def __init__(self, layout, sizes):
        import jax

        # Per Keras list (trainable, non-trainable, optimizer): the block
        # table (`[block][role]` -> list index) and the non-block indices.
        self.tables = (layout.trainable, layout.non_trainable, layout.slots)
        self.sizes = tuple(sizes)
        self.rest = []
        for table, size in zip(self.tables, self.sizes):
            owned = {n for row in table for n in row}
            self.rest.append([n for n in range(size) if n not in owned])
        self.num_blocks = len(layout.trainable)
        self._pack = jax.jit(self._pack_lists)
        self._unpack = jax.jit(self._unpack_lists)

    # ------------------------------------------------------------------
    # Outside the step: Keras' state in, Keras' state out.

    def is_packed(self, state):
        """Whether the trainable list of `state` is in the packed form."""
        return len(state[0]) != self.sizes[0]

    def pack(self, state):
        """Keras' four lists of per-variable arrays -> the packed state."""
        packed = self._pack(tuple(list(values) for values in state[:3]))
        return (*packed, state[3])

    def unpack(self, state):
        """The packed state -> Keras' four lists of per-variable arrays."""
        lists = self._unpack(tuple(list(values) for values in state[:3]))
        return (*lists, state[3])

    def _pack_lists(self, lists):
        import jax.numpy as jnp

        packed = []
        for values, table, rest in zip(lists, self.tables, self.rest):
            roles = len(table[0]) if table else 0
            packed.append(
                [values[n] for n in rest]
                + [jnp.stack([values[row[j]] for row in table]) for j in range(roles)]
            )
        return tuple(packed)

    def _unpack_lists(self, lists):
        out = []
        for values, table, rest, size in zip(lists, self.tables, self.rest, self.sizes):
            full = [None] * size
            for m, n in enumerate(rest):
                full[n] = values[m]
            for j, stacked in enumerate(values[len(rest):]):
                for i, row in enumerate(table):
                    full[row[j]] = stacked[i]
            out.append(full)
        return tuple(out)

    # ------------------------------------------------------------------
    # Inside the step.

    def read(self, packed, idx):
        """Keras' lists for a gathered step (`gather.py`), from the packed state.

        Block position `t < k` holds block `idx[t]`'s values (`idx`: an int32
        tensor, the path's `k` blocks in depth order); the other positions
        hold their own block's (unread: the step leaves them off).
        """
        import jax.numpy as jnp

        k = idx.shape[0]
        out = []
        for values, table, rest, size in zip(
            packed, self.tables, self.rest, self.sizes
        ):
            full = [None] * size
            for m, n in enumerate(rest):
                full[n] = values[m]
            for j, stacked in enumerate(values[len(rest):]):
                taken = jnp.take(
                    stacked, idx, axis=0, indices_are_sorted=True, unique_indices=True
                )
                for t, row in enumerate(table):
                    full[row[j]] = taken[t] if t < k else stacked[t]
            out.append(full)
        return out

    def write(self, packed, lists, idx):
        """The packed state after a gathered step that returned Keras' `lists`.

        Row `idx[t]` of each stacked array takes position `t`'s new value,
        in place (the buffers are donated); the other rows keep theirs.
        """
        import jax.numpy as jnp

        k = idx.shape[0]
        out = []
        for old, new, table, rest in zip(packed, lists, self.tables, self.rest):
            values = [new[n] for n in rest]
            for j, stacked in enumerate(old[len(rest):]):
                fresh = jnp.stack([new[table[t][j]] for t in range(k)])
                values.append(
                    stacked.at[idx].set(
                        fresh.astype(stacked.dtype),
                        indices_are_sorted=True,
                        unique_indices=True,
                    )
                )
            out.append(values)
        return out
