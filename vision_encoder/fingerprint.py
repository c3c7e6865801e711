"""Model fingerprints: a stable hash of everything that shapes an image's encoding.

Cache keys carry it, so a different model, processor, dtype or compressor never reads another's
entries. It must not depend on paths, hosts or library versions' bookkeeping, so that replicas on
different machines with the same model share their cache.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from speculum.vlm import VisionLanguageModel
from vision_encoder.entry import FORMAT

# The decoder does not influence visual embeddings; skipping its weights keeps start-up fast for a
# 7B target (hashing all 14 GB would take tens of seconds), while its config is still hashed.
_DECODER_PARTS = ("language_model.", "lm_head.")


def model_fingerprint(model: VisionLanguageModel, image_processor: Any, compressor: Any | None = None) -> str:
    """sha256 hex of: stored layout, config, image-processor config, vision weights, dtype and device
    type (GPU and CPU results differ in the last bits), and the compressor's identity."""
    digest = hashlib.sha256()
    _add_json(digest, {"format": FORMAT, "dtype": str(model.model.dtype), "device": model.device.type})
    _add_json(digest, _portable(model.config.to_dict()))
    _add_json(digest, _portable(image_processor.to_dict()))
    _add_state(digest, model.model.state_dict(), exclude=_DECODER_PARTS)
    _add_json(digest, {"compressor": compressor_fingerprint(compressor)})
    return digest.hexdigest()


def compressor_fingerprint(compressor: Any | None) -> str | None:
    """A drafter-latent compressor's identity: its `fingerprint` string, else (for an nn.Module) a hash
    of its class and weights. Anything else is refused: caching latents under an unknown identity
    could serve one compressor's latents to another."""
    if compressor is None:
        return None
    declared = getattr(compressor, "fingerprint", None)
    if isinstance(declared, str) and declared:
        return declared
    if isinstance(compressor, torch.nn.Module):
        digest = hashlib.sha256(type(compressor).__qualname__.encode())
        _add_state(digest, compressor.state_dict(), exclude=())
        return digest.hexdigest()
    raise TypeError(f"{type(compressor).__name__} has no `fingerprint` and is not an nn.Module")


def _add_json(digest, value: Any) -> None:
    digest.update(json.dumps(value, sort_keys=True, default=str).encode())


def _add_state(digest, state: dict[str, torch.Tensor], exclude: tuple[str, ...]) -> None:
    for name in sorted(state):
        if any(f".{part}" in f".{name}" for part in exclude):
            continue
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())


def _portable(config: Any) -> Any:
    """Drop bookkeeping that differs between hosts with the same model (paths, versions)."""
    if isinstance(config, dict):
        return {
            str(key): _portable(value)  # str: configs hold int keys too (id2label), and JSON sorts one type
            for key, value in config.items()
            if not str(key).startswith("_") and key != "transformers_version"
        }
    if isinstance(config, (list, tuple)):
        return [_portable(value) for value in config]
    return config
