"""The two target tensors a feature drafter borrows, read from the target folder's safetensors.

Only the token embedding [V, D] and the LM head [V, D] are read (the rest of the target is never
loaded in the draft service). Both stay frozen: the drafter predicts target features, and the
target's own head turns them into tokens.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PreTrainedModel

from draft_service.feature.config import TargetRef

EMBED_SUFFIX = "embed_tokens.weight"
HEAD_SUFFIX = "lm_head.weight"


@dataclass(frozen=True)
class TargetParts:
    """embedding: [V, D] input token embedding · lm_head: [V, D] output head (no bias)."""

    embedding: torch.Tensor
    lm_head: torch.Tensor

    def __post_init__(self) -> None:
        assert self.embedding.dim() == 2 and self.embedding.shape == self.lm_head.shape, (
            self.embedding.shape, self.lm_head.shape)


def config_sha256(target_dir: str | Path) -> str:
    """The target's identity for drafter checkpoints: sha256 of its config.json bytes."""
    return hashlib.sha256((Path(target_dir) / "config.json").read_bytes()).hexdigest()


def target_ref(target_dir: str | Path, recorded_path: str | None = None) -> TargetRef:
    """A TargetRef for `target_dir` read from its config alone; `recorded_path` is what to store."""
    text = AutoConfig.from_pretrained(target_dir, local_files_only=True).get_text_config()
    return TargetRef(recorded_path or str(target_dir), config_sha256(target_dir), text.vocab_size, text.hidden_size)


def _weight_files(target_dir: Path) -> list[Path]:
    index = target_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [target_dir / shard for shard in shards]
    return [target_dir / "model.safetensors"]


def _is_text_embedding(key: str) -> bool:
    return key.endswith(EMBED_SUFFIX) and "vision" not in key


def load_target_parts(target_dir: str | Path, dtype: torch.dtype = torch.float32) -> TargetParts:
    """Read the token embedding and LM head (the embedding again when the weights are tied)."""
    target_dir = Path(target_dir)
    found: dict[str, torch.Tensor] = {}
    for path in _weight_files(target_dir):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                if _is_text_embedding(key):
                    found["embedding"] = handle.get_tensor(key)
                elif key.endswith(HEAD_SUFFIX):
                    found["lm_head"] = handle.get_tensor(key)
    if "embedding" not in found:
        raise ValueError(f"no token embedding ({EMBED_SUFFIX}) in {target_dir}")
    embedding = found["embedding"].to(dtype)
    lm_head = found.get("lm_head", found["embedding"]).to(dtype)  # tied weights save no head
    return TargetParts(embedding, lm_head)


def parts_from_model(model: PreTrainedModel) -> TargetParts:
    """The embedding and head of a target already in memory (copies, detached)."""
    embedding = model.get_input_embeddings().weight.detach().float().clone()
    return TargetParts(embedding, model.get_output_embeddings().weight.detach().float().clone())


def model_ref(model: PreTrainedModel, recorded_path: str = "<in-memory>") -> TargetRef:
    """A TargetRef for a target in memory, identified by its config's JSON."""
    text = model.config.get_text_config()
    digest = hashlib.sha256(model.config.to_json_string().encode()).hexdigest()
    return TargetRef(recorded_path, digest, text.vocab_size, text.hidden_size)
