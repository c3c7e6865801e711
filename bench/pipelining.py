"""Pipelined vs sequential speculation through the services, and both vs the target alone (issue 8).

One `speculum serve` stack in a child process (verifier pinned to core 0, drafter to core 1); each request runs in
three modes in a rotating order through the public gRPC API: target alone (speculation off),
sequential speculation, pipelined speculation. Greedy, image prompts from the shipped samples.
Reports median tokens/s per mode, the pipelined/sequential ratio (target >= 1.3x) and the speedup
over the target alone (the user's view, target >= 3x), and checks all modes returned the same tokens.
Also runs K = `--long-draft-length` (sequential, pipelined, adaptive up to it).
Usage: python -m bench.pipelining [--requests 6] [--max-new-tokens 128] [--draft-length 4] [--long-draft-length 8]
       [--loop-at drafter|verifier|orchestrator]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import grpc

from bench.stack import stack_in_child
from orchestrator.remote_loop import DEFAULT_LOOP_AT, LoopPlacement
from orchestrator.engine import GenerateRequest
from orchestrator.public_api import request_to_proto
from speculum.config import SamplingParams, SpeculationParams
from speculum.launcher import StackConfig
from speculum.paths import demo_drafter_dir, demo_target_dir
from speculum.ports import free_port
from speculum.v1 import speculum_pb2_grpc

PROMPT = "Describe the image in detail."


def modes(draft_length: int, long_draft_length: int) -> dict[str, SpeculationParams]:
    """The pair the ratio compares, the baseline, and the longer drafts that pay on image prompts
    (two semi-AR drafter passes per round: fewer rounds, so less of the split's per-round cost)."""
    chosen = {
        "target alone": SpeculationParams(enabled=False),
        "sequential": SpeculationParams(num_draft_tokens=draft_length, pipelined=False),
        "pipelined": SpeculationParams(num_draft_tokens=draft_length, pipelined=True),
    }
    if long_draft_length:
        chosen[f"sequential K={long_draft_length}"] = SpeculationParams(num_draft_tokens=long_draft_length,
                                                                        pipelined=False)
        chosen[f"pipelined K={long_draft_length}"] = SpeculationParams(num_draft_tokens=long_draft_length,
                                                                       pipelined=True)
        chosen[f"adaptive K<={long_draft_length}"] = SpeculationParams(num_draft_tokens=long_draft_length,
                                                                      pipelined=False, adaptive=True)
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--draft-length", type=int, default=4)
    parser.add_argument("--long-draft-length", type=int, default=8, help="extra rows with this K (0: none)")
    parser.add_argument("--drafter", default=str(demo_drafter_dir()))
    parser.add_argument("--loop-at", type=LoopPlacement, default=DEFAULT_LOOP_AT,
                        help="where requests' loops run (default: as `speculum serve`)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/pipelining.json"))
    args = parser.parse_args()
    samples = sorted((demo_target_dir().parent / "samples").glob("*.png"))
    speculations = modes(args.draft_length, args.long_draft_length)
    rates = {name: [] for name in speculations}
    totals = {name: [] for name in speculations}  # (tokens, seconds, rounds, rounds drafted ahead) per request
    same = True
    config = StackConfig(demo_target_dir(), args.drafter, port=free_port(), loop_at=args.loop_at.value)
    with stack_in_child(config) as (address, _):
        stub = speculum_pb2_grpc.SpeculumStub(grpc.insecure_channel(address))
        sampling = SamplingParams(max_new_tokens=args.max_new_tokens)
        for i in range(args.requests + 1):  # the first round warms every mode up and is not counted
            image = samples[i % len(samples)].read_bytes()
            names = list(speculations)
            order = names[i % len(names):] + names[: i % len(names)]
            answers = set()
            for name in order:
                request = request_to_proto(GenerateRequest(PROMPT, [image], sampling, speculations[name]))
                started = time.perf_counter()
                response = stub.Generate(request, timeout=600)
                seconds = time.perf_counter() - started
                answers.add(tuple(response.token_ids))
                if i:
                    rates[name].append(len(response.token_ids) / seconds)
                    totals[name].append((len(response.token_ids), seconds, response.speculation.target_forwards,
                                         response.speculation.drafted_ahead))
            same = same and len(answers) == 1
    medians = {name: statistics.median(values) for name, values in rates.items()}
    overall = {name: sum(r[0] for r in rows) / sum(r[1] for r in rows) for name, rows in totals.items()}
    pipelined_ratio = medians["pipelined"] / medians["sequential"]
    print(f"through the services, greedy, {args.requests} image prompts, max {args.max_new_tokens} new tokens, "
          f"K = {args.draft_length}, drafter {Path(args.drafter).name}, loops in the {args.loop_at.value}; "
          f"median tokens/s (whole request), all "
          f"tokens over all seconds, rounds (of them drafted ahead) and ms per round")
    for name, value in medians.items():
        rounds, ahead = (sum(r[i] for r in totals[name]) for i in (2, 3))
        print(f"{name:<20} {value:8.1f} tok/s  {value / medians['target alone']:5.2f}x over the target alone; "
              f"overall {overall[name]:6.1f} tok/s, {rounds} rounds ({ahead} ahead), "
              f"{1000 * sum(r[1] for r in totals[name]) / max(rounds, 1):.2f} ms per round")
    overall_ratio = overall["pipelined"] / overall["sequential"]
    print(f"pipelined / sequential: {pipelined_ratio:.2f}x by medians, {overall_ratio:.2f}x overall "
          f"(target >= 1.3x); identical answers: {same}")
    if args.long_draft_length:
        long_ratio = medians[f"pipelined K={args.long_draft_length}"] / medians[f"sequential K={args.long_draft_length}"]
        best = max(medians, key=medians.get)
        print(f"pipelined / sequential at K={args.long_draft_length}: {long_ratio:.2f}x; best over the target alone: "
              f"{medians[best] / medians['target alone']:.2f}x ({best}; target >= 3x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = vars(args) | {"out": str(args.out), "loop_at": args.loop_at.value}
    args.out.write_text(json.dumps({"settings": settings, "median_tokens_per_s": medians,
                                    "pipelined_over_sequential": pipelined_ratio, "identical_answers": same}, indent=2))


if __name__ == "__main__":
    main()
