"""`speculum generate` as users run it: the installed entry point, in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import png_bytes

SPECULUM = Path(sys.executable).parent / "speculum"
FIELDS = {"text", "token_ids", "finish_reason", "usage", "speculation", "timing"}


def speculum(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SPECULUM), *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "scene.png"
    path.write_bytes(png_bytes(4))
    return path


def test_json_fields_and_identical_tokens_for_every_drafter(llava_dir, image_file):
    outputs = {}
    for drafter in ("none", "ngram", str(llava_dir)):
        done = speculum("generate", "--target", str(llava_dir), "--drafter", drafter, "--image", str(image_file),
                        "--prompt", "Describe the image.", "--max-new-tokens", "24", "--json")
        assert done.returncode == 0, done.stderr
        outputs[drafter] = json.loads(done.stdout)
    for out in outputs.values():
        assert set(out) == FIELDS
        assert set(out["usage"]) == {"prompt_tokens", "completion_tokens"}
        assert set(out["speculation"]) == {"target_forwards", "draft_tokens", "accepted_tokens", "mean_accepted_length",
                                           "drafted_ahead"}
        assert set(out["timing"]) == {"ttft_s", "decode_s"}
        assert out["usage"]["completion_tokens"] == len(out["token_ids"]) == 24
    assert outputs["none"]["token_ids"] == outputs["ngram"]["token_ids"] == outputs[str(llava_dir)]["token_ids"]
    assert outputs["none"]["speculation"]["draft_tokens"] == 0
    # the target drafting for itself is accepted in full: τ = K + 1 = 5 on every full round
    assert outputs[str(llava_dir)]["speculation"]["mean_accepted_length"] > 4


def test_requests_file_runs_each_line(llava_dir, image_file, tmp_path):
    requests = tmp_path / "requests.jsonl"
    lines = [
        {"prompt": "Describe the image.", "image": str(image_file), "max_new_tokens": 8},
        {"prompt": "Say something.", "max_new_tokens": 6, "temperature": 0.8, "seed": 3},
        {"prompt": "Say something.", "max_new_tokens": 6, "temperature": 0.8, "seed": 3},
    ]
    requests.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    done = speculum("generate", "--target", str(llava_dir), "--drafter", "ngram", "--requests", str(requests), "--json")
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["usage"]["completion_tokens"] for r in results] == [8, 6, 6]
    assert results[1]["token_ids"] == results[2]["token_ids"]  # same seed, same sample


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", ""], "prompt: must not be empty"),
        (["--prompt", "hi", "--temperature", "-1"], "sampling.temperature"),
        (["--prompt", "hi", "--top-p", "1.5"], "sampling.top_p"),
        (["--prompt", "hi", "--max-new-tokens", "0"], "sampling.max_new_tokens"),
        (["--prompt", "hi", "--drafter", "/no/such/dir"], "drafter"),
    ],
)
def test_bad_flags_exit_2_naming_the_field(llava_dir, args, message):
    done = speculum("generate", "--target", str(llava_dir), *args)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr


def test_train_drafter_and_bench_subcommands_exist():
    done = speculum("train-drafter", "--help")
    assert done.returncode == 0 and "--target" in done.stdout
    done = speculum("--help")
    assert done.returncode == 0 and all(c in done.stdout for c in ("generate", "serve", "bench", "train-drafter"))


@pytest.mark.parametrize("flags, expected", [([], None), (["--pipelined"], True), (["--no-pipelined"], False)])
def test_pipelined_is_left_to_where_the_loop_runs_unless_a_flag_says(flags, expected):
    from speculum.cli import _to_request, build_parser

    args = build_parser().parse_args(["generate", "--prompt", "hi", *flags])
    assert _to_request({"prompt": "hi"}, args).speculation.pipelined is expected
