"""Batching under concurrency (issue 8): the same load with no batching, batched verification, and
batched verification plus batched drafting.

Each mode starts `speculum serve`'s stack (verifier pinned to core 0, drafter to core 1) and sends
`--streams` concurrent closed-loop request streams through the public gRPC API (greedy, image
prompts from the shipped samples). Reports aggregate tokens/s, p50/p99 request latency, each
mode's ratio to the unbatched one (target >= 2x at 16 streams) and checks that every mode returned
the same tokens.
Usage: python -m bench.batching [--streams 16] [--requests-per-stream 3] [--window-ms 4]
[--loop-at drafter|verifier|orchestrator]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path

import grpc

from bench.services import LOOP_PART, round_breakdown, scrape
from bench.stack import stack_in_child
from orchestrator.engine import GenerateRequest
from orchestrator.public_api import request_to_proto
from orchestrator.remote_loop import DEFAULT_LOOP_AT, LoopPlacement
from speculum.config import SamplingParams, SpeculationParams
from speculum.launcher import StackConfig
from speculum.paths import demo_drafter_dir, demo_target_dir
from speculum.ports import free_port
from speculum.v1 import speculum_pb2_grpc

PROMPT = "Describe the image in detail."


MODES = (("one block per pass", False, False), ("batched verification", True, False),
         ("batched verify + draft", True, True))


def run_mode(window_ms: float, draft_window_ms: float, streams: int, per_stream: int, max_new_tokens: int,
             drafter: str, loop_at: LoopPlacement, pipelined: bool | None = None) -> dict:
    for service, window in (("VERIFY", window_ms), ("DRAFT", draft_window_ms)):
        os.environ[f"SPECULUM_{service}_BATCH_WINDOW_MS"] = str(window)
        os.environ[f"SPECULUM_{service}_MAX_BATCH"] = str(streams)
    os.environ.setdefault("SPECULUM_MAX_WORKERS", str(2 * streams))  # every stream's RPC gets a thread
    samples = sorted((demo_target_dir().parent / "samples").glob("*.png"))
    latencies: list[float] = []
    answers: dict[tuple[int, int], tuple[int, ...]] = {}
    tokens = 0
    lock = threading.Lock()
    config = StackConfig(demo_target_dir(), drafter, port=free_port(), loop_at=loop_at.value)
    with stack_in_child(config) as (address, metrics_ports):
        channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)])
        stub = speculum_pb2_grpc.SpeculumStub(channel)

        def request(s: int, i: int):
            image = samples[(s + i) % len(samples)].read_bytes()
            return request_to_proto(GenerateRequest(PROMPT, [image], SamplingParams(max_new_tokens=max_new_tokens),
                                                    SpeculationParams(pipelined=pipelined)))

        stub.Generate(request(0, 0), timeout=300)  # warm-up
        barrier = threading.Barrier(streams + 1)

        def stream(s: int) -> None:
            nonlocal tokens
            barrier.wait()
            for i in range(per_stream):
                started = time.perf_counter()
                response = stub.Generate(request(s, i), timeout=600)
                with lock:
                    latencies.append(time.perf_counter() - started)
                    answers[(s, i)] = tuple(response.token_ids)
                    tokens += len(response.token_ids)

        before = {part: scrape(port) for part, port in metrics_ports.items()}
        threads = [threading.Thread(target=stream, args=(s,)) for s in range(streams)]
        for thread in threads:
            thread.start()
        barrier.wait()
        started = time.perf_counter()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        after = {part: scrape(port) for part, port in metrics_ports.items()}
        mean_batch = {}
        for service in ("verify", "draft"):
            passes, items = (after[service].get((f"speculum_{service}_batch_{name}_total", frozenset()), 0.0)
                             - before[service].get((f"speculum_{service}_batch_{name}_total", frozenset()), 0.0)
                             for name in ("passes", "items"))
            mean_batch[service] = round(items / passes, 2) if passes else None
        loop_part = LOOP_PART[loop_at]
        rounds = {name: round(ms, 2) for name, ms in round_breakdown(before, after, loop_part).items()}
        # CPU seconds each part used over the load (its process_* metrics): which core is the bottleneck.
        cpu = {part: round(after[part].get(("process_cpu_seconds_total", frozenset()), 0.0)
                           - before[part].get(("process_cpu_seconds_total", frozenset()), 0.0), 2)
               for part in ("verify", "draft", "orchestrator")}
    latencies.sort()
    return {
        "window_ms": window_ms,
        "draft_window_ms": draft_window_ms,
        "tokens_per_s": round(tokens / wall, 1),
        "p50_s": round(statistics.median(latencies), 3),
        "p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3),
        "requests": len(latencies),
        "mean_verify_batch": mean_batch["verify"],
        "mean_draft_batch": mean_batch["draft"],
        **rounds,
        "wall_s": round(wall, 2),
        "cpu_s": cpu,
        "answers": answers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--requests-per-stream", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--window-ms", type=float, default=4.0)
    parser.add_argument("--drafter", default=str(demo_drafter_dir()))
    parser.add_argument("--loop-at", type=LoopPlacement, default=DEFAULT_LOOP_AT,
                        help="where the stack runs requests' loops (default: as `speculum serve`)")
    parser.add_argument("--pipelined", action=argparse.BooleanOptionalAction, default=None,
                        help="the requests' speculation.pipelined (default: unset, the server's faster mode)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/batching.json"))
    args = parser.parse_args()
    rows = []
    for label, verify, draft in MODES:
        row = run_mode(args.window_ms if verify else 0.0, args.window_ms if draft else 0.0, args.streams,
                       args.requests_per_stream, args.max_new_tokens, args.drafter, args.loop_at, args.pipelined)
        rows.append({"mode": label} | row)
    answers = [row.pop("answers") for row in rows]
    same = all(a == answers[0] for a in answers)
    base = rows[0]["tokens_per_s"]
    print(f"{args.streams} concurrent streams x {args.requests_per_stream} requests, greedy, image prompts, "
          f"max {args.max_new_tokens} new tokens, drafter {Path(args.drafter).name}, {args.window_ms:g} ms windows, "
          f"loops run in the {args.loop_at.value}, pipelined: {'server default' if args.pipelined is None else args.pipelined}")
    print(f"{'mode':<24} {'tokens/s':>9} {'ratio':>6} {'p50 s':>7} {'p99 s':>7} {'verify batch':>12} {'draft batch':>11}")
    for row in rows:
        row["ratio"] = round(row["tokens_per_s"] / base, 3)
        print(f"{row['mode']:<24} {row['tokens_per_s']:>9.1f} {row['ratio']:>5.2f}x {row['p50_s']:>7.3f} "
              f"{row['p99_s']:>7.3f} {row['mean_verify_batch'] or '-':>12} {row['mean_draft_batch'] or '-':>11}")
    print("a round as the loop saw it (means, ms): draft / verification / the verifier's handling of a Verify call "
          "(nan: the loop runs in the verifier, no Verify calls):")
    for row in rows:
        print(f"  {row['mode']:<24} {row['draft_round_ms']:6.2f} / {row['verify_round_ms']:6.2f} / "
              f"{row['verify_handling_ms']:6.2f}")
    print("CPU seconds over the load (verifier / drafter / orchestrator replica) and wall seconds:")
    for row in rows:
        cpu = row["cpu_s"]
        print(f"  {row['mode']:<24} {cpu['verify']:5.2f} / {cpu['draft']:5.2f} / {cpu['orchestrator']:5.2f}  "
              f"of {row['wall_s']:.2f} s")
    print(f"best batched / unbatched: {max(r['ratio'] for r in rows[1:]):.2f}x (target >= 2x); "
          f"identical answers: {same}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = vars(args) | {"out": str(args.out), "loop_at": args.loop_at.value}
    args.out.write_text(json.dumps({"settings": settings, "rows": rows,
                                    "identical_answers": same}, indent=2))


if __name__ == "__main__":
    main()
