"""The Drafter protocol over a feature draft model in this process."""

from __future__ import annotations

from pathlib import Path

from draft_service.feature.checkpoint import load_checkpoint, recorded_target_dir
from draft_service.feature.model import FeatureDraftModel
from draft_service.feature.session import FeatureDraftSession
from speculum.config import SamplingParams
from speculum.model_facts import ModelFacts
from speculum.tree import TreeShape


class FeatureDrafter:
    """Opens feature-draft sessions; `facts` are the target's (image slots, vocabulary)."""

    needs_target_features = True  # every advance consumes VerifyResult.hidden

    def __init__(self, model: FeatureDraftModel, facts: ModelFacts, tree_shape: TreeShape | None = None):
        assert facts.vocab_size == model.config.vocab_size, (facts.vocab_size, model.config.vocab_size)
        self.model = model.eval()
        self.facts = facts
        self.tree_shape = tree_shape  # None or width 1: chains

    @classmethod
    def from_pretrained(cls, drafter_dir: str | Path, target_dir: str | Path | None = None,
                        tree_shape: TreeShape | None = None) -> FeatureDrafter:
        """Load a checkpoint; reads only the target's configs, embedding and LM head (default: the
        target folder recorded in the checkpoint)."""
        target_dir = Path(target_dir) if target_dir is not None else recorded_target_dir(drafter_dir)
        return cls(load_checkpoint(drafter_dir, target_dir), ModelFacts.from_pretrained(target_dir), tree_shape)

    def open(self, sampling: SamplingParams) -> FeatureDraftSession:
        return FeatureDraftSession(self.model, self.facts, sampling, self.tree_shape)
