"""The ghz configurations in loadtest/ghz/: reading their request, and writing them from a sample image.

The request JSON is protobuf's JSON mapping (bytes as base64), which ghz converts with the
descriptors it gets by server reflection; `request_from_config` converts it the same way with
`json_format`, so the load generator here sends exactly what ghz sends.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from google.protobuf import json_format

from speculum.paths import REPO_ROOT
from speculum.v1 import speculum_pb2

GHZ_DIR = Path(__file__).resolve().parent / "ghz"
SAMPLE_IMAGE = REPO_ROOT / "models" / "demo" / "samples" / "scene_101.png"
CONFIGS = {"Generate": GHZ_DIR / "generate.json", "GenerateStream": GHZ_DIR / "generate_stream.json"}


def request_from_config(path: Path) -> speculum_pb2.GenerateRequest:
    """The `data` of a ghz config as a GenerateRequest (ParseError on unknown fields or bad values)."""
    config = json.loads(path.read_text())
    return json_format.ParseDict(config["data"], speculum_pb2.GenerateRequest())


def write_configs(image: Path = SAMPLE_IMAGE, max_new_tokens: int = 32) -> None:
    """Rewrite both configs around `image` (`python -m loadtest ghz-configs` after a sample changes)."""
    data = {
        "prompt": "Describe the image in detail.",
        "images": [base64.b64encode(image.read_bytes()).decode()],
        "sampling": {"max_new_tokens": max_new_tokens, "temperature": 0.0},
    }
    for method, path in CONFIGS.items():
        config = {
            "name": f"speculum {method} (demo pair, {image.name})",
            "call": f"speculum.v1.Speculum/{method}",
            "concurrency": 4,
            "duration": "30s",
            "duration-stop": "wait",
            "host": "127.0.0.1:50051",
            "insecure": True,
            "connections": 1,
            "timeout": "120s",
            "connect-timeout": "10s",
            "data": data,
        }
        path.write_text(json.dumps(config, indent=2) + "\n")
