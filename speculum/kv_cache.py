"""KV-cache rollback for transformers 5.x caches.

`DynamicCache.crop` takes a *negative* count of tokens to drop in transformers 5 (the 4.x
"keep up to length" form raises), so the rollback is wrapped once here, with the compaction a
candidate tree needs (keep one branch of the rows just appended).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import Cache


def truncate(cache: Cache, length: int) -> None:
    """Keep the first `length` positions of every layer of `cache`."""
    current = cache.get_seq_length()
    assert 0 <= length <= current, (length, current)
    if length < current:
        cache.crop(length - current)


@torch.inference_mode()  # the cache's tensors are inference tensors: written in place only here
def keep_rows(cache: Cache, length: int, rows: Sequence[int]) -> None:
    """Keep the first `length` positions, then the positions `rows` (ascending, each >= length)
    moved down to follow them; drop the rest. A verified tree keeps its accepted branch this way."""
    assert all(length <= a < b for a, b in zip(rows, rows[1:])) and (not rows or rows[0] >= length), (length, rows)
    if list(rows) != list(range(length, length + len(rows))):
        index = torch.tensor(rows, device=cache.layers[0].keys.device)
        for layer in cache.layers:
            # The gathered rows are copied before the write, so overlapping ranges are safe.
            layer.keys[..., length : length + len(rows), :] = layer.keys.index_select(-2, index)
            layer.values[..., length : length + len(rows), :] = layer.values.index_select(-2, index)
    truncate(cache, length + len(rows))
