"""Micro-batching (issue 18, batched serving): coalescing, order, bounds, deadlines, errors, shutdown,
and :class:`ModelRuntime` serving concurrent ``predict`` calls through it with unchanged results."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cds_service.batching import BatchDeadlineExceeded, BatcherClosed, BatchFailed, MicroBatcher
from cds_service.inference import ModelRuntime
from tests.onnx_fixtures import build_toy_model_dir


class GatedRun:
    """A batch function that records each batch, returns ``10 * item`` per row and can be held.

    While ``hold`` is set, a batch blocks in the call after signalling ``entered``, so a test can
    queue items behind a running batch deterministically.
    """

    def __init__(self, fail: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self.fail = fail

    def hold(self) -> None:
        self.release.clear()
        self.entered.clear()

    def __call__(self, items: Sequence[int]) -> np.ndarray:
        self.batches.append(list(items))
        self.entered.set()
        self.release.wait(10)
        if self.fail:
            raise ValueError("boom")
        return np.array([[10 * i, i] for i in items], dtype=np.float32)


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.002)


def submit_behind_running_batch(
    batcher: MicroBatcher[int], run: GatedRun, items: Sequence[int], deadline_s: float | None = None
) -> list[Any]:
    """Hold a first batch (item 0) in the call, queue ``items`` from their own threads, then release.

    ``deadline_s``: each queued item's deadline, seconds after it is submitted. Returns each
    item's result (or the exception it raised), in ``items`` order.
    """

    def submit(item: int) -> np.ndarray:
        return batcher.submit(item, None if deadline_s is None else time.monotonic() + deadline_s)

    run.hold()
    with ThreadPoolExecutor(len(items) + 1) as pool:
        first = pool.submit(batcher.submit, 0)
        assert run.entered.wait(5)
        futures = [pool.submit(submit, item) for item in items]
        wait_for(lambda: batcher.queued == len(items))
        run.release.set()
        outcomes: list[Any] = []
        for future in [first, *futures]:
            try:
                outcomes.append(future.result(5))
            except Exception as exc:
                outcomes.append(exc)
    return outcomes[1:]


def test_concurrent_items_share_one_call_and_each_gets_its_own_row() -> None:
    """Items queued while a batch runs go into the next call together; every caller gets its row."""
    run = GatedRun()
    batcher = MicroBatcher(run, max_wait_s=0.005, max_batch=32)
    items = list(range(1, 8))
    outcomes = submit_behind_running_batch(batcher, run, items)
    assert [sorted(b) for b in run.batches] == [[0], items]
    for item, out in zip(items, outcomes, strict=True):
        assert out.tolist() == [10 * item, item]
    stats = batcher.stats()
    assert (stats.batches, stats.items, stats.largest) == (2, 8, 7)
    batcher.close()


def test_batches_never_exceed_max_batch() -> None:
    """Seven queued items with ``max_batch=3`` run as 3 + 3 + 1, each still answered correctly."""
    run = GatedRun()
    batcher = MicroBatcher(run, max_wait_s=0.005, max_batch=3)
    items = list(range(1, 8))
    outcomes = submit_behind_running_batch(batcher, run, items)
    assert [len(b) for b in run.batches] == [1, 3, 3, 1]
    assert [o[0] for o in outcomes] == [10 * i for i in items]
    batcher.close()


def test_a_lone_request_does_not_pay_the_wait() -> None:
    """Without concurrency the batch thread runs at once, even with a long ``max_wait_s``."""
    batcher = MicroBatcher(GatedRun(), max_wait_s=2.0)
    started = time.monotonic()
    for item in range(3):
        assert batcher.submit(item)[0] == 10 * item
    assert time.monotonic() - started < 1.0
    batcher.close()


def test_the_gather_wait_is_bounded_and_ends_before_a_deadline() -> None:
    """Under concurrency the wait for more items ends at ``max_wait_s`` and before a queued deadline."""
    run = GatedRun()
    batcher = MicroBatcher(run, max_wait_s=0.2, max_batch=32)
    submit_behind_running_batch(batcher, run, [1, 2])  # the previous batch held 2: gathering is on
    started = time.monotonic()
    assert batcher.submit(3)[0] == 30
    waited = time.monotonic() - started
    assert 0.15 <= waited < 1.5
    long_wait = MicroBatcher(run, max_wait_s=30.0, max_batch=32)
    submit_behind_running_batch(long_wait, run, [1, 2], deadline_s=2.0)
    started = time.monotonic()
    assert long_wait.submit(4, deadline=time.monotonic() + 1.0)[0] == 40  # gathers half its time
    assert 0.3 <= time.monotonic() - started < 0.9
    batcher.close()
    long_wait.close()


def test_a_caller_never_waits_past_its_deadline() -> None:
    """A caller whose batch runs too long gets BatchDeadlineExceeded at its deadline, not later."""
    run = GatedRun()
    batcher = MicroBatcher(run)
    run.hold()
    started = time.monotonic()
    with pytest.raises(BatchDeadlineExceeded):
        batcher.submit(1, deadline=time.monotonic() + 0.1)
    assert time.monotonic() - started < 1.0
    run.release.set()
    with pytest.raises(BatchDeadlineExceeded):
        batcher.submit(2, deadline=time.monotonic() - 1.0)
    assert batcher.submit(3)[0] == 30  # the batcher keeps serving
    batcher.close()


def test_an_expired_queued_item_is_dropped_without_running() -> None:
    """An item whose caller gave up while it was still queued never reaches the model."""
    run = GatedRun()
    batcher = MicroBatcher(run)
    run.hold()
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(batcher.submit, 0)
        assert run.entered.wait(5)
        with pytest.raises(BatchDeadlineExceeded):
            batcher.submit(99, deadline=time.monotonic() + 0.05)
        run.release.set()
        assert first.result(5)[0] == 0
    assert batcher.submit(5)[0] == 50
    assert all(99 not in batch for batch in run.batches)
    assert batcher.stats().expired == 1
    batcher.close()


def test_a_failed_batch_reaches_every_waiter_and_the_batcher_recovers() -> None:
    """Every caller of a failing batch gets BatchFailed chained to the model's error."""
    run = GatedRun()
    batcher = MicroBatcher(run)
    run.fail = True
    outcomes = submit_behind_running_batch(batcher, run, [1, 2, 3])
    assert len(run.batches) == 2 and sorted(run.batches[1]) == [1, 2, 3]
    for out in outcomes:
        assert isinstance(out, BatchFailed) and isinstance(out.__cause__, ValueError)
    run.fail = False
    assert batcher.submit(4)[0] == 40
    batcher.close()


def test_a_wrong_number_of_rows_is_a_failure_for_the_batch() -> None:
    """A batch function that returns too few rows fails its batch rather than misrouting rows."""
    batcher: MicroBatcher[int] = MicroBatcher(lambda items: np.zeros((len(items) + 1, 2)))
    with pytest.raises(BatchFailed, match="rows"):
        batcher.submit(1)
    batcher.close()


def test_close_runs_what_is_queued_then_refuses_new_items() -> None:
    """Shutdown: queued callers still get results, later submits are refused, the thread ends."""
    run = GatedRun()
    batcher = MicroBatcher(run, max_wait_s=0.005)
    run.hold()
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(batcher.submit, 0)
        assert run.entered.wait(5)
        queued = [pool.submit(batcher.submit, item) for item in (1, 2)]
        wait_for(lambda: batcher.queued == 2)
        closer = pool.submit(batcher.close, 5.0)
        wait_for(lambda: batcher.closed)
        with pytest.raises(BatcherClosed):
            batcher.submit(3)
        run.release.set()
        closer.result(5)
        assert first.result(5)[0] == 0
        assert [f.result(5)[0] for f in queued] == [10, 20]
    assert batcher._thread is not None and not batcher._thread.is_alive()


def test_invalid_bounds_are_refused() -> None:
    """A negative wait or an empty batch size is a programming error, reported at construction."""
    with pytest.raises(ValueError):
        MicroBatcher(GatedRun(), max_wait_s=-1)
    with pytest.raises(ValueError):
        MicroBatcher(GatedRun(), max_batch=0)


# -- ModelRuntime ---------------------------------------------------------------------------------
@dataclass
class _Ecg:
    signal: np.ndarray
    fs: float
    lead_names: tuple[str, ...]


@dataclass
class _Inputs:
    ecg: _Ecg
    metadata: dict[str, float | None]


class SlowSession:
    """Wraps an ONNX Runtime session so each call takes ≥ 30 ms and records its batch size."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self.batch_sizes: list[int] = []

    def run(self, outputs: Any, feeds: dict[str, np.ndarray]) -> Any:
        self.batch_sizes.append(len(next(iter(feeds.values()))))
        time.sleep(0.03)
        return self._session.run(outputs, feeds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def test_runtime_predict_batches_concurrent_calls_with_unchanged_results(tmp_path: Path) -> None:
    """16 concurrent ``predict`` calls coalesce into fewer ONNX calls and match unbatched results."""
    from fhir_mappings.signal_spec import MODEL_LEADS

    build_toy_model_dir(tmp_path / "m")
    plain = ModelRuntime.load(tmp_path / "m", ["CPUExecutionProvider"])
    batched = ModelRuntime.load(tmp_path / "m", ["CPUExecutionProvider"], batch_max_wait_ms=5)
    slow = SlowSession(batched._session)
    batched._session = slow
    rng = np.random.default_rng(3)
    inputs = [
        _Inputs(
            _Ecg(rng.normal(0, 0.4, (1000, 12)).astype(np.float32), 100.0, tuple(MODEL_LEADS)),
            {"sex": float(i % 2), "age": 40.0 + i, "heart_rate": None},
        )
        for i in range(16)
    ]
    expected = [[p.probability for p in plain.predict(x)] for x in inputs]
    barrier = threading.Barrier(16)

    def call(x: _Inputs) -> list[float]:
        barrier.wait()
        return [p.probability for p in batched.predict(x, deadline=time.monotonic() + 10)]

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(call, inputs))
    np.testing.assert_allclose(np.array(got), np.array(expected), atol=1e-6)
    n_windows = batched.manifest.ecg.n_windows
    assert max(slow.batch_sizes) > n_windows  # more than one ECG in some call
    assert batched.calls == len(slow.batch_sizes) < 16
    assert sum(slow.batch_sizes) == 16 * n_windows
    batched.close()
    assert batched.batcher is not None and batched.batcher.closed
    assert plain.batcher is None
