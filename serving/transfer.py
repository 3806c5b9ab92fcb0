"""One host-to-device transfer per step: the step's per-row host arrays (tokens, positions, sampling
parameters, ...) packed side by side into one int32 buffer [B, K], unpacked inside the compiled step.

Each host array a jitted call receives is its own transfer, which JAX shards in Python: a decode
step's nineteen were the largest host cost of a step (docs/DESIGN_NOTES.md, "Host cost of a jitted
call"). Packed, the host makes one.

The layout (which leaves are packed, their shapes and dtypes, their columns) is a static argument of
the step, so each layout is its own program, as each set of shapes was before.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

def _packable(a, rows: int) -> bool:
    return isinstance(a, np.ndarray) and a.ndim >= 1 and a.shape[0] == rows and a.dtype.kind in "biuf" \
        and a.dtype.itemsize in (1, 4)


def pack_rows(tree, rows: int):
    """tree (arrays and scalars) -> (the [rows, K] int32 buffer of its numpy leaves with `rows` rows,
    the other leaves, the layout: the static argument `unpack_rows` takes)."""
    leaves, treedef = jax.tree.flatten(tree)
    columns, kept, spec, width = [], [], [], 0
    for i, a in enumerate(leaves):
        if not _packable(a, rows):
            kept.append(a)
            continue
        flat = a.reshape(rows, -1)
        words = flat.view(np.int32) if a.dtype.itemsize == 4 else flat.astype(np.int32)  # (bool, int8: widened)
        spec.append((i, a.shape[1:], a.dtype.str, width, words.shape[1]))
        columns.append(words)
        width += words.shape[1]
    buffer = np.concatenate(columns, axis=1) if columns else np.zeros((rows, 0), np.int32)
    return buffer, kept, (treedef, len(leaves), tuple(spec))


def unpack_rows(buffer, kept, layout, place=lambda a: a):
    """Inside the step: the buffer [B, K] and the other leaves -> the tree pack_rows packed. place: applied
    to each unpacked array (the step pins them whole on every device, as the buffer is)."""
    treedef, n, spec = layout
    leaves, rest = [None] * n, iter(kept)
    for i, shape, dtype, start, width in spec:
        dtype = np.dtype(dtype)
        words = buffer[:, start:start + width]
        a = jax.lax.bitcast_convert_type(words, dtype) if dtype.itemsize == 4 else words.astype(dtype)
        leaves[i] = place(a.reshape(buffer.shape[0], *shape))
    leaves = [next(rest) if a is None else a for a in leaves]
    return jax.tree.unflatten(treedef, leaves)
