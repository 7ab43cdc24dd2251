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
- the blocks' variables in that list, per dtype, are one array of shape
  `(L, P)`: row `i` holds block `i`'s variables of that dtype, flattened
  and laid end to end in the `Layout`'s order (for the optimizer: every
  slot of every weight of the block).

A step then reads its path's rows (one `take` per array) and writes them
back in place (one `.at[idx].set` per array, on a donated buffer): it
touches the `k` on-path blocks' rows only, whatever `L` is, in a handful of
ops whatever the number of variables a block has.

The packed state keeps Keras' four lists (trainable, non-trainable,
optimizer, metrics), so `fit` threads it as it would its own. Keras' state
is packed at the first gathered step and after any sync (`pack`); it is
unpacked before a step of another kind (a static path's) and by the model's
`jax_state_sync` before Keras writes it to the variables. Each conversion
copies the blocks' weights and slots once, and holds both copies for the
moment it runs.
"""

import math


class Packing:
    """How a `Layout`'s block variables pack into stacked arrays, and back.

    Args:
        layout: the blocks' `gather.Layout`.
        specs: per Keras list (trainable, non-trainable, optimizer), the
            `(shape, dtype)` of each of its variables.
    """

    def __init__(self, layout, specs):
        import jax

        self.tables = (layout.trainable, layout.non_trainable, layout.slots)
        self.sizes = tuple(len(s) for s in specs)
        self.num_blocks = len(layout.trainable)
        # Per list: the indices of no block, and the groups of the blocks'
        # variables (per dtype: `[(role, offset, size, shape)]`).
        self.rest = []
        self.groups = []
        for table, spec in zip(self.tables, specs):
            owned = {n for row in table for n in row}
            self.rest.append([n for n in range(len(spec)) if n not in owned])
            groups = {}
            for j, n in enumerate(table[0] if table else ()):
                shape, dtype = spec[n]
                entries = groups.setdefault(str(dtype), [])
                offset = entries[-1][1] + entries[-1][2] if entries else 0
                entries.append((j, offset, math.prod(shape), tuple(shape)))
            self.groups.append([groups[d] for d in sorted(groups)])
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
        for values, table, rest, groups in zip(lists, self.tables, self.rest, self.groups):
            flat = [
                jnp.stack([_row(jnp, [values[row[j]] for j, *_ in group]) for row in table])
                for group in groups
            ]
            packed.append([values[n] for n in rest] + flat)
        return tuple(packed)

    def _unpack_lists(self, lists):
        return tuple(
            self._lists(lists, lambda stacked, i: stacked[i], range(self.num_blocks))
        )

    # ------------------------------------------------------------------
    # Inside the step.

    def read(self, packed, idx, sorted_indices=True):
        """Keras' lists for a gathered step (`gather.py`), from the packed state.

        Block position `t < k` holds block `idx[t]`'s values (`idx`: an int32
        tensor, the path's `k` blocks in depth order); the other positions
        hold their own block's (unread: the step leaves them off). With
        `off_path_update="zero_grad"`, `idx` is a permutation of every block
        (the path's first), not sorted.
        """
        import jax.numpy as jnp

        k = idx.shape[0]
        taken = {}

        def row(stacked, t):
            if t >= k:
                return stacked[t]
            if id(stacked) not in taken:
                # `clip`: the indices are in range; the default would mask
                # every element of the rows against out-of-range indices.
                taken[id(stacked)] = jnp.take(
                    stacked,
                    idx,
                    axis=0,
                    mode="clip",
                    indices_are_sorted=sorted_indices,
                    unique_indices=True,
                )
            return taken[id(stacked)][t]

        return self._lists(packed, row, range(self.num_blocks))

    def write(self, packed, lists, idx, sorted_indices=True):
        """The packed state after a gathered step that returned Keras' `lists`.

        Row `idx[t]` of each stacked array takes position `t`'s new values,
        in place (the buffers are donated); the other rows keep theirs.
        """
        import jax.numpy as jnp

        k = idx.shape[0]
        out = []
        for old, new, table, rest, groups in zip(
            packed, lists, self.tables, self.rest, self.groups
        ):
            values = [new[n] for n in rest]
            for stacked, group in zip(old[len(rest):], groups):
                fresh = jnp.stack(
                    [_row(jnp, [new[table[t][j]] for j, *_ in group]) for t in range(k)]
                )
                values.append(
                    stacked.at[idx].set(
                        fresh.astype(stacked.dtype),
                        indices_are_sorted=sorted_indices,
                        unique_indices=True,
                    )
                )
            out.append(values)
        return out

    def _lists(self, packed, row, positions):
        """Keras' lists, position `t`'s variables cut from `row(stacked, t)`."""
        out = []
        for values, table, rest, groups, size in zip(
            packed, self.tables, self.rest, self.groups, self.sizes
        ):
            full = [None] * size
            for m, n in enumerate(rest):
                full[n] = values[m]
            for stacked, group in zip(values[len(rest):], groups):
                for t in positions:
                    flat = row(stacked, t)
                    for j, offset, length, shape in group:
                        full[table[t][j]] = flat[offset : offset + length].reshape(shape)
            out.append(full)
        return out


def _row(jnp, arrays):
    """One block's variables of one dtype, flattened end to end."""
    return jnp.concatenate([jnp.reshape(a, (-1,)) for a in arrays])
