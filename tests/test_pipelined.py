"""Pipelined speculation: drafting the next block during verification changes speed, never output.

Greedy output equals the target alone for every drafter kind (chains and trees, image and text
prompts); with a drafter that always guesses right nearly every block is drafted ahead; sampling
keeps the target's distribution (exact marginals); the look-ahead's kept part is chosen by the
settled tokens only; and the mode works through the real gRPC services.
"""

from __future__ import annotations

import grpc
import pytest

from conftest import ScriptedDrafter, build_prompt, hf_greedy, png_bytes
from draft_service.feature.branches import MAX_BRANCHES, _likely_rejections
from draft_service.ngram import NgramDrafter
from draft_service.vlm_drafter import VlmDrafter
from orchestrator.lookahead import _after_guess, _cut
from orchestrator.loop import speculate
from orchestrator.stopping import StopChecker
from speculum.config import SamplingParams, SpeculationParams
from speculum.records import DraftBlock, join_pieces
from speculum.tree import TreeShape
import test_sampling_lossless
from test_sampling_lossless import exact_marginals, matches, sample_counts, target  # noqa: F401 (fixtures)

MAX_NEW = 24
PIPELINED = SpeculationParams(num_draft_tokens=3, pipelined=True)


def run(engine, prompt, drafter, speculation=PIPELINED, sampling=None):
    sampling = sampling or SamplingParams(max_new_tokens=MAX_NEW)
    chunks = list(speculate(prompt, sampling, speculation, engine.verifier, drafter,
                            StopChecker(sampling.max_new_tokens, frozenset())))
    return [t for c in chunks for t in c.token_ids], chunks[-1].stats


def feature_drafter(llava_dir, engine, tree_shape=None):
    from draft_service.feature.checkpoint import new_model
    from draft_service.feature.drafter import FeatureDrafter
    from draft_service.feature.target_parts import load_target_parts, target_ref

    model = new_model(target_ref(llava_dir), load_target_parts(llava_dir), seed=1, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, semi_ar_k=2, semi_ar_hidden=64)
    return FeatureDrafter(model, engine.target.facts, tree_shape)


@pytest.mark.parametrize("kind", ["ngram", "small-vlm", "feature", "feature-tree", "oracle"])
@pytest.mark.parametrize("with_image", [True, False])
def test_pipelined_greedy_equals_the_target(llava_dir, llava_engine, small_llava_drafter_model, kind, with_image):
    prompt = build_prompt(llava_engine, "Describe the image in detail.", [png_bytes(4)] if with_image else [])
    reference = hf_greedy(llava_engine.target, prompt, MAX_NEW)
    drafter = {
        "ngram": lambda: NgramDrafter(),
        "small-vlm": lambda: VlmDrafter(small_llava_drafter_model),
        "feature": lambda: feature_drafter(llava_dir, llava_engine),
        "feature-tree": lambda: feature_drafter(llava_dir, llava_engine, TreeShape(width=2, nodes=6)),
        "oracle": lambda: ScriptedDrafter(reference, None, llava_engine.target.vocab_size),
    }[kind]()
    tokens, stats = run(llava_engine, prompt, drafter)
    assert tokens == reference
    if kind == "oracle":  # every guess right: all blocks after the first were drafted ahead
        assert stats.drafted_ahead == stats.target_forwards - 1 and stats.target_forwards < MAX_NEW / 3


def test_a_wrong_guess_drops_the_look_ahead(llava_engine):
    prompt = build_prompt(llava_engine, "Hi")
    reference = hf_greedy(llava_engine.target, prompt, MAX_NEW)
    tokens, stats = run(llava_engine, prompt, ScriptedDrafter(reference, 1, llava_engine.target.vocab_size))
    assert tokens == reference and stats.drafted_ahead == 0  # every block is rejected at its second token


def test_the_kept_look_ahead_is_the_subtree_of_the_settled_token():
    chain = DraftBlock((5, 6, 7))
    assert _after_guess(chain, 5).tokens == (6, 7) and _after_guess(chain, 4) is None
    #        root: 5 (0) and 9 (1); 5 -> 6 (2); 9 -> 3 (3), 4 (4); 3 -> 8 (5)
    tree_block = DraftBlock((5, 9, 6, 3, 4, 8), parents=(-1, -1, 0, 1, 1, 3))
    kept = _after_guess(tree_block, 9)
    assert kept.tokens == (3, 4, 8) and kept.parents == (-1, -1, 0)
    assert _after_guess(tree_block, 5).tokens == (6,) and _after_guess(tree_block, 5).parents is None
    cut = _cut(DraftBlock((3, 4, 8), parents=(-1, -1, 0)), 1)
    assert cut.tokens == (3, 4) and cut.parents == (-1, -1)


@pytest.mark.parametrize("drafter_kind", ["small-lm", "feature"])
def test_pipelined_sampling_keeps_the_target_distribution(target, exact_marginals, monkeypatch, drafter_kind):  # noqa: F811
    from draft_service.feature.checkpoint import new_model
    from draft_service.feature.drafter import FeatureDrafter
    from draft_service.feature.target_parts import model_ref, parts_from_model
    import torch

    if drafter_kind == "small-lm":
        drafter = VlmDrafter(test_sampling_lossless.tiny_lm(seed=12))
    else:
        model = new_model(model_ref(target.model), parts_from_model(target.model), seed=4, num_heads=2,
                          num_kv_heads=1, intermediate_size=64, semi_ar_k=2, semi_ar_hidden=32)
        with torch.no_grad():
            model.fc.weight.mul_(20)  # sharpen the random drafter, so that look-aheads are both kept and dropped
        drafter = FeatureDrafter(model, target.facts)
    monkeypatch.setattr(test_sampling_lossless, "SAMPLES", 800)
    counts = sample_counts(target, drafter, seed_base=60_000, speculation=SpeculationParams(num_draft_tokens=1,
                                                                                             pipelined=True))
    for position in range(exact_marginals.shape[0]):
        assert matches(counts[position], exact_marginals[position]), position


def test_pipelined_through_the_services(llava_engine, small_llava_drafter_model):
    from draft_service import server as draft_server
    from orchestrator.clients import GrpcDrafter, GrpcVerifier
    from speculum.rpc.settings import ServerSettings, SessionSettings
    from verify_service import server as verify_server

    settings, sessions = ServerSettings(port=0, max_workers=4), SessionSettings(ttl_s=60, max_sessions=4)
    verifier = verify_server.serve(llava_engine.target, settings, sessions)
    drafter = draft_server.serve(VlmDrafter(small_llava_drafter_model), settings, sessions)
    try:
        prompt = build_prompt(llava_engine, "Describe the image in detail.", [png_bytes(5)])
        remote = (GrpcVerifier(grpc.insecure_channel(verifier.address)),
                  GrpcDrafter(grpc.insecure_channel(drafter.address)))
        chunks = list(speculate(prompt, SamplingParams(max_new_tokens=MAX_NEW), PIPELINED, *remote,
                                StopChecker(MAX_NEW, frozenset())))
        reference = hf_greedy(llava_engine.target, prompt, MAX_NEW)
        assert [t for c in chunks for t in c.token_ids] == reference
        assert len(verifier.servicer.sessions) == 0 and len(drafter.servicer.sessions) == 0
        # A drafter that is always right (so every look-ahead is kept) shows whether rounds were
        # drafted ahead: with `pipelined` on, and not by default.
        scripted = draft_server.serve(ScriptedDrafter(reference, None, llava_engine.target.vocab_size), settings,
                                      sessions)
        try:
            ahead = {}
            for name, speculation in (("on", PIPELINED), ("default", SpeculationParams(num_draft_tokens=3))):
                chunks = list(speculate(prompt, SamplingParams(max_new_tokens=MAX_NEW), speculation, remote[0],
                                        GrpcDrafter(grpc.insecure_channel(scripted.address)),
                                        StopChecker(MAX_NEW, frozenset())))
                assert [t for c in chunks for t in c.token_ids] == reference, name
                ahead[name] = chunks[-1].stats.drafted_ahead
            assert ahead["on"] > 0 and ahead["default"] == 0, ahead
        finally:
            scripted.stop()
        # A seeded sample is reproducible in pipelined mode too.
        runs = [list(speculate(prompt, SamplingParams(max_new_tokens=MAX_NEW, temperature=0.9, seed=11),
                               PIPELINED, *remote, StopChecker(MAX_NEW, frozenset())))
                for _ in range(2)]
        first, second = ([t for c in chunks for t in c.token_ids] for chunks in runs)
        counts = [(s.target_forwards, s.draft_tokens, s.accepted_tokens, s.drafted_ahead)
                  for s in (chunks[-1].stats for chunks in runs)]
        assert first == second and counts[0] == counts[1]
    finally:
        verifier.stop()
        drafter.stop()


def test_the_metered_wrappers_of_the_serve_replica_pass_the_look_ahead_through(llava_engine):
    """The Serve replica (or a verifier hosting loops) wraps the clients for Prometheus; a wrapper that drops `assume` would
    silently turn pipelining off (it did once)."""
    from prometheus_client import CollectorRegistry

    from orchestrator.metered import MeteredDrafter, MeteredVerifier
    from speculum.metrics import RoundMetrics

    prompt = build_prompt(llava_engine, "Hi")
    reference = hf_greedy(llava_engine.target, prompt, MAX_NEW)
    metrics = RoundMetrics(CollectorRegistry())
    drafter = MeteredDrafter(ScriptedDrafter(reference, None, llava_engine.target.vocab_size), metrics)
    chunks = list(speculate(prompt, SamplingParams(max_new_tokens=MAX_NEW), PIPELINED,
                            MeteredVerifier(llava_engine.verifier, metrics), drafter, StopChecker(MAX_NEW, frozenset())))
    assert [t for c in chunks for t in c.token_ids] == reference
    assert chunks[-1].stats.drafted_ahead == chunks[-1].stats.target_forwards - 1


@pytest.mark.parametrize("draft_length", [2, 5])
@pytest.mark.parametrize("with_image", [True, False])
def test_pipelined_greedy_equals_the_target_with_branching_look_aheads(llava_dir, llava_engine, with_image,
                                                                         draft_length):
    """Look-aheads cover rejections and two bonus guesses, for blocks of the drafter's k (2) and longer."""
    prompt = build_prompt(llava_engine, "Describe the image in detail.", [png_bytes(6)] if with_image else [])
    reference = hf_greedy(llava_engine.target, prompt, MAX_NEW)
    tokens, _ = run(llava_engine, prompt, feature_drafter(llava_dir, llava_engine),
                    SpeculationParams(num_draft_tokens=draft_length, pipelined=True))
    assert tokens == reference


@pytest.mark.parametrize("length", [2, 4, 5])
def test_each_branch_of_a_look_ahead_is_what_the_drafter_drafts_after_that_outcome(llava_dir, llava_engine, length):
    """The look-ahead's tree forwards give, for every outcome it covers, the block a chain forward
    over the same rows gives; alternatives differ from the block's tokens, the guesses from each other.
    A block longer than the drafter's k (4, 5 > 2) is fed k rows per forward, as a chain feeds it. The
    guesses are fed from the block's last row; a chain feeds them so only when k divides the block's
    length (else with its last group's features, predicted from further back)."""
    import torch

    from draft_service.feature.session import run_plan

    drafter = feature_drafter(llava_dir, llava_engine)  # k = 2
    prompt = build_prompt(llava_engine, "Describe the image in detail.", [png_bytes(7)])
    sampling = SamplingParams(max_new_tokens=MAX_NEW).with_seed()
    first = llava_engine.verifier.open(sampling, return_features=True).prefill(prompt)
    session = drafter.open(sampling)
    session.prefill(prompt, first)
    block = join_pieces(list(session.propose(length)))
    ahead = join_pieces(list(session.propose(6, block.tokens)))  # the guess, then 5 tokens (3 forwards of k)

    def chain_after(assumed, tokens):
        with torch.inference_mode():
            return join_pieces(list(run_plan(session.plan(tokens, assumed), session.model, session.cache))).tokens

    guesses = [ahead.tokens[i] for i, parent in enumerate(ahead.parents) if parent < 0]
    assert len(guesses) == 2 and guesses[0] != guesses[1]
    for guess in guesses if length % 2 == 0 else ():
        assert _after_guess(ahead, guess).tokens == chain_after((*block.tokens, guess), 5)
    at = [branch.accepted for branch in ahead.branches]
    assert 0 < len(at) <= MAX_BRANCHES and at == sorted(set(at)) and at[-1] < length
    for branch in ahead.branches:  # a branch: as many tokens after the alternative
        assert branch.token != block.tokens[branch.accepted] and not branch.block.branches
        assert branch.block.tokens == chain_after((*block.tokens[: branch.accepted], branch.token), 5)


def _counting_forwards(model):
    calls = []
    original = model.forward

    def forward(*args, **kwargs):
        calls.append(args[0].shape[1])  # rows fed
        return original(*args, **kwargs)

    model.forward = forward
    return calls


def test_a_look_ahead_feeds_the_block_and_the_verified_rows_in_one_forward(llava_dir, llava_engine):
    """A look-ahead reuses the features its block was drafted from: b's rows (4 > k = 2) go in one
    forward, and after a verification that kept a chain of the last look-ahead, the verified rows go
    in that same forward. Feeding them there gives what feeding them first (sync) gives."""
    import torch

    from speculum.records import VerifyResult
    from speculum.rejection import NextTokenKind

    prompt = build_prompt(llava_engine, "Describe the image in detail.", [png_bytes(7)])
    sampling = SamplingParams(max_new_tokens=MAX_NEW).with_seed()
    verifier = llava_engine.verifier.open(sampling, return_features=True)
    first = verifier.prefill(prompt)
    sessions = []
    for _ in range(2):
        drafter = feature_drafter(llava_dir, llava_engine)  # k = 2, the same seeded weights
        session = drafter.open(sampling)
        session.prefill(prompt, first)
        sessions.append(session)
    blocks, aheads, calls = [], [], []
    for session in sessions:
        block = join_pieces(list(session.propose(4)))
        fed = _counting_forwards(session.model)
        aheads.append(join_pieces(list(session.propose(6, block.tokens))))
        blocks.append(block)
        calls.append(fed)
    assert blocks[0] == blocks[1] and aheads[0] == aheads[1]
    # A: b (4 rows) and its alternatives in one forward; B: the two guesses; then 5 tokens below each
    # root, k per forward (2 forwards after the first 2 from B's output)
    assert len(calls[0]) == 4 and calls[0][0] >= 4, calls[0]
    # The verifier accepts all of b and settles on the first guess: the look-ahead's chain below it holds.
    guess = aheads[0].tokens[0]
    kept = _after_guess(aheads[0], guess)
    features = first.hidden.new_zeros(5, first.hidden.shape[-1]).normal_(generator=torch.Generator().manual_seed(3))
    result = VerifyResult(4, (*blocks[0].tokens, guess), NextTokenKind.BONUS, features)
    for session in sessions:
        session.advance(result)
    sessions[1].sync()  # the verified rows first, on their own
    fed = _counting_forwards(sessions[0].model)
    after = [join_pieces(list(s.propose(6, kept.tokens[:4]))) for s in sessions]
    assert fed[0] == 5 + 4 + len(after[0].branches), fed  # verified rows, b and alternatives together
    assert after[0] == after[1]
    torch.testing.assert_close(sessions[0]._features, sessions[1]._features, atol=1e-5, rtol=1e-5)
    assert sessions[0].real_length == sessions[1].real_length


def test_branches_go_where_the_drafter_expects_rejections():
    """Position j is rejected with probability reach_j * (1 - p_j) by the drafter's own numbers; the
    likeliest ones get a branch (at most `room`, each at least MIN_REJECTION likely)."""
    import torch

    vocab = 6
    sure, unsure = torch.full((vocab,), -9.0), torch.zeros(vocab)
    sure[1] = 9.0  # p(1) ~ 1: nothing to branch for
    unsure[2], unsure[4] = 2.0, 1.5  # p(2) ~ 0.5: a likely rejection, whose best alternative is 4
    logits = torch.stack([sure, unsure, sure, unsure])
    chosen, reach = _likely_rejections(logits, [1, 2, 1, 2], start=4, reach=1.0, room=3)
    assert chosen == [(5, 4), (7, 4)] and 0.2 < reach < 0.35
    assert _likely_rejections(logits, [1, 2, 1, 2], 4, 1.0, room=1)[0] == [(5, 4)]  # the likelier one
    assert _likely_rejections(logits, [1, 2, 1, 2], 4, reach=0.05, room=3)[0] == []  # too unlikely to get there


def test_a_rejection_keeps_the_branch_of_the_settled_tokens_only():
    from orchestrator.lookahead import Lookahead
    from speculum.records import Branch, VerifyResult
    from speculum.rejection import NextTokenKind

    class Ahead:  # a draft session whose look-ahead guesses: rejected at 1 with 42
        active = True

        def propose_ahead(self, max_tokens, assume):
            return DraftBlock((9, 1), parents=(-1, 0), branches=(Branch(1, 42, DraftBlock((5, 6))),))

    block = DraftBlock((7, 8))
    settled = {(1, 42): (5, 6), (1, 43): None, (0, 42): None, (2, 9): (1,), (2, 3): None}
    for (accepted, token), expected in settled.items():
        lookahead = Lookahead(Ahead(), enabled=True)
        lookahead.start(block, 2)
        kind = NextTokenKind.BONUS if accepted == 2 else NextTokenKind.RECOVERED
        lookahead.settle(block, VerifyResult(accepted, (*block.tokens[:accepted], token), kind))
        kept = lookahead.take(4)
        assert (kept.tokens if kept else None) == expected, (accepted, token)
        lookahead.close()


def test_branches_survive_the_wire():
    from speculum.records import Branch
    from speculum.rpc import convert

    block = DraftBlock((9, 1, 4), parents=(-1, 0, -1), branches=(Branch(0, 3, DraftBlock((5, 6))),
                                                                 Branch(1, 42, DraftBlock((2,)))))
    back = convert.block_from_proto(convert.block_to_proto(block))
    assert back == block and convert.block_from_proto(convert.block_to_proto(DraftBlock((1,)))).branches == ()


def test_the_public_api_default_is_sequential_at_the_default_k_unless_the_request_says_otherwise():
    from orchestrator.engine import GenerateRequest
    from orchestrator.public_api import request_from_proto, request_to_proto
    from speculum.v1 import speculum_pb2

    assert SpeculationParams().pipelined is None and SpeculationParams().num_draft_tokens == 8
    assert request_from_proto(speculum_pb2.GenerateRequest(prompt="Hi")).speculation.pipelined is False
    unset = request_to_proto(GenerateRequest("Hi"))
    assert not unset.speculation.HasField("pipelined")
    assert request_from_proto(unset).speculation.pipelined is False
    for chosen in (True, False):
        request = GenerateRequest("Hi", speculation=SpeculationParams(pipelined=chosen))
        assert request_from_proto(request_to_proto(request)).speculation.pipelined is chosen


def test_no_look_ahead_while_the_verifier_serves_other_requests():
    """Under concurrency the rounds stay aligned for batched verification: after a verification that
    met other calls in flight, the next round is drafted after it, not ahead."""
    from orchestrator.lookahead import Lookahead
    from speculum.records import VerifyResult
    from speculum.rejection import NextTokenKind

    class Counting:
        active = True
        calls = 0

        def propose_ahead(self, max_tokens, assume):
            Counting.calls += 1
            return DraftBlock((9, 1))

    lookahead = Lookahead(Counting(), enabled=True)
    block = DraftBlock((7, 8))
    for depth, drafted_ahead in ((0, 1), (3, 2), (0, 2), (0, 3)):
        lookahead.start(block, 2)
        lookahead.settle(block, VerifyResult(2, (7, 8, 9), NextTokenKind.BONUS, queue_depth=depth))
        assert Counting.calls == drafted_ahead, depth
    lookahead.close()
