"""A small synchronous client of the local API, over the Unix socket or TCP (used by the CLI).

It speaks the same Open Inference Protocol as any other client; only the transport differs.
"""

from __future__ import annotations

import http.client
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from edged.api.tensors import HEADER_LENGTH
from edged.errors import ApiError, DaemonUnreachableError
from edged.runtime.base import NUMPY_TO_DATATYPE, Array


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


@dataclass(frozen=True)
class Endpoint:
    socket_path: Path | None = None
    url: str | None = None

    def describe(self) -> str:
        return f"unix:{self.socket_path}" if self.socket_path else str(self.url)


class LocalClient:
    def __init__(self, endpoint: Endpoint, timeout_s: float = 30.0) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s

    def _connection(self) -> http.client.HTTPConnection:
        if self.endpoint.socket_path is not None:
            return _UnixConnection(str(self.endpoint.socket_path), self.timeout_s)
        parts = urlsplit(self.endpoint.url or "http://127.0.0.1:8000")
        return http.client.HTTPConnection(
            parts.hostname or "127.0.0.1", parts.port or 80, timeout=self.timeout_s
        )

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = self._connection()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        except (TimeoutError, ConnectionError, FileNotFoundError, OSError) as exc:
            raise DaemonUnreachableError(
                f"cannot reach the edged daemon at {self.endpoint.describe()}: {exc} "
                "(is `edged run` running? pass --socket or --url)"
            ) from exc
        finally:
            conn.close()

    def json(self, method: str, path: str, body: Any = None) -> Any:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        status, _, data = self.request(method, path, payload, headers)
        doc = json.loads(data) if data else {}
        if status >= 400:
            message = (
                doc.get("error", data.decode(errors="replace"))
                if isinstance(doc, dict)
                else str(doc)
            )
            raise ApiError(status, message)
        return doc

    def infer(
        self,
        model: str,
        inputs: dict[str, Array],
        *,
        version: str | None = None,
        priority: int = 0,
        timeout_ms: float | None = None,
    ) -> tuple[str, dict[str, Array]]:
        """Binary-tensor inference; returns (model_version, outputs)."""
        header_inputs = []
        chunks = []
        for name, value in inputs.items():
            datatype = NUMPY_TO_DATATYPE.get(value.dtype)
            if datatype is None:
                raise ApiError(
                    400, f"input {name!r} has dtype {value.dtype}, which edged does not serve"
                )
            data = np.ascontiguousarray(value).tobytes()
            header_inputs.append(
                {
                    "name": name,
                    "shape": list(value.shape),
                    "datatype": datatype,
                    "parameters": {"binary_data_size": len(data)},
                }
            )
            chunks.append(data)
        params: dict[str, Any] = {"binary_data_output": True}
        if priority:
            params["priority"] = priority
        header = json.dumps({"inputs": header_inputs, "parameters": params}).encode()
        headers = {HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"}
        if timeout_ms is not None:
            headers["Edged-Timeout-Ms"] = str(timeout_ms)
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
        status, resp_headers, data = self.request("POST", path, header + b"".join(chunks), headers)
        if status >= 400:
            try:
                message = json.loads(data).get("error", "")
            except ValueError:
                message = data.decode(errors="replace")
            raise ApiError(status, message)
        length = int(resp_headers.get(HEADER_LENGTH, len(data)))
        doc = json.loads(data[:length])
        offset = length
        outputs: dict[str, Array] = {}
        from edged.runtime.base import DATATYPE_TO_NUMPY

        for out in doc["outputs"]:
            dtype = DATATYPE_TO_NUMPY[out["datatype"]]
            size = (out.get("parameters") or {}).get("binary_data_size")
            if size is not None:
                outputs[out["name"]] = np.frombuffer(
                    data[offset : offset + size], dtype=dtype
                ).reshape(out["shape"])
                offset += size
            else:
                outputs[out["name"]] = np.asarray(out["data"], dtype=dtype).reshape(out["shape"])
        return str(doc.get("model_version")), outputs
