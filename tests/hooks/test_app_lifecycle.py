"""The app owns its thread pools, audit writer and database: it closes them itself, safely.

``cds_service.app._close_when_collected`` is the app's finalizer. The garbage collector runs it on
whichever thread happened to allocate, possibly inside ``ThreadPoolExecutor.submit`` with the
pools' shared lock held; closing in place there deadlocked that thread (seen in CI: a hook worker
collected an older app mid-submit and the suite hung). These tests pin that the close happens,
and that it never runs on the collecting thread.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.thread as pool_module
import gc
import threading
import time

import pytest

from cds_service.app import _close_when_collected, create_app
from tests.service_fixtures import FakeRuntime, ServiceEnv


def _until_refused(pool: concurrent.futures.ThreadPoolExecutor, timeout_s: float = 10.0) -> bool:
    """Whether ``pool`` refuses new work within ``timeout_s`` (it was shut down)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            pool.submit(int).result(timeout=timeout_s)
        except RuntimeError:
            return True
        time.sleep(0.02)
    return False


def test_the_app_closes_its_pools_itself(service_env: ServiceEnv) -> None:
    """``close()`` runs by itself once the app is garbage-collected: its pools stop taking work."""
    app = create_app(service_env.settings(), runtime=FakeRuntime())
    deps = app.extensions["ecglab"].pipeline.deps
    pools = (deps.executor, deps.fhir_executor)
    assert all(pool.submit(int).result(timeout=5) == 0 for pool in pools)
    del app
    gc.collect()
    assert all(_until_refused(pool) for pool in pools)


def test_collection_inside_a_pool_submit_does_not_deadlock(service_env: ServiceEnv) -> None:
    """The finalizer returns at once even when the collecting thread holds the pools' shared lock.

    With audit on, closing flushes the audit writer through ``submit``, which takes the same
    non-reentrant lock: run in place, the finalizer would never return.
    """
    app = create_app(service_env.settings(audit=True), runtime=FakeRuntime())
    state = app.extensions["ecglab"]
    assert state.audit.enabled
    returned = threading.Event()

    def collect_mid_submit() -> None:
        with pool_module._global_shutdown_lock:  # what submit holds when a collection starts
            _close_when_collected(state)
        returned.set()

    worker = threading.Thread(target=collect_mid_submit, daemon=True)
    worker.start()
    assert returned.wait(5), "the finalizer blocked the collecting thread"
    assert _until_refused(state.pipeline.deps.executor)
    with pytest.raises(RuntimeError):
        state.pipeline.deps.fhir_executor.submit(int)


def test_the_background_writer_writes_in_order_and_refuses_after_close() -> None:
    """Audit rows and cached predictions: written in submission order; ``close`` writes what is
    queued first; later work is refused (``submit`` answers False) rather than raised."""
    from cds_service.background_writer import BackgroundWriter

    written: list[int] = []
    gate = threading.Event()
    writer = BackgroundWriter("test")
    assert writer.submit(lambda: gate.wait(5))
    for n in range(5):
        assert writer.submit(written.append, n)
    assert not writer.flush(timeout_s=0.05), "the gate holds the queue"
    gate.set()
    assert writer.close(timeout_s=5)
    assert written == [0, 1, 2, 3, 4]
    assert not writer.submit(written.append, 5)
    assert writer.flush() and written == [0, 1, 2, 3, 4]
