"""One decoder pass for several sessions, without padding: their new rows go through every
projection and MLP together, and attend, session by session, to their own KV cache.

The padded alternative (`VisionLanguageModel._padded_pass`) stacks every session's cache into one
right-padded batch and copies it back, at every pass: its cost grows with the caches, so on a CPU a
batch of blocks cost almost what the same blocks cost one by one. Here a cache is only appended to,
as in a single pass, and the extra cost of a session is its attention (a few small calls per layer).

It drives the modules of transformers' LLaMA decoder (`layers[i].self_attn.{q,k,v,o}_proj`,
RMSNorms, `mlp`, `rotary_emb`, `norm`) with transformers' own RoPE and GQA helpers; `fits` says
whether a decoder is one. Each session's rows compute what a single pass computes, up to float
rounding (tests compare them to one-by-one passes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import LlamaModel, apply_rotary_pos_emb, repeat_kv

from speculum import tree


def fits(decoder: torch.nn.Module) -> bool:
    """Whether this pass can drive `decoder` (a LLaMA decoder; others take the padded pass)."""
    return isinstance(decoder, LlamaModel)


@torch.inference_mode()
def run(decoder: torch.nn.Module, caches: Sequence[DynamicCache], token_lists: Sequence[Sequence[int]],
        parents_lists: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Feed session b its tokens [T_b] as a tree (parents [T_b - 1]) after its cache, which is
    extended in place. -> each session's last-layer hidden states [T_b, D] (after the final norm)."""
    device = decoder.embed_tokens.weight.device
    lengths = [cache.get_seq_length() for cache in caches]
    counts = [len(tokens) for tokens in token_lists]
    starts = [sum(counts[:b]) for b in range(len(counts))]
    total = sum(counts)
    ids = torch.tensor([token for tokens in token_lists for token in tokens], device=device)
    x = decoder.embed_tokens(ids)[None]  # [1, N, D]
    positions = torch.cat([torch.tensor([0, *tree.depths(parents)]) + length
                           for parents, length in zip(parents_lists, lengths)])[None].to(device)
    cos, sin = decoder.rotary_emb(x, positions)
    masks = [_mask(length, parents, x.dtype, device) for length, parents in zip(lengths, parents_lists)]
    for index, layer in enumerate(decoder.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        shape = (1, total, -1, attn.head_dim)
        q = attn.q_proj(h).view(shape).transpose(1, 2)  # [1, H, N, hd]
        k = attn.k_proj(h).view(shape).transpose(1, 2)  # [1, H_kv, N, hd]
        v = attn.v_proj(h).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        outputs = []
        for cache, start, count, mask in zip(caches, starts, counts, masks):
            rows = slice(start, start + count)
            keys, values = cache.update(k[:, :, rows], v[:, :, rows], index)
            outputs.append(F.scaled_dot_product_attention(
                q[:, :, rows], repeat_kv(keys, attn.num_key_value_groups),
                repeat_kv(values, attn.num_key_value_groups), attn_mask=mask, scale=attn.scaling,
            ))
        attended = torch.cat(outputs, dim=2).transpose(1, 2).reshape(1, total, -1)
        x = x + attn.o_proj(attended)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    hidden = decoder.norm(x)[0]
    return [hidden[start:start + count] for start, count in zip(starts, counts)]


def _mask(length: int, parents: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive [1, 1, T, length + T]: the whole cache, then each new row's ancestors and itself."""
    visible = torch.cat([torch.ones(len(parents) + 1, length, dtype=torch.bool), tree.ancestor_mask(parents)], 1)
    mask = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[None, None].to(device)
