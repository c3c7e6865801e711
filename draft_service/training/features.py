"""Target features for drafter training: one frozen-target forward over prompt + answer per sample.

The features come from the same adapter (speculum.vlm) the verifier serves with, so the drafter is
trained on exactly the states it receives at inference. Answers are either the target's own greedy
output (self-distillation) or a dataset's reference answer; the caller decides.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from speculum.records import PromptInputs
from speculum.vlm import VisionLanguageModel


@dataclass(frozen=True)
class FeatureSample:
    """One training sequence.

    prompt_ids: the prompt with ONE image token per image (as PromptInputs carries it).
    answer_ids: the answer tokens after the prompt.
    hidden: [T, D] the target's last-layer post-norm states over the expanded prompt + answer.
    visual_embeds: [I, N, D] projected visual embeddings, or None for a text-only sample.
    """

    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    hidden: torch.Tensor
    visual_embeds: torch.Tensor | None

    @property
    def multimodal(self) -> bool:
        return self.visual_embeds is not None


@torch.inference_mode()
def extract_features(target: VisionLanguageModel, prompt: PromptInputs, answer_ids, dtype=torch.float32) -> FeatureSample:
    """Run the target once over `prompt` + `answer_ids`; keep its hidden states (stored in `dtype`)."""
    visual = prompt.visual_embeds
    if visual is None and prompt.pixel_values is not None:
        visual = target.encode_images(prompt.pixel_values)
    cache = target.new_cache()
    prompt_ids = target.expand_image_tokens(prompt.token_ids)
    # Two passes, as serving runs them: answer tokens are plain tokens even if one is the image id.
    hidden = [target.forward(cache, inputs_embeds=target.embed(prompt_ids, visual), logits_for_last=1).hidden]
    if answer_ids:
        hidden.append(target.forward(cache, list(answer_ids), logits_for_last=1).hidden)
    hidden = torch.cat(hidden)
    assert hidden.shape == (len(prompt_ids) + len(answer_ids), target.hidden_size), hidden.shape
    return FeatureSample(
        tuple(prompt.token_ids),
        tuple(answer_ids),
        hidden.to("cpu", dtype),
        None if visual is None else visual.to("cpu", dtype),
    )


@torch.inference_mode()
def greedy_answer(target: VisionLanguageModel, prompt: PromptInputs, max_new_tokens: int) -> list[int]:
    """The target's own greedy continuation of `prompt` (stops after an EOS token)."""
    visual = prompt.visual_embeds
    if visual is None and prompt.pixel_values is not None:
        visual = target.encode_images(prompt.pixel_values)
    cache = target.new_cache()
    embeds = target.embed(target.expand_image_tokens(prompt.token_ids), visual)
    token = int(target.forward(cache, inputs_embeds=embeds, logits_for_last=1).logits[-1].argmax())
    answer = [token]
    while token not in target.eos_token_ids and len(answer) < max_new_tokens:
        token = int(target.forward(cache, [token]).logits[-1].argmax())
        answer.append(token)
    return answer
