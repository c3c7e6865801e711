"""The demo world: seeded data, the engine's prompt layout, the micro-scale recipe end to end,
bit-identical resumption, and the shipped target answering held-out questions."""

from __future__ import annotations

import dataclasses
import hashlib
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

from demo_world.__main__ import main as demo_world_main
from demo_world.config import FULL, MICRO
from demo_world.data import answer_ids, build_tokenizer, collate, make_item, prompt_ids, step_items
from demo_world.evaluate import greedy_answer, heldout_items
from demo_world.model import build_image_processor, build_model, save_target
from demo_world.scenes import (PATCH_COLOURS, PATCH_SHAPES, PATCH_SIZES, Letter, Scene, SceneObject, patch_labels,
                               render, scene_for_seed)
from demo_world.tasks import Kind, describe, key_facts
from demo_world.text_corpus import split_docstrings
from demo_world.train import PROBE_CLASSES, PatchProbe, answer_loss, probe_class_tokens, train

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "demo" / "target"


@pytest.fixture(scope="module")
def micro_tokenizer():
    return build_tokenizer(MICRO)


def test_same_seed_same_image_and_text():
    a, b = scene_for_seed(7, FULL.scenes), scene_for_seed(7, FULL.scenes)
    assert a == b
    assert render(a, FULL.scenes).tobytes() == render(b, FULL.scenes).tobytes()
    assert describe(a) == describe(b)
    assert render(scene_for_seed(8, FULL.scenes), FULL.scenes).tobytes() != render(a, FULL.scenes).tobytes()


def test_step_batches_are_a_function_of_the_step():
    first, again = step_items(MICRO, 3), step_items(MICRO, 3)
    assert [s.example for s in first] == [s.example for s in again]
    assert [s.image and s.image.tobytes() for s in first] == [s.image and s.image.tobytes() for s in again]
    assert [s.example for s in step_items(MICRO, 4)] != [s.example for s in first]


def test_text_corpus_split_is_disjoint_and_stable():
    train_names = {d.qualname for d in split_docstrings(held_out=False)}
    held_names = {d.qualname for d in split_docstrings(held_out=True)}
    assert train_names and held_names and not train_names & held_names


def test_descriptions_are_long_and_image_dependent():
    texts = {describe(scene_for_seed(seed, FULL.scenes)) for seed in range(20)}
    assert len(texts) == 20
    assert min(len(t.split()) for t in texts) >= 25


def test_key_facts_ignore_wording_but_not_facts():
    assert key_facts("There are three objects.") == ("three",)
    assert key_facts("The circle is red.") != key_facts("The circle is blue.")
    assert key_facts("The letter K is written at the top.") == ("K", "top")


def test_prompt_layout_matches_the_engine(micro_tokenizer):
    tok = micro_tokenizer
    ids = prompt_ids(tok, "How many objects are there?", has_image=True, visual_tokens=64)
    assert ids[0] == tok.bos_token_id and ids.count(3) == 64
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many objects are there?"}]}],
        add_generation_prompt=True, tokenize=False)
    # The prompt and "ASSISTANT:" are on separate lines, as in the tokenizer's training texts (the
    # template's trim_blocks once fused them).
    assert rendered == "<s>USER: <image>\nHow many objects are there?\nASSISTANT:"
    # Tokenising prompt and answer apart gives the same ids as the joint string the model sees.
    joint = tok(rendered + " There are two objects.", add_special_tokens=False).input_ids
    apart = tok(rendered, add_special_tokens=False).input_ids + answer_ids(tok, "There are two objects.")[:-1]
    assert joint == apart


def test_the_image_last_layout_puts_the_prompt_before_the_image():
    from speculum.chat_tokenizer import train_chat_tokenizer

    tok = train_chat_tokenizer(["USER: How many objects are there?\nASSISTANT: There are two objects."] * 8, 300,
                               image_last=True)
    ids = prompt_ids(tok, "How many objects are there?", has_image=True, visual_tokens=4)
    assert tok.decode(ids) == "<s>USER: How many objects are there?\n<image><image><image><image>\nASSISTANT:"
    assert tok.decode(prompt_ids(tok, "Hi", has_image=False, visual_tokens=4)) == "<s>USER: Hi\nASSISTANT:"


def test_multi_turn_template_keeps_turns_on_their_own_lines(micro_tokenizer):
    rendered = micro_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
         {"role": "user", "content": "Again"}], add_generation_prompt=True, tokenize=False)
    assert rendered == "<s>USER: Hi\nASSISTANT: Hello.</s>\nUSER: Again\nASSISTANT:"


def test_patch_labels_name_what_covers_each_patch():
    centre = SceneObject(shape="triangle", colour="blue", size="large", row=1, col=1, dx=0.0, dy=0.0)
    corner = SceneObject(shape="circle", colour="red", size="small", row=0, col=0, dx=0.0, dy=0.0)
    scene = Scene(objects=(corner, centre), letter=Letter(char="K", row=2, col=2))
    labels = patch_labels(scene, FULL.scenes, patch_size=8)
    grid = FULL.scenes.image_size // 8
    assert len(labels.shape) == len(labels.colour) == len(labels.size) == grid * grid

    def at(x, y):  # the labels of the patch holding pixel (x, y)
        i = (y // 8) * grid + x // 8
        return PATCH_SHAPES[labels.shape[i]], PATCH_COLOURS[labels.colour[i]], PATCH_SIZES[labels.size[i]]

    third = FULL.scenes.image_size / 3
    assert at(int(1.5 * third), int(1.5 * third)) == ("triangle", "blue", "large")
    assert at(int(0.5 * third), int(0.5 * third)) == ("circle", "red", "small")
    assert at(int(2.5 * third), int(2.5 * third)) == ("letter", "none", "none")
    assert at(int(2.5 * third), int(0.5 * third)) == ("none", "none", "none")  # an empty cell


def _fresh(config, tokenizer):
    return build_model(dataclasses.replace(config.model, vocab_size=len(tokenizer)), config.train.seed)


def test_micro_pipeline_trains_saves_loads_and_generates(tmp_path, micro_tokenizer):
    torch.set_num_threads(2)
    tok, config = micro_tokenizer, MICRO
    image_processor = build_image_processor(config.model)
    model = _fresh(config, tok)
    result = train(model, tok, image_processor, config, tmp_path / "run")
    assert result.steps == config.train.steps
    save_target(model, tok, config.model, tmp_path / "target")

    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "target", dtype=torch.float32).eval()
    assert loaded.config.image_token_id == 3 and loaded.config.image_seq_length == config.model.visual_tokens
    assert loaded.generation_config.eos_token_id == 2
    loaded_tok = AutoTokenizer.from_pretrained(tmp_path / "target")
    processor = AutoProcessor.from_pretrained(tmp_path / "target")
    assert AutoImageProcessor.from_pretrained(tmp_path / "target") is not None
    assert loaded_tok.get_vocab() == tok.get_vocab()
    # fp16 on disk: the loaded weights are the trained ones rounded to half precision.
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor.half().float())

    item = heldout_items(config, Kind.COUNT.value, 1)[0]
    batch = collate([item], tok, image_processor, config.model.visual_tokens)
    shipped_pixels = processor.image_processor([item.image], return_tensors="pt").pixel_values
    assert torch.equal(batch.pixel_values, shipped_pixels)
    answer = greedy_answer(loaded, loaded_tok, processor.image_processor, item, config.model.visual_tokens, 8)
    assert isinstance(answer, str)


def test_resumed_training_is_bit_identical(tmp_path, micro_tokenizer):
    torch.set_num_threads(2)
    tok, config = micro_tokenizer, MICRO
    image_processor = build_image_processor(config.model)
    straight = _fresh(config, tok)
    train(straight, tok, image_processor, config, tmp_path / "straight")

    # Stop at the step-3 checkpoint, then resume in a fresh model from the run directory.
    train(_fresh(config, tok), tok, image_processor, config, tmp_path / "resumed", stop_after=3)
    resumed = _fresh(config, tok)
    result = train(resumed, tok, image_processor, config, tmp_path / "resumed")
    assert result.resumed_from == 3
    for name, tensor in straight.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


@pytest.mark.skipif(not SHIPPED.exists(), reason="the demo target has not been built yet")
def test_shipped_target_answers_heldout_count_questions():
    torch.set_num_threads(2)
    model = LlavaForConditionalGeneration.from_pretrained(SHIPPED, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(SHIPPED)
    image_processor = AutoProcessor.from_pretrained(SHIPPED).image_processor
    items = heldout_items(FULL, Kind.COUNT.value, 10)
    answers = [greedy_answer(model, tok, image_processor, it, FULL.model.visual_tokens, 16) for it in items]
    right = [key_facts(a) == key_facts(it.example.answer) for a, it in zip(answers, items)]
    # The shipped target scores 0.98 on 50 held-out count questions (models/demo/samples/README.md);
    # one constant answer would score about 0.2 (1-5 objects, uniform).
    assert sum(right) >= 9, list(zip(answers, [it.example.answer for it in items]))
    assert all(a.startswith("There ") and a.endswith(".") for a in answers)


def test_probe_adds_a_vision_gradient(micro_tokenizer):
    torch.set_num_threads(2)
    tok, config = micro_tokenizer, MICRO
    image_processor = build_image_processor(config.model)
    items = [it for it in step_items(config, 0) if it.image is not None]
    batch = collate(items, tok, image_processor, config.model.visual_tokens, config.scenes)
    assert batch.patch_labels.shape == (len(items), config.model.visual_tokens, 3)
    assert batch.patch_labels[..., 0].any()  # some patch is covered by an object
    probe = PatchProbe(config.model.text_hidden, seed=1)
    grads = []
    for weight in (0.0, 1.0):
        model = _fresh(config, tok)
        answer_loss(model, batch, probe, weight).backward()
        patch_embedding = next(p for n, p in model.named_parameters() if n.endswith("patch_embedding.weight"))
        grads.append(patch_embedding.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


def test_lookup_patches_are_those_of_the_one_object_the_question_names():
    from demo_world.data import lookup_patches

    circle = SceneObject(shape="circle", colour="red", size="large", row=0, col=0, dx=0.0, dy=0.0)
    triangle = SceneObject(shape="triangle", colour="blue", size="large", row=1, col=1, dx=0.0, dy=0.0)
    labels = patch_labels(Scene(objects=(circle, triangle), letter=None), FULL.scenes, patch_size=8)
    of = {name: [PATCH_SHAPES[s] == name for s in labels.shape] for name in ("circle", "triangle")}
    assert any(of["circle"]) and any(of["triangle"])
    assert lookup_patches("What colour is the triangle?", labels) == of["triangle"]
    assert lookup_patches("Where is the red circle?", labels) == of["circle"]
    assert lookup_patches("What shape is the blue object?", labels) == of["triangle"]
    assert lookup_patches("How many circles are there?", labels) == of["circle"]
    for unnamed in ("Is the red circle to the left of the blue triangle?", "Describe the image in detail.",
                    "Are there more circles than triangles?"):
        assert not any(lookup_patches(unnamed, labels)), unnamed


def test_the_lookup_loss_teaches_a_head_to_attend_to_the_named_object(micro_tokenizer):
    torch.set_num_threads(2)
    tok, config = micro_tokenizer, MICRO
    items = [make_item(kind, random.Random(kind), config.scenes) for kind in ("colour", "size", "position", "describe")]
    batch = collate(items, tok, build_image_processor(config.model), config.model.visual_tokens, config.scenes)
    assert batch.lookup.any(1).tolist() == [True, True, True, False]
    model = _fresh(config, tok)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    extra = []
    for _ in range(20):
        loss = answer_loss(model, batch, lookup_weight=1.0, lookup_layer=1) - answer_loss(model, batch).detach()
        extra.append(float(loss.detach()))
        (loss + answer_loss(model, batch)).backward()
        optimizer.step()
        optimizer.zero_grad()
    # -log(mass on the object's patches): from about chance (a few of ~80 keys) to most of the mass
    assert extra[0] > 1.5 and extra[-1] < 0.5 * extra[0], extra


def test_the_cell_head_of_the_probe_learns_the_grid_cell_of_each_patch():
    from demo_world.train import patch_cells

    cells = patch_cells(64).view(8, 8)  # 8 patches per side over 3 cells: 3, 2 and 3 patches
    assert cells[0].tolist() == [0, 0, 0, 1, 1, 2, 2, 2] and cells[:, 0].tolist() == [0, 0, 0, 3, 3, 6, 6, 6]
    assert cells[7, 7] == 8
    torch.manual_seed(0)
    features, labels = torch.randn(2, 64, 16), torch.zeros(2, 64, 3, dtype=torch.long)
    with_cell, without = PatchProbe(16, seed=1, cell=True), PatchProbe(16, seed=1)
    with_cell.loss(features, labels).backward()
    assert with_cell.cell.weight.grad.abs().sum() > 0 and without.cell is None
    # the three attribute heads start from the same seeded weights either way
    assert torch.equal(with_cell.shape.weight, without.shape.weight)


def test_micro_build_twice_from_the_seed_gives_identical_weights(tmp_path):
    hashes = []
    for name in ("first", "second"):
        out = tmp_path / name
        demo_world_main(["build", "--preset", "micro", "--out", str(out / "target"), "--run-dir", str(out / "run")])
        hashes.append(hashlib.sha256((out / "target" / "model.safetensors").read_bytes()).hexdigest())
    assert hashes[0] == hashes[1]


def test_loss_per_answer_weighs_every_answer_alike(micro_tokenizer):
    """The issue-3 trial switch: each example's answer loss is its token mean, then the batch mean, so
    the short lookup answers count as much as a long description."""
    tok, config = micro_tokenizer, MICRO
    image_processor = build_image_processor(config.model)
    items = step_items(config, 0)[:4]
    model = _fresh(config, tok)
    with torch.no_grad():
        batched = answer_loss(model, collate(items, tok, image_processor, config.model.visual_tokens), per_answer=True)
        alone = [answer_loss(model, collate([it], tok, image_processor, config.model.visual_tokens)) for it in items]
        pooled = answer_loss(model, collate(items, tok, image_processor, config.model.visual_tokens))
    torch.testing.assert_close(batched, torch.stack(alone).mean(), atol=1e-5, rtol=1e-5)
    assert len({len(answer_ids(tok, it.example.answer)) for it in items}) > 1  # so per-answer and per-token differ
    assert not torch.allclose(batched, pooled)


def test_tied_probe_reads_patches_with_the_word_embeddings(micro_tokenizer):
    """The other trial switch: the probe's named classes score patches against the LM's input
    embeddings of their words, so its loss trains those embeddings too."""
    tok, config = micro_tokenizer, MICRO
    try:
        class_tokens = probe_class_tokens(tok)
        assert all(tok.decode([t]).strip() == name for head, names in zip(class_tokens, PROBE_CLASSES)
                   for t, name in zip(head, names) if t is not None)
    except ValueError as exc:  # the micro vocabulary splits some word; the tie itself is checked below
        assert "cannot tie the probe" in str(exc)
        ids = iter(range(10, 100))
        class_tokens = tuple(tuple(None if name == "none" else next(ids) for name in names) for names in PROBE_CLASSES)
    probe = PatchProbe(config.model.text_hidden, seed=1, class_tokens=class_tokens)
    model = _fresh(config, tok)
    embeddings = model.get_input_embeddings().weight
    features = torch.randn(2, config.model.visual_tokens, config.model.text_hidden)
    labels = torch.zeros(2, config.model.visual_tokens, 3, dtype=torch.long)
    labels[:, :5, 0] = PATCH_SHAPES.index("triangle")
    probe.loss(features, labels, embeddings).backward()
    triangle = class_tokens[0][PATCH_SHAPES.index("triangle")]
    assert embeddings.grad[triangle].abs().sum() > 0
    untouched = set(range(len(embeddings))) - {t for head in class_tokens for t in head if t is not None}
    assert embeddings.grad[sorted(untouched)].abs().sum() == 0
