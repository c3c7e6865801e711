"""Shared fixtures: tiny seeded models (multimodal and text-only), saved checkpoints, images."""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Iterator, Sequence

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

from orchestrator.engine import Engine  # noqa: E402
from orchestrator.prompting import PromptBuilder  # noqa: E402
from speculum.ports import free_port  # noqa: E402
from speculum.records import DraftBlock, PromptInputs, VerifyResult  # noqa: E402
from speculum.rpc.settings import ServerSettings, SessionSettings  # noqa: E402
from speculum.tiny import TinySpec, build_tiny_model, save_tiny_checkpoint, tiny_tokenizer  # noqa: E402
from speculum.vlm import VisionLanguageModel  # noqa: E402


def png_bytes(seed: int, size: int = 40) -> bytes:
    pixels = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("llava"), TinySpec())


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("llama"), TinySpec(multimodal=False, seed=6))


@pytest.fixture(scope="session")
def llava_engine(llava_dir):
    return Engine.from_pretrained(llava_dir)


@pytest.fixture(scope="session")
def llama_engine(llama_dir):
    return Engine.from_pretrained(llama_dir)


@pytest.fixture(scope="session")
def small_llava_drafter_model(tokenizer):
    """An independent, smaller random LLaVA sharing the tokenizer (it guesses mostly wrong)."""
    spec = TinySpec(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, seed=7)
    return VisionLanguageModel(build_tiny_model(spec, tokenizer))


@pytest.fixture(scope="session")
def small_llama_drafter_model(tokenizer):
    spec = TinySpec(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, multimodal=False, seed=8)
    return VisionLanguageModel(build_tiny_model(spec, tokenizer))


def hf_greedy(model: VisionLanguageModel, prompt: PromptInputs, max_new_tokens: int, eos: int | None = None) -> list[int]:
    """The oracle: HF generate(do_sample=False) of the same target."""
    ids = torch.tensor([model.expand_image_tokens(prompt.token_ids)])
    kwargs = {"pixel_values": prompt.pixel_values} if prompt.pixel_values is not None else {}
    if eos is not None:
        kwargs["eos_token_id"] = eos
    out = model.model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens, **kwargs
    )
    return out[0, ids.shape[1] :].tolist()


class ScriptedDraftSession:
    """Drafts a known continuation, corrupting the draft at in-block index `wrong_at` (if < K)."""

    def __init__(self, continuation: Sequence[int], wrong_at: int | None, vocab_size: int):
        self.continuation = list(continuation)
        self.wrong_at = wrong_at
        self.vocab_size = vocab_size
        self.emitted = 0

    def prefill(self, prompt: PromptInputs, first: VerifyResult) -> None:
        self.emitted = len(first.tokens)

    def propose(self, max_tokens: int, assume: Sequence[int] = ()) -> Iterator[DraftBlock]:
        start = self.emitted + len(assume)  # it knows the continuation, so `assume` is only a count
        tokens = self.continuation[start : start + max_tokens]
        if self.wrong_at is not None and self.wrong_at < len(tokens):
            tokens[self.wrong_at] = (tokens[self.wrong_at] + 1) % self.vocab_size
        yield DraftBlock(tuple(tokens))

    def advance(self, result: VerifyResult) -> None:
        self.emitted += len(result.tokens)

    def close(self) -> None:
        pass


class ScriptedDrafter:
    needs_target_features = False

    def __init__(self, continuation: Sequence[int], wrong_at: int | None, vocab_size: int):
        self.args = (continuation, wrong_at, vocab_size)

    def open(self, sampling) -> ScriptedDraftSession:
        return ScriptedDraftSession(*self.args)



def build_prompt(engine: Engine, text: str, images: Sequence[bytes] = ()) -> PromptInputs:
    """The engine's own prompt for `text` and `images` (tokenized, images encoded)."""
    from orchestrator.engine import GenerateRequest
    from speculum.config import SamplingParams

    return engine.prepare(GenerateRequest(text, list(images), SamplingParams(max_new_tokens=1))).prompt


def assert_concurrent_requests_lossless(engine: Engine, verifier, drafter, draft_length: int, requests: int = 6,
                                        max_new_tokens: int = 16) -> None:
    """`requests` greedy requests (every other one with an image) speculating at once from their own
    threads over `verifier` and `drafter`: each must equal the target alone."""
    import threading

    from orchestrator.loop import speculate
    from orchestrator.stopping import StopChecker
    from speculum.config import SamplingParams, SpeculationParams

    prompts = [build_prompt(engine, f"Describe picture {i} in detail.", [png_bytes(i)] if i % 2 else [])
               for i in range(requests)]
    outputs: dict[int, list[int]] = {}

    def one(i: int) -> None:
        chunks = speculate(prompts[i], SamplingParams(max_new_tokens=max_new_tokens),
                           SpeculationParams(num_draft_tokens=draft_length), verifier, drafter,
                           StopChecker(max_new_tokens, frozenset()))
        outputs[i] = [t for c in chunks for t in c.token_ids]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(requests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for i, prompt in enumerate(prompts):
        assert outputs.get(i) == hf_greedy(engine.target, prompt, max_new_tokens), i


def hosted_verifier(engine: Engine, target_dir, drafter_address: str | None,
                    settings: ServerSettings = ServerSettings(port=0, max_workers=4),
                    sessions: SessionSettings = SessionSettings(max_sessions=4)):
    """A verify server (port 0) whose hosted loops draft with the draft server at `drafter_address`
    (None: they decode with the target alone)."""
    from orchestrator.clients import GrpcDrafter, connect
    from verify_service import server as verify_server

    drafter = None if drafter_address is None else GrpcDrafter(connect(drafter_address), timeout_s=2)
    decode = PromptBuilder.from_pretrained(target_dir, engine.target.facts).decode
    return verify_server.serve(engine.target, settings, sessions, drafter=drafter, decode=decode)


def loop_hosting_drafter(drafter, engine: Engine, target_dir, verifier_address: str | None,
                         settings: ServerSettings = ServerSettings(port=0, max_workers=4),
                         sessions: SessionSettings = SessionSettings()):
    """A draft server whose hosted loops (`Drafter.Generate`) verify with the verify server at
    `verifier_address` (None: it hosts none)."""
    from draft_service import server as draft_server
    from orchestrator.clients import GrpcVerifier, connect

    verifier = None if verifier_address is None else GrpcVerifier(connect(verifier_address), timeout_s=30,
                                                                  rounds_stream=True)
    decode = PromptBuilder.from_pretrained(target_dir, engine.target.facts).decode
    return draft_server.serve(drafter, settings, sessions, verifier=verifier,
                              eos_token_ids=engine.target.facts.eos_token_ids, decode=decode)


def paired_services(drafter, engine: Engine, target_dir, settings: ServerSettings,
                    verify_sessions: SessionSettings, draft_sessions: SessionSettings = SessionSettings()):
    """(verify server, draft server), each able to host requests' loops with the other."""
    draft_settings = dataclasses.replace(settings, port=free_port())
    verifier = hosted_verifier(engine, target_dir, f"127.0.0.1:{draft_settings.port}", settings, verify_sessions)
    return verifier, loop_hosting_drafter(drafter, engine, target_dir, verifier.address, draft_settings, draft_sessions)


def sessions_left_after(timeout_s: float, *servers) -> int:
    """Sessions still open in `servers` (RunningServers) once none is left, or after `timeout_s`."""
    import time

    deadline = time.monotonic() + timeout_s
    while (left := sum(len(server.servicer.sessions) for server in servers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left
