"""Drafter training data from local files: ShareGPT-style JSONL (text) and LLaVA-style JSON + an
image folder (multimodal), read by draft_service.training.local_data and trained on through the
real CLI entry against the tiny target; malformed files fail with the file and line named; a
text-only drafter (no image training items) still reports held-out image τ."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoImageProcessor, AutoTokenizer

from draft_service.feature.drafter import FeatureDrafter
from draft_service.training.__main__ import main
from draft_service.training.local_data import RecordSamples, read_llava_json, read_sharegpt_jsonl, split_records
from orchestrator.prompting import PromptBuilder
from speculum.errors import InvalidArgument

MICRO = ["--steps", "4", "--batch-size", "4", "--eval-samples", "2", "--max-new-tokens", "8", "--heads", "4",
         "--kv-heads", "2", "--intermediate", "64", "--warmup-steps", "1", "--quiet", "--threads", "2"]
TEXT = [(f"Explain item {i} of the list.", f"Item {i} is a value stored at index {i}.") for i in range(5)]
IMAGES = [(f"What color is picture {i}?", f"Picture {i} is mostly {color}.")
          for i, color in enumerate(["red", "green", "blue", "gray", "white"])]


def write_sharegpt(path, pairs=TEXT) -> None:
    lines = []
    for i, (prompt, answer) in enumerate(pairs):
        if i % 2:  # the OpenAI "messages" form, with a system turn, is accepted as well
            record = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt},
                                   {"role": "assistant", "content": answer}]}
        else:
            record = {"id": str(i), "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer},
                                                      {"from": "human", "value": "And then?"}]}
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines[:2] + [""] + lines[2:]) + "\n")  # a blank line is skipped


def write_llava(path, folder, pairs=IMAGES) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "sub").mkdir(exist_ok=True)
    records = []
    for i, (prompt, answer) in enumerate(pairs):
        pixels = (np.random.default_rng(i).random((24 + 4 * i, 32, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(folder / "sub" / f"{i}.png")
        human = f"<image>\n{prompt}" if i % 2 == 0 else f"{prompt}\n<image>"
        records.append({"id": f"img{i}", "image": f"sub/{i}.png",
                        "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]})
    path.write_text(json.dumps(records, indent=1))


def stored_ids(run_dir) -> dict:
    """The (prompt ids, answer ids) of every pool in the features cache the run wrote."""
    with safe_open(str(run_dir / "features.safetensors"), framework="pt") as handle:
        return {pool: [(tuple(p), tuple(a)) for p, a in pairs] for pool, pairs in json.loads(handle.metadata()["ids"]).items()}


def stored_visual(run_dir, pool: str, index: int) -> torch.Tensor:
    with safe_open(str(run_dir / "features.safetensors"), framework="pt") as handle:
        return handle.get_tensor(f"{pool}/{index}/visual")


def test_readers_take_the_first_exchange(tmp_path):
    write_sharegpt(tmp_path / "text.jsonl")
    text = read_sharegpt_jsonl(tmp_path / "text.jsonl")
    assert [(r.prompt, r.answer) for r in text.records] == TEXT
    assert text.records[2].where == f"{tmp_path / 'text.jsonl'}:4"  # line numbers count the blank line
    write_llava(tmp_path / "llava.json", tmp_path / "images")
    image = read_llava_json(tmp_path / "llava.json", tmp_path / "images")
    assert [(r.prompt, r.answer) for r in image.records] == IMAGES  # the <image> placeholder is removed
    sample = RecordSamples(image.records)[1]
    assert sample.image.size == (32, 28) and sample.image.mode == "RGB" and sample.example.prompt == IMAGES[1][0]

    train, held = split_records(text, held_out=2, train=10, seed=0)
    assert len(held) == 2 and sorted(r.where for r in train + held) == sorted(r.where for r in text.records)
    assert split_records(text, 2, 10, seed=0) == (train, held)  # seeded
    assert any(split_records(text, 2, 10, seed=s)[1] != held for s in range(1, 6))
    assert split_records(text, 2, 1, seed=0) == (train[:1], held)  # a cap keeps the held-out draw


@pytest.mark.parametrize("line, message", [
    ('{"conversations": [{"from": "human", "value": "hi"}', r"text.jsonl:2: not valid JSON"),
    ('{"conversations": [{"from": "human", "value": "hi"}]}', r"text.jsonl:2: the first human turn is not followed by a gpt"),
    ('{"conversations": [{"from": "gpt", "value": "hi"}]}', r"text.jsonl:2: has no human"),
    ('{"conversations": [{"from": "robot", "value": "hi"}]}', r"text.jsonl:2: turn 0 has the unknown role 'robot'"),
    ('{"conversations": [{"from": "human", "value": 3}]}', r"text.jsonl:2: turn 0 must be"),
    ('{"text": "hi"}', r"text.jsonl:2: needs \"conversations\""),
    ('[1, 2]', r"text.jsonl:2: must be a JSON object"),
    ('[', r"text.jsonl:2: not valid JSON \(.*\); JSONL holds one JSON object per line"),
    ('{"conversations": [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "x"}]}',
     r"text.jsonl:2: a text prompt must not contain <image>"),
])
def test_malformed_sharegpt_names_the_line(tmp_path, line, message):
    good = json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]})
    (tmp_path / "text.jsonl").write_text(f"{good}\n{line}\n{good}\n")
    with pytest.raises(InvalidArgument, match=message):
        read_sharegpt_jsonl(tmp_path / "text.jsonl")


@pytest.mark.parametrize("change, message", [
    (lambda r: r[1].pop("image"), r"llava.json record 1 \(id img1\): needs \"image\""),
    (lambda r: r[2].update(image="sub/missing.png"), r"record 2 \(id img2\): image sub/missing.png not found"),
    (lambda r: r[0]["conversations"][0].update(value="<image><image> two?"), r"record 0 \(id img0\): one image per record"),
    (lambda r: r[3]["conversations"][0].update(value="<image>"), r"record 3 \(id img3\): the human turn holds no text"),
    (lambda r: r[4]["conversations"].pop(), r"record 4 \(id img4\): the first human turn is not followed"),
])
def test_malformed_llava_names_the_record(tmp_path, change, message):
    write_llava(tmp_path / "llava.json", tmp_path / "images")
    records = json.loads((tmp_path / "llava.json").read_text())
    change(records)
    (tmp_path / "llava.json").write_text(json.dumps(records))
    with pytest.raises(InvalidArgument, match=message):
        read_llava_json(tmp_path / "llava.json", tmp_path / "images")


def test_cli_reports_bad_files_before_loading_the_target(tmp_path):
    (tmp_path / "text.jsonl").write_text('{"conversations": []}\n')
    common = ["--target", str(tmp_path / "no_target"), "--out", str(tmp_path / "out"), *MICRO]
    with pytest.raises(SystemExit, match=r"^error: .*text.jsonl:1: has no human \(user\) turn$"):
        main([*common, "--text-jsonl", str(tmp_path / "text.jsonl")])
    with pytest.raises(SystemExit, match=r"^error: .*go together"):
        main([*common, "--llava-json", str(tmp_path / "text.jsonl")])
    write_sharegpt(tmp_path / "two.jsonl", TEXT[:2])
    with pytest.raises(SystemExit, match=r"two.jsonl: has 2 records: none left for training after holding out 2"):
        main([*common, "--text-jsonl", str(tmp_path / "two.jsonl")])
    # An image that exists but is not an image fails when its features are collected, naming the record.
    write_llava(tmp_path / "llava.json", tmp_path / "images", IMAGES[:3])
    (tmp_path / "images" / "sub" / "1.png").write_bytes(b"not a png")
    records = read_llava_json(tmp_path / "llava.json", tmp_path / "images").records
    with pytest.raises(InvalidArgument, match=r"record 1 \(id img1\): cannot read image"):
        RecordSamples(records)[1]


def test_training_from_local_files(tmp_path, llava_dir, llava_engine):
    write_sharegpt(tmp_path / "text.jsonl")
    write_llava(tmp_path / "llava.json", tmp_path / "images")
    out, run_dir = tmp_path / "drafter", tmp_path / "run"
    files = ["--text-jsonl", str(tmp_path / "text.jsonl"), "--llava-json", str(tmp_path / "llava.json"),
             "--image-folder", str(tmp_path / "images")]
    summary = main(["--target", str(llava_dir), "--out", str(out), "--run-dir", str(run_dir), "--seed", "3",
                    "--answers", "dataset", *files, *MICRO])
    # Every record is used: 2 of each file held out (the default --eval-samples), the other 3 train.
    assert summary["pools"] == {"train_text": 3, "train_image": 3, "eval_text": 2, "eval_image": 2}
    assert summary["data_files"]["text_jsonl"]["path"] == str((tmp_path / "text.jsonl").resolve())
    assert FeatureDrafter.from_pretrained(out, llava_dir).model.config.decouple_visual
    assert json.loads((out / "config.json").read_text())["meta"]["steps"] == 4

    # Prompts went through the target's chat template; training answers are the files' answers.
    tokenizer = AutoTokenizer.from_pretrained(llava_dir, local_files_only=True)
    prompts = PromptBuilder(tokenizer, llava_engine.target.image_token_id)
    eos = sorted(llava_engine.target.eos_token_ids)[0]
    answer_ids = lambda text: (*tokenizer(" " + text, add_special_tokens=False).input_ids, eos)  # noqa: E731
    ids = stored_ids(run_dir)
    for pool, held, pairs, images in (("train_text", "eval_text", TEXT, 0), ("train_image", "eval_image", IMAGES, 1)):
        by_prompt = {prompts.tokenize(prompt, images): answer for prompt, answer in pairs}
        assert {p for p, _ in ids[pool] + ids[held]} == set(by_prompt)  # each record exactly once
        assert len(ids[pool]) + len(ids[held]) == len(pairs)
        for prompt, answer in ids[pool]:
            assert answer == answer_ids(by_prompt[prompt])
        for prompt, answer in ids[held]:  # held out: the target's own greedy answer, not the file's
            assert 1 <= len(answer) <= 8

    # The visual features are the target's encoding of the file's own image.
    processor = AutoImageProcessor.from_pretrained(llava_dir, local_files_only=True)
    index = {prompts.tokenize(prompt, 1): i for i, (prompt, _) in enumerate(IMAGES)}[ids["train_image"][0][0]]
    pixels = processor([Image.open(tmp_path / "images" / "sub" / f"{index}.png").convert("RGB")], return_tensors="pt")
    expected = llava_engine.target.encode_images(pixels.pixel_values).to(torch.float16)
    torch.testing.assert_close(stored_visual(run_dir, "train_image", 0), expected)

    # A changed file is a different data set: the cached features are collected again.
    write_sharegpt(tmp_path / "text.jsonl", [(prompt, "Changed.") for prompt, _ in TEXT])
    main(["--target", str(llava_dir), "--out", str(out), "--run-dir", str(run_dir), "--seed", "3",
          "--answers", "dataset", *files, *MICRO, "--eval-only"])
    assert {answer for _, answer in stored_ids(run_dir)["train_text"]} == {answer_ids("Changed.")}


def test_text_only_drafter_is_measured_on_images(tmp_path, llava_dir):
    """The "language-only draft" baseline: text training items only, no MSD decoupling; the held-out
    evaluation still runs on image prompts (demo describe scenes here)."""
    write_sharegpt(tmp_path / "text.jsonl")
    out, run_dir = tmp_path / "text_only", tmp_path / "run"
    summary = main(["--target", str(llava_dir), "--out", str(out), "--run-dir", str(run_dir), "--seed", "0",
                    "--text-jsonl", str(tmp_path / "text.jsonl"), "--image-samples", "0", "--no-decouple", *MICRO])
    assert summary["pools"] == {"train_text": 3, "train_image": 0, "eval_text": 2, "eval_image": 2}
    assert summary["heldout"]["image"]["rounds"] > 0 and summary["heldout"]["image"]["tau"] >= 1.0
    assert not FeatureDrafter.from_pretrained(out, llava_dir).model.config.decouple_visual
    image_token = FeatureDrafter.from_pretrained(out, llava_dir).facts.image_token_id
    assert all(image_token in prompt for prompt, _ in stored_ids(run_dir)["eval_image"])
    assert not any(image_token in prompt for prompt, _ in stored_ids(run_dir)["train_text"])
