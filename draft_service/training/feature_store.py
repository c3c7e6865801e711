"""FeaturePools on disk (one safetensors file), so a resumed or longer run skips the target passes.

Token ids travel in the file's metadata as JSON; tensors are named `<pool>/<index>/hidden|visual`.
The key records the data config and the target's identity: a different one is recomputed.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from draft_service.training.demo_data import FeaturePools
from draft_service.training.features import FeatureSample

POOLS = ("train_text", "train_image", "eval_text", "eval_image")


def save_pools(pools: FeaturePools, path: Path, key: str) -> None:
    tensors, ids = {}, {}
    for pool in POOLS:
        samples = getattr(pools, pool)
        ids[pool] = [[list(s.prompt_ids), list(s.answer_ids)] for s in samples]
        for i, sample in enumerate(samples):
            tensors[f"{pool}/{i}/hidden"] = sample.hidden.contiguous()
            if sample.visual_embeds is not None:
                tensors[f"{pool}/{i}/visual"] = sample.visual_embeds.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"key": key, "ids": json.dumps(ids)})


def load_pools(path: Path, key: str) -> FeaturePools | None:
    """The stored pools, or None when absent or made for another key."""
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        if metadata.get("key") != key:
            return None
        names = set(handle.keys())
        ids = json.loads(metadata["ids"])
        pools = {}
        for pool in POOLS:
            pools[pool] = [
                FeatureSample(
                    tuple(prompt_ids),
                    tuple(answer_ids),
                    handle.get_tensor(f"{pool}/{i}/hidden"),
                    handle.get_tensor(f"{pool}/{i}/visual") if f"{pool}/{i}/visual" in names else None,
                )
                for i, (prompt_ids, answer_ids) in enumerate(ids[pool])
            ]
    return FeaturePools(**pools)
