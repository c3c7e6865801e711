"""`make bench`: every benchmark, one after the other (each measures its own pairs side by side)."""

from __future__ import annotations

import subprocess
import sys

for module in ("bench.cores", "bench.drafting", "bench.baselines", "bench.grpc_floor", "bench.services", "bench.pipelining",
               "bench.batch_pass", "bench.batching"):
    print(f"\n=== {module}", flush=True)
    subprocess.run([sys.executable, "-m", module], check=True)
