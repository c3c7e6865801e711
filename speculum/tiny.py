"""Tiny randomly initialised models in llava-hf layout, for tests, the stand-in demo and benchmarks.

Nothing can be downloaded here, so correctness is checked on small models built from configs.
Everything is seeded: the same spec gives the same weights and the same tokenizer.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from speculum.chat_tokenizer import BOS, EOS, IMAGE, PAD, train_chat_tokenizer


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny model. vocab_size None: the tokenizer's size. init_std scales how peaked outputs are."""

    vocab_size: int | None = None
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_positions: int = 512
    multimodal: bool = True
    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 32
    init_std: float = 0.02
    seed: int = 0


# A stand-in pair for the demo and the baseline benchmark until the trained demo pair ships:
# the target costs clearly more per token than the drafter.
STANDIN_TARGET = TinySpec(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, seed=0)
STANDIN_DRAFTER = TinySpec(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=2, seed=1)


def tiny_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few standard-library docstrings (offline, deterministic)."""
    texts = [inspect.getdoc(obj) or "" for obj in (str, list, dict, set, int, float, bytes, tuple, range, zip)]
    return train_chat_tokenizer(texts * 4, vocab_size)


def build_tiny_model(spec: TinySpec, tokenizer: PreTrainedTokenizerFast | None = None) -> PreTrainedModel:
    """A seeded random LLaVA (or text-only Llama) model matching `tokenizer`'s special ids."""
    tokenizer = tokenizer or tiny_tokenizer()
    vocab_size = spec.vocab_size or len(tokenizer)
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (("pad", PAD), ("bos", BOS), ("eos", EOS))}
    text_config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.hidden_size * 2,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_positions,
        initializer_range=spec.init_std,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
    )
    torch.manual_seed(spec.seed)
    if not spec.multimodal:
        model = LlamaForCausalLM(text_config)
    else:
        vision_config = CLIPVisionConfig(
            image_size=spec.image_size,
            patch_size=spec.patch_size,
            hidden_size=spec.vision_hidden,
            intermediate_size=spec.vision_hidden * 2,
            num_hidden_layers=1,
            num_attention_heads=2,
            projection_dim=spec.vision_hidden,
        )
        config = LlavaConfig(
            vision_config=vision_config,
            text_config=text_config,
            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
            image_seq_length=(spec.image_size // spec.patch_size) ** 2,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
        )
        model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        eos_token_id=ids["eos"], pad_token_id=ids["pad"], bos_token_id=ids["bos"]
    )
    return model.eval()


def save_tiny_checkpoint(out_dir: str | Path, spec: TinySpec = TinySpec()) -> Path:
    """Write a tiny model, its tokenizer and (when multimodal) its image processor to `out_dir`."""
    out_dir = Path(out_dir)
    tokenizer = tiny_tokenizer()
    model = build_tiny_model(spec, tokenizer)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if spec.multimodal:
        processor = CLIPImageProcessorPil(
            size={"shortest_edge": spec.image_size}, crop_size={"height": spec.image_size, "width": spec.image_size}
        )
        processor.save_pretrained(out_dir)
    (out_dir / "tiny_spec.json").write_text(json.dumps(spec.__dict__, indent=2))
    return out_dir
