"""Where the shipped demo model pair lives (overridable with SPECULUM_MODELS_DIR)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def models_dir() -> Path:
    return Path(os.environ.get("SPECULUM_MODELS_DIR", REPO_ROOT / "models"))


def demo_target_dir() -> Path:
    return models_dir() / "demo" / "target"


def demo_drafter_dir() -> Path:
    return models_dir() / "demo" / "drafter"
