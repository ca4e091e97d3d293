"""The inference stack keeps working under the unit's MemoryDenyWriteExecute=yes.

systemd refuses writable+executable mappings for the service. A runtime that JITs, a cffi
callback or a shared library that asks for an executable stack would fail there. These tests
catch that here, when a dependency is upgraded, rather than on a device: the kernel's own
PR_SET_MDWE (Linux >= 6.3) enforces the same rule for a subprocess that runs both runtimes.
"""

from __future__ import annotations

import importlib.util
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PT_GNU_STACK = 0x6474E551
PF_X = 0x1

_UNDER_MDWE = """
import ctypes, mmap, sys
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    print("no-mdwe"); sys.exit(0)
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    sys.exit("a W+X mapping was allowed: MDWE is not in force")
except OSError:
    pass
import numpy as np
import onnxruntime as ort
from ai_edge_litert.interpreter import Interpreter
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

models = sys.argv[1]
session = ort.InferenceSession(models + "/mlp/1/model.onnx", providers=["CPUExecutionProvider"])
first = session.get_inputs()[0]
x = np.ones([d if isinstance(d, int) else 2 for d in first.shape], np.float32)
print("onnx", session.run(None, {first.name: x})[0].shape)
interpreter = Interpreter(model_path=models + "/fc/1/model.tflite")
interpreter.allocate_tensors()
detail = interpreter.get_input_details()[0]
interpreter.set_tensor(detail["index"], np.ones(detail["shape"], np.float32))
interpreter.invoke()
print("litert", interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).shape)
key = Ed25519PrivateKey.generate()
key.public_key().verify(key.sign(b"bundle"), b"bundle")
print("ed25519 ok")

import asyncio, grpc
from edged.api.grpc._proto import grpc_service_pb2

async def echo(request, context):
    return request

async def grpc_round_trip():
    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(echo)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.S", {"M": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer = await channel.unary_unary("/t.S/M")(b"ping", timeout=30)
    await server.stop(0)
    return grpc_service_pb2.ServerLiveResponse(live=answer == b"ping").live

print("grpc", asyncio.run(grpc_round_trip()))
"""


def test_runtimes_infer_without_writable_executable_memory() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _UNDER_MDWE, str(REPO / "models")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.stdout.strip() == "no-mdwe":
        pytest.skip("the kernel has no PR_SET_MDWE (Linux < 6.3)")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "onnx (2, 10)" in result.stdout
    assert "litert (1, 8)" in result.stdout
    assert "ed25519 ok" in result.stdout
    assert "grpc True" in result.stdout


def _wants_executable_stack(path: Path) -> bool:
    with path.open("rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2:  # only 64-bit ELF objects
            return False
        order = "<" if header[5] == 1 else ">"
        phoff = struct.unpack_from(order + "Q", header, 0x20)[0]
        phentsize, phnum = struct.unpack_from(order + "HH", header, 0x36)
        for index in range(phnum):
            f.seek(phoff + index * phentsize)
            p_type, p_flags = struct.unpack(order + "II", f.read(8))
            if p_type == PT_GNU_STACK:
                return bool(p_flags & PF_X)
    return False  # no PT_GNU_STACK: the loader's default, non-executable on arm64 and x86-64


@pytest.mark.parametrize(
    "package", ["onnxruntime", "ai_edge_litert", "numpy", "cryptography", "grpc", "google._upb"]
)
def test_no_shared_library_asks_for_an_executable_stack(package: str) -> None:
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations
    root = Path(next(iter(spec.submodule_search_locations)))
    libraries = [p for p in root.rglob("*.so*") if p.is_file()]
    libs_dir = root.parent / f"{package}.libs"  # auditwheel's vendored libraries
    if libs_dir.is_dir():
        libraries += [p for p in libs_dir.iterdir() if p.is_file()]
    assert libraries, f"no shared libraries found under {root}"
    assert [p for p in libraries if _wants_executable_stack(p)] == []


def test_the_stack_check_sees_an_executable_stack(tmp_path: Path) -> None:
    # Guards against a vacuous pass: flip PF_X on a copy of a real library's PT_GNU_STACK.
    original = Path(sys.executable).resolve()
    data = bytearray(original.read_bytes())
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for index in range(phnum):
        offset = phoff + index * phentsize
        if struct.unpack_from("<I", data, offset)[0] == PT_GNU_STACK:
            struct.pack_into("<I", data, offset + 4, 0x7)  # RWX
            break
    else:
        pytest.skip(f"{original} has no PT_GNU_STACK header to flip")
    patched = tmp_path / "patched.so"
    patched.write_bytes(bytes(data))
    assert not _wants_executable_stack(original)
    assert _wants_executable_stack(patched)
