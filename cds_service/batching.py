"""Micro-batching: concurrent request threads of one worker share one ONNX Runtime call.

A gunicorn ``gthread`` worker answers several hook calls at once, and each used to run the model
on its own 4 windows. ONNX Runtime on a CPU does far more ECGs per second in one batched call than
in many small concurrent ones (the GEMMs get wide enough to use the cores well, and the calls stop
fighting over the same threads), so :class:`MicroBatcher` lets the request threads hand their
prepared inputs to one batch thread that coalesces them:

* **bounded wait**: the batch thread waits at most ``max_wait_s`` (default 5 ms) for more items
  to arrive, never more than half of any queued caller's time from queueing to its deadline, and
  never so long that the previous batch's run time would no longer fit before that deadline. The
  wait is only spent under concurrency
  (when more than one item is queued, or the previous batch held more than one); a lone request
  on an idle worker runs at once and pays nothing;
* **bounded batch**: at most ``max_batch`` items (default 32) per call; the rest wait for the
  next one;
* **deadlines**: :meth:`MicroBatcher.submit` never blocks past the caller's deadline (a
  ``time.monotonic()`` value). An item whose caller gave up before its batch started is dropped
  from the queue; one whose batch is already running is computed and discarded;
* **failures**: when the batch function raises, every waiter of that batch gets a
  :class:`BatchFailed` chained to the original error;
* **shutdown**: :meth:`MicroBatcher.close` refuses new items, lets the batch thread finish what
  is queued and joins it. The thread is started on first use and again after a ``fork`` (a
  forked child inherits no threads), so a batcher built before a fork still works in the child.

The module is generic over the item type: the caller provides ``run(items) -> array`` whose row
``i`` is item ``i``'s result (:class:`cds_service.inference.ModelRuntime` stacks prepared ECGs and
metadata into one ``predict_prepared`` call).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_MAX_WAIT_S = 0.005
DEFAULT_MAX_BATCH = 32


class BatchDeadlineExceeded(TimeoutError):
    """The caller's deadline passed before its result was ready."""


class BatchFailed(RuntimeError):
    """The batch this item ran in failed; ``__cause__`` holds the batch function's error."""


class BatcherClosed(RuntimeError):
    """The batcher was closed; it takes no new items."""


@dataclass(eq=False)
class _Pending(Generic[T]):
    """One submitted item and the slot its waiter reads the outcome from."""

    item: T
    deadline: float | None
    queued_at: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    result: np.ndarray | None = None
    error: BaseException | None = None
    abandoned: bool = False


@dataclass(frozen=True)
class BatchStats:
    """Counters since the batcher was made: batch calls, items run, largest batch, dropped items."""

    batches: int
    items: int
    largest: int
    expired: int


class MicroBatcher(Generic[T]):
    """Coalesces items submitted by concurrent threads into calls of ``run``; see the module docstring."""

    def __init__(
        self,
        run: Callable[[Sequence[T]], np.ndarray],
        *,
        max_wait_s: float = DEFAULT_MAX_WAIT_S,
        max_batch: int = DEFAULT_MAX_BATCH,
        name: str = "ecglab-batcher",
    ) -> None:
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._run = run
        self.max_wait_s = max_wait_s
        self.max_batch = max_batch
        self._name = name
        self._closed = False
        self._reset_after_fork()

    def _reset_after_fork(self) -> None:
        """Fresh lock, queue and (not yet started) thread for the current process."""
        self._pid = os.getpid()
        self._cond = threading.Condition()
        self._queue: deque[_Pending[T]] = deque()
        self._thread: threading.Thread | None = None
        self._last_batch = 0
        self._last_run_s = 0.0
        self._batches = self._items = self._largest = self._expired = 0

    # -- callers --------------------------------------------------------------------------------
    def submit(self, item: T, deadline: float | None = None) -> np.ndarray:
        """Queue ``item``, block until its batch has run and return its row of the result.

        ``deadline`` is a ``time.monotonic()`` instant (``None``: wait as long as the batch takes).
        Raises :class:`BatchDeadlineExceeded` when it passes first, :class:`BatchFailed` when the
        batch function raised, :class:`BatcherClosed` after :meth:`close`.
        """
        if os.getpid() != self._pid:
            self._reset_after_fork()
        pending: _Pending[T] = _Pending(item, deadline)
        with self._cond:
            if self._closed:
                raise BatcherClosed(f"{self._name} is closed")
            if deadline is not None and time.monotonic() >= deadline:
                self._expired += 1
                raise BatchDeadlineExceeded("the deadline passed before the item was queued")
            self._queue.append(pending)
            self._ensure_thread()
            self._cond.notify_all()
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        if not pending.done.wait(timeout):
            with self._cond:
                if not pending.done.is_set():
                    pending.abandoned = True
                    if pending in self._queue:
                        self._queue.remove(pending)
                    self._expired += 1
                    raise BatchDeadlineExceeded("the deadline passed before the batch finished")
        if pending.error is not None:
            raise BatchFailed(f"the batched model call failed: {pending.error}") from pending.error
        assert pending.result is not None
        return pending.result

    def close(self, timeout: float | None = 10.0) -> None:
        """Take no new items, run what is queued, and wait up to ``timeout`` s for the thread to end."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def queued(self) -> int:
        """Items waiting for a batch (not counting the one being run)."""
        with self._cond:
            return len(self._queue)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def stats(self) -> BatchStats:
        """The counters so far (for tests, benchmarks and logs)."""
        with self._cond:
            return BatchStats(self._batches, self._items, self._largest, self._expired)

    # -- the batch thread -----------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        """Start the batch thread if it is not running (caller holds the lock)."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        """Take batches off the queue and run them until closed and drained."""
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._execute(batch)

    def _next_batch(self) -> list[_Pending[T]] | None:
        """Block until a batch is due; ``None`` once closed with nothing left."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            concurrent = len(self._queue) > 1 or self._last_batch > 1
            if concurrent and self.max_wait_s > 0 and not self._closed:
                self._gather()
            batch: list[_Pending[T]] = []
            while self._queue and len(batch) < self.max_batch:
                pending = self._queue.popleft()
                if pending.abandoned:
                    continue
                batch.append(pending)
            self._last_batch = len(batch)
            return batch

    def _gather(self) -> None:
        """Wait (lock held, released while waiting) for the queue to fill, up to the bounded wait.

        The wait ends ``max_wait_s`` after it began, when the batch is full, on close, or at a
        queued item's limit: halfway from its queueing to its deadline, and no later than its
        deadline less the previous batch's run time.
        """
        end = time.monotonic() + self.max_wait_s
        while len(self._queue) < self.max_batch and not self._closed:
            limits = [
                min(p.queued_at + (p.deadline - p.queued_at) / 2, p.deadline - self._last_run_s)
                for p in self._queue
                if p.deadline is not None
            ]
            until = min([end, *limits])
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            self._cond.wait(remaining)

    def _execute(self, batch: list[_Pending[T]]) -> None:
        """Run one batch outside the lock and hand every waiter its row or the error."""
        if not batch:
            return
        started = time.monotonic()
        try:
            out = np.asarray(self._run([p.item for p in batch]))
            if out.shape[:1] != (len(batch),):
                raise ValueError(f"the batch function returned {out.shape[:1]} rows for {len(batch)} items")
        except Exception as exc:  # delivered to every waiter; the thread keeps serving
            log.warning("batched model call of %d item(s) failed: %s", len(batch), exc)
            for pending in batch:
                pending.error = exc
                pending.done.set()
        else:
            for i, pending in enumerate(batch):
                pending.result = out[i]
                pending.done.set()
        with self._cond:
            self._last_run_s = time.monotonic() - started
            self._batches += 1
            self._items += len(batch)
            self._largest = max(self._largest, len(batch))
