"""Faults that really happen to the split services, over real gRPC servers, with nothing lost.

- a stalled drafter (alive, not answering) costs one round deadline, then rounds go without drafts;
  speculation comes back, in the same request and in later ones, once the drafter answers again;
- a drafter server stopped and started again on its port: the request re-prefills a draft session
  on the new server and speculates again;
- a verify service process killed with SIGKILL mid-request and started again: the request
  re-prefills on the new process and finishes with the same greedy output; when the verifier does
  not come back, the request fails with UNAVAILABLE after a bounded wait, never hangs;
- Redis flushed mid-run: the next request on an image re-encodes it, then hits again;
- a thousand abandoned requests leave no session behind and no memory growth beyond a margin.
Greedy output is always compared with the target alone (HF generate).
"""

from __future__ import annotations

import ast
import gc
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import build_prompt, hf_greedy, png_bytes
from draft_service import server as draft_server
from draft_service.ngram import NgramDrafter, NgramSession
from orchestrator.breaker import BreakerSettings, CircuitBreaker
from orchestrator.clients import GrpcDrafter, GrpcImageEncoder, GrpcVerifier, connect
from orchestrator.loop import speculate
from orchestrator.stopping import StopChecker
from speculum.config import SamplingParams, SpeculationParams
from speculum.errors import Unavailable
from speculum.launcher import ServiceProcess, rss_bytes
from speculum.local_redis import RedisServer, redis_binary
from speculum.ports import free_port
from speculum.rpc.settings import ClientSettings, ServerSettings, SessionSettings
from verify_service import server as verify_server
from verify_service.target import TargetSession
from vision_encoder import server as encoder_server
from vision_encoder.cache import CacheSettings

SETTINGS = ServerSettings(port=0, max_workers=8)
CLIENTS = ClientSettings(draft_round_deadline_s=0.2, max_reconnect_backoff_ms=300)
QUICK_BREAKER = BreakerSettings(first_pause_s=0.3, max_pause_s=1.0)


@pytest.fixture(scope="module")
def verifier_server(llava_engine):
    running = verify_server.serve(llava_engine.target, SETTINGS, SessionSettings(ttl_s=60, max_sessions=16))
    yield running
    running.stop()


@pytest.fixture
def drafter_server():
    running = draft_server.serve(NgramDrafter(), SETTINGS, SessionSettings(ttl_s=60, max_sessions=16))
    yield running
    running.stop()


def verifier_client(running) -> GrpcVerifier:
    return GrpcVerifier(connect(running.address, CLIENTS))


def drafter_client(address: str) -> GrpcDrafter:
    return GrpcDrafter(connect(address, CLIENTS), timeout_s=0.5, round_deadline_s=CLIENTS.draft_round_deadline_s,
                       breaker=QUICK_BREAKER)


def stream(prompt, verifier, drafter, max_new, **kwargs):
    sampling = SamplingParams(max_new_tokens=max_new)
    return speculate(prompt, sampling, SpeculationParams(num_draft_tokens=4), verifier, drafter,
                     StopChecker(max_new, frozenset()), **kwargs)


def collect(chunks) -> tuple[list[int], object]:
    chunks = list(chunks)
    return [t for c in chunks for t in c.token_ids], chunks[-1].stats


@pytest.fixture
def slow_verify(monkeypatch):
    """Each verification takes >= 20 ms, so a request lasts long enough for a fault in its middle."""
    original = TargetSession.verify
    monkeypatch.setattr(TargetSession, "verify", lambda self, block: time.sleep(0.02) or original(self, block))


@pytest.fixture
def stalled_rounds(monkeypatch):
    """The drafter's first `stalls[0]` Draft rounds hang for `stalls[1]` seconds (alive, not dead);
    set `stalls[0] = 10**9` to stall every round. It holds the drafter's device lock meanwhile,
    as a hung model call would."""
    stalls = [1, 0.6]
    calls = []
    original = NgramSession.propose

    def propose(self, max_tokens, *args, **kwargs):
        calls.append(time.monotonic())
        if len(calls) <= stalls[0]:
            time.sleep(stalls[1])
        yield from original(self, max_tokens, *args, **kwargs)

    monkeypatch.setattr(NgramSession, "propose", propose)
    return stalls


def test_breaker_pauses_double_and_reset():
    now = [0.0]
    breaker = CircuitBreaker(BreakerSettings(first_pause_s=1.0, max_pause_s=3.0), clock=lambda: now[0])
    assert breaker.allow()
    breaker.failed()
    assert not breaker.allow()
    now[0] = 1.0
    assert breaker.allow() and not breaker.allow()  # one probe per pause
    breaker.failed()  # second fault: 2 s
    now[0] = 2.9
    assert not breaker.allow()
    now[0] = 3.0
    assert breaker.allow()
    breaker.failed()
    breaker.failed()  # capped at 3 s
    now[0] = 6.0
    assert breaker.allow()
    breaker.succeeded()
    assert breaker.allow() and breaker.allow()


def test_stalled_drafter_costs_a_round_deadline_not_the_request(llava_engine, verifier_server, drafter_server,
                                                                  stalled_rounds):
    stalled_rounds[:] = [10**9, 4.0]  # every round hangs for 4 s
    prompt = build_prompt(llava_engine, "Describe the image.", [png_bytes(3)])
    drafter = drafter_client(drafter_server.address)
    started = time.monotonic()
    tokens, stats = collect(stream(prompt, verifier_client(verifier_server), drafter, 32))
    elapsed = time.monotonic() - started
    assert tokens == hf_greedy(llava_engine.target, prompt, 32)
    assert elapsed < 3.5, elapsed  # one 4 s stall alone would exceed it
    assert stats.draft_tokens == 0 and drafter.breaker.opened >= 1

    # The drafter answers again: once its pause is over, the next request speculates.
    stalled_rounds[0] = 0
    time.sleep(QUICK_BREAKER.max_pause_s + 4.0)  # the hung calls end, the pause passes
    tokens, stats = collect(stream(prompt, verifier_client(verifier_server), drafter, 32))
    assert tokens == hf_greedy(llava_engine.target, prompt, 32)
    assert stats.draft_tokens > 0


def test_request_speculates_again_after_a_stall(llava_engine, verifier_server, drafter_server, stalled_rounds,
                                                slow_verify):
    stalled_rounds[:] = [1, 0.6]  # the first round hangs past its deadline, then the drafter is fine
    prompt = build_prompt(llava_engine, "Tell me a story.", [])
    tokens, stats = collect(stream(prompt, verifier_client(verifier_server), drafter_client(drafter_server.address),
                                   100))
    assert tokens == hf_greedy(llava_engine.target, prompt, 100)
    assert stats.draft_tokens > 0  # every draft after the first round came from a re-prefilled session
    assert drafter_server.servicer.sessions.counters.opened == 2
    assert len(drafter_server.servicer.sessions) == 0


def test_drafter_restarted_mid_request_is_used_again(llava_engine, verifier_server, slow_verify):
    port = free_port()
    settings = ServerSettings(port=port, max_workers=4)
    first = draft_server.serve(NgramDrafter(), settings, SessionSettings())
    prompt = build_prompt(llava_engine, "Describe the image in detail.", [png_bytes(4)])
    chunks = stream(prompt, verifier_client(verifier_server), drafter_client(f"127.0.0.1:{port}"), 100)
    tokens = [t for _ in range(3) for t in next(chunks).token_ids]
    first.stop()  # the drafter goes away mid-request ...
    tokens += [t for _ in range(3) for t in next(chunks).token_ids]
    second = draft_server.serve(NgramDrafter(), settings, SessionSettings())  # ... and comes back
    try:
        rest, stats = collect(chunks)
        assert tokens + rest == hf_greedy(llava_engine.target, prompt, 100)
        assert second.servicer.sessions.counters.opened >= 1  # re-prefilled on the new drafter
        assert stats.draft_tokens > 0
        assert len(second.servicer.sessions) == 0
    finally:
        second.stop()


def spawn_verifier(llava_dir: Path, port: int, log_path: Path) -> ServiceProcess:
    env = {**os.environ, "SPECULUM_VERIFY_PORT": str(port), "SPECULUM_METRICS_PORT": "off", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    return ServiceProcess("verify", ["verify_service.server", "--target", str(llava_dir)], "speculum.v1.Verifier",
                          port, env, log_path)


def test_verifier_process_killed_and_restarted_mid_request(llava_engine, llava_dir, tmp_path):
    process = spawn_verifier(llava_dir, free_port(), tmp_path / "verify.log").start()
    try:
        process.wait_healthy(120)
        prompt = build_prompt(llava_engine, "Describe the image in detail.", [png_bytes(7)])
        chunks = stream(prompt, GrpcVerifier(connect(process.address, CLIENTS)), None, 40, resume_within_s=90)
        tokens = [t for _ in range(5) for t in next(chunks).token_ids]
        process.kill()  # SIGKILL: the session and its KV cache are gone
        restarting = threading.Thread(target=process.start)  # the replica comes back (k8s restarts it)
        restarting.start()
        started = time.monotonic()
        rest, _ = collect(chunks)  # the next round fails UNAVAILABLE, then re-prefills on the new process
        restarting.join()
        assert tokens + rest == hf_greedy(llava_engine.target, prompt, 40)
        assert len(tokens) == 5 and time.monotonic() - started < 90
    finally:
        process.terminate()
        process.wait()


def test_verifier_that_does_not_come_back_fails_fast(llava_engine):
    running = verify_server.serve(llava_engine.target, SETTINGS, SessionSettings())
    prompt = build_prompt(llava_engine, "Hi")
    chunks = stream(prompt, verifier_client(running), None, 40, resume_within_s=1.5)
    next(chunks)
    running.stop()
    started = time.monotonic()
    with pytest.raises(Unavailable, match="not back within"):
        collect(chunks)
    assert time.monotonic() - started < 4


@pytest.mark.skipif(redis_binary() is None, reason="the redis-server binary is not installed")
def test_redis_flushed_mid_run_reencodes_then_hits_again(llava_dir):
    with RedisServer() as redis:
        running = encoder_server.serve(llava_dir, SETTINGS, CacheSettings(redis_url=redis.url))
        try:
            encoder = GrpcImageEncoder(connect(running.address))
            image = png_bytes(50)
            hits = [encoder.encode([image])[0].cache_hit for _ in range(2)]
            with redis.client() as client:
                client.flushall()
            first_after = encoder.encode([image])[0]
            hits += [first_after.cache_hit, encoder.encode([image])[0].cache_hit]
            assert hits == [False, True, False, True]
            assert first_after.visual_embeds.shape[0] > 0
        finally:
            running.stop()


def test_thousand_abandoned_requests_leak_no_session_and_no_memory(llava_engine, verifier_server, drafter_server):
    """Requests abandoned after their first or second chunk (a client cancelling) through real
    gRPC services in this process. Margin: 40 MB of RSS growth over 1000 requests after a warm-up
    of 200 (the allocator keeps some freed pages; a leaked KV cache per request would be ~1000x
    a tiny model's cache and far above it)."""
    verifier, drafter = verifier_client(verifier_server), drafter_client(drafter_server.address)
    prompts = [build_prompt(llava_engine, text) for text in ("Hello there.", "Count to ten.", "Say something.")]

    def abandon(i: int) -> None:
        chunks = stream(prompts[i % 3], verifier, drafter, 30)
        for _ in range(1 + i % 2):
            next(chunks)
        chunks.close()

    for i in range(200):
        abandon(i)
    gc.collect()
    before = rss_bytes(os.getpid())
    started = time.monotonic()
    for i in range(1000):
        abandon(i)
    gc.collect()
    growth = rss_bytes(os.getpid()) - before
    print(f"1000 abandoned requests in {time.monotonic() - started:.1f} s, RSS growth {growth / 2**20:.1f} MB")
    for store in (verifier_server.servicer.sessions, drafter_server.servicer.sessions):
        assert len(store) == 0
        assert store.counters.opened >= 1200 and store.counters.released == store.counters.opened
    assert growth < 40 * 2**20, growth


UNSAFE_MODULES = {"pickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}


def unsafe_calls(tree: ast.AST) -> list[tuple[int, str]]:
    """Imports of unpickling modules, eval/exec, torch.load without weights_only=True,
    yaml.load, numpy loads with allow_pickle=True."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [alias.name for alias in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            found += [(node.lineno, f"import {n}") for n in names if n and n.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else ast.unparse(func) if isinstance(func, ast.Attribute) else ""
            keywords = {k.arg: k.value for k in node.keywords}
            safe_load = isinstance(keywords.get("weights_only"), ast.Constant) and keywords["weights_only"].value is True
            pickles = isinstance(keywords.get("allow_pickle"), ast.Constant) and keywords["allow_pickle"].value is True
            if name in ("eval", "exec", "yaml.load", "yaml.unsafe_load") or (name == "torch.load" and not safe_load) \
                    or (name in ("np.load", "numpy.load") and pickles):
                found.append((node.lineno, name))
    return found


def test_the_unsafe_call_finder_finds_them():
    code = "import pickle\nfrom dill import loads\neval(x)\ntorch.load(p)\ntorch.load(p, weights_only=True)\nm.eval()\n"
    assert [name for _, name in unsafe_calls(ast.parse(code))] == ["import pickle", "import dill", "eval", "torch.load"]


def test_no_pickle_or_eval_on_anything_that_crosses_a_wire():
    """Serving code never unpickles or evaluates data: tensors travel as raw bytes with a dtype
    table, Redis holds safetensors, checkpoints load as safetensors or with weights_only=True.
    (demo_world/, the offline demo-model trainer, is not serving code and is not scanned.)"""
    root = Path(__file__).resolve().parents[1]
    offenders = []
    for package in ("speculum", "orchestrator", "verify_service", "draft_service", "vision_encoder", "bench"):
        for path in (root / package).rglob("*.py"):
            for line, name in unsafe_calls(ast.parse(path.read_text())):
                offenders.append(f"{path.relative_to(root)}:{line}: {name}")
    assert offenders == []


def test_model_paths_are_not_request_fields():
    """What the public API accepts cannot name a file on the server."""
    from speculum.v1 import common_pb2, speculum_pb2

    def field_names(descriptor, seen=()):
        for field in descriptor.fields:
            yield field.name
            if field.message_type is not None and field.message_type not in seen:
                yield from field_names(field.message_type, (*seen, descriptor))

    names = set(field_names(speculum_pb2.GenerateRequest.DESCRIPTOR))
    assert {"prompt", "images", "sampling"} <= names
    assert not {n for n in names if any(word in n for word in ("path", "dir", "model", "file", "url"))}
    assert {"temperature", "top_p"} <= set(common_pb2.SamplingParams.DESCRIPTOR.fields_by_name)


@pytest.mark.parametrize("kind", ["feature", "feature-semi-ar-compressed", "small-vlm", "ngram"])
def test_a_draft_session_rebuilt_from_the_transcript_drafts_as_if_never_lost(llava_dir, llava_engine, kind,
                                                                             small_llava_drafter_model):
    """What a re-prefill gives a drafter (prompt + committed tokens, the target's feature rows
    gathered round by round) puts it in the same state as a session that never went away."""
    from draft_service.vlm_drafter import VlmDrafter
    from orchestrator.loop import Transcript
    from speculum.records import join_pieces
    from test_feature_drafter import drafter_for

    drafter = {
        "feature": lambda: drafter_for(llava_dir, llava_engine, decouple_visual=True, compress_visual=False,
                                       semi_ar_k=1),
        "feature-semi-ar-compressed": lambda: drafter_for(llava_dir, llava_engine, decouple_visual=True,
                                                          compress_visual=True, semi_ar_k=3),
        "small-vlm": lambda: VlmDrafter(small_llava_drafter_model),
        "ngram": NgramDrafter,
    }[kind]()
    prompt = build_prompt(llava_engine, "Describe the image in detail.", [png_bytes(1)])
    sampling = SamplingParams(max_new_tokens=40).with_seed()
    target = llava_engine.verifier.open(sampling, return_features=drafter.needs_target_features)
    transcript = Transcript(prompt, keep_hidden=drafter.needs_target_features)
    first = target.prefill(prompt)
    transcript.commit(first)
    kept = drafter.open(sampling)
    kept.prefill(prompt, first)
    for _ in range(5):
        result = target.verify(join_pieces(list(kept.propose(3))))
        transcript.commit(result)
        kept.advance(result)
    rebuilt = drafter.open(sampling)
    rebuilt.prefill(transcript.prompt_through(include_pending=False), transcript.as_prefill())
    for _ in range(3):  # the same drafts, and the same after a round verified in both
        drafted, again = join_pieces(list(kept.propose(3))), join_pieces(list(rebuilt.propose(3)))
        assert drafted.tokens == again.tokens
        result = target.verify(drafted)
        kept.advance(result)
        rebuilt.advance(result)
    target.close()


def test_feature_rows_kept_for_a_rebuild_are_bounded(monkeypatch):
    """A request keeps the target's feature rows only up to MAX_KEPT_FEATURE_BYTES; beyond it the
    draft session cannot be rebuilt (the request goes on with the target alone), memory stays bounded."""
    import torch

    from orchestrator import loop
    from speculum.records import PromptInputs, VerifyResult
    from speculum.rejection import NextTokenKind

    monkeypatch.setattr(loop, "MAX_KEPT_FEATURE_BYTES", 10 * 8 * 4)  # 10 rows of D=8 fp32
    transcript = loop.Transcript(PromptInputs((1, 2, 3)), keep_hidden=True)
    transcript.commit(VerifyResult(0, (4,), NextTokenKind.BONUS, torch.zeros(3, 8)))
    transcript.commit(VerifyResult(2, (5, 6, 7), NextTokenKind.BONUS, torch.zeros(3, 8)))
    rebuilt = transcript.as_prefill()
    assert rebuilt.tokens == (7,) and rebuilt.hidden.shape == (6, 8)  # prompt 3 + tokens 4, 5, 6
    assert transcript.prompt_through(include_pending=False).token_ids == (1, 2, 3, 4, 5, 6)
    transcript.commit(VerifyResult(4, (8, 9, 10, 11, 12), NextTokenKind.BONUS, torch.zeros(5, 8)))
    assert transcript.as_prefill() is None


def test_idle_sessions_expire_and_are_closed():
    from speculum.errors import SessionNotFound
    from speculum.sessions import SessionStore

    now, closed = [0.0], []
    store = SessionStore(ttl_s=10, max_sessions=4, evict_when_full=False, close=closed.append, clock=lambda: now[0])
    store.open("a", "state-a")
    store.open("b", "state-b")
    now[0] = 5.0
    with store.use("b"):  # b is used, a is not
        pass
    now[0] = 12.0
    with pytest.raises(SessionNotFound):
        with store.use("a"):
            pass
    assert store.expire() == 1 and closed == ["state-a"] and len(store) == 1
    assert store.counters.expired == 1


def test_a_request_whose_verifier_session_expired_resumes(llava_engine):
    """A request that idles past the verifier's session TTL (a stalled client) is not lost: its
    next round gets NOT_FOUND and the loop re-prefills a new session; the old one is closed."""
    running = verify_server.serve(llava_engine.target, SETTINGS, SessionSettings(ttl_s=0.3, max_sessions=4))
    try:
        prompt = build_prompt(llava_engine, "Count to ten.")
        chunks = stream(prompt, verifier_client(running), None, 24)
        tokens = [t for _ in range(3) for t in next(chunks).token_ids]
        time.sleep(0.6)
        rest, _ = collect(chunks)
        assert tokens + rest == hf_greedy(llava_engine.target, prompt, 24)
        counters = running.servicer.sessions.counters
        assert counters.opened == 2  # the expired session and the re-prefilled one
        deadline = time.monotonic() + 5  # the expired one is released in the background (or expired)
        while counters.released + counters.expired < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert counters.released + counters.expired == 2 and len(running.servicer.sessions) == 0
    finally:
        running.stop()
