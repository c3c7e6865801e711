"""Build the randomly initialised LLaVA target, its image processor, and save both in llava-hf layout.

Only transformers' own classes are used, so the shipped folder loads with
`LlavaForConditionalGeneration.from_pretrained`, `AutoTokenizer` and `AutoProcessor`. No training here.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerBase,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from demo_world.config import ModelConfig
from speculum.chat_tokenizer import chat_template

PAD_ID, BOS_ID, EOS_ID, IMAGE_ID = 0, 1, 2, 3  # fixed by speculum.chat_tokenizer
# Scenes are drawn on light grey; centring at 0.5 keeps pixel values in [-1, 1].
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


def build_model(config: ModelConfig, seed: int) -> LlavaForConditionalGeneration:
    """A fresh target with weights drawn from `seed`."""
    vision = CLIPVisionConfig(
        hidden_size=config.vision_hidden,
        intermediate_size=4 * config.vision_hidden,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=config.vision_heads,
        image_size=config.image_size,
        patch_size=config.patch_size,
    )
    text = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.text_hidden,
        intermediate_size=config.text_intermediate,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        num_key_value_heads=config.text_heads,
        max_position_embeddings=config.max_positions,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    llava = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_ID,
        image_seq_length=config.visual_tokens,
        vision_feature_layer=-1,  # the last layer: with 3 layers, -2 would waste a third of the tower
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    llava.pad_token_id, llava.bos_token_id, llava.eos_token_id = PAD_ID, BOS_ID, EOS_ID
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava)
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False
    )
    return model


def build_image_processor(config: ModelConfig) -> CLIPImageProcessorPil:
    """The processor the engine and the recipe both use, so training pixels match serving pixels."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": config.image_size},
        crop_size={"height": config.image_size, "width": config.image_size},
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
    )


def save_target(
    model: LlavaForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    config: ModelConfig,
    out: Path,
) -> None:
    """Write model (fp16 on disk), tokenizer, image processor and LlavaProcessor to `out`."""
    out.mkdir(parents=True, exist_ok=True)
    half = copy.deepcopy(model).to(torch.float16)  # fp16 keeps the repo small; the engine casts back to fp32
    half.save_pretrained(out)
    processor = LlavaProcessor(
        image_processor=build_image_processor(config),
        tokenizer=tokenizer,
        patch_size=config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, which "default" then drops: N = (size/patch)^2
        chat_template=chat_template(config.image_last),
    )
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
