"""One batched verification pass against the same blocks one by one, in process (issue 8).

B target sessions (the demo target, prompts of 150 + 7b tokens) each verify a chain of 4 drafts:
one by one, in one pass with per-session attention (speculum.batched_pass, the default for a LLaMA
decoder), and in one padded pass (the path other decoders take). One thread, pinned to core 0;
median of `--repeats` passes, each on freshly prefilled sessions.
Usage: python -m bench.batch_pass [--sessions 1 4 8 16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from unittest import mock

import torch

from speculum import batched_pass
from speculum.config import SamplingParams
from speculum.paths import demo_target_dir
from speculum.records import DraftBlock, PromptInputs
from speculum.vlm import VisionLanguageModel
from verify_service.target import TargetSession, verify_batch

KINDS = ("one by one", "per-session attention", "padded")


def _sessions(model: VisionLanguageModel, count: int) -> list[TargetSession]:
    sessions = []
    for b in range(count):
        session = TargetSession(model, SamplingParams(seed=b))
        draw = random.Random(b)
        session.prefill(PromptInputs(tuple(draw.randrange(5, model.vocab_size) for _ in range(150 + 7 * b))))
        sessions.append(session)
    return sessions


def _time(model: VisionLanguageModel, count: int, kind: str) -> float:
    sessions = _sessions(model, count)
    blocks = [DraftBlock((7, 8, 9, 10)) for _ in sessions]
    started = time.perf_counter()
    if kind == "one by one":
        for session, block in zip(sessions, blocks):
            session.verify(block)
    elif kind == "padded":
        with mock.patch.object(batched_pass, "fits", lambda decoder: False):
            verify_batch(sessions, blocks)
    else:
        verify_batch(sessions, blocks)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.sched_setaffinity(0, {0})
    torch.set_num_threads(1)
    model = VisionLanguageModel.from_pretrained(demo_target_dir())
    print("sessions  " + "  ".join(f"{kind:>22}" for kind in KINDS) + "   (ms per pass of all blocks)")
    for count in args.sessions:
        ms = {kind: 1000 * statistics.median(_time(model, count, kind) for _ in range(args.repeats)) for kind in KINDS}
        print(f"{count:>8}  " + "  ".join(f"{ms[kind]:>22.1f}" for kind in KINDS)
              + f"   per-session attention: {ms[KINDS[0]] / ms[KINDS[1]]:.2f}x of one by one")


if __name__ == "__main__":
    main()
