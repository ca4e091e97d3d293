"""The model manager with real runtimes: hot swap, self-test, memory policy, scheduling.

To hold requests in the queue deterministically, a test makes the model's next run wait on an
event (``worker_busy``): once the worker is inside that run, which the test waits for, requests
queue behind it exactly as behind a long-running batch; counts are polled from the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from edged.config import ModelsConfig
from edged.demo.samples import SAMPLE_MLP_LAYERS, write_failing_version, write_onnx_mlp
from edged.errors import (
    DeadlineExceededError,
    InsufficientMemoryError,
    InvalidRequestError,
    ModelLoadError,
    ModelNotFoundError,
    QueueFullError,
    SelfTestFailedError,
)
from edged.serve.manager import ModelManager
from edged.serve.scheduler import InferenceResult

T = TypeVar("T")


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await coro_fn()

    return asyncio.run(main())


class RecordingObserver:
    def __init__(self) -> None:
        self.batches: list[int] = []
        self.outcomes: dict[str, int] = {}

    def on_batch(
        self, version: str, rows: int, queue_s: list[float], start: float, end: float
    ) -> None:
        self.batches.append(rows)

    def on_outcome(self, outcome: str, count: int = 1) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + count


def x_mlp(rows: int = 1, seed: int = 0) -> dict[str, np.ndarray[Any, Any]]:
    return {"input": np.random.default_rng(seed).standard_normal((rows, 64), dtype=np.float32)}


def x_fc(value: float = 1.0) -> dict[str, np.ndarray[Any, Any]]:
    return {"input": np.full((1, 16), value, dtype=np.float32)}


class BusyWorker:
    """The model's runs wait for ``release``; ``running()`` returns once the worker is in one."""

    def __init__(self, manager: ModelManager, name: str) -> None:
        self.entry = manager.entry(name)
        self.entered = threading.Event()
        self.release = threading.Event()

    async def running(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 30), "the worker never ran"

    async def queued(self, count: int) -> None:
        """Returns once ``count`` requests wait in the model's queue."""
        await self.until(lambda: self.entry.scheduler.queue_depth == count, f"{count} queued")

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        """A bounded poll of real state."""
        for _ in range(3000):
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"never reached: {what}")


@contextlib.contextmanager
def worker_busy(manager: ModelManager, name: str) -> Iterator[BusyWorker]:
    busy = BusyWorker(manager, name)
    current = busy.entry.slot.current
    assert current is not None
    model = current.model
    real_run = model.run

    def held_run(feeds: Any) -> Any:
        busy.entered.set()
        busy.release.wait(60)
        return real_run(feeds)

    model.run = held_run  # type: ignore[method-assign]
    try:
        yield busy
    finally:
        busy.release.set()
        del model.run


def append_config(repo: Path, model: str, text: str) -> None:
    path = repo / model / "config.toml"
    path.write_text(path.read_text() + "\n" + text)


def test_hot_swap_serves_the_new_version_and_releases_the_old(model_repo: Path) -> None:
    async def scenario() -> None:
        manager = ModelManager(ModelsConfig(repository=model_repo))
        await manager.start()
        first = await manager.infer("mlp", x_mlp())
        old = manager.serving("mlp")
        write_onnx_mlp(model_repo / "mlp" / "2", SAMPLE_MLP_LAYERS, seed=0, bias_shift=5.0)
        assert await manager.load_model("mlp") == "2"
        second = await manager.infer("mlp", x_mlp())
        await manager.close()
        assert (first.model_version, second.model_version) == ("1", "2")
        np.testing.assert_allclose(
            second.outputs["output"], first.outputs["output"] + 5.0, atol=1e-4
        )
        assert old.closed

    run(scenario)


def test_a_version_failing_its_test_vectors_is_not_switched_in(model_repo: Path) -> None:
    async def scenario() -> None:
        manager = ModelManager(ModelsConfig(repository=model_repo))
        await manager.start()
        write_failing_version(model_repo / "mlp" / "2")
        with pytest.raises(SelfTestFailedError, match="output 'output' differs"):
            await manager.load_model("mlp")
        result = await manager.infer("mlp", x_mlp())
        status = manager.status()
        await manager.close()
        assert result.model_version == "1"
        mlp = next(m for m in status["models"] if m["name"] == "mlp")
        assert mlp["state"] == "READY"
        assert "differs" in mlp["last_error"]
        assert status["events"][-1]["ok"] is False

    run(scenario)


def test_a_corrupt_model_file_is_reported_and_the_old_version_serves(model_repo: Path) -> None:
    async def scenario() -> None:
        manager = ModelManager(ModelsConfig(repository=model_repo))
        await manager.start()
        bad = model_repo / "mlp" / "2"
        bad.mkdir()
        (bad / "model.onnx").write_bytes(b"this is not a protobuf")
        with pytest.raises(ModelLoadError, match="cannot load"):
            await manager.load_model("mlp")
        result = await manager.infer("mlp", x_mlp())
        await manager.close()
        assert result.model_version == "1"

    run(scenario)


def test_memory_policy_refuse_keeps_the_old_version(model_repo: Path) -> None:
    async def scenario() -> None:
        manager = ModelManager(ModelsConfig(repository=model_repo, memory_reserve_bytes=0))
        await manager.start()
        in_use = sum(manager.serving(n).memory_estimate_bytes for n in ("mlp", "fc"))
        manager.config = replace(manager.config, memory_limit_bytes=in_use + 1024)
        write_onnx_mlp(model_repo / "mlp" / "2", SAMPLE_MLP_LAYERS, seed=0, bias_shift=1.0)
        with pytest.raises(InsufficientMemoryError, match="version 1 keeps serving"):
            await manager.load_model("mlp")
        result = await manager.infer("mlp", x_mlp())
        await manager.close()
        assert result.model_version == "1"

    run(scenario)


def test_memory_policy_unload_first_swaps_with_a_gap(model_repo: Path) -> None:
    async def scenario() -> None:
        manager = ModelManager(ModelsConfig(repository=model_repo, memory_reserve_bytes=0))
        await manager.start()
        in_use = sum(manager.serving(n).memory_estimate_bytes for n in ("mlp", "fc"))
        manager.config = replace(
            manager.config, memory_limit_bytes=in_use + 1024, memory_policy="unload-first"
        )
        write_onnx_mlp(model_repo / "mlp" / "2", SAMPLE_MLP_LAYERS, seed=0, bias_shift=1.0)
        old = manager.serving("mlp")
        assert await manager.load_model("mlp") == "2"
        result = await manager.infer("mlp", x_mlp())
        await manager.close()
        assert old.closed
        assert result.model_version == "2"

    run(scenario)


def test_requests_arriving_while_the_worker_is_busy_form_one_batch(model_repo: Path) -> None:
    observer = RecordingObserver()

    async def scenario() -> list[InferenceResult]:
        manager = ModelManager(ModelsConfig(repository=model_repo), lambda name: observer)
        await manager.start()
        observer.batches.clear()
        with worker_busy(manager, "mlp") as busy:
            tasks = [asyncio.ensure_future(manager.infer("mlp", x_mlp(seed=0)))]
            await busy.running()  # the worker took it alone and is inside its run
            tasks += [
                asyncio.ensure_future(manager.infer("mlp", x_mlp(seed=i))) for i in range(1, 10)
            ]
            await busy.queued(9)
        results = await asyncio.gather(*tasks)
        alone = await manager.infer("mlp", x_mlp())
        await manager.close()
        return [*results, alone]

    results = run(scenario)
    # The first request was taken alone; the other nine queued behind its run.
    assert sorted(observer.batches) == [1, 1, 9]
    assert results[-1].batch_rows == 1
    for i, result in enumerate(results[:10]):
        assert result.outputs["output"].shape == (1, 10), i


def test_batched_results_match_unbatched_ones(model_repo: Path) -> None:
    async def scenario() -> tuple[list[InferenceResult], list[InferenceResult]]:
        manager = ModelManager(ModelsConfig(repository=model_repo))
        await manager.start()
        single = [await manager.infer("mlp", x_mlp(seed=i)) for i in range(5)]
        with worker_busy(manager, "mlp") as busy:
            tasks = [asyncio.ensure_future(manager.infer("mlp", x_mlp(seed=i))) for i in range(5)]
            await busy.running()  # whatever it did not take is queued behind this run
        batched = await asyncio.gather(*tasks)
        await manager.close()
        return single, list(batched)

    single, batched = run(scenario)
    assert max(r.batch_rows for r in batched) > 1
    for s, b in zip(single, batched, strict=True):
        np.testing.assert_allclose(s.outputs["output"], b.outputs["output"], rtol=1e-5, atol=1e-5)


def test_full_queue_rejects_with_queue_full(model_repo: Path) -> None:
    append_config(model_repo, "fc", "[batching]\nmax_queue_size = 2\n")

    async def scenario() -> None:
        manager = ModelManager(ModelsConfig(repository=model_repo))
        await manager.start()
        with worker_busy(manager, "fc") as busy:
            first = asyncio.ensure_future(manager.infer("fc", x_fc()))
            await busy.running()
            queued = [asyncio.ensure_future(manager.infer("fc", x_fc())) for _ in range(2)]
            await busy.queued(2)
            with pytest.raises(QueueFullError, match="queue of model 'fc' is full"):
                await manager.infer("fc", x_fc())
        done = await asyncio.gather(first, *queued)
        await manager.close()
        assert [r.model_version for r in done] == ["1", "1", "1"]

    run(scenario)


def test_deadline_passes_while_queued(model_repo: Path) -> None:
    observer = RecordingObserver()

    async def scenario() -> None:
        manager = ModelManager(ModelsConfig(repository=model_repo), lambda name: observer)
        await manager.start()
        with worker_busy(manager, "fc") as busy:
            first = asyncio.ensure_future(manager.infer("fc", x_fc()))
            await busy.running()
            with pytest.raises(DeadlineExceededError, match="deadline of 50 ms"):
                await manager.infer("fc", x_fc(), timeout_s=0.05)
        await first
        await manager.close()

    run(scenario)
    assert observer.outcomes.get("dropped") == 1  # the expired request never ran


def test_higher_priority_requests_run_first(model_repo: Path) -> None:
    order: list[str] = []

    async def scenario() -> None:
        manager = ModelManager(ModelsConfig(repository=model_repo))
        await manager.start()

        async def call(label: str, priority: int) -> None:
            await manager.infer("fc", x_fc(), priority=priority)
            order.append(label)

        with worker_busy(manager, "fc") as busy:
            first = asyncio.ensure_future(call("first", 2))
            await busy.running()
            rest = [asyncio.ensure_future(call(f"low{i}", 2)) for i in range(3)]
            await busy.queued(3)
            rest.append(asyncio.ensure_future(call("urgent", 1)))
            await busy.queued(4)
        await asyncio.gather(first, *rest)
        with pytest.raises(InvalidRequestError, match="priority 3 is outside 1..2"):
            await manager.infer("fc", x_fc(), priority=3)
        await manager.close()

    run(scenario)
    assert order == ["first", "urgent", "low0", "low1", "low2"]


def test_a_caller_that_goes_away_is_dropped_before_it_runs(model_repo: Path) -> None:
    observer = RecordingObserver()

    async def scenario() -> None:
        manager = ModelManager(ModelsConfig(repository=model_repo), lambda name: observer)
        await manager.start()
        observer.batches.clear()
        with worker_busy(manager, "fc") as busy:
            first = asyncio.ensure_future(manager.infer("fc", x_fc()))
            await busy.running()
            gone = asyncio.ensure_future(manager.infer("fc", x_fc()))
            await busy.queued(1)
            gone.cancel()
        await first
        await manager.close()  # the worker drains its queue first: it meets the dropped one

    run(scenario)
    assert observer.outcomes == {"dropped": 1}
    assert observer.batches == [1]


def test_result_cache_reuses_and_coalesces_identical_requests(model_repo: Path) -> None:
    append_config(model_repo, "fc", "[cache]\nenabled = true\nmax_entries = 4\n")
    observer = RecordingObserver()

    async def scenario() -> None:
        manager = ModelManager(ModelsConfig(repository=model_repo), lambda name: observer)
        await manager.start()
        observer.batches.clear()
        cache = manager.entry("fc").cache
        assert cache is not None
        with worker_busy(manager, "fc") as busy:
            tasks = [asyncio.ensure_future(manager.infer("fc", x_fc(2.0))) for _ in range(3)]
            await busy.running()
            await busy.until(lambda: cache.coalesced == 2, "two requests joined the first")
        results = await asyncio.gather(*tasks)
        again = await manager.infer("fc", x_fc(2.0))
        other = await manager.infer("fc", x_fc(3.0))
        await manager.close()
        assert (cache.coalesced, cache.hits) == (2, 1)
        for r in [*results, again]:
            np.testing.assert_array_equal(r.outputs["output"], results[0].outputs["output"])
        assert not np.array_equal(other.outputs["output"], again.outputs["output"])

    run(scenario)
    assert observer.batches == [1, 1]  # one run for the three identical requests, one for 3.0


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"nope": np.zeros((1, 64), np.float32)}, "has no input tensor 'nope'"),
        (
            {"input": np.zeros((1, 63), np.float32)},
            "shape \\[1, 63\\] does not match the model's \\[-1, 64\\]",
        ),
        ({"input": np.zeros((1, 64), np.float64)}, "datatype FP64 does not match the model's FP32"),
        ({"input": np.zeros((64,), np.float32)}, "shape \\[64\\]"),
        ({"input": np.zeros((33, 64), np.float32)}, "batch size 33 is outside 1..32"),
    ],
)
def test_bad_inputs_name_the_tensor_and_the_problem(
    model_repo: Path, inputs: dict[str, np.ndarray[Any, Any]], message: str
) -> None:
    async def scenario() -> None:
        manager = ModelManager(ModelsConfig(repository=model_repo))
        await manager.start()
        try:
            with pytest.raises(InvalidRequestError, match=message):
                await manager.infer("mlp", inputs)
            assert (await manager.infer("mlp", x_mlp())).model_version == "1"
        finally:
            await manager.close()

    run(scenario)


def test_unknown_model_and_version(model_repo: Path) -> None:
    async def scenario() -> None:
        manager = ModelManager(ModelsConfig(repository=model_repo))
        await manager.start()
        try:
            with pytest.raises(ModelNotFoundError, match="unknown model 'nope'"):
                await manager.infer("nope", x_mlp())
            with pytest.raises(ModelNotFoundError, match="version 9 of model 'mlp' is not serving"):
                await manager.infer("mlp", x_mlp(), version="9")
        finally:
            await manager.close()

    run(scenario)
