"""The drafter's one decoder layer in plain torch: Llama attention (RoPE, SDPA) and SwiGLU MLP, with its KV cache.

Why not transformers' LlamaDecoderLayer: at 256 wide the layer's matmuls take microseconds, and a
drafting round paid about as much again for HF's per-call plumbing (kwargs, the checkpointing
wrapper, RoPE recomputed per call, DynamicCache's layer objects). This layer computes the same
function with the same parameter names (`self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`,
`post_attention_layernorm`), so checkpoints written with the HF layer load unchanged; the tests
check it against the HF layer. EAGLE's layout: no input norm (the inputs are fc outputs already
scaled like target features). The cache is one growable buffer pair with an O(1) rollback.
It must stay a pure function of its inputs and cache: no sampling, no session logic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from draft_service.feature.config import FeatureDrafterConfig


class LayerCache:
    """Keys and values of one sequence's rows: [1, H_kv, capacity, head_dim] buffers, the first
    `length` rows valid. Appending grows the buffers (doubling); `truncate` only moves `length`."""

    def __init__(self, initial_capacity: int = 256):
        self.length = 0
        self._initial = initial_capacity
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None

    @property
    def keys(self) -> torch.Tensor:
        """[1, H_kv, length, head_dim] the valid keys (a view)."""
        return self._keys[:, :, : self.length] if self._keys is not None else torch.empty(0)

    @property
    def values(self) -> torch.Tensor:
        """[1, H_kv, length, head_dim] the valid values (a view)."""
        return self._values[:, :, : self.length] if self._values is not None else torch.empty(0)

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store [1, H_kv, T, head_dim] new rows after the valid ones -> all valid keys and values (views)."""
        assert keys.shape[0] == 1 and keys.shape == values.shape, (keys.shape, values.shape)
        end = self.length + keys.shape[2]
        if self._keys is None or end > self._keys.shape[2]:
            self._grow(keys, end)
        self._keys[:, :, self.length : end] = keys
        self._values[:, :, self.length : end] = values
        self.length = end
        return self._keys[:, :, :end], self._values[:, :, :end]

    def truncate(self, length: int) -> None:
        """Keep the first `length` rows (the rest is overwritten by later appends)."""
        assert 0 <= length <= self.length, (length, self.length)
        self.length = length

    def _grow(self, like: torch.Tensor, needed: int) -> None:
        capacity = max(self._initial, needed, 2 * (0 if self._keys is None else self._keys.shape[2]))
        shape = (1, like.shape[1], capacity, like.shape[3])
        keys, values = like.new_empty(shape), like.new_empty(shape)
        if self._keys is not None:
            keys[:, :, : self.length] = self._keys[:, :, : self.length]
            values[:, :, : self.length] = self._values[:, :, : self.length]
        self._keys, self._values = keys, values


class RotaryTable(nn.Module):
    """cos / signed sin of Llama's default RoPE per position, [P, head_dim], computed as transformers
    does (positions · inv_freq in fp32, the frequencies repeated once) and extended on demand.
    Buffers, not parameters: never in a checkpoint."""

    def __init__(self, head_dim: int, theta: float, initial_positions: int):
        super().__init__()
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        cos, sin = self._table(initial_positions)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _table(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin ((-sin, sin) over the two halves: see `rotate`) of positions 0..count-1."""
        freqs = torch.arange(count, dtype=torch.float)[:, None] * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos(), torch.cat((-freqs.sin(), freqs.sin()), dim=-1)

    def lookup(self, start: int, count: int, positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin for `positions` ([B, T] or [T]) when given, else for start..start+count-1.
        -> [T, head_dim] (broadcasts over batch and heads) or [B, 1, T, head_dim]."""
        last = start + count if positions is None else int(positions.max()) + 1
        if last > self.cos.shape[0]:
            with torch.inference_mode(False):  # training must be able to save them for backward
                self.cos, self.sin = self._table(max(last, 2 * self.cos.shape[0]))
        if positions is None:
            return self.cos[start : start + count], self.sin[start : start + count]
        cos, sin = self.cos[positions], self.sin[positions]
        return (cos, sin) if positions.dim() == 1 else (cos.unsqueeze(1), sin.unsqueeze(1))


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE on [B, H, T, head_dim] in transformers' rotate_half convention: x·cos + rotate_half(x)·sin,
    with rotate_half(x) = (-x2, x1) = roll(x)·(-1, 1) folded into `signed_sin` (one op fewer)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class FusedWeight:
    """The row-concatenation of some Linear layers' weights, so that one matmul does their work
    while the checkpoint keeps their own names. Cached for inference (rebuilt when any of them is
    replaced or updated in place: pointer and version counter), concatenated per call while autograd
    records, so that training still updates the layers' own parameters."""

    def __init__(self, *linears: nn.Linear):
        self._linears = linears
        self._key: tuple | None = None
        self._weight: torch.Tensor | None = None

    def get(self) -> torch.Tensor:
        weights = [linear.weight for linear in self._linears]
        if torch.is_grad_enabled():
            return torch.cat(weights)
        key = tuple((w.data_ptr(), w._version) for w in weights)
        if key != self._key:
            self._weight, self._key = torch.cat(weights), key
        return self._weight


class RMSNorm(nn.Module):
    """Llama's RMSNorm (the parameter is `weight`)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads, RoPE and an optional cache (no biases, as Llama).
    q, k and v run as one matmul (FusedWeight) and q and k are rotated together."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int):
        super().__init__()
        self.head_dim = hidden_size // num_heads
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False)
        self.qkv = FusedWeight(self.q_proj, self.k_proj, self.v_proj)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None,
                mask: torch.Tensor | None, causal: bool, last_only: bool = False,
                only: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, D] -> [B, T, D] ([B, 1, D]: the last row's output alone with `last_only`; [B, R, D]:
        rows `only` alone, R indices, with a `mask`). mask: bool [B or 1, 1, T, S + T] (True =
        visible) or None; `causal` applies SDPA's own causal mask (only without a mask and without
        cached rows)."""
        batch, length, _ = x.shape
        heads, kv_heads = self.num_heads, self.num_kv_heads
        qkv = F.linear(x, self.qkv.get()).view(batch, length, heads + 2 * kv_heads, self.head_dim).transpose(1, 2)
        query_key = rotate(qkv[:, : heads + kv_heads], cos, sin)
        query, key, value = query_key[:, :heads], query_key[:, heads:], qkv[:, heads + kv_heads :]
        if last_only:  # every row's key and value, but only the last row's query: it sees all rows
            query, length, causal = query[:, :, -1:], 1, False
        elif only is not None:  # every row's key and value, the queries of rows `only`
            query, length, mask = query[:, :, only], len(only), mask[:, :, only]
        if cache is not None:
            key, value = cache.append(key, value)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=causal,
                                             enable_gqa=heads != kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    """Llama's SwiGLU feed-forward; gate and up run as one matmul (FusedWeight)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.gate_up = FusedWeight(self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up.get()).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """x + attn(x), then + mlp(norm(.)): a Llama decoder layer without its input norm."""

    def __init__(self, config: FeatureDrafterConfig):
        super().__init__()
        self.self_attn = Attention(config.hidden_size, config.num_heads, config.num_kv_heads)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryTable(self.self_attn.head_dim, config.rope_theta, config.max_positions)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None, mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, last_only: bool = False,
                only: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, D] rows after the cache's (B = 1 with a cache) -> [B, T, D], or [B, 1, D] for the
        last row alone with `last_only` (the other rows then only add their keys and values: with
        one layer their outputs feed nothing, so their queries, attention and MLP are skipped), or
        [B, R, D] for the rows `only` (R indices) of a tree given by `mask`.

        Without `mask` the rows are causal after the cached ones; with it (a candidate tree) `mask`
        [1, 1, T, S + T] says what each row sees and `positions` [1, T] or [T] gives their positions.
        """
        assert not (last_only and (mask is not None or positions is not None)), "last_only is for causal rows"
        assert only is None or mask is not None, "only is for trees"
        cached = 0 if cache is None else cache.length
        length = x.shape[1]
        cos, sin = self.rotary.lookup(cached, length, positions)
        causal = mask is None and cached == 0 and length > 1
        if mask is None and cached and length > 1 and not last_only:  # new rows after cached ones: causal, offset
            mask = torch.ones(length, cached + length, dtype=torch.bool).tril_(cached)
        kept = x[:, -1:] if last_only else x if only is None else x[:, only]
        h = kept + self.self_attn(x, cos, sin, cache, mask, causal, last_only, only)
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward_last_many(self, xs: list[torch.Tensor], caches: list[LayerCache]) -> torch.Tensor:
        """Many sessions' new rows in one pass: xs[i] [T_i, D] go after caches[i]'s rows (appended to
        it) -> [B, D], each session's last-row output, equal to `forward(xs[i][None], caches[i],
        last_only=True)` for each i. The matmuls run once over all rows; only the cache writes and the
        padded gather of keys are per session."""
        attn = self.self_attn
        heads, kv_heads, head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        lengths = [x.shape[0] for x in xs]
        positions = torch.cat([torch.arange(c.length, c.length + n) for c, n in zip(caches, lengths)])
        cos, sin = self.rotary.lookup(0, 0, positions)  # [R, head_dim]
        rows = torch.cat(xs)  # [R, D]
        qkv = F.linear(rows, attn.qkv.get()).view(len(rows), heads + 2 * kv_heads, head_dim)
        query_key = rotate(qkv[:, : heads + kv_heads], cos[:, None], sin[:, None])
        ends = torch.tensor(lengths).cumsum(0)
        query = query_key[ends - 1, :heads].unsqueeze(2)  # [B, H, 1, head_dim]: the last rows' queries
        spans = [(int(end) - n, int(end)) for end, n in zip(ends, lengths)]
        totals = [c.length + n for c, n in zip(caches, lengths)]
        keys = rows.new_zeros(len(xs), kv_heads, max(totals), head_dim)
        values = torch.zeros_like(keys)
        for i, (cache, (start, end)) in enumerate(zip(caches, spans)):
            new_keys = query_key[start:end, heads:].transpose(0, 1)[None]  # [1, H_kv, T_i, head_dim]
            new_values = qkv[start:end, heads + kv_heads :].transpose(0, 1)[None]
            all_keys, all_values = cache.append(new_keys, new_values)
            keys[i, :, : totals[i]] = all_keys[0]
            values[i, :, : totals[i]] = all_values[0]
        visible = torch.arange(max(totals)) < torch.tensor(totals)[:, None]  # [B, S]
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=visible[:, None, None],
                                             enable_gqa=heads != kv_heads)
        h = rows[ends - 1] + attn.o_proj(out.reshape(len(xs), heads * head_dim))
        return h + self.mlp(self.post_attention_layernorm(h))
