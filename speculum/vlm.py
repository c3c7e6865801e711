"""A narrow adapter over HF causal (vision-)language models, run step by step with a KV cache.

It wraps `LlavaForConditionalGeneration` (vision tower + projector + decoder) or a text-only
`*ForCausalLM`, loaded from a local folder or built from a config. It embeds prompts (expanding
each image token to the model's visual-token count), runs the decoder over a cache and returns
logits and last-layer hidden states. It knows nothing about drafting or verification.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, LlavaForConditionalGeneration, PreTrainedModel

from speculum import batched_pass, tree
from speculum.errors import InvalidArgument
from speculum.model_facts import ModelFacts


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class ModelStep:
    """One decoder pass. logits: [T, V] (float32) · hidden: [T, D] last-layer, post-norm."""

    logits: torch.Tensor
    hidden: torch.Tensor


class VisionLanguageModel:
    """A causal LM, optionally multimodal (LLaVA layout), driven through an explicit KV cache."""

    def __init__(self, model: PreTrainedModel, device: torch.device | None = None):
        device = device or default_device()
        # fp32 on CPU: bf16 matmuls are several times slower there (notes/stack.md).
        dtype = torch.float32 if device.type == "cpu" else torch.float16
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device = device
        self.config = model.config
        self.text_config = model.config.get_text_config()
        if isinstance(model, LlavaForConditionalGeneration):
            self._decoder = model.model.language_model
            self._vision = model.model
        else:
            self._decoder = model.model
            self._vision = None
        self._lm_head = model.lm_head
        self.facts = ModelFacts.from_config(model.config, model.generation_config)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | None = None) -> VisionLanguageModel:
        """Load a local llava-hf (or plain causal LM) folder; nothing is downloaded."""
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        model_cls = LlavaForConditionalGeneration if config.model_type == "llava" else AutoModelForCausalLM
        model = model_cls.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        return cls(model, device)

    # --- facts about the model -------------------------------------------------------------
    @property
    def is_multimodal(self) -> bool:
        return self._vision is not None

    @property
    def vocab_size(self) -> int:
        return self.facts.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.facts.hidden_size

    @property
    def max_positions(self) -> int:
        return self.facts.max_positions

    @property
    def image_token_id(self) -> int | None:
        return self.facts.image_token_id

    @property
    def num_image_tokens(self) -> int:
        return self.facts.num_image_tokens

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.facts.eos_token_ids

    def expand_image_tokens(self, token_ids: Sequence[int]) -> list[int]:
        return self.facts.expand_image_tokens(token_ids)

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision tower + projector. pixel_values: [I, 3, H, W] -> visual embeds [I, N, D]."""
        if not self.is_multimodal:
            raise InvalidArgument("images", "this target is text-only and takes no images")
        pixel_values = pixel_values.to(self.device, self.model.dtype)
        features = self._vision.get_image_features(pixel_values=pixel_values).pooler_output
        embeds = torch.stack(list(features))
        assert embeds.shape[1:] == (self.num_image_tokens, self.hidden_size), embeds.shape
        return embeds

    @torch.inference_mode()
    def embed(self, token_ids: Sequence[int], visual_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings [1, T, D] for expanded `token_ids`, visual embeds [I, N, D] at image slots."""
        ids = torch.tensor([list(token_ids)], device=self.device)
        embeds = self._decoder.get_input_embeddings()(ids)
        num_slots = int((ids == self.image_token_id).sum()) if self.is_multimodal else 0
        num_visual = 0 if visual_embeds is None else visual_embeds.shape[0] * visual_embeds.shape[1]
        if num_slots != num_visual:
            raise InvalidArgument(
                "images", f"the prompt has {num_slots} image-token slots but {num_visual} visual embeddings"
            )
        if num_slots:
            mask = (ids == self.image_token_id).unsqueeze(-1).expand_as(embeds)
            embeds = embeds.masked_scatter(mask, visual_embeds.to(embeds.dtype).reshape(-1))
        return embeds

    # --- decoding -----------------------------------------------------------------------------
    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.text_config)

    @torch.inference_mode()
    def forward(
        self,
        cache: DynamicCache,
        token_ids: Sequence[int] | None = None,
        inputs_embeds: torch.Tensor | None = None,
        logits_for_last: int | None = None,
        tree_parents: Sequence[int] | None = None,
    ) -> ModelStep:
        """Run the decoder over new positions appended to `cache` (which it extends).

        Give either `token_ids` [T] or `inputs_embeds` [1, T, D]. `logits_for_last` limits the
        LM head to the last n positions (a prefill needs one); hidden states cover all T.
        `tree_parents` [T - 1] makes the new positions a candidate tree under the first one (see
        speculum.tree): each attends to the cache and its own ancestors, at position cache + depth.
        """
        if inputs_embeds is None:
            inputs_embeds = self._decoder.get_input_embeddings()(torch.tensor([list(token_ids)], device=self.device))
        num_new = inputs_embeds.shape[1]
        if cache.get_seq_length() + num_new > self.max_positions:
            raise InvalidArgument(
                "sampling.max_new_tokens",
                f"the sequence would reach {cache.get_seq_length() + num_new} tokens, beyond the target's "
                f"context of {self.max_positions}",
            )
        mask = positions = None
        if tree_parents is not None:
            mask, positions = self._tree_attention(cache.get_seq_length(), tree_parents)
        out = self._decoder(inputs_embeds=inputs_embeds, past_key_values=cache, use_cache=True,
                            attention_mask=mask, position_ids=positions)
        hidden = out.last_hidden_state[0]  # [T, D]
        head_input = hidden if logits_for_last is None else hidden[-logits_for_last:]
        logits = self._lm_head(head_input).float()
        return ModelStep(logits=logits, hidden=hidden)

    @torch.inference_mode()
    def forward_batch(self, caches: Sequence[DynamicCache], token_lists: Sequence[Sequence[int]],
                      parents_lists: Sequence[Sequence[int]]) -> list[ModelStep]:
        """One decoder pass for several sequences, each with its own cache (extended in place).

        Sequence b feeds token_lists[b] [T_b] as a tree (parents_lists[b] [T_b - 1], see forward;
        a chain is (-1, 0, 1, ...)). Each row computes what `forward` alone would: a LLaMA decoder
        runs all rows through its projections together and attends per session (speculum.batched_pass);
        other decoders get caches right-padded into one batch, the padding masked out.
        """
        lengths = [cache.get_seq_length() for cache in caches]
        for length, tokens in zip(lengths, token_lists):
            if length + len(tokens) > self.max_positions:
                raise InvalidArgument("sampling.max_new_tokens", f"the sequence would exceed the target's context of "
                                      f"{self.max_positions}")
        if batched_pass.fits(self._decoder):
            hidden = batched_pass.run(self._decoder, caches, token_lists, parents_lists)
            return [ModelStep(logits=self._lm_head(rows).float(), hidden=rows) for rows in hidden]
        return self._padded_pass(caches, token_lists, parents_lists, lengths)

    def _padded_pass(self, caches: Sequence[DynamicCache], token_lists: Sequence[Sequence[int]],
                     parents_lists: Sequence[Sequence[int]], lengths: Sequence[int]) -> list[ModelStep]:
        """forward_batch through the decoder's own forward: caches right-padded into one batch."""
        longest, widest = max(lengths), max(len(tokens) for tokens in token_lists)
        batch = len(caches)
        visible = torch.zeros(batch, widest, longest + widest, dtype=torch.bool)
        positions = torch.zeros(batch, widest, dtype=torch.long)
        ids = torch.zeros(batch, widest, dtype=torch.long)
        for b, (length, tokens, parents) in enumerate(zip(lengths, token_lists, parents_lists)):
            count = len(tokens)
            ids[b, :count] = torch.tensor(list(tokens))
            visible[b, :, :length] = True
            visible[b, :count, longest : longest + count] = tree.ancestor_mask(parents)
            visible[b, count:, longest + count :] = torch.eye(widest - count, dtype=torch.bool)  # padding: itself
            positions[b, :count] = torch.tensor([0, *tree.depths(parents)]) + length
            positions[b, count:] = length
        padded = self._padded_cache(caches, longest)
        dtype = self.model.dtype
        mask = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, torch.finfo(dtype).min)
        embeds = self._decoder.get_input_embeddings()(ids.to(self.device))
        out = self._decoder(inputs_embeds=embeds, past_key_values=padded, use_cache=True,
                            attention_mask=mask[:, None].to(self.device), position_ids=positions.to(self.device))
        steps = []
        for b, (cache, tokens) in enumerate(zip(caches, token_lists)):
            count = len(tokens)
            for index, layer in enumerate(padded.layers):
                cache.update(layer.keys[b : b + 1, :, longest : longest + count],
                             layer.values[b : b + 1, :, longest : longest + count], index)
            hidden = out.last_hidden_state[b, :count]
            steps.append(ModelStep(logits=self._lm_head(hidden).float(), hidden=hidden))
        return steps

    def _padded_cache(self, caches: Sequence[DynamicCache], longest: int) -> DynamicCache:
        """The caches right-padded to `longest` positions and stacked along the batch."""
        padded = self.new_cache()
        for index in range(len(caches[0].layers)):
            keys = [c.layers[index].keys for c in caches]
            shape = (len(caches), keys[0].shape[1], longest, keys[0].shape[-1])
            batch_keys = keys[0].new_zeros(shape)
            batch_values = keys[0].new_zeros(shape)
            for b, cache in enumerate(caches):
                length = cache.layers[index].keys.shape[-2]
                batch_keys[b, :, :length] = cache.layers[index].keys[0]
                batch_values[b, :, :length] = cache.layers[index].values[0]
            padded.update(batch_keys, batch_values, index)
        return padded

    def _tree_attention(self, num_cached: int, parents: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> additive mask [1, 1, T, S + T] and position ids [1, T] for a tree of T - 1 nodes."""
        visible = torch.cat([torch.ones(len(parents) + 1, num_cached, dtype=torch.bool), tree.ancestor_mask(parents)], 1)
        dtype = self.model.dtype
        mask = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, torch.finfo(dtype).min)
        positions = torch.tensor([0, *tree.depths(parents)]) + num_cached
        return mask[None, None].to(self.device), positions[None].to(self.device)
