"""The checked-in gRPC stubs are what scripts/grpc_stubs.py makes of the vendored protos."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STUBS = REPO / "edged" / "api" / "grpc" / "_proto"


def serialized_descriptor(path: Path) -> bytes:
    """The FileDescriptorProto a generated module adds to its pool: the proto's meaning."""
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "AddSerializedFile"
        ):
            arg = node.args[0]
            assert isinstance(arg, ast.Constant) and isinstance(arg.value, bytes)
            return arg.value
    raise AssertionError(f"{path} adds no serialized descriptor")


def protoc_version(path: Path) -> str:
    return next(
        line for line in path.read_text().splitlines() if line.startswith("# Protobuf Python")
    )


def test_the_stubs_match_the_vendored_protos(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="regenerating needs grpcio-tools (the dev extra)")
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "grpc_stubs.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = sorted(p.name for p in tmp_path.iterdir())
    assert fresh == sorted(p.name for p in STUBS.iterdir() if p.suffix in (".py", ".pyi"))
    for name in ("grpc_service_pb2.py", "model_config_pb2.py"):
        assert serialized_descriptor(tmp_path / name) == serialized_descriptor(STUBS / name), (
            f"{name} is stale: run scripts/grpc_stubs.py"
        )
    # The same protoc writes the same text; another one may only format it differently.
    if protoc_version(tmp_path / "grpc_service_pb2.py") == protoc_version(
        STUBS / "grpc_service_pb2.py"
    ):
        for name in fresh:
            assert (tmp_path / name).read_text() == (STUBS / name).read_text(), name


def test_the_stubs_live_apart_from_tritonclients_in_one_process() -> None:
    pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is a dev dependency")
    import tritonclient.grpc.service_pb2 as theirs

    from edged.api.grpc._proto import grpc_service_pb2 as ours

    assert ours.ModelInferRequest is not theirs.ModelInferRequest
    data = theirs.ModelInferRequest(model_name="m", raw_input_contents=[b"x"]).SerializeToString()
    assert ours.ModelInferRequest.FromString(data).raw_input_contents == [b"x"]
