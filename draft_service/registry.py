"""Choosing a drafter by kind: none (target alone), prompt lookup, or a model folder."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig

from draft_service.feature.checkpoint import is_feature_drafter
from draft_service.feature.drafter import FeatureDrafter
from draft_service.ngram import NgramDrafter
from draft_service.vlm_drafter import VlmDrafter
from speculum.errors import InvalidArgument
from speculum.tree import TreeShape
from speculum.vlm import VisionLanguageModel


class DrafterKind(enum.Enum):
    NONE = "none"
    NGRAM = "ngram"
    MODEL = "model"  # a folder holding a small (vision-)language model
    FEATURE = "feature"  # a folder holding a feature drafter (EAGLE-style, MSD / FLASH) for its target


@dataclass(frozen=True)
class DrafterSpec:
    kind: DrafterKind
    path: Path | None = None

    @classmethod
    def parse(cls, spec: str) -> DrafterSpec:
        """`none`, `ngram` or a path to a drafter folder (the CLI's --drafter)."""
        for kind in (DrafterKind.NONE, DrafterKind.NGRAM):
            if spec == kind.value:
                return cls(kind)
        path = Path(spec)
        if not (path / "config.json").is_file():
            raise InvalidArgument("drafter", f"expected none, ngram or a model folder with config.json, got {spec!r}")
        return cls(DrafterKind.FEATURE if is_feature_drafter(path) else DrafterKind.MODEL, path)


def target_vocab_size(target_dir: str | Path) -> int:
    """The target's vocabulary size, read from its config alone (no weights loaded)."""
    return AutoConfig.from_pretrained(target_dir, local_files_only=True).get_text_config().vocab_size


def load_drafter(spec: str, vocab_size: int, device=None, tree_shape: TreeShape | None = None):
    """The Drafter for `spec`, or None to decode with the target alone; checks the vocabulary.

    `tree_shape` makes a feature drafter draft candidate trees; the other kinds draft chains.
    """
    parsed = DrafterSpec.parse(spec)
    if parsed.kind is DrafterKind.NONE:
        return None
    if parsed.kind is DrafterKind.NGRAM:
        return NgramDrafter()
    if parsed.kind is DrafterKind.FEATURE:  # its folder names its target; the embedding and head come from there
        drafter = FeatureDrafter.from_pretrained(parsed.path, tree_shape=tree_shape)
        if drafter.facts.vocab_size != vocab_size:
            raise InvalidArgument("drafter", f"vocab size {drafter.facts.vocab_size} differs from the target's {vocab_size}")
        return drafter
    model = VisionLanguageModel.from_pretrained(parsed.path, device)
    if model.vocab_size != vocab_size:
        raise InvalidArgument("drafter", f"vocab size {model.vocab_size} differs from the target's {vocab_size}")
    return VlmDrafter(model)
