"""The feature drafter's architecture config: sizes and the MSD / FLASH switches. Computes nothing.

It is frozen and validated on construction, and it is what the checkpoint's JSON records next to
the identity of the target the weights were trained against.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

MARKER = "speculum-feature-drafter"  # the `kind` in a checkpoint's config.json: says what loads it


@dataclass(frozen=True)
class TargetRef:
    """Which target a drafter belongs to.

    path: the target folder as recorded at training time (relative paths are relative to the
        drafter folder, so a shipped pair can move together).
    config_sha256: sha256 of the target's config.json bytes; a mismatch refuses to load.
    vocab_size / hidden_size: V and D of the target, checked against the loaded tensors.
    """

    path: str
    config_sha256: str
    vocab_size: int
    hidden_size: int

    def __post_init__(self) -> None:
        if self.vocab_size < 1 or self.hidden_size < 1:
            raise ValueError("vocab_size and hidden_size must be positive")


@dataclass(frozen=True)
class FeatureDrafterConfig:
    """One feature drafter.

    num_heads / num_kv_heads / intermediate_size: the single Llama decoder layer (hidden size is D).
    rope_theta / max_positions: RoPE of the drafter's own context (its positions, not the target's).
    decouple_visual: MSD. Visual positions take visual inputs directly instead of fc(embed, hidden).
    compress_visual: FLASH. Each image's visual positions become `num_latents` learned-query latents.
        Their source is the projected visual embeddings when `decouple_visual` (what the vision
        encoder produces, so it can run there), else the target's hidden states at the visual
        positions (FLASH's latent-aware variant; needs the target's prefill features).
    num_latents: C, latents per image when compressing.
    drop_visual: language-only drafting (Gagrani et al.'s "language-only draft"): image positions are
        left out of the drafter's context; the target's features at the text after them still carry
        what the target saw. Excludes decouple_visual and compress_visual.
    semi_ar_k: FLASH semi-autoregressive head: one forward predicts this many next features
        (1 = plain autoregressive drafting).
    semi_ar_hidden: width of the semi-AR head's MLP.
    """

    target: TargetRef
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 768
    rope_theta: float = 10000.0
    max_positions: int = 2048
    rms_norm_eps: float = 1e-6
    decouple_visual: bool = True
    compress_visual: bool = False
    num_latents: int = 8
    semi_ar_k: int = 1
    semi_ar_hidden: int = 512
    drop_visual: bool = False

    def __post_init__(self) -> None:
        if self.target.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden size must divide into num_heads, and num_heads into num_kv_heads")
        if self.num_latents < 1 or self.semi_ar_k < 1 or self.semi_ar_hidden < 1:
            raise ValueError("num_latents, semi_ar_k and semi_ar_hidden must be positive")
        if self.intermediate_size < 1 or self.max_positions < 1:
            raise ValueError("intermediate_size and max_positions must be positive")
        if self.drop_visual and (self.decouple_visual or self.compress_visual):
            raise ValueError("drop_visual leaves images out: it excludes decouple_visual and compress_visual")

    @property
    def hidden_size(self) -> int:
        return self.target.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.target.vocab_size

    def to_dict(self) -> dict:
        return {"kind": MARKER, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> FeatureDrafterConfig:
        if data.get("kind") != MARKER:
            raise ValueError(f"not a feature drafter config (kind={data.get('kind')!r})")
        fields = {k: v for k, v in data.items() if k != "kind"}
        return cls(**{**fields, "target": TargetRef(**fields["target"])})
