"""The split stack vs the in-process engine, side by side in one run (issue targets in the table).

Through the services: `speculum serve`'s stack (started in a child process: Ray's driver threads must
not share this process with the in-process engine), verifier pinned to core 0 and drafter to core 1.
In-process: the same target and drafter in this process, one torch thread, pinned to core 0.
Requests alternate between the two, each in its default speculation mode (SpeculationParams: K = 8,
sequential on both sides; `--num-draft-tokens` and `--pipelined` choose). Reports tokens/s of each (all tokens over all seconds of the
same requests; the median per request too), their ratio (target >= 0.85), the
per-round overhead of the split in ms, and time to first token for a cached image vs a new one
(target <= 0.6); once for each place the stack can run requests' loops (the verifier, the default,
and the orchestrator). Usage: python -m bench.services [--target DIR] [--drafter ngram|DIR]
[--requests N] [--loop-at verifier|orchestrator ...]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import torch
from PIL import Image
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from transformers.utils import logging as hf_logging

from bench.stack import stack_in_child
from draft_service.registry import load_drafter
from orchestrator.engine import Engine, GenerateRequest
from orchestrator.metered import MeteredDrafter, MeteredVerifier
from orchestrator.public_api import request_to_proto
from orchestrator.remote_loop import LoopPlacement
from speculum.config import SamplingParams, SpeculationParams
from speculum.launcher import StackConfig
from speculum.metrics import RoundMetrics
from speculum.paths import demo_drafter_dir, demo_target_dir
from speculum.ports import free_port
from speculum.tiny import STANDIN_TARGET, save_tiny_checkpoint
from speculum.v1 import speculum_pb2_grpc

PROMPTS = ["Describe the image in detail.", "What do you see in this picture?"]


def _image(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((64, 64, 3)) * 255).astype("uint8")).save(buffer, "PNG")
    return buffer.getvalue()


def _images(count: int, seed: int = 0) -> list[bytes]:
    samples = sorted((demo_target_dir().parent / "samples").glob("*.png"))
    if samples:
        return [samples[i % len(samples)].read_bytes() for i in range(count)]
    return [_image(seed + i) for i in range(count)]


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


# The part (metrics) whose process runs requests' loops.
LOOP_PART = {LoopPlacement.VERIFIER: "verify", LoopPlacement.DRAFTER: "draft", LoopPlacement.ORCHESTRATOR: "orchestrator"}


def round_breakdown(before: dict, after: dict, loop_part: str) -> dict:
    """Mean ms of a round's draft and verification as the loop saw them (`loop_part`: the process
    the loop runs in), and, with the loop away from the verifier, the verifier's own handling time of
    a Verify (the difference is transport, (de)serialization and scheduling)."""

    def mean_ms(part: str, name: str, labels: dict | None = None) -> float:
        key = frozenset((labels or {}).items())
        total = after[part].get((f"{name}_sum", key), 0.0) - before[part].get((f"{name}_sum", key), 0.0)
        count = after[part].get((f"{name}_count", key), 0.0) - before[part].get((f"{name}_count", key), 0.0)
        return 1000 * total / count if count else float("nan")

    verify_labels = {"grpc_service": "speculum.v1.Verifier", "grpc_method": "Verify", "grpc_code": "OK"}
    return {
        "draft_round_ms": mean_ms(loop_part, "speculum_draft_round_seconds"),
        "verify_round_ms": mean_ms(loop_part, "speculum_verify_round_seconds"),
        "verify_handling_ms": mean_ms("verify", "grpc_server_handling_seconds", verify_labels),
    }


def _mean_ms(histogram) -> float:
    """Mean of a histogram's observations in ms (the warm-up included: a few rounds of many)."""
    samples = {sample.name: sample.value for metric in histogram.collect() for sample in metric.samples}
    count = next(value for name, value in samples.items() if name.endswith("_count"))
    total = next(value for name, value in samples.items() if name.endswith("_sum"))
    return 1000 * total / count if count else float("nan")


def run(target_dir: Path, drafter: str, requests: int, max_new_tokens: int, loop_at: LoopPlacement,
        speculation: SpeculationParams) -> dict:
    rows = {"in_process": [], "services": []}
    config = StackConfig(target_dir, drafter, port=free_port(), loop_at=loop_at.value)
    with stack_in_child(config) as (address, metrics_ports):
        os.sched_setaffinity(0, {0})  # after the child started: it must not inherit core 0 only
        torch.set_num_threads(1)
        engine = Engine.from_pretrained(target_dir)
        # The in-process rounds are timed the same way as the services' (the metered wrappers).
        local_rounds = RoundMetrics(CollectorRegistry())
        engine.verifier = MeteredVerifier(engine.verifier, local_rounds)
        engine.drafter = MeteredDrafter(load_drafter(drafter, engine.target.vocab_size), local_rounds)
        sampling = SamplingParams(max_new_tokens=max_new_tokens)
        image = _images(1)[0]
        stub = speculum_pb2_grpc.SpeculumStub(grpc.insecure_channel(address))
        warm = GenerateRequest(PROMPTS[0], [image], sampling)
        engine.generate(warm), stub.Generate(request_to_proto(warm), timeout=300)
        before = {part: scrape(port) for part, port in metrics_ports.items()}
        for index in range(requests):
            request = GenerateRequest(PROMPTS[index % len(PROMPTS)], [image], sampling, speculation)
            local = engine.generate(request)
            remote = stub.Generate(request_to_proto(request), timeout=300)
            assert list(remote.token_ids) == list(local.token_ids), "the split changed the output"
            rows["in_process"].append((len(local.token_ids), local.stats.ttft_s + local.stats.decode_s,
                                       local.stats.target_forwards))
            rows["services"].append((len(remote.token_ids), remote.timing.ttft_s + remote.timing.decode_s,
                                     remote.speculation.target_forwards))
        loop_part = LOOP_PART[loop_at]
        rounds = round_breakdown(before, {part: scrape(port) for part, port in metrics_ports.items()}, loop_part)
        rounds["in_process_draft_round_ms"] = _mean_ms(local_rounds.draft_round)
        rounds["in_process_verify_round_ms"] = _mean_ms(local_rounds.verify_round)
        ttft = {"uncached": [], "cached": []}
        for index in range(requests):
            fresh = _image(1000 + index)  # never seen: the encoder runs
            for kind in ("uncached", "cached"):
                request = GenerateRequest(PROMPTS[0], [fresh], SamplingParams(max_new_tokens=1))
                reply = stub.Generate(request_to_proto(request), timeout=300)
                assert reply.images.cache_hits == (kind == "cached")
                ttft[kind].append(reply.timing.ttft_s)

    def tokens_per_s(kind):
        """All tokens over all seconds of the same requests. (A median of per-request rates would
        fall between the demo pair's two answer lengths, ~96 and ~9 tokens, whose rates differ 3x.)"""
        return sum(tokens for tokens, _, _ in rows[kind]) / sum(seconds for _, seconds, _ in rows[kind])

    def median_rate(kind):
        return statistics.median(tokens / seconds for tokens, seconds, _ in rows[kind])

    overhead_ms = statistics.median(
        (remote[1] - local[1]) / (remote[2] + 1) * 1000 for local, remote in zip(rows["in_process"], rows["services"])
    )
    return {
        "loop_at": loop_at.value,
        "in_process_tokens_per_s": tokens_per_s("in_process"),
        "services_tokens_per_s": tokens_per_s("services"),
        "services_over_in_process": tokens_per_s("services") / tokens_per_s("in_process"),
        "median_request_tokens_per_s": {kind: median_rate(kind) for kind in rows},
        "overhead_ms_per_round": overhead_ms,
        **rounds,
        "ttft_uncached_ms": statistics.median(ttft["uncached"]) * 1000,
        "ttft_cached_ms": statistics.median(ttft["cached"]) * 1000,
        "ttft_cached_over_uncached": statistics.median(ttft["cached"]) / statistics.median(ttft["uncached"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=Path, help="target folder (default: the demo target, else a stand-in)")
    parser.add_argument("--drafter", default=None, help="ngram | DIR (default: the demo drafter, else ngram)")
    parser.add_argument("--requests", type=int, default=12)  # this VM drifts: 6 pairs gave 0.74-0.88 in one hour
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--loop-at", type=LoopPlacement, nargs="+", default=list(LoopPlacement),
                        help="where the stack runs requests' loops (one stack each, in turn; default: both)")
    parser.add_argument("--num-draft-tokens", type=int, default=None,
                        help="both sides' speculation.num_draft_tokens (default: unset, the API default)")
    parser.add_argument("--pipelined", action=argparse.BooleanOptionalAction, default=None,
                        help="both sides' speculation.pipelined (default: unset, each side's faster mode)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/services.json"))
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as workdir:
        target = args.target
        if target is None:
            target = demo_target_dir() if (demo_target_dir() / "config.json").is_file() else \
                save_tiny_checkpoint(Path(workdir) / "target", STANDIN_TARGET)
        drafter = args.drafter or (str(demo_drafter_dir()) if (demo_drafter_dir() / "config.json").is_file() else "ngram")
        speculation = SpeculationParams(pipelined=args.pipelined, **(
            {} if args.num_draft_tokens is None else {"num_draft_tokens": args.num_draft_tokens}))
        reports = [run(Path(target), drafter, args.requests, args.max_new_tokens, placement, speculation)
                   for placement in args.loop_at]
    print(f"split stack vs in-process: target {target}, drafter {drafter}, greedy, max_new_tokens="
          f"{args.max_new_tokens}, {args.requests} image requests interleaved; verifier core 0, drafter core 1; "
          f"K = {speculation.num_draft_tokens}; pipelined: "
          f"{speculation.pipelined if speculation.pipelined is not None else 'each side default'}")
    for report in reports:
        print(f" loop at the {report['loop_at']}:")
        medians = report["median_request_tokens_per_s"]
        print(f"  tokens/s in-process {report['in_process_tokens_per_s']:.1f}, through services "
              f"{report['services_tokens_per_s']:.1f}: ratio {report['services_over_in_process']:.2f} (target >= 0.85; "
              f"all tokens over all seconds; median per request {medians['in_process']:.1f} vs "
              f"{medians['services']:.1f}: {medians['services'] / medians['in_process']:.2f})")
        handling = "" if report["loop_at"] == LoopPlacement.VERIFIER.value else \
            f", of which the verifier's own handling {report['verify_handling_ms']:.2f} ms"
        print(f"  split overhead per round: {report['overhead_ms_per_round']:.1f} ms; a round through the services "
              f"(means, as the loop saw them): draft {report['draft_round_ms']:.2f} ms, verify "
              f"{report['verify_round_ms']:.2f} ms{handling}; in process: draft "
              f"{report['in_process_draft_round_ms']:.2f} ms, verify {report['in_process_verify_round_ms']:.2f} ms")
        print(f"  TTFT new image (encoder and full prefill run) {report['ttft_uncached_ms']:.1f} ms; same image "
              f"again (embeddings from the cache, image-prefix rows reused) {report['ttft_cached_ms']:.1f} ms: "
              f"ratio {report['ttft_cached_over_uncached']:.2f} (target <= 0.6)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"target": str(target), "drafter": drafter, "runs": reports}, indent=2))


if __name__ == "__main__":
    main()
