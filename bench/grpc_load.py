"""A small load generator for edged's KServe v2 gRPC front end (what wrk is for the HTTP rows):
``--concurrency`` callers in one asyncio process keep one ModelInfer each in flight, spread over
``--connections`` HTTP/2 connections, for ``--duration-s``. The request is serialized once and
the answers are not parsed (but the first one, checked), so the client's own CPU per request
stays small. With ``--stream`` the calls are ModelStreamInfer messages instead: one stream per
connection, ``--concurrency`` messages in flight over all of them. Prints one
``GRPC_RESULT {json}`` line.

    python bench/grpc_load.py --target 127.0.0.1:8001 --model mlp --shape 1 1024 \
        --concurrency 64 --duration-s 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter

import grpc
import numpy as np

from edged.api.grpc._proto import grpc_service_pb2 as pb

METHOD = "/inference.GRPCInferenceService/ModelInfer"
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"


def request_bytes(
    model: str, input_name: str, shape: list[int], seed: int, request_id: str = ""
) -> bytes:
    x = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name=input_name, datatype="FP32", shape=shape)
    request.raw_input_contents.append(x.tobytes())
    return request.SerializeToString()


async def run(args: argparse.Namespace) -> dict[str, object]:
    body = request_bytes(args.model, args.input_name, args.shape, args.seed)
    channels = [
        # A distinct channel argument keeps grpc from sharing one connection between channels.
        grpc.aio.insecure_channel(args.target, options=[("edged.bench.connection", i)])
        for i in range(max(1, min(args.connections, args.concurrency)))
    ]
    calls: list[grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = [
        c.unary_unary(METHOD)
        for c in channels  # bytes in, bytes out
    ]
    first = pb.ModelInferResponse.FromString(await calls[0](body, timeout=30))
    if args.check and not first.raw_output_contents:
        raise SystemExit(f"unexpected answer: {first}")
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    started = time.perf_counter()
    stop_at = started + args.duration_s

    async def caller(i: int) -> None:
        call = calls[i % len(calls)]
        clock = time.perf_counter
        while (t0 := clock()) < stop_at:
            try:
                await call(body, timeout=args.timeout_s or None)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] += 1
            else:
                latencies.append(clock() - t0)

    async def streamer(i: int, depth: int) -> None:
        """``depth`` messages in flight on one stream; each answer (matched by id) is
        followed by the next request from the same slot."""
        bodies = [
            request_bytes(args.model, args.input_name, args.shape, args.seed, str(k))
            for k in range(depth)
        ]
        call: grpc.aio.StreamStreamCall[bytes, bytes] = channels[i].stream_stream(STREAM_METHOD)()
        sent = [0.0] * depth
        clock = time.perf_counter
        for k, request in enumerate(bodies):
            sent[k] = clock()
            await call.write(request)
        outstanding = depth
        while outstanding:
            data = await call.read()
            if data is grpc.aio.EOF:
                errors["EOF"] += outstanding
                break
            outstanding -= 1
            assert isinstance(data, bytes)
            answer = pb.ModelStreamInferResponse.FromString(data)
            k = int(answer.infer_response.id)
            if answer.error_message:
                errors["stream error"] += 1
            else:
                latencies.append(clock() - sent[k])
            if clock() < stop_at:
                sent[k] = clock()
                await call.write(bodies[k])
                outstanding += 1
        await call.done_writing()

    if args.stream:
        per_stream, extra = divmod(args.concurrency, len(channels))
        depths = [per_stream + (i < extra) for i in range(len(channels))]
        await asyncio.gather(*(streamer(i, d) for i, d in enumerate(depths) if d))
    else:
        await asyncio.gather(*(caller(i) for i in range(args.concurrency)))
    duration = time.perf_counter() - started
    for channel in channels:
        await channel.close()
    ms = np.asarray(latencies) * 1e3 if latencies else np.zeros(1)
    return {
        "requests": len(latencies) + sum(errors.values()),
        "ok": len(latencies),
        "errors": dict(errors),
        "duration_s": duration,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="host:port of edged's gRPC listener")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--input-name", default="input")
    parser.add_argument("--shape", type=int, nargs="+", default=[1, 1024])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument(
        "--timeout-s", type=float, default=10.0, help="each call's deadline (0: none)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--stream", action="store_true", help="ModelStreamInfer, not ModelInfer")
    parser.add_argument(
        "--no-check", dest="check", action="store_false", help="skip the answer check"
    )
    args = parser.parse_args(argv)
    try:
        import uvloop

        result = uvloop.run(run(args))
    except ImportError:
        result = asyncio.run(run(args))
    print("GRPC_RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
