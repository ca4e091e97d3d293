"""Baseline (c) of bench/serving.py: the traditional thread-per-request server.

A ``http.server.ThreadingHTTPServer`` whose handler parses the Open Inference Protocol request
minimally (binary tensors, or JSON tensors with the standard ``json`` module, as such a server
usually would) and calls the runtime once per request (no batching), concurrently from as
many threads as there are connections. It loads the model through ``edged.runtime.load_model``
so the runtime is the one edged uses. Transport settings match edged's aiohttp server
(HTTP/1.1 keep-alive, listen backlog 128, no Nagle delay), so the comparison isolates the
thread model.

    python bench/thread_server.py --version-dir DIR --port N [--intra-op-threads K] [--spin-wait on]
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from edged.runtime import LoadedModel, load_model
from edged.runtime.options import RuntimeOptions

HEADER_LENGTH = "Inference-Header-Content-Length"
AIOHTTP_DEFAULT_BACKLOG = 128

log = logging.getLogger("thread_server")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = AIOHTTP_DEFAULT_BACKLOG
    model: LoadedModel


class _InferHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as wrk and aiohttp use
    disable_nagle_algorithm = True  # headers and body go out in two writes
    server: _Server

    def do_GET(self) -> None:
        self._send(200 if self.path.startswith("/v2/health/") else 404, b"", None)

    def do_POST(self) -> None:
        try:
            length = int(self.headers["Content-Length"])
            body = self.rfile.read(length)
            if self.headers[HEADER_LENGTH] is None:
                self._json(json.loads(body))
                return
            header_length = int(self.headers[HEADER_LENGTH])
            doc = json.loads(body[:header_length])
            spec = doc["inputs"][0]
            x = np.frombuffer(body, dtype=np.float32, offset=header_length).reshape(spec["shape"])
            outputs = self.server.model.run({spec["name"]: x})
        except (KeyError, TypeError, ValueError) as exc:
            self._send(400, json.dumps({"error": str(exc)}).encode(), None)
            return
        chunks = [np.ascontiguousarray(v).tobytes() for v in outputs.values()]
        header = json.dumps(
            {
                "model_name": "mlp",
                "outputs": [
                    {
                        "name": name,
                        "datatype": "FP32",
                        "shape": list(value.shape),
                        "parameters": {"binary_data_size": len(chunk)},
                    }
                    for (name, value), chunk in zip(outputs.items(), chunks, strict=True)
                ],
            },
            separators=(",", ":"),
        ).encode()
        self._send(200, b"".join([header, *chunks]), len(header))

    def _json(self, doc: dict[str, Any]) -> None:
        spec = doc["inputs"][0]
        x = np.asarray(spec["data"], dtype=np.float32).reshape(spec["shape"])
        outputs = self.server.model.run({spec["name"]: x})
        payload = json.dumps(
            {
                "model_name": "mlp",
                "outputs": [
                    {
                        "name": name,
                        "datatype": "FP32",
                        "shape": list(value.shape),
                        "data": value.ravel().tolist(),
                    }
                    for name, value in outputs.items()
                ],
            },
            separators=(",", ":"),
        ).encode()
        self._send(200, payload, None, "application/json")

    def _send(
        self,
        status: int,
        payload: bytes,
        header_length: int | None,
        content_type: str | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        if header_length is not None:
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header(HEADER_LENGTH, str(header_length))
        elif content_type is not None:
            self.send_header("Content-Type", content_type)
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # no access log, as edged runs with access_log=None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--intra-op-threads", type=int, default=0)
    parser.add_argument(
        "--spin-wait", choices=("on", "off"), default="on", help="on: ONNX Runtime's own default"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    options = RuntimeOptions(
        intra_op_threads=args.intra_op_threads, spin_wait=args.spin_wait == "on"
    )
    model = load_model(args.version_dir, options)  # before listening: ready means loaded
    server = _Server(("127.0.0.1", args.port), _InferHandler)
    server.model = model

    def stop(signum: int, frame: FrameType | None) -> None:
        # shutdown() waits for serve_forever to return, so it cannot run on the serving thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    log.info("serving %s on 127.0.0.1:%d", server.model.description, args.port)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
