"""KV-cache rollback for transformers 5.x caches.

`DynamicCache.crop` takes a *negative* count of tokens to drop in transformers 5 (the 4.x
"keep up to length" form raises), so the rollback is wrapped once here.
"""

from __future__ import annotations

from transformers import Cache


def truncate(cache: Cache, length: int) -> None:
    """Keep the first `length` positions of every layer of `cache`."""
    current = cache.get_seq_length()
    assert 0 <= length <= current, (length, current)
    if length < current:
        cache.crop(length - current)
