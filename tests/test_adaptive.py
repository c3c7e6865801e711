"""Adaptive draft length: K follows acceptance and the verifier's load, and changes speed only.

The policy on hand-built acceptance and load sequences; greedy output equal to the target alone
with adaptive K (chains, trees, pipelined); a drafter that is right, then wrong, then right again
makes K shrink and grow back, as the verifier sees it; a verifier reporting a deep queue makes
the loop stop drafting and resume when the queue drains; sampling keeps the target's distribution
(exact marginals) while K varies; the verify service reports its real queue depth over gRPC; the
public contract carries `speculation.adaptive`.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time

import grpc
import pytest
import torch

import test_sampling_lossless
from conftest import ScriptedDraftSession, ScriptedDrafter, build_prompt, hf_greedy, png_bytes
from draft_service.ngram import NgramDrafter
from draft_service.vlm_drafter import VlmDrafter
from orchestrator.draft_length import (AdaptiveLength, DraftLengthConfig, FixedLength, expected_tokens, for_request,
                                       levels)
from orchestrator.loop import speculate
from orchestrator.stopping import StopChecker
from speculum.config import SamplingParams, SpeculationParams
from speculum.errors import InvalidArgument
from speculum.records import DraftBlock, PromptInputs
from speculum.sampling import probs_from_logits
from speculum.tree import TreeShape
from test_pipelined import feature_drafter
from test_sampling_lossless import matches, sample_counts, target  # noqa: F401 (fixture)
from verify_service.target import InProcessVerifier

MAX_NEW = 24
ADAPTIVE = SpeculationParams(num_draft_tokens=4, adaptive=True)


# --- the policy on hand-built sequences ------------------------------------------------------------
def test_the_policy_starts_long_shrinks_on_rejections_and_grows_back():
    policy = AdaptiveLength(4)
    assert policy.next_length() == 4  # the prior: a drafter worth using
    shrinking = []
    for _ in range(6):  # every block rejected at its first token
        policy.observe(policy.next_length(), 0)
        shrinking.append(policy.next_length())
    assert shrinking == sorted(shrinking, reverse=True) and shrinking[-1] == 1  # never 0 without load
    growing = []
    for _ in range(4):  # every block accepted in full
        k = policy.next_length()
        policy.observe(k, k)
        growing.append(policy.next_length())
    assert growing == sorted(growing) and growing[-1] == 4
    assert growing[0] < 4  # one good round is not enough to trust the drafter fully


@pytest.mark.parametrize("max_length", [1, 2, 8, 32])
def test_the_length_stays_within_one_and_the_requested_k(max_length):
    policy = AdaptiveLength(max_length)
    seen = set()
    for accepted_share in (1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 1.0):
        k = policy.next_length()
        seen.add(k)
        policy.observe(k, int(k * accepted_share))
    assert min(seen) >= 1 and max(seen) == max_length


def test_acceptance_is_estimated_per_draft_token_reached():
    config = DraftLengthConfig(memory=0.0)  # only the last round counts
    policy = AdaptiveLength(8, config)
    policy.observe(4, 2)  # two accepted, the third rejected: 3 trials, 2 successes
    assert policy.acceptance == pytest.approx(2 / 3)
    policy.observe(4, 4)  # all accepted: 4 trials, 4 successes (nothing was rejected)
    assert policy.acceptance == pytest.approx(1.0)
    policy.observe(0, 0)  # nothing drafted: no news
    assert policy.acceptance == pytest.approx(1.0)


def test_a_deep_queue_stops_drafting_and_a_drained_one_resumes_it():
    policy = AdaptiveLength(4)
    for _ in range(3):
        policy.observe(4, 3)
    assert policy.next_length() >= 3
    policy.observe(4, 3, queue_depth=1)  # a block in flight beside ours: still idle
    assert policy.saturation == 0 and policy.next_length() >= 3
    lengths = []
    for _ in range(4):
        k = policy.next_length()
        policy.observe(k, min(k, 3), queue_depth=16)
        lengths.append(policy.next_length())
    assert lengths[-1] == 0 and policy.saturation == 1
    for _ in range(6):
        policy.observe(0, 0, queue_depth=0)
    assert policy.saturation == 0 and policy.next_length() >= 3  # α was kept while not drafting


@pytest.mark.parametrize("alpha", [0.3, 0.6, 0.9])
def test_more_load_never_means_longer_drafts(alpha):
    lengths = []
    for depth in range(0, 20):
        policy = AdaptiveLength(8, DraftLengthConfig(prior_acceptance=alpha, load_memory=0.0))
        policy.observe(0, 0, queue_depth=depth)
        lengths.append(policy.next_length())
    assert lengths == sorted(lengths, reverse=True) and lengths[0] >= 1 and lengths[-1] == 0


def test_fixed_length_and_helpers():
    fixed = for_request(SpeculationParams(num_draft_tokens=5))
    assert isinstance(fixed, FixedLength)
    fixed.observe(5, 0, queue_depth=50)
    assert fixed.next_length() == 5
    assert isinstance(for_request(ADAPTIVE), AdaptiveLength)
    assert expected_tokens(0.5, 0) == 1 and expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert levels(DraftBlock(())) == 0 and levels(DraftBlock((4, 5, 6))) == 3
    assert levels(DraftBlock((5, 9, 6, 3, 4, 8), parents=(-1, -1, 0, 1, 1, 3))) == 3
    with pytest.raises(ValueError):
        DraftLengthConfig(idle_depth=9, saturated_depth=8)
    with pytest.raises(InvalidArgument, match="speculation.adaptive"):
        SpeculationParams(adaptive="yes")


# --- the loop ---------------------------------------------------------------------------------------
class ScriptedLoadVerifier:
    """The in-process verifier, recording each block's length and reporting `depth(round)` as its
    queue depth (a busy verifier simulated: this machine cannot run one big enough)."""

    def __init__(self, inner, depth=lambda round_index: 0):
        self.inner = inner
        self.depth = depth
        self.blocks: list[int] = []

    def open(self, sampling, return_features=False):
        session = self.inner.open(sampling, return_features)
        recorder = self

        class Session:
            def prefill(self, prompt):
                return session.prefill(prompt)

            def verify(self, block):
                result = session.verify(block)
                recorder.blocks.append(len(block.tokens))
                return dataclasses.replace(result, queue_depth=recorder.depth(len(recorder.blocks) - 1))

            def close(self):
                session.close()

        return Session()


def run(verifier, prompt, drafter, speculation=ADAPTIVE, max_new=MAX_NEW):
    sampling = SamplingParams(max_new_tokens=max_new)
    chunks = list(speculate(prompt, sampling, speculation, verifier, drafter, StopChecker(max_new, frozenset())))
    return [t for c in chunks for t in c.token_ids], chunks[-1].stats


@pytest.mark.parametrize("kind", ["ngram", "small-vlm", "feature-tree"])
@pytest.mark.parametrize("pipelined", [False, True])
def test_adaptive_greedy_equals_the_target(llava_dir, llava_engine, small_llava_drafter_model, kind, pipelined):
    prompt = build_prompt(llava_engine, "Describe the image in detail.", [png_bytes(4)])
    reference = hf_greedy(llava_engine.target, prompt, MAX_NEW)
    drafter = {
        "ngram": lambda: NgramDrafter(),
        "small-vlm": lambda: VlmDrafter(small_llava_drafter_model),
        "feature-tree": lambda: feature_drafter(llava_dir, llava_engine, TreeShape(width=2, nodes=6)),
    }[kind]()
    speculation = dataclasses.replace(ADAPTIVE, pipelined=pipelined)
    tokens, _ = run(llava_engine.verifier, prompt, drafter, speculation)
    assert tokens == reference


class PhasedDraftSession(ScriptedDraftSession):
    """Knows the continuation; drafts it right, except while the next token lies in `wrong` (then the
    first draft token is off, so nothing is accepted)."""

    def __init__(self, continuation, wrong: range, vocab_size):
        super().__init__(continuation, None, vocab_size)
        self.wrong = wrong

    def propose(self, max_tokens, assume=()):
        self.wrong_at = 0 if self.emitted + len(assume) in self.wrong else None
        return super().propose(max_tokens, assume)


def test_k_shrinks_while_the_drafter_is_wrong_and_grows_back(llava_engine):
    prompt = build_prompt(llava_engine, "Hi")
    max_new = 60
    reference = hf_greedy(llava_engine.target, prompt, max_new)
    drafter = ScriptedDrafter(reference, None, llava_engine.target.vocab_size)
    drafter.open = lambda sampling: PhasedDraftSession(reference, range(16, 28), llava_engine.target.vocab_size)
    verifier = ScriptedLoadVerifier(llava_engine.verifier)
    tokens, stats = run(verifier, prompt, drafter, max_new=max_new)
    assert tokens == reference
    # 1 + 4 * 3 = 13 tokens in three full rounds; then nine wrong rounds (one token each) shrink K
    # to 1; right again from token 22: K grows back to 4 (the end is cut by max_new_tokens).
    # Three full rounds emit 1 + 3 * 5 = 16 tokens; twelve wrong rounds (one token each) shrink K to 1
    # (slowly at first: three full rounds made the drafter trusted); right again from token 28, K grows
    # back to 4 within two rounds (the last block is cut by max_new_tokens).
    assert verifier.blocks[:3] == [4, 4, 4]
    shrinking, growing = verifier.blocks[3:15], verifier.blocks[15:-1]
    assert shrinking == sorted(shrinking, reverse=True) and shrinking[0] == 4 and shrinking[-5:] == [1] * 5
    assert growing[:3] == [1, 2, 4] and set(growing[2:]) == {4}
    fixed = ScriptedLoadVerifier(llava_engine.verifier)
    assert run(fixed, prompt, drafter, SpeculationParams(num_draft_tokens=4), max_new)[0] == reference
    assert len(fixed.blocks) > len(verifier.blocks) - 3  # adaptive: about as few rounds as fixed K
    assert sum(verifier.blocks) < sum(fixed.blocks)  # ... with fewer wasted draft tokens


@pytest.mark.parametrize("pipelined", [False, True])
def test_a_saturated_verifier_gets_no_drafts_until_its_queue_drains(llava_engine, pipelined):
    prompt = build_prompt(llava_engine, "Hi")
    max_new = 60
    reference = hf_greedy(llava_engine.target, prompt, max_new)
    drafter = ScriptedDrafter(reference, 2, llava_engine.target.vocab_size)  # two of four drafts accepted
    busy = range(3, 11)  # rounds 3..10 report 12 verify calls ahead of theirs
    verifier = ScriptedLoadVerifier(llava_engine.verifier, lambda i: 12 if i in busy else 0)
    speculation = dataclasses.replace(ADAPTIVE, pipelined=pipelined)
    tokens, stats = run(verifier, prompt, drafter, speculation, max_new)
    assert tokens == reference
    blocks = verifier.blocks
    assert blocks[:4] == [4, 4, 4, 4]  # load is seen from round 3's result on
    assert 0 < blocks[4] < 4  # a loaded verifier: shorter drafts
    assert blocks[5:12] == [0] * 7  # a saturated one: the target alone (no draft calls either)
    assert blocks[12] > 0 and 4 in blocks[12:16]  # the queue drains: drafting resumes, K grows back


# --- sampling stays exact while K varies ------------------------------------------------------------
NEW_TOKENS = 5
SAMPLING = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.9, top_k=3)  # 3**4 prefixes to enumerate


def exact_marginals(model, prompt: PromptInputs, sampling: SamplingParams, new_tokens: int) -> torch.Tensor:
    """P(token j = v) for each generated position j, by enumerating every prefix the target allows."""
    vocab = model.vocab_size
    marginals = torch.zeros(new_tokens, vocab, dtype=torch.float64)
    prefixes = {(): 1.0}
    for position in range(new_tokens):
        grown = {}
        for prefix, mass in prefixes.items():
            logits = model.forward(model.new_cache(), [*prompt.token_ids, *prefix]).logits[-1]
            probs = probs_from_logits(logits, sampling).double()
            marginals[position] += mass * probs
            for token in (probs > 0).nonzero().flatten().tolist():
                grown[(*prefix, token)] = mass * float(probs[token])
        prefixes = grown
    return marginals


def test_adaptive_sampling_keeps_the_target_distribution(target, monkeypatch):  # noqa: F811
    """A quick-reacting policy and a verifier whose reported load comes and goes make K vary between
    0 and 3 within each request; every position's marginal must still be the target's."""
    recorded = []

    def loaded_verifier(model):
        verifier = ScriptedLoadVerifier(InProcessVerifier(model), lambda i: 16 if (i + len(recorded)) % 3 == 1 else 0)
        recorded.append(verifier)
        return verifier

    quick = DraftLengthConfig(memory=0.0, load_memory=0.0, prior_acceptance=0.5)
    monkeypatch.setattr(test_sampling_lossless, "InProcessVerifier", loaded_verifier)
    monkeypatch.setattr(test_sampling_lossless, "speculate", functools.partial(speculate, draft_lengths=quick))
    monkeypatch.setattr(test_sampling_lossless, "NEW_TOKENS", NEW_TOKENS)
    monkeypatch.setattr(test_sampling_lossless, "SAMPLING", SAMPLING)
    monkeypatch.setattr(test_sampling_lossless, "SAMPLES", 800)
    drafter = VlmDrafter(test_sampling_lossless.tiny_lm(seed=12))
    counts = sample_counts(target, drafter, seed_base=70_000, speculation=SpeculationParams(num_draft_tokens=3,
                                                                                           adaptive=True))
    lengths = {k for verifier in recorded for k in verifier.blocks}
    assert {0, 1, 3} <= lengths  # K did vary
    marginals = exact_marginals(target, test_sampling_lossless.PROMPT, SAMPLING, NEW_TOKENS)
    for position in range(NEW_TOKENS):
        assert matches(counts[position], marginals[position]), position


# --- the load signal over gRPC and the public contract ---------------------------------------------
def test_the_verify_service_reports_the_calls_ahead_in_its_queue(llava_engine):
    from orchestrator.clients import GrpcVerifier
    from speculum.rpc.settings import ServerSettings, SessionSettings
    from verify_service import server as verify_server

    running = verify_server.serve(llava_engine.target, ServerSettings(port=0, max_workers=4),
                                  SessionSettings(ttl_s=60, max_sessions=4))
    servicer = running.servicer
    try:
        verifier = GrpcVerifier(grpc.insecure_channel(running.address))
        prompt = build_prompt(llava_engine, "Hi")
        sessions = [verifier.open(SamplingParams(max_new_tokens=8, seed=i)) for i in range(2)]
        for session in sessions:
            session.prefill(prompt)
        assert sessions[0].verify(DraftBlock(())).queue_depth == 0  # alone
        results = {}

        def verify(index):
            results[index] = sessions[index].verify(DraftBlock(()))

        threads = [threading.Thread(target=verify, args=(i,)) for i in range(2)]
        with servicer._device:  # the device is busy: both calls queue behind it, the first one first
            for count, thread in enumerate(threads, 1):
                thread.start()
                deadline = time.monotonic() + 10
                while servicer.in_flight < count and time.monotonic() < deadline:
                    time.sleep(0.01)
        for thread in threads:
            thread.join(10)
        assert results[0].queue_depth == 0 and results[1].queue_depth == 1
        assert servicer.in_flight == 0
        for session in sessions:
            session.close()
    finally:
        running.stop()


def test_the_public_request_carries_adaptive():
    from orchestrator.engine import GenerateRequest
    from orchestrator.public_api import request_from_proto, request_to_proto
    from speculum.v1 import speculum_pb2

    unset = request_from_proto(speculum_pb2.GenerateRequest(prompt="Hi"))
    assert unset.speculation.adaptive == SpeculationParams().adaptive
    for adaptive in (True, False):
        request = GenerateRequest("Hi", speculation=SpeculationParams(num_draft_tokens=6, adaptive=adaptive))
        back = request_from_proto(request_to_proto(request))
        assert back.speculation.adaptive is adaptive and back.speculation.num_draft_tokens == 6


def test_rounds_without_drafts_keep_a_remote_drafter_in_step(llava_engine):
    """Through the real services, a saturated spell (simulated: the verifier wrapper reports a deep
    queue) skips draft calls; the draft service must still get every round's result, or its drafts
    are off by the skipped tokens once drafting resumes."""
    from draft_service import server as draft_server
    from orchestrator.clients import GrpcDrafter, GrpcVerifier
    from speculum.rpc.settings import ServerSettings, SessionSettings
    from verify_service import server as verify_server

    prompt = build_prompt(llava_engine, "Hi")
    max_new = 60
    reference = hf_greedy(llava_engine.target, prompt, max_new)
    settings, sessions = ServerSettings(port=0, max_workers=4), SessionSettings(ttl_s=60, max_sessions=4)
    verifier = verify_server.serve(llava_engine.target, settings, sessions)
    drafter = draft_server.serve(ScriptedDrafter(reference, 2, llava_engine.target.vocab_size), settings, sessions)
    try:
        remote = GrpcVerifier(grpc.insecure_channel(verifier.address))
        loaded = ScriptedLoadVerifier(remote, lambda i: 12 if i in range(3, 11) else 0)
        tokens, stats = run(loaded, prompt, GrpcDrafter(grpc.insecure_channel(drafter.address)), max_new=max_new)
        assert tokens == reference
        assert loaded.blocks[5:12] == [0] * 7
        assert 4 in loaded.blocks[12:16]  # the drafter is in step again: two of four accepted, K back to 4
    finally:
        verifier.stop()
        drafter.stop()


def test_the_cli_flag_chooses_adaptive():
    from speculum.cli import _to_request, build_parser

    for flag, expected in (("--adaptive", True), ("--no-adaptive", False)):
        args = build_parser().parse_args(["generate", "--prompt", "Hi", "--draft-length", "6", flag])
        speculation = _to_request({"prompt": "Hi"}, args).speculation
        assert speculation.adaptive is expected and speculation.num_draft_tokens == 6
    default = build_parser().parse_args(["generate", "--prompt", "Hi"])
    assert _to_request({"prompt": "Hi"}, default).speculation.adaptive == SpeculationParams().adaptive
