"""The drafter checkpoint: `config.json` (architecture + the target it belongs to) and
`model.safetensors` (the trained tensors only: fc, layer, compressor, semi-AR head).

The target's embedding and LM head are not in it; loading reads them from the target folder and
refuses a target whose config differs from the recorded one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from draft_service.feature.config import MARKER, FeatureDrafterConfig, TargetRef
from draft_service.feature.model import FeatureDraftModel
from draft_service.feature.target_parts import TargetParts, config_sha256, load_target_parts
from speculum.errors import InvalidArgument

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def is_feature_drafter(folder: str | Path) -> bool:
    """True when `folder` holds a feature-drafter checkpoint (its config says so)."""
    path = Path(folder) / CONFIG_FILE
    return path.is_file() and json.loads(path.read_text()).get("kind") == MARKER


def read_config(folder: str | Path) -> FeatureDrafterConfig:
    """The architecture config of a checkpoint (without its `meta`: how it was trained)."""
    data = json.loads((Path(folder) / CONFIG_FILE).read_text())
    data.pop("meta", None)
    return FeatureDrafterConfig.from_dict(data)


def recorded_target_dir(folder: str | Path) -> Path:
    """The target folder recorded at training time (relative paths resolve from the drafter folder)."""
    recorded = Path(read_config(folder).target.path)
    return recorded if recorded.is_absolute() else (Path(folder) / recorded).resolve()


def save_checkpoint(model: FeatureDraftModel, folder: str | Path, dtype: torch.dtype = torch.float32,
                    extra: dict | None = None) -> Path:
    """Write the config and the trained tensors (in `dtype`); `extra` is stored in the config under `meta`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to(dtype).contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS_FILE))
    data = model.config.to_dict() | ({"meta": extra} if extra else {})
    (folder / CONFIG_FILE).write_text(json.dumps(data, indent=2))
    return folder


def load_checkpoint(folder: str | Path, target_dir: str | Path | None = None) -> FeatureDraftModel:
    """The fp32 model from `folder`, over the embedding and head of `target_dir` (default: recorded)."""
    config = read_config(folder)
    target_dir = Path(target_dir) if target_dir is not None else recorded_target_dir(folder)
    if config_sha256(target_dir) != config.target.config_sha256:
        raise InvalidArgument("drafter", f"{folder} was trained against another target than {target_dir}")
    model = FeatureDraftModel(config, load_target_parts(target_dir))
    state = {name: t.float() for name, t in load_file(str(Path(folder) / WEIGHTS_FILE)).items()}
    model.load_state_dict(state)
    return model.eval()



def new_model(target: TargetRef, parts: TargetParts, seed: int = 0, **options) -> FeatureDraftModel:
    """A freshly initialised (seeded) drafter over `parts`; `options` are FeatureDrafterConfig fields."""
    config = FeatureDrafterConfig(target, **options)
    torch.manual_seed(seed)
    return FeatureDraftModel(config, parts).eval()
