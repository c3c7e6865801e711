"""The drafting benchmark's harness: HF's generate() sees our exact prompt, rows are paired and checked.

Runs the harness on the tiny target (not the demo pair, and not for speed): HF generate must return
the same greedy tokens as our engine (otherwise the HF rows would compare different prompts), and a
method whose greedy answer differs from the target's is counted as such in the table.
"""

from __future__ import annotations

import pytest
from transformers import LlavaForConditionalGeneration

from bench.drafting import markdown, run_group
from bench.methods import EngineMethod, HfMethod, Outcome
from conftest import png_bytes
from draft_service.ngram import NgramDrafter
from orchestrator.engine import GenerateRequest
from speculum.config import SamplingParams


@pytest.fixture(scope="module")
def group():
    sampling = SamplingParams(max_new_tokens=12)
    return [GenerateRequest("Describe the image.", [png_bytes(i)], sampling) for i in range(2)]


class OffByOne(EngineMethod):
    """A deliberately wrong method: the target's answer with its last token changed."""

    def run(self, request):
        outcome = super().run(request)
        return Outcome((*outcome.token_ids[:-1], outcome.token_ids[-1] + 1), outcome.seconds, outcome.tau)


def test_hf_generate_answers_our_prompt_with_our_tokens(llava_dir, llava_engine, group):
    hf = LlavaForConditionalGeneration.from_pretrained(llava_dir)
    ours, theirs = EngineMethod("target", llava_engine, None, 4), HfMethod("hf-target", llava_engine, hf)
    for request in group:
        assert theirs.run(request).token_ids == ours.run(request).token_ids


def test_rows_are_paired_and_mismatches_counted(llava_engine, group):
    methods = [EngineMethod("target", llava_engine, None, 4), EngineMethod("ngram", llava_engine, NgramDrafter(), 4),
               OffByOne("broken", llava_engine, None, 4)]
    cells = run_group(methods, group, repeats=2)
    summary = {name: cell.summary() for name, cell in cells.items()}
    assert summary["target"]["runs"] == summary["ngram"]["runs"] == 4
    assert summary["target"]["speedup"] == 1.0
    assert summary["ngram"]["mismatches"] == 0 and summary["broken"]["mismatches"] == 4
    table = markdown({"image prompts, T=0": summary}, {"date": "d", "cpus": 2, "draft_length": 4, "tree_depth": 5,
                                                      "tree": [2, 6], "max_new_tokens": 12, "repeats": 2}, {})
    assert "| broken |" in table and "4/4" in table
