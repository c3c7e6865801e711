"""Candidate trees: index math, greedy and sampling verification of trees, and the target's tree pass.

Sampling: recursive rejection sampling must keep the target's distribution when the drafter draws
siblings without replacement, and the test must notice when it does not (deterministic top-k
siblings with their draft probabilities are biased). The target's tree pass must accept the right
branch, and its compacted KV cache must equal a fresh prefill of the committed tokens.
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from conftest import build_prompt, hf_greedy, png_bytes
from draft_service.tree_growth import grow_tree
from speculum import tree
from speculum.config import SamplingParams
from speculum.errors import InvalidArgument
from speculum.records import DraftBlock, PromptInputs
from speculum.rejection import NextTokenKind, verify_tree_greedy, verify_tree_sampling
from speculum.tree import TreeShape
from verify_service.target import TargetSession

#        root
#       /    \
#      0      1
#     / \     |
#    2   3    4
#        |
#        5
PARENTS = (-1, -1, 0, 0, 1, 3)


def test_index_math():
    assert tree.depths(PARENTS) == [1, 1, 2, 2, 2, 3]
    assert tree.children(PARENTS) == [[0, 1], [2, 3], [4], [], [5], [], []]
    assert tree.path_to(PARENTS, 5) == [0, 3, 5]
    assert tree.path_to(PARENTS, -1) == []
    mask = tree.ancestor_mask(PARENTS)
    assert mask[6].nonzero().flatten().tolist() == [0, 1, 4, 6]  # node 5 sees root, 0, 3 and itself
    assert mask[2].nonzero().flatten().tolist() == [0, 2]  # node 1 does not see its sibling 0
    assert torch.equal(tree.ancestor_mask((-1, 0, 1)), torch.ones(4, 4, dtype=torch.bool).tril())


@pytest.mark.parametrize("parents", [(0,), (-1, 1), (-1, -2)])
def test_parents_must_precede_children(parents):
    with pytest.raises(InvalidArgument, match="block.parents"):
        tree.check_parents(parents)


def test_tree_shape_limits():
    with pytest.raises(InvalidArgument, match="tree.width"):
        TreeShape(width=0)
    with pytest.raises(InvalidArgument, match="tree.nodes"):
        TreeShape(width=2, nodes=1000)
    assert TreeShape(width=3).budget(4) == 24 and TreeShape(width=3, nodes=7).budget(4) == 7


def one_hot_logits(winners: list[int], vocab: int = 10) -> torch.Tensor:
    logits = torch.zeros(len(winners), vocab)
    logits[torch.arange(len(winners)), torch.tensor(winners)] = 5.0
    return logits


def test_greedy_follows_the_matching_branch():
    tokens = (7, 3, 1, 2, 9, 4)  # the target wants 3, then 9 under node 1 (row 2), then 5
    logits = one_hot_logits([3, 0, 9, 0, 0, 5, 0])
    verdict = verify_tree_greedy(tokens, PARENTS, logits)
    assert verdict.path == (1, 4) and verdict.next_token == 5 and verdict.next_kind is NextTokenKind.BONUS


def test_greedy_with_no_matching_child_emits_the_target_token():
    verdict = verify_tree_greedy((7, 3, 1, 2, 9, 4), PARENTS, one_hot_logits([8, 0, 0, 0, 0, 0, 0]))
    assert verdict.path == () and verdict.next_token == 8


def test_greedy_reaches_a_leaf_and_takes_the_bonus():
    verdict = verify_tree_greedy((7, 3, 1, 2, 9, 4), PARENTS, one_hot_logits([7, 2, 0, 0, 4, 0, 6]))
    assert verdict.path == (0, 3, 5) and verdict.next_token == 6


# --- sampling: two levels over a 6-token vocabulary ----------------------------------------------
VOCAB, WIDTH, TRIALS = 6, 3, 6000


def distributions(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Target rows per first token, the target's root row and the drafter's q (one for every node)."""
    g = torch.Generator().manual_seed(seed)
    target_root = torch.softmax(torch.randn(VOCAB, generator=g) * 1.5, -1)
    target_next = torch.softmax(torch.randn(VOCAB, VOCAB, generator=g) * 1.5, -1)  # [first token, V]
    draft = torch.softmax(torch.randn(VOCAB, generator=g) * 1.5, -1)
    return target_root, target_next, draft


def run_trials(pick_children, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts of the first emitted token, and of the second given the first (when both come from one pass)."""
    target_root, target_next, draft = distributions(seed)
    g = torch.Generator().manual_seed(seed + 1)
    first_counts, second_counts = torch.zeros(VOCAB), torch.zeros(VOCAB, VOCAB)
    for _ in range(TRIALS):
        tokens, parents = [], []
        for token in pick_children(draft, g):
            tokens.append(token)
            parents.append(-1)
        for node in range(len(tokens)):  # every first-level node gets WIDTH children of its own
            for token in pick_children(draft, g):
                tokens.append(token)
                parents.append(node)
        rows = [target_root] + [target_next[tokens[n]] if parents[n] < 0 else target_root for n in range(len(tokens))]
        verdict = verify_tree_sampling(tokens, parents, draft.expand(len(tokens), VOCAB), torch.stack(rows), g)
        emitted = [tokens[n] for n in verdict.path] + [verdict.next_token]
        first_counts[emitted[0]] += 1
        if len(emitted) > 1:
            second_counts[emitted[0], emitted[1]] += 1
    return first_counts, second_counts


def without_replacement(draft: torch.Tensor, g: torch.Generator) -> list[int]:
    return torch.multinomial(draft, WIDTH, replacement=False, generator=g).tolist()


def top_k(draft: torch.Tensor, g: torch.Generator) -> list[int]:
    return draft.topk(WIDTH).indices.tolist()


def agrees(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    return chisquare(counts.numpy(), (probs * counts.sum()).numpy()).pvalue > 1e-3


def test_recursive_rejection_sampling_keeps_the_target_distribution():
    target_root, target_next, _ = distributions(0)
    first, second = run_trials(without_replacement, seed=0)
    assert agrees(first, target_root)
    checked = 0
    for token in range(VOCAB):
        if second[token].sum() >= 200:  # the second token, given the first, follows that node's row
            assert agrees(second[token], target_next[token]), token
            checked += 1
    assert checked >= 2


def test_deterministic_siblings_break_it_and_the_test_notices():
    target_root, _, _ = distributions(0)
    first, _ = run_trials(top_k, seed=0)
    assert not agrees(first, target_root)


def test_grown_tree_respects_shape_and_draws_distinct_siblings():
    logits = torch.randn(VOCAB)
    calls = []

    def expand(nodes, tokens, parents):
        calls.append(list(nodes))
        return torch.randn(len(nodes), VOCAB)

    g = torch.Generator().manual_seed(0)
    for sampling in (SamplingParams(), SamplingParams(temperature=1.0, seed=0)):
        calls.clear()
        block = grow_tree(logits, expand, TreeShape(width=2, nodes=9), 3, sampling, g)
        assert len(block.tokens) == 9 and max(tree.depths(block.parents)) == 3
        assert [len(c) for c in calls] == [2, 2]  # two expansions of the two best nodes per level
        for kids in tree.children(block.parents):
            assert len({block.tokens[k] for k in kids}) == len(kids)
        assert (block.draft_probs is None) == sampling.greedy


# --- the target's tree pass ---------------------------------------------------------------------
def cache_tensors(session: TargetSession) -> list[torch.Tensor]:
    return [t for layer in session.cache.layers for t in (layer.keys, layer.values)]


@pytest.mark.parametrize("with_image", [True, False])
def test_target_accepts_the_right_branch_and_compacts_its_cache(llava_engine, with_image):
    target = llava_engine.target
    prompt = build_prompt(llava_engine, "What is in the picture?", [png_bytes(3)] if with_image else [])
    reference = hf_greedy(target, prompt, 12)
    sampling = SamplingParams(max_new_tokens=12, seed=0)
    wrong = [(t + 1) % target.vocab_size for t in reference]
    # The reference continuation r1 r2 r3 hides in the second branch at every level, next to decoys.
    tokens = (wrong[1], reference[1], wrong[2], reference[2], wrong[3], reference[3], wrong[4])
    parents = (-1, -1, 0, 1, 1, 3, 5)

    session = TargetSession(target, sampling)
    first = session.prefill(prompt)
    result = session.verify(DraftBlock(tokens, parents=parents))
    assert result.num_accepted == 3
    assert result.tokens == tuple(reference[1:5])
    assert result.hidden.shape == (4, target.hidden_size)

    committed = [*first.tokens, *result.tokens[:-1]]
    fresh = TargetSession(target, sampling)
    fresh_first = fresh.prefill(PromptInputs((*prompt.token_ids, *committed), prompt.pixel_values))
    assert session.cache_length == fresh.cache_length
    for compacted, rebuilt in zip(cache_tensors(session), cache_tensors(fresh), strict=True):
        torch.testing.assert_close(compacted, rebuilt, atol=1e-5, rtol=1e-4)
    # the accepted branch's features are those of a plain causal pass over it
    torch.testing.assert_close(result.hidden, fresh_first.hidden[-4:], atol=1e-4, rtol=1e-4)

    after = session.verify(DraftBlock((reference[5], wrong[6]), parents=(-1, -1)))
    assert after.tokens == (reference[5], reference[6])


def test_target_refuses_a_malformed_tree(llava_engine):
    session = TargetSession(llava_engine.target, SamplingParams(seed=0))
    session.prefill(build_prompt(llava_engine, "Hi"))
    with pytest.raises(InvalidArgument, match="block.parents"):
        session.verify(DraftBlock((1, 2), parents=(-1, 5)))


# --- trees through the real gRPC services ----------------------------------------------------------
@pytest.fixture(scope="module")
def tree_services(llava_dir, llava_engine):
    from draft_service import server as draft_server
    from draft_service.feature.checkpoint import new_model
    from draft_service.feature.drafter import FeatureDrafter
    from draft_service.feature.target_parts import load_target_parts, target_ref
    from speculum.rpc.settings import ServerSettings, SessionSettings
    from verify_service import server as verify_server

    model = new_model(target_ref(llava_dir), load_target_parts(llava_dir), seed=0, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, semi_ar_k=2, semi_ar_hidden=64)
    drafter = FeatureDrafter(model, llava_engine.target.facts, TreeShape(width=2, nodes=8))
    settings, sessions = ServerSettings(port=0, max_workers=4), SessionSettings(ttl_s=60, max_sessions=4)
    verifier, drafting = verify_server.serve(llava_engine.target, settings, sessions), draft_server.serve(drafter, settings, sessions)
    yield verifier, drafting, drafter
    verifier.stop()
    drafting.stop()


def speculate_tokens(prompt, verifier, drafter, sampling):
    from orchestrator.loop import speculate
    from orchestrator.stopping import StopChecker
    from speculum.config import SpeculationParams

    chunks = list(speculate(prompt, sampling, SpeculationParams(num_draft_tokens=3), verifier, drafter,
                            StopChecker(sampling.max_new_tokens, frozenset())))
    return [t for c in chunks for t in c.token_ids], chunks[-1].stats


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_trees_cross_the_services_intact(llava_engine, tree_services, temperature):
    import grpc

    from orchestrator.clients import GrpcDrafter, GrpcVerifier

    verifier, drafting, drafter = tree_services
    prompt = build_prompt(llava_engine, "Describe the image in detail.", [png_bytes(2)])
    sampling = SamplingParams(max_new_tokens=16, temperature=temperature, seed=3)
    channels = [grpc.insecure_channel(s.address) for s in (verifier, drafting)]
    remote, stats = speculate_tokens(prompt, GrpcVerifier(channels[0]), GrpcDrafter(channels[1]), sampling)
    local, _ = speculate_tokens(prompt, llava_engine.verifier, drafter, sampling)
    assert remote == local  # parents and draft probabilities travelled intact (sampling: same seed, same tokens)
    if temperature == 0.0:
        assert remote == hf_greedy(llava_engine.target, prompt, 16)
    assert stats.draft_tokens > 3 * stats.target_forwards, "rounds must have drafted trees, not chains"
