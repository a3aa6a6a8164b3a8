"""One writer thread that stores rows after the hook call was answered (audit rows, cached predictions).

A hook call must not wait for a database write it does not need for its answer, so the audit
trail and the prediction cache hand their rows to a :class:`BackgroundWriter`: one thread, writes
in submission order, a failure logged by the caller's function and never raised into the call.
``flush`` waits for what was queued so far (tests, shutdown); ``close`` writes what is queued, up
to a time limit, and stops the thread. Work submitted after ``close`` is refused (``submit``
answers False) so a shutting-down app drops rows with a log line instead of raising.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any


class BackgroundWriter:
    """A single writer thread named ``ecglab-<name>``."""

    def __init__(self, name: str) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ecglab-{name}")

    def submit(self, write: Callable[..., Any], *args: Any) -> bool:
        """Queue ``write(*args)``; False when the writer is closed (nothing was queued)."""
        try:
            self._pool.submit(write, *args)
        except RuntimeError:
            return False
        return True

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until what was queued so far is written; False when ``timeout_s`` ran out first."""
        try:
            marker = self._pool.submit(lambda: None)
        except RuntimeError:  # closed: close() waited for the queue already
            return True
        try:
            marker.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            return False
        return True

    def close(self, timeout_s: float = 5.0) -> bool:
        """Write what is queued (up to ``timeout_s``), then stop the thread; False when rows were dropped."""
        written = self.flush(timeout_s)
        self._pool.shutdown(wait=False, cancel_futures=True)
        return written
