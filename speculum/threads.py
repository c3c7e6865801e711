"""CPU placement for a service process: which cores, how many torch threads.

On a 2-core machine the verifier and the drafter each get one core, the analogue of "target on a
large GPU, drafter on a small GPU" (DESIGN.md, performance method).
"""

from __future__ import annotations

import os

import torch


def pin_from_env(prefix: str) -> None:
    """Apply SPECULUM_<prefix>_CPUS (e.g. "0" or "0,1") and SPECULUM_<prefix>_THREADS when set."""
    cpus = os.environ.get(f"SPECULUM_{prefix}_CPUS")
    if cpus:
        chosen = {int(c) for c in cpus.split(",") if c.strip()}
        os.sched_setaffinity(0, chosen)
        torch.set_num_threads(len(chosen))
    threads = os.environ.get(f"SPECULUM_{prefix}_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
