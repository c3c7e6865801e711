"""Training the drafter for pipelined look-aheads (draft_service.training.objective, `lookahead`),
and the pipelined acceptance simulation (draft_service.training.evaluate).

The look-ahead term's second forward must give each swapped-in row exactly what serving computes
for it: the real rows up to p in the drafter's cache, then rows fused with the drafter's own
predictions out[p, d]. The simulation must emit every answer token and take its blocks from
look-aheads.
"""

from __future__ import annotations

import torch

from conftest import build_prompt, hf_greedy, png_bytes
from draft_service.feature.context import sequence_context
from draft_service.training.evaluate import simulated_pipelined_tau, simulated_tau
from draft_service.training.features import extract_features
from draft_service.training.objective import LossWeights, _lookahead_blocks, feature_loss
from test_feature_drafter import drafter_for, fit

K = 3


def _sample(engine):
    prompt = build_prompt(engine, "Describe the image in detail.", [png_bytes(4)])
    return extract_features(engine.target, prompt, hf_greedy(engine.target, prompt, 20))


@torch.no_grad()
def test_block_rows_see_what_serving_gives_them(llava_dir, llava_engine):
    model = drafter_for(llava_dir, llava_engine, seed=5, decouple_visual=True, compress_visual=True,
                        semi_ar_k=K).model.eval()
    facts = llava_engine.target.facts
    sample = _sample(llava_engine)
    prompt = facts.expand_image_tokens(sample.prompt_ids)
    tokens = torch.tensor([*prompt, *sample.answer_ids])
    context = sequence_context(model, tokens, sample.hidden.float()[:-1], facts, len(prompt),
                               sample.visual_embeds.float())
    features = model(context.inputs[None])[0]  # [T', k, D]
    first = len(tokens) - len(sample.answer_ids) - 1
    rows, positions, visible, spec = _lookahead_blocks(model, context, tokens, first, features, K,
                                                       torch.Generator().manual_seed(1))
    out = model(rows[None], attention_mask=visible[None, None], positions=positions[None])[0]
    real = len(context.inputs)
    assert torch.allclose(out[:real], features, atol=1e-5), "the real rows are forward 1's"
    spec = spec.tolist()
    starts = [i for i, r in enumerate(spec) if i == 0 or spec[i - 1] != r - 1]
    assert len(starts) >= 3, "the sample must hold several blocks"
    for begin, end in zip(starts, starts[1:] + [len(spec)]):
        p = spec[begin] - 1
        block = spec[begin:end]
        assert len(block) == K or end == len(spec)
        cache = model.new_cache()
        predicted = model(context.inputs[None, : p + 1], cache, last_only=True)[0]  # out[p]: [k, D]
        # serving: the block's tokens fused with out[p, 0..], causal after the real rows
        next_tokens = tokens[context.target_positions[block] + 1]
        fed = model.fuse(model.embed(next_tokens), predicted[: len(block)])
        served = model(fed[None], cache)[0]  # [len(block), k, D]
        assert torch.allclose(served, out[real + begin : real + end], atol=1e-5), p


def test_lookahead_term_adds_to_the_loss_and_trains(llava_dir, llava_engine):
    model = drafter_for(llava_dir, llava_engine, seed=5, semi_ar_k=K).model.train()
    facts = llava_engine.target.facts
    samples = [_sample(llava_engine)]
    plain = feature_loss(model, facts, samples, LossWeights(noise=0.0), torch.Generator().manual_seed(0))
    both = feature_loss(model, facts, samples, LossWeights(noise=0.0, lookahead=1.0), torch.Generator().manual_seed(0))
    assert both.total.item() > plain.total.item()
    assert (both.feature, both.ce, both.top1) == (plain.feature, plain.ce, plain.top1), "the parts are the plain term's"
    both.total.backward()
    assert model.fc.weight.grad is not None and model.fc.weight.grad.abs().sum() > 0


def test_pipelined_simulation_emits_every_token_from_lookaheads(llava_dir, llava_engine):
    prompts = {"image": (build_prompt(llava_engine, "Describe the image in detail.", [png_bytes(1)]), None),
               "text": (build_prompt(llava_engine, "Tell me a story about lists."), None)}
    prompts = {name: (p, hf_greedy(llava_engine.target, p, 24)) for name, (p, _) in prompts.items()}
    drafter = fit(llava_dir, llava_engine, prompts, dict(decouple_visual=True, compress_visual=True, semi_ar_k=K))
    samples = [extract_features(llava_engine.target, p, reference) for p, reference in prompts.values()]
    sequential = simulated_tau(drafter, samples, K)
    pipelined = simulated_pipelined_tau(drafter, samples, K)
    assert pipelined.emitted == sequential.emitted == sum(len(s.answer_ids) - 1 for s in samples)
    assert pipelined.drafted_ahead > 0 and pipelined.rounds > pipelined.drafted_ahead
    assert pipelined.tau >= 1.0
