"""The canonical block_weights string the editor (web/block_weights_core.js) writes, in Python: the tests' reference.

The node only parses (vl_core.schedule.parse_block_weights); nothing in the pack formats, so this lives with the tests."""
from __future__ import annotations

from collections.abc import Sequence


def format_block_weights(weights: Sequence[float]) -> str:
    """Compact canonical string of a weight list (runs of equal non-zero weights as ranges); '' if all 0.

    parse_block_weights(format_block_weights(w), len(w)) == w for finite w whose repr round-trips.
    """
    parts = []
    i, n = 0, len(weights)
    while i < n:
        w = float(weights[i])
        j = i
        while j + 1 < n and float(weights[j + 1]) == w:
            j += 1
        if w != 0.0:
            parts.append(f"{i}:{w!r}" if i == j else f"{i}-{j}:{w!r}")
        i = j + 1
    return ", ".join(parts)
