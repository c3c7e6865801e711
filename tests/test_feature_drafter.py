"""The feature drafter (EAGLE-style, MSD / FLASH switches) keeps the target's output exactly.

Greedy: speculate() with the drafter equals HF generate(do_sample=False) of the target, for draft
lengths 1..6, with and without an image, for every switch combination, with an untrained drafter
(almost everything rejected) and a briefly trained one (long accepted runs, so rollbacks happen
mid-block). Sampling keeps the target's distribution (exact marginals on a small vocabulary). A
saved and reloaded checkpoint drafts the same tokens, and after rejections the drafter's KV cache
equals a fresh prefill of the committed context. The same holds for candidate trees. The drafter's
plain-torch decoder layer computes what transformers' LlamaDecoderLayer computes, with its weights.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from conftest import build_prompt, hf_greedy, png_bytes
from draft_service.feature.checkpoint import load_checkpoint, new_model, save_checkpoint
from draft_service.feature.config import FeatureDrafterConfig, TargetRef
from draft_service.feature.layer import DecoderLayer, LayerCache
from draft_service.feature.drafter import FeatureDrafter
from draft_service.feature.target_parts import parts_from_model, model_ref, target_ref, load_target_parts
from orchestrator.loop import speculate
from orchestrator.stopping import StopChecker
from speculum.config import SamplingParams, SpeculationParams
from speculum.records import DraftBlock, PromptInputs, VerifyResult, join_pieces
from speculum import tree
from speculum.rejection import NextTokenKind
from speculum.tree import TreeShape
import test_sampling_lossless
from test_sampling_lossless import exact_marginals, matches, sample_counts, target  # noqa: F401 (fixtures)
from verify_service.target import TargetSession

MAX_NEW = 24
UNTRAINED_NEW = 8  # an untrained drafter is rejected every round: a few rounds exercise every path
SMALL = dict(num_heads=4, num_kv_heads=2, intermediate_size=128, num_latents=4, semi_ar_hidden=64)
SWITCHES = {
    f"decouple{int(d)}-compress{int(c)}-k{k}": dict(decouple_visual=d, compress_visual=c, semi_ar_k=k)
    for d, c, k in itertools.product((True, False), (False, True), (1, 3))
} | {"language-only-k3": dict(decouple_visual=False, drop_visual=True, semi_ar_k=3)}


def drafter_for(llava_dir, engine, seed: int = 0, **switches) -> FeatureDrafter:
    model = new_model(target_ref(llava_dir), load_target_parts(llava_dir), seed=seed, **SMALL, **switches)
    return FeatureDrafter(model, engine.target.facts)


def run(engine, prompt, drafter, k, sampling=None):
    sampling = sampling or SamplingParams(max_new_tokens=MAX_NEW)
    assert sampling.max_new_tokens <= MAX_NEW
    stop = StopChecker(sampling.max_new_tokens, engine.target.eos_token_ids)
    chunks = list(speculate(prompt, sampling, SpeculationParams(num_draft_tokens=k), engine.verifier, drafter, stop))
    return [t for chunk in chunks for t in chunk.token_ids], chunks[-1].stats


@pytest.fixture(scope="module")
def prompts(llava_engine):
    image = build_prompt(llava_engine, "Describe the image in detail.", [png_bytes(1)])
    text = build_prompt(llava_engine, "Tell me a story about lists.")
    return {name: (p, hf_greedy(llava_engine.target, p, MAX_NEW)) for name, p in (("image", image), ("text", text))}


TRAINED = {  # the full MSD + FLASH drafter, and the plain EAGLE one
    "msd-flash-k3": dict(decouple_visual=True, compress_visual=True, semi_ar_k=3),
    "eagle-k1": dict(decouple_visual=False, compress_visual=False, semi_ar_k=1),
}


def fit(llava_dir, engine, prompts, switches) -> FeatureDrafter:
    """A drafter fitted for a hundred steps to the target's own features on the two test prompts."""
    from draft_service.training.features import extract_features
    from draft_service.training.objective import LossWeights, feature_loss

    drafter = drafter_for(llava_dir, engine, seed=3, **switches)
    model = drafter.model.train()
    samples = [extract_features(engine.target, p, reference) for p, reference in prompts.values()]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(100):
        loss = feature_loss(model, engine.target.facts, samples, LossWeights(noise=0.0)).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return drafter


@pytest.fixture(scope="module")
def trained_drafters(llava_dir, llava_engine, prompts):
    return {name: fit(llava_dir, llava_engine, prompts, switches) for name, switches in TRAINED.items()}


@pytest.fixture(scope="module")
def trained(trained_drafters):
    return trained_drafters["msd-flash-k3"]


@pytest.mark.parametrize("switches", list(SWITCHES))
@pytest.mark.parametrize("prompt_kind", ["image", "text"])
def test_greedy_untrained_equals_target(llava_dir, llava_engine, prompts, switches, prompt_kind):
    prompt, reference = prompts[prompt_kind]
    drafter = drafter_for(llava_dir, llava_engine, **SWITCHES[switches])
    for k in range(1, 7):
        tokens, stats = run(llava_engine, prompt, drafter, k, SamplingParams(max_new_tokens=UNTRAINED_NEW))
        assert tokens == reference[:UNTRAINED_NEW], k
        assert stats.draft_tokens > 0, "the drafter must have drafted (a fault falls back silently)"


@pytest.mark.parametrize("name", list(TRAINED))
@pytest.mark.parametrize("prompt_kind", ["image", "text"])
def test_greedy_trained_equals_target_and_accepts(llava_engine, prompts, trained_drafters, name, prompt_kind):
    prompt, reference = prompts[prompt_kind]
    rejected = 0
    for k in range(1, 7):
        tokens, stats = run(llava_engine, prompt, trained_drafters[name], k)
        assert tokens == reference, k
        assert stats.accepted_tokens > 0, (k, stats)
        rejected += stats.draft_tokens - stats.accepted_tokens
    assert rejected > 0, "some drafts must be rejected, so that rollbacks are exercised"


def test_semi_ar_yields_blocks_of_k(llava_engine, prompts, trained):
    prompt, _ = prompts["image"]
    target = TargetSession(llava_engine.target, SamplingParams(max_new_tokens=MAX_NEW, seed=0))
    session = trained.open(SamplingParams(max_new_tokens=MAX_NEW, seed=0))
    session.prefill(prompt, target.prefill(prompt))
    assert [len(piece.tokens) for piece in session.propose(7)] == [3, 3, 1]


def test_compression_shortens_the_drafter_context(llava_dir, llava_engine, prompts):
    prompt, _ = prompts["image"]
    first = TargetSession(llava_engine.target, SamplingParams(seed=0)).prefill(prompt)
    lengths = {}
    for compress in (False, True):
        session = drafter_for(llava_dir, llava_engine, compress_visual=compress).open(SamplingParams(seed=0))
        session.prefill(prompt, first)
        session.sync()
        lengths[compress] = session.real_length
    facts = llava_engine.target.facts
    assert lengths[False] == len(facts.expand_image_tokens(prompt.token_ids))
    assert lengths[False] - lengths[True] == facts.num_image_tokens - SMALL["num_latents"]


def test_language_only_drafter_leaves_the_image_out(llava_dir, llava_engine, prompts):
    prompt, _ = prompts["image"]
    first = TargetSession(llava_engine.target, SamplingParams(seed=0)).prefill(prompt)
    session = drafter_for(llava_dir, llava_engine, decouple_visual=False, drop_visual=True).open(SamplingParams(seed=0))
    session.prefill(prompt, first)
    session.sync()
    facts = llava_engine.target.facts
    assert session.real_length == len(facts.expand_image_tokens(prompt.token_ids)) - facts.num_image_tokens
    with pytest.raises(ValueError, match="drop_visual"):
        drafter_for(llava_dir, llava_engine, decouple_visual=True, drop_visual=True)


def test_encoder_latents_are_used_when_present(llava_dir, llava_engine, prompts):
    """The vision encoder may run the compressor; its latents must give the same drafts."""
    prompt, _ = prompts["image"]
    drafter = drafter_for(llava_dir, llava_engine, compress_visual=True)
    with torch.inference_mode():
        latents = drafter.model.compressor(prompt.visual_embeds)
    with_latents = PromptInputs(prompt.token_ids, prompt.pixel_values, prompt.visual_embeds, latents)
    (ours, ours_stats), (theirs, theirs_stats) = (run(llava_engine, p, drafter, 3) for p in (with_latents, prompt))
    assert ours == theirs and ours_stats.draft_tokens == theirs_stats.draft_tokens


def test_checkpoint_round_trip_drafts_identically(tmp_path, llava_dir, llava_engine, prompts, trained):
    save_checkpoint(trained.model, tmp_path / "drafter")
    reloaded = FeatureDrafter.from_pretrained(tmp_path / "drafter", llava_dir)
    assert sorted(p.name for p in (tmp_path / "drafter").iterdir()) == ["config.json", "model.safetensors"]
    prompt, _ = prompts["image"]
    first = TargetSession(llava_engine.target, SamplingParams(seed=0)).prefill(prompt)
    sampling = SamplingParams(max_new_tokens=MAX_NEW, temperature=1.0, seed=5)
    blocks = []
    for drafter in (trained, reloaded):
        session = drafter.open(sampling)
        session.prefill(prompt, first)
        blocks.append(join_pieces(list(session.propose(6))))
    assert blocks[0].tokens == blocks[1].tokens
    torch.testing.assert_close(blocks[0].draft_probs, blocks[1].draft_probs)
    assert trained.model.compressor.fingerprint == reloaded.model.compressor.fingerprint


def test_checkpoint_refuses_another_target(tmp_path, llava_dir, llama_dir, trained):
    save_checkpoint(trained.model, tmp_path / "drafter")
    with pytest.raises(Exception, match="another target"):
        load_checkpoint(tmp_path / "drafter", llama_dir)


def test_cache_after_rejection_equals_fresh_prefill(llava_engine, prompts, trained):
    prompt, _ = prompts["image"]
    sampling = SamplingParams(max_new_tokens=MAX_NEW, seed=0)
    target = TargetSession(llava_engine.target, sampling)
    session = trained.open(sampling)
    first = target.prefill(prompt)
    session.prefill(prompt, first)
    emitted = list(first.tokens)
    rejections = 0
    for _ in range(6):
        block = join_pieces(list(session.propose(5)))
        result = target.verify(block)
        rejections += result.num_accepted < len(block.tokens)
        session.advance(result)
        emitted += result.tokens
    assert rejections > 0
    session.sync()
    # A fresh session over the same committed context, with the target's features computed in one pass.
    fresh_target = TargetSession(llava_engine.target, sampling)
    context = PromptInputs((*prompt.token_ids, *emitted[:-1]), prompt.pixel_values, prompt.visual_embeds)
    fresh_first = fresh_target.prefill(context)
    fresh = trained.open(sampling)
    fresh.prefill(context, VerifyResult(0, (emitted[-1],), NextTokenKind.BONUS, fresh_first.hidden))
    fresh.sync()
    assert fresh.real_length == session.real_length
    torch.testing.assert_close(session.cache.keys, fresh.cache.keys, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(session.cache.values, fresh.cache.values, atol=1e-4, rtol=1e-4)


def test_sampling_keeps_the_target_distribution(target, exact_marginals, monkeypatch):  # noqa: F811
    # Semi-AR (k=3): each block is one piece of several sampled tokens with their probabilities.
    model = new_model(model_ref(target.model), parts_from_model(target.model), seed=4,
                      num_heads=2, num_kv_heads=1, intermediate_size=64, semi_ar_k=3, semi_ar_hidden=32)
    # A random drafter is nearly uniform over 8 tokens; sharpen it so that some drafts get rejected
    # and some accepted at sampling time.
    with torch.no_grad():
        model.fc.weight.mul_(20)
    monkeypatch.setattr(test_sampling_lossless, "SAMPLES", 600)  # fewer runs: this file must stay quick
    # One token more than the exact marginals cover, so that the first round drafts a 2-token semi-AR
    # block (room = max_new - 2); the marginals of the first three tokens do not depend on it.
    checked = exact_marginals.shape[0]
    monkeypatch.setattr(test_sampling_lossless, "NEW_TOKENS", checked + 1)
    monkeypatch.setattr(test_sampling_lossless, "SAMPLING",
                        dataclasses.replace(test_sampling_lossless.SAMPLING, max_new_tokens=checked + 1))
    counts = sample_counts(target, FeatureDrafter(model, target.facts), seed_base=40_000)
    for position in range(checked):
        assert matches(counts[position], exact_marginals[position]), position


# --- candidate trees (EAGLE-2 dynamic trees drafted by the feature drafter) ----------------------
TREES = {"w2-n8": TreeShape(width=2, nodes=8), "w3": TreeShape(width=3)}


def with_tree(drafter: FeatureDrafter, shape: TreeShape) -> FeatureDrafter:
    return FeatureDrafter(drafter.model, drafter.facts, shape)


@pytest.mark.parametrize("name", list(TRAINED))
@pytest.mark.parametrize("shape", list(TREES))
@pytest.mark.parametrize("prompt_kind", ["image", "text"])
def test_tree_greedy_equals_target(llava_engine, prompts, trained_drafters, name, shape, prompt_kind):
    prompt, reference = prompts[prompt_kind]
    drafter = with_tree(trained_drafters[name], TREES[shape])
    for k in (1, 3, 5):
        tokens, stats = run(llava_engine, prompt, drafter, k)
        assert tokens == reference, k
        assert stats.accepted_tokens > 0, (k, stats)


@pytest.mark.parametrize("switches", ["decouple1-compress1-k3", "decouple0-compress0-k1"])
def test_untrained_tree_greedy_equals_target(llava_dir, llava_engine, prompts, switches):
    prompt, reference = prompts["image"]
    drafter = with_tree(drafter_for(llava_dir, llava_engine, **SWITCHES[switches]), TreeShape(width=3, nodes=10))
    for k in (2, 4):
        tokens, stats = run(llava_engine, prompt, drafter, k, SamplingParams(max_new_tokens=UNTRAINED_NEW))
        assert tokens == reference[:UNTRAINED_NEW], k
        assert stats.draft_tokens > 0


def test_tree_blocks_branch_within_the_budget(llava_engine, prompts, trained):
    prompt, _ = prompts["image"]
    target = TargetSession(llava_engine.target, SamplingParams(max_new_tokens=MAX_NEW, seed=0))
    session = with_tree(trained, TreeShape(width=3, nodes=10)).open(SamplingParams(max_new_tokens=MAX_NEW, seed=0))
    session.prefill(prompt, target.prefill(prompt))
    (block,) = session.propose(4)
    assert len(block.tokens) == 10 and not block.is_chain
    assert max(tree.depths(block.parents)) <= 4


def test_cache_after_tree_rounds_equals_fresh_prefill(llava_engine, prompts, trained):
    prompt, _ = prompts["text"]
    sampling = SamplingParams(max_new_tokens=MAX_NEW, seed=0)
    target = TargetSession(llava_engine.target, sampling)
    session = with_tree(trained, TreeShape(width=2, nodes=6)).open(sampling)
    first = target.prefill(prompt)
    session.prefill(prompt, first)
    emitted = list(first.tokens)
    for _ in range(5):
        (block,) = session.propose(4)
        result = target.verify(block)
        session.advance(result)
        emitted += result.tokens
    session.sync()
    fresh_target = TargetSession(llava_engine.target, sampling)
    context = PromptInputs((*prompt.token_ids, *emitted[:-1]))
    fresh = trained.open(sampling)
    fresh.prefill(context, VerifyResult(0, (emitted[-1],), NextTokenKind.BONUS, fresh_target.prefill(context).hidden))
    fresh.sync()
    assert fresh.real_length == session.real_length
    torch.testing.assert_close(session.cache.keys, fresh.cache.keys, atol=1e-4, rtol=1e-4)


def test_tree_sampling_keeps_the_target_distribution(target, exact_marginals, monkeypatch):  # noqa: F811
    model = new_model(model_ref(target.model), parts_from_model(target.model), seed=4,
                      num_heads=2, num_kv_heads=1, intermediate_size=64)
    with torch.no_grad():
        model.fc.weight.mul_(20)  # sharpen the random drafter, so that drafts are both kept and rejected
    monkeypatch.setattr(test_sampling_lossless, "SAMPLES", 600)
    drafter = FeatureDrafter(model, target.facts, TreeShape(width=3, nodes=6))
    counts = sample_counts(target, drafter, seed_base=50_000)
    for position in range(exact_marginals.shape[0]):
        assert matches(counts[position], exact_marginals[position]), position


# --- the plain-torch decoder layer against transformers' LlamaDecoderLayer ------------------------
def layer_pair(num_kv_heads: int) -> tuple[DecoderLayer, torch.nn.Module, object]:
    """Our layer and transformers' (input norm removed, as the drafter uses it) with the same random weights."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = FeatureDrafterConfig(TargetRef("-", "-", 64, 64), num_heads=4, num_kv_heads=num_kv_heads,
                                  intermediate_size=96, rope_theta=500.0, max_positions=8)
    hf_config = LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=num_kv_heads,
                            rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta, attn_implementation="sdpa")
    torch.manual_seed(0)
    ours = DecoderLayer(config)
    with torch.no_grad():
        ours.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    theirs = LlamaDecoderLayer(hf_config, layer_idx=0)
    theirs.input_layernorm = torch.nn.Identity()
    theirs.load_state_dict(ours.state_dict())  # strict: the parameter names are the same
    return ours.eval(), theirs.eval(), LlamaRotaryEmbedding(hf_config)


def hf_run(layer, rotary, x, cache=None, mask=None, positions=None):
    cached = 0 if cache is None else cache.get_seq_length()
    if positions is None:
        positions = torch.arange(cached, cached + x.shape[1])[None]
        if cached and x.shape[1] > 1:
            mask = torch.ones(x.shape[1], cached + x.shape[1], dtype=torch.bool).tril(cached)[None, None]
    return layer(x, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=cache is not None,
                 position_embeddings=rotary(x, positions))


@pytest.mark.parametrize("num_kv_heads", [4, 2])
@torch.no_grad()
def test_layer_equals_transformers_llama_layer(num_kv_heads):
    from transformers import DynamicCache

    ours, theirs, rotary = layer_pair(num_kv_heads)
    # A right-padded batch, causal, beyond the initial RoPE table (8 positions): training's forward.
    batch = torch.randn(3, 13, 64)
    torch.testing.assert_close(ours(batch), hf_run(theirs, rotary, batch))
    # Incremental with a cache, with a rollback in the middle: serving's forward (chains need only
    # the last row's output; the rows before it still enter the cache).
    cache, hf_cache = LayerCache(initial_capacity=4), DynamicCache()
    for chunk, last_only in ((5, False), (1, False), (3, True), (4, True), (2, False)):
        x = torch.randn(1, chunk, 64)
        expected = hf_run(theirs, rotary, x, hf_cache)
        torch.testing.assert_close(ours(x, cache, last_only=last_only), expected[:, -1:] if last_only else expected)
        if chunk == 3:
            cache.truncate(cache.length - 2)
            hf_cache.crop(-2)
    torch.testing.assert_close(cache.keys, hf_cache.layers[0].keys)
    torch.testing.assert_close(cache.values, hf_cache.layers[0].values)
    # A candidate tree after the cached rows: its own mask and positions.
    cached = cache.length
    parents = [-1, -1, 0, 0, 2]
    visible = torch.zeros(5, cached + 5, dtype=torch.bool)
    visible[:, :cached] = True
    for node in range(5):
        for ancestor in tree.path_to(parents, node):
            visible[node, cached + ancestor] = True
    positions = torch.tensor([[cached + len(tree.path_to(parents, n)) - 1 for n in range(5)]])
    x = torch.randn(1, 5, 64)
    torch.testing.assert_close(ours(x, cache, visible[None, None], positions),
                               hf_run(theirs, rotary, x, hf_cache, visible[None, None], positions))


@torch.no_grad()
def test_layer_fused_weights_follow_in_place_updates():
    """q/k/v and gate/up run as one cached matmul at inference: an optimizer step between two
    evaluations (in-place updates) must not leave the cached copy stale."""
    ours, theirs, rotary = layer_pair(4)
    x = torch.randn(2, 6, 64)
    ours(x)  # builds the cached fused weights
    for name in ("self_attn.k_proj.weight", "mlp.up_proj.weight"):
        ours.get_parameter(name).mul_(1.5)
        theirs.get_parameter(name).mul_(1.5)
    torch.testing.assert_close(ours(x), hf_run(theirs, rotary, x))
