"""Stop conditions: EOS, max new tokens and stop strings, at any position of a block."""

from __future__ import annotations

from orchestrator.engine import GenerateRequest
from orchestrator.stopping import FinishReason, StopChecker
from speculum.config import SamplingParams, SpeculationParams


def test_eos_is_kept_and_ends_generation():
    checker = StopChecker(10, frozenset({2}))
    decision = checker.offer([5, 6], [7, 2, 8])
    assert (decision.keep, decision.finish) == (2, FinishReason.EOS)


def test_length_cuts_the_block():
    decision = StopChecker(4, frozenset()).offer([5, 6], [7, 8, 9])
    assert (decision.keep, decision.finish) == (2, FinishReason.LENGTH)


def test_nothing_stops():
    decision = StopChecker(10, frozenset({2})).offer([5], [7, 8])
    assert (decision.keep, decision.finish) == (2, None)


def test_stop_string_spanning_tokens():
    vocab = {1: "he", 2: "llo", 3: " wor", 4: "ld", 5: "!"}
    checker = StopChecker(10, frozenset(), ("lo wo",), lambda ids: "".join(vocab[i] for i in ids))
    decision = checker.offer([1], [2, 3, 4, 5])
    assert (decision.keep, decision.finish) == (2, FinishReason.STOP)
    assert checker.visible_text("hello world", FinishReason.STOP) == "hel"


def test_stop_string_in_the_engine_matches_plain_decoding(llava_engine):
    base = llava_engine.generate(GenerateRequest("Tell me about sets.", sampling=SamplingParams(max_new_tokens=30)))
    stop = base.text[10:14]
    assert stop.strip(), base.text
    for speculation in (SpeculationParams(enabled=False), SpeculationParams(num_draft_tokens=5)):
        request = GenerateRequest("Tell me about sets.", sampling=SamplingParams(max_new_tokens=30, stop=(stop,)),
                                  speculation=speculation)
        result = llava_engine.generate(request)
        assert result.finish_reason is FinishReason.STOP
        assert result.text == base.text[: base.text.index(stop)]
        assert base.token_ids[: len(result.token_ids)] == result.token_ids
