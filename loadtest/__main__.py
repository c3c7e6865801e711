"""`python -m loadtest`: throughput and latency at several concurrency levels, as JSON and a plot.

Without --target it starts the whole split stack here (`speculum serve`'s LocalStack, demo pair),
measures, and stops it. The request is the ghz configuration's (loadtest/ghz/*.json), so these
figures and a ghz run against a cluster measure the same call. Exits 1 when any call failed.

    python -m loadtest [--target HOST:PORT] [--levels 1 4 16] [--duration 5] [--out build/loadtest]
    python -m loadtest ghz-configs      # rewrite loadtest/ghz/*.json from the sample image
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import os
import platform
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from loadtest.generator import LevelReport, LevelSettings, Method, run_level
from loadtest.ghz_config import CONFIGS, SAMPLE_IMAGE, request_from_config, write_configs
from loadtest.plot import plot


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", choices=["run", "ghz-configs"], default="run")
    parser.add_argument("--target", help="HOST:PORT of a running Speculum (default: start the stack here)")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16], help="concurrency levels")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per level and method")
    parser.add_argument("--methods", nargs="+", choices=[m.value for m in Method],
                        default=[m.value for m in Method])
    parser.add_argument("--timeout", type=float, default=120.0, help="per-call deadline, seconds")
    parser.add_argument("--out", type=Path, default=Path("build/loadtest"), help="folder for loadtest.json/.png")
    parser.add_argument("--token", default=os.environ.get("SPECULUM_API_TOKEN") or None,
                        help="bearer token (default: SPECULUM_API_TOKEN)")
    return parser


async def measure(target: str, methods: Sequence[Method], levels: Sequence[int], duration_s: float,
                  timeout_s: float = 120.0, metadata: tuple[tuple[str, str], ...] = ()) -> list[LevelReport]:
    """Every (method, level) in turn, each after one unmeasured warm-up call of that method."""
    reports = []
    for method in methods:
        request = request_from_config(CONFIGS[method.value])
        warm_up = await run_level(LevelSettings(target, method, 1, timeout_s, timeout_s, metadata, max_calls=1),
                                  request)
        if warm_up.errors:
            raise SystemExit(f"loadtest: the warm-up call failed: {warm_up.status_codes}")
        for concurrency in levels:
            report = await run_level(LevelSettings(target, method, concurrency, duration_s, timeout_s, metadata),
                                     request)
            print(_line(report), flush=True)
            reports.append(report)
    return reports


def _line(report: LevelReport) -> str:
    latency = report.latency_ms
    figures = "" if latency is None else (
        f" p50 {latency.p50:8.1f} ms  p95 {latency.p95:8.1f} ms  p99 {latency.p99:8.1f} ms"
    )
    return (f"{report.method:<15} c={report.concurrency:<3} {report.count:5d} calls {report.rps:7.2f} req/s"
            f"{figures}  codes {report.status_codes}")


@contextlib.contextmanager
def target_stack(target: str | None) -> Iterator[str]:
    """The given target, or a LocalStack on the demo pair for the duration of the block."""
    if target:
        yield target
        return
    from speculum.launcher import LocalStack, StackConfig
    from speculum.paths import demo_drafter_dir, demo_target_dir
    from speculum.ports import free_port

    drafter = str(demo_drafter_dir()) if (demo_drafter_dir() / "config.json").is_file() else "ngram"
    print(f"loadtest: starting the local stack (demo target, drafter {drafter})", flush=True)
    with LocalStack(StackConfig(demo_target_dir(), drafter, port=free_port())) as stack:
        yield stack.address


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "ghz-configs":
        write_configs()
        return 0
    logging.basicConfig(level=logging.WARNING)
    metadata = (("authorization", f"Bearer {args.token}"),) if args.token else ()
    methods = [Method(m) for m in args.methods]
    started = datetime.datetime.now(datetime.timezone.utc)
    with target_stack(args.target) as address:
        reports = asyncio.run(measure(address, methods, args.levels, args.duration, args.timeout, metadata))
    request = request_from_config(CONFIGS[methods[0].value])
    result = {
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join(["python -m loadtest", *(argv if argv is not None else sys.argv[1:])]),
        "target": args.target or "local stack (speculum serve: demo pair)",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "request": {"prompt": request.prompt, "image": SAMPLE_IMAGE.name,
                    "max_new_tokens": request.sampling.max_new_tokens,
                    "temperature": request.sampling.temperature},
        "duration_s_per_level": args.duration,
        "levels": [report.as_dict() for report in reports],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "loadtest.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(reports, args.out / "loadtest.png",
         f"Speculum {result['target']}, {started:%Y-%m-%d}, {request.sampling.max_new_tokens} new tokens")
    errors = sum(report.errors for report in reports)
    print(f"loadtest: wrote {args.out / 'loadtest.json'} and {args.out / 'loadtest.png'}; {errors} errors", flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
