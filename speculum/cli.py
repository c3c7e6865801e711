"""The `speculum` command line: `speculum generate` (in-process or `--server`) and `speculum serve`.

Parses flags into request dataclasses, runs the engine, prints text or one JSON object per
request. Errors print one readable line naming the offending field and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from speculum.config import SamplingParams, SpeculationParams
from speculum.errors import SpeculumError
from speculum.paths import demo_drafter_dir, demo_target_dir
from speculum.tree import TreeShape


def _default_drafter() -> str:
    return str(demo_drafter_dir()) if (demo_drafter_dir() / "config.json").is_file() else "ngram"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="speculum", description="Lossless speculative decoding for VLMs.")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate for one prompt or a JSONL file of requests")
    gen.add_argument("--target", type=Path, default=None, help="target model folder (default: the demo target)")
    gen.add_argument("--drafter", default=None, help="none | ngram | DIR (default: the demo drafter, else ngram)")
    gen.add_argument("--image", type=Path, action="append", default=[], help="image file (repeatable)")
    gen.add_argument("--prompt", help="the user prompt")
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--draft-length", type=int, default=SpeculationParams().num_draft_tokens, help="K per round")
    gen.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=SpeculationParams().adaptive,
                     help="K per round follows acceptance and the verifier's load, at most --draft-length")
    gen.add_argument("--pipelined", action=argparse.BooleanOptionalAction, default=None,
                     help="draft the next block during verification (default: the faster mode where the loop "
                          "runs: on through --server, off in process)")
    gen.add_argument("--tree-width", type=int, default=1, help="candidate-tree branching (1 = chains; feature drafters)")
    gen.add_argument("--tree-nodes", type=int, default=0, help="tree node budget per round (0 = K x width)")
    gen.add_argument("--requests", type=Path, help="JSONL: prompt, image, max_new_tokens, temperature, seed")
    gen.add_argument("--json", action="store_true", help="print one JSON object per request")
    gen.add_argument("--server", help="HOST:PORT of a running Speculum (default: run in-process)")
    serve = commands.add_parser("serve", help="run the whole split stack locally until Ctrl-C")
    serve.add_argument("--port", type=int, default=50051, help="public gRPC port")
    serve.add_argument("--target", type=Path, default=None, help="target folder (default: the demo target)")
    serve.add_argument("--drafter", default=None, help="ngram | DIR (default: the demo drafter, else ngram)")
    serve.add_argument("--loop-at", choices=("verifier", "drafter", "orchestrator"), default="verifier",
                       help="where requests' speculative loops run (default: beside the target, in the verifier)")
    commands.add_parser("bench", help="run the benchmarks (as `make bench`)")
    commands.add_parser("train-drafter", help="train a feature drafter (python -m draft_service.training)",
                        add_help=False)
    return parser


def _requests(args: argparse.Namespace) -> Iterator[dict]:
    """One dict per request, from --requests or from the flags."""
    if args.requests:
        with args.requests.open() as lines:
            for number, line in enumerate(lines, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise SystemExit(f"speculum: {args.requests}:{number}: not JSON ({exc})") from exc
        return
    if args.prompt is None:
        raise SystemExit("speculum: give --prompt or --requests")
    yield {"prompt": args.prompt, "images": [str(p) for p in args.image]}


def _to_request(spec: dict, args: argparse.Namespace):
    from orchestrator.engine import GenerateRequest

    images = spec.get("images") or ([spec["image"]] if spec.get("image") else [])
    try:
        image_bytes = [Path(p).read_bytes() for p in images]
    except OSError as exc:
        raise SystemExit(f"speculum: cannot read image: {exc}") from exc
    sampling = SamplingParams(
        max_new_tokens=int(spec.get("max_new_tokens", args.max_new_tokens)),
        temperature=float(spec.get("temperature", args.temperature)),
        top_p=float(spec.get("top_p", args.top_p)),
        top_k=int(spec.get("top_k", args.top_k)),
        seed=spec.get("seed", args.seed),
        stop=tuple(spec.get("stop", args.stop)),
    )
    speculation = SpeculationParams(enabled=True, num_draft_tokens=args.draft_length, pipelined=args.pipelined,
                                    adaptive=args.adaptive)
    return GenerateRequest(str(spec.get("prompt", "")), image_bytes, sampling, speculation)


def _print(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result), flush=True)
        return
    spec, timing = result["speculation"], result["timing"]
    print(result["text"], flush=True)
    print(
        f"[{result['usage']['completion_tokens']} tokens, finish={result['finish_reason']}, "
        f"τ={spec['mean_accepted_length']:.2f}, target forwards={spec['target_forwards']}, "
        f"ttft={timing['ttft_s'] * 1000:.0f} ms, decode={timing['decode_s']:.2f} s]",
        file=sys.stderr,
    )


def generate_remote(args: argparse.Namespace) -> int:
    import grpc

    from orchestrator.public_api import request_to_proto, response_json
    from speculum.v1 import speculum_pb2_grpc

    with grpc.insecure_channel(args.server, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]) as channel:
        stub = speculum_pb2_grpc.SpeculumStub(channel)
        for spec in _requests(args):
            try:
                response = stub.Generate(request_to_proto(_to_request(spec, args)), timeout=600)
            except grpc.RpcError as exc:
                print(f"speculum: error: {exc.code().name}: {exc.details()}", file=sys.stderr)
                return 2
            _print(response_json(response), args.json)
    return 0


def serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from speculum.launcher import LocalStack, StackConfig
    from speculum.logs import setup_logging

    setup_logging("launcher")
    target_dir = args.target or demo_target_dir()
    if not (Path(target_dir) / "config.json").is_file():
        raise SystemExit(f"speculum: no target model at {target_dir} (give --target DIR)")
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    config = StackConfig(Path(target_dir), args.drafter or _default_drafter(), args.port, loop_at=args.loop_at)
    with LocalStack(config) as stack:
        print(f"speculum: ready, public gRPC API speculum.v1.Speculum on {stack.address}", flush=True)
        stopping.wait()
        print("speculum: shutting down", flush=True)
    return 0


def generate(args: argparse.Namespace) -> int:
    if args.server:
        return generate_remote(args)
    import torch

    from draft_service.registry import load_drafter
    from orchestrator.engine import Engine

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    target_dir = args.target or demo_target_dir()
    if not (Path(target_dir) / "config.json").is_file():
        raise SystemExit(f"speculum: no target model at {target_dir} (give --target DIR)")
    engine = Engine.from_pretrained(target_dir)
    tree_shape = TreeShape(args.tree_width, args.tree_nodes)
    if args.drafter:
        engine.drafter = load_drafter(args.drafter, engine.target.vocab_size, engine.target.device, tree_shape)
    else:  # the shipped drafter, unless it no longer matches the target: then prompt lookup
        try:
            engine.drafter = load_drafter(_default_drafter(), engine.target.vocab_size, engine.target.device, tree_shape)
        except SpeculumError as exc:
            print(f"speculum: the default drafter cannot be used ({exc}); using ngram", file=sys.stderr)
            engine.drafter = load_drafter("ngram", engine.target.vocab_size)
    for spec in _requests(args):
        _print(engine.generate(_to_request(spec, args)).as_json(), args.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train-drafter"]:  # its own flags: hand the rest of the line over
        from draft_service.training.__main__ import main as train_drafter

        train_drafter(argv[1:])
        return 0
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        import runpy

        runpy.run_module("bench", run_name="__main__")
        return 0
    try:
        return serve(args) if args.command == "serve" else generate(args)
    except SpeculumError as exc:
        print(f"speculum: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
