"""Generated stubs are current: regenerating from protos/ gives exactly the files in speculum/v1/."""

from __future__ import annotations

from speculum import stubs
from speculum.paths import REPO_ROOT


def test_stubs_match_the_protos(tmp_path):
    fresh = stubs.generate(tmp_path)
    assert fresh, "protoc generated nothing"
    installed = REPO_ROOT / "speculum" / "v1"
    stale = [path.name for path in fresh if not (installed / path.name).is_file()
             or (installed / path.name).read_bytes() != path.read_bytes()]
    assert not stale, f"stale stubs (run `make stubs`): {stale}"


def test_every_proto_has_stubs():
    names = {path.stem for path in stubs.proto_files()}
    assert {"common", "speculum", "session", "verifier", "drafter", "vision"} <= names
    for name in names:
        assert (REPO_ROOT / "speculum" / "v1" / f"{name}_pb2.pyi").is_file()
