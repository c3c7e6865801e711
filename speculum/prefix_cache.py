"""Prompt-prefix KV reuse: the target's cache rows for a prompt's start, up to its last image.

A second request about the same image (same template start, same visual embeddings) skips the
target's prefill of those rows: it restores them and runs only the text after the image. Entries
are keyed by the sha256 of the prefix's input embeddings (token and visual, bit for bit), so a
different image, prompt start or encoder never matches. The rows restored are the rows a full
prefill computes (causal attention: a row never depends on later ones), so output is unchanged.
Least recently used entries go first once `max_bytes` is reached; 0 turns reuse off.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from transformers import Cache

from speculum.counters import Counters

DEFAULT_MAX_BYTES = 256 * 2**20


@dataclass(frozen=True)
class PrefixEntry:
    """keys/values: per layer [1, H, P, d] · hidden: [P, D] the target's features at those rows."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    hidden: torch.Tensor

    @property
    def length(self) -> int:
        return self.hidden.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(t) for t in (*self.keys, *self.values, self.hidden))


@dataclass(frozen=True)
class PrefixStats:
    hits: int = 0
    misses: int = 0
    stores: int = 0
    evictions: int = 0
    reused_tokens: int = 0


class PrefixCache:
    """Thread-safe LRU of PrefixEntry by prefix key, bounded in bytes."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        if max_bytes < 0:
            raise ValueError("the prefix cache's size must be >= 0 bytes")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, PrefixEntry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._counters = Counters(PrefixStats)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def stats(self) -> PrefixStats:
        return self._counters.snapshot()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def lookup(self, key: bytes) -> PrefixEntry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._counters.add(misses=1)
                return None
            self._entries.move_to_end(key)
            self._counters.add(hits=1, reused_tokens=entry.length)
            return entry

    def store(self, key: bytes, cache: Cache, hidden: torch.Tensor, length: int) -> None:
        """Copy the first `length` rows of `cache` (and `hidden`, [>= length, D]) under `key`."""
        entry = PrefixEntry(
            tuple(layer.keys[..., :length, :].clone() for layer in cache.layers),
            tuple(layer.values[..., :length, :].clone() for layer in cache.layers),
            hidden[:length].clone(),
        )
        if entry.nbytes > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = entry
            self._bytes += entry.nbytes
            evicted = 0
            while self._bytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self._bytes -= old.nbytes
                evicted += 1
            self._counters.add(stores=1, evictions=evicted)


def prefix_key(prefix_embeds: torch.Tensor) -> bytes:
    """sha256 over the dtype, shape and bytes of the prefix's input embeddings [1, P, D]."""
    tensor = prefix_embeds.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{tensor.dtype}:{tuple(tensor.shape)}".encode())
    digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.digest()


def image_prefix_length(expanded_ids: list[int], image_token_id: int | None) -> int:
    """Rows up to and including the last image token; 0 without images or when nothing follows
    (a prefill must run at least one new row to choose the first token)."""
    if image_token_id is None:
        return 0
    for index in range(len(expanded_ids) - 1, -1, -1):
        if expanded_ids[index] == image_token_id:
            return index + 1 if index + 1 < len(expanded_ids) else 0
    return 0


def restore(cache: Cache, entry: PrefixEntry) -> None:
    """Fill the empty `cache` with the entry's rows (copies: sessions write their caches in place)."""
    assert cache.get_seq_length() == 0, "restore into a fresh cache"
    for index, (keys, values) in enumerate(zip(entry.keys, entry.values)):
        cache.update(keys.clone(), values.clone(), index)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
