"""The blocks' state stacked by role: one array per role, a row per block.

The loop step (`loop_jax.py`, `loop_tf.py`) reads block `idx[t]`'s weights,
state and optimizer slots as row `idx[t]` of one array per *role*
(`blocks.Layout`): the `j`-th weight of every block stacked into one
`(L, *shape_j)` array, and so for the non-trainable state (dropout seeds)
and for each optimizer slot. A step then
touches only its path's rows, in a handful of operations whatever `L` is.

`Stacks` converts Keras' three lists of per-variable values (trainable,
non-trainable, optimizer) to the *stacked* lists and back. A stacked list
holds, in order, the values of the variables of no block (embeddings, heads,
the optimizer's step count: the *rest*) and then one stacked array per role.
Written with `keras.ops`, so it serves every backend: on JAX the stacked
lists are what `fit` threads from step to step (`loop_jax.py`); on
TensorFlow they are held in variables of their own (`loop_tf.py`).
"""

from keras import ops

TRAINABLE, NON_TRAINABLE, OPTIMIZER = 0, 1, 2


class Stacks:
    """How a `Layout`'s block variables stack by role, and back.

    Args:
        layout: the blocks' `blocks.Layout`.
        sizes: the lengths of the model's trainable, non-trainable and
            optimizer variable lists.
    """

    def __init__(self, layout, sizes):
        self.layout = layout
        self.tables = (layout.trainable, layout.non_trainable, layout.slots)
        self.sizes = tuple(sizes)
        self.num_blocks = layout.num_blocks
        self.rest = []
        for table, size in zip(self.tables, self.sizes):
            owned = {n for row in table for n in row}
            self.rest.append([n for n in range(size) if n not in owned])
        self.roles = tuple(len(table[0]) if table else 0 for table in self.tables)

    def is_stacked(self, lists):
        """Whether the trainable list of `lists` is in the stacked form."""
        return len(lists[0]) != self.sizes[0]

    def stack(self, lists):
        """Keras' three lists of per-variable values -> the stacked lists."""
        out = []
        for which, values in enumerate(lists[:3]):
            table = self.tables[which]
            rest = [values[n] for n in self.rest[which]]
            stacked = [
                ops.stack([values[row[j]] for row in table])
                for j in range(self.roles[which])
            ]
            out.append(rest + stacked)
        return out

    def unstack(self, lists):
        """The stacked lists -> Keras' three lists of per-variable values."""
        return [self.views(values, which) for which, values in enumerate(lists[:3])]

    def views(self, values, which):
        """Keras' list `which`, each block variable a row of its role's stack."""
        rest, stacked = self.split(values, which)
        full = [None] * self.sizes[which]
        for n, value in zip(self.rest[which], rest):
            full[n] = value
        for i, row in enumerate(self.tables[which]):
            for j, n in enumerate(row):
                full[n] = stacked[j][i]
        return full

    def split(self, values, which):
        """`(rest, stacked)` of the stacked list `which` (and nothing after them)."""
        count = len(self.rest[which])
        return list(values[:count]), list(values[count : count + self.roles[which]])

    def extra(self, values, which):
        """What a stacked list carries after its stacks (the JAX workspace)."""
        return list(values[len(self.rest[which]) + self.roles[which] :])

    def join(self, rest, stacked, which, extra=()):
        return list(rest) + list(stacked) + list(extra)

    def block_variables(self, variables, which, block=0):
        """Block `block`'s variables of list `which`, in role order."""
        return [variables[n] for n in self.tables[which][block]]

    def rest_variables(self, variables, which):
        return [variables[n] for n in self.rest[which]]


class FlatRows:
    """Roles laid end to end: one flat row per block and dtype.

    TensorFlow's loop step keeps each group of roles that share a dtype as
    one `(L, P)` array, so that reading or writing a block's row is one
    operation whatever the number of roles (TensorFlow's graph runs op by
    op: a step of per-role reads and writes would be bound by their count).

    Args:
        specs: per role, `(shape, dtype)`.
        kinds: optional, per role, a group key beside the dtype (an
            optimizer slot's kind: the `k`-th slot of every weight).
    """

    def __init__(self, specs, kinds=None):
        self.specs = [(tuple(shape), dtype) for shape, dtype in specs]
        kinds = kinds or [0] * len(specs)
        groups = {}
        for role, ((shape, dtype), kind) in enumerate(zip(self.specs, kinds)):
            size = 1
            for d in shape:
                size *= d
            entries = groups.setdefault((kind, str(dtype)), [])
            offset = entries[-1][1] + entries[-1][2] if entries else 0
            entries.append((role, offset, size, shape))
        self.keys = sorted(groups)
        self.groups = [groups[key] for key in self.keys]
        self.widths = [entries[-1][1] + entries[-1][2] for entries in self.groups]
        self.dtypes = [key[1] for key in self.keys]

    def split(self, rows):
        """Per role, its value, from one row per group."""
        out = [None] * len(self.specs)
        for row, entries in zip(rows, self.groups):
            pieces = ops.split(row, [offset for _, offset, _, _ in entries[1:]]) if len(
                entries
            ) > 1 else [row]
            for (role, _, _, shape), piece in zip(entries, pieces):
                out[role] = ops.reshape(piece, shape)
        return out

    def join(self, values):
        """One row per group, from each role's value."""
        rows = []
        for entries, dtype in zip(self.groups, self.dtypes):
            parts = [ops.reshape(ops.cast(values[role], dtype), (-1,)) for role, *_ in entries]
            rows.append(parts[0] if len(parts) == 1 else ops.concatenate(parts))
        return rows
