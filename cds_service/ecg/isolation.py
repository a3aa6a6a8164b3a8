"""ECG decoding (bytes → the model's leads) in a small pool of worker processes, abandoned at a deadline.

Decoding is CPU work in pure Python and C (pydicom, wfdb, XML parsers, vendor decompressors,
numpy) that holds the GIL. Run on a request thread, a hostile file would hold that thread past the
hook's budget and slow every other call of the same server process. Here it runs in a worker
process instead: the request thread only waits on a pipe (GIL released) until the deadline, and a
decode still running then is abandoned — ``EcgRejected("decode_timeout")`` for that ECG — and its
process is killed and replaced, so it cannot keep burning CPU.

* :class:`DecodeJob` — everything one decode needs, as plain picklable data: the file's bytes and
  format hint, or the named ``valueSampledData`` components, plus the read limits, lead aliases
  and minimum duration. Fetching attachment URLs stays in the caller (it needs the FHIR client).
* :func:`decode` — the decode itself (:func:`~cds_service.ecg.readers.read_file` or
  :func:`~cds_service.ecg.readers.sampled_data.read_leads`, then
  :func:`~cds_service.ecg.canonical.to_model_leads`), in whatever process calls it. The model's
  10 s / 100 Hz preparation stays with the runtime: its cost is fixed by the bounded decoded
  signal, not by the file.
* :class:`Decoder` — owned by the app (created at start, :meth:`Decoder.close` at shutdown):
  ``processes`` worker processes (``ECGLAB_ECG_DECODE_PROCESSES``; 0 decodes in the calling
  process), started lazily or by :meth:`Decoder.warm_up`. Each worker has its own pipe, so one
  stuck worker is killed without disturbing the others; a decode waits for a free worker only
  until its deadline. Workers are forked from a ``forkserver`` that has imported the readers (and
  pydicom and wfdb), so a replacement is ready in milliseconds; where ``forkserver`` is
  unavailable they are spawned.

**Outcomes.** A reader's rejection keeps its reason; any other exception in the worker, a worker
that dies (a crash, the kernel's OOM killer) or a broken pipe is ``unreadable`` for that ECG and
the worker is replaced. Nothing here raises anything but :class:`EcgRejected` for a bad file.

**What is decoded in the calling process.** ``valueSampledData`` jobs of at most
``inline_chars`` characters of sample text (default :data:`INLINE_CHARS`, 16 KiB: a 2.5 s 12-lead
strip at 100 Hz). That text is already in memory as parsed JSON and its decoding is vectorised
numpy, linear in its size (``benchmarks/ecg_decode.py``, ``ecg_decode_inline_max_ms_p50``: about
3 ms at this size), so it cannot hold the GIL for long, and a worker would add a copy and two pipe
transfers (4 to 8 ms, ``ecg_decode_pool_overhead_ms``) to a decode no longer than that. Larger
payloads and files go to a worker, whatever their size: file readers are the code whose cost on
hostile bytes motivates the pool.

As with any ``forkserver``/``spawn`` pool, a program that creates a :class:`Decoder` from a script
needs the ``if __name__ == "__main__":`` guard (workers import the main module); gunicorn workers,
the ``ecglab`` command and pytest have it.
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import queue
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from cds_service.ecg.canonical import to_model_leads
from cds_service.ecg.readers import read_file
from cds_service.ecg.readers.sampled_data import LeadComponent, read_leads, sample_chars
from cds_service.ecg.record import EcgRecording, EcgRejected, ReadLimits

__all__ = ["DEFAULT_PROCESSES", "INLINE_CHARS", "MAX_DECODE_S", "DecodeJob", "Decoder", "decode"]

log = logging.getLogger(__name__)

DEFAULT_PROCESSES: int = 2
"""Worker processes of a :class:`Decoder` unless configured (``ECGLAB_ECG_DECODE_PROCESSES``)."""

INLINE_CHARS: int = 16 * 1024
"""``valueSampledData`` with at most this many characters of sample text is decoded in-process."""

MAX_DECODE_S: float = 30.0
"""Longest a decode may run when the caller gives no deadline (command-line paths)."""

PRELOAD: tuple[str, ...] = ("cds_service.ecg.isolation", "pydicom", "wfdb")
"""Modules the forkserver imports once, so that every worker forked from it starts warm."""

_STOP_WAIT_S = 2.0


@dataclass(frozen=True)
class DecodeJob:
    """One ECG to decode: a file (``data`` + ``hint``) or named ``valueSampledData`` (``leads``)."""

    limits: ReadLimits
    aliases: Mapping[str, Sequence[str]]
    min_duration_s: float
    data: bytes | None = None
    hint: str | None = None
    leads: tuple[LeadComponent, ...] = ()

    @property
    def inline_size(self) -> int | None:
        """Characters of sample text of a ``valueSampledData`` job; ``None`` for a file."""
        return None if self.data is not None else sample_chars(self.leads)


Work = Callable[[DecodeJob], EcgRecording]
"""What a worker runs on a job (:func:`decode`; tests substitute a module-level function)."""


def decode(job: DecodeJob) -> EcgRecording:
    """Decode ``job`` in this process: read it, then name, derive and check the 12 model leads.

    Raises:
        EcgRejected: whatever the reader or :func:`~cds_service.ecg.canonical.to_model_leads`
            rejects (a reader's unexpected exception is already ``unreadable``).
    """
    if job.data is not None:
        recording = read_file(job.data, job.limits, job.hint)
    else:
        recording = read_leads(job.leads, job.limits)
    return to_model_leads(recording, job.aliases, min_duration_s=job.min_duration_s)


def _serve(conn: Connection, work: Work) -> None:
    """A worker's loop: receive a job, answer ``("ok", recording)``, ``("rejected", reason, text)``
    or ``("error", exception type)``; return when the parent closes the pipe."""
    signal.signal(
        signal.SIGINT, signal.SIG_IGN
    )  # Ctrl-C reaches the whole process group; the parent stops us
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        reply: tuple[Any, ...]
        try:
            reply = ("ok", work(job))
        except EcgRejected as exc:
            reply = ("rejected", exc.reason, str(exc))
        except Exception as exc:  # any failure on hostile input is an answer, never a dead worker
            reply = ("error", type(exc).__name__)
        try:
            conn.send(reply)
        except (OSError, pickle.PicklingError):
            return


class _Worker:
    """One worker process and the parent's end of its pipe; used by one thread at a time."""

    def __init__(self, context: multiprocessing.context.BaseContext, work: Work) -> None:
        self._context = context
        self._work = work
        self._process: Any = None
        self._conn: Connection | None = None

    @property
    def alive(self) -> bool:
        """Whether the process is started and running."""
        return self._process is not None and self._process.is_alive()

    def start(self) -> None:
        """Start the process unless it runs already."""
        if self.alive:
            return
        self.stop()
        parent, child = self._context.Pipe(duplex=True)
        process = self._context.Process(  # type: ignore[attr-defined]
            target=_serve, args=(child, self._work), name="ecglab-ecg-decoder", daemon=True
        )
        process.start()
        child.close()
        self._process, self._conn = process, parent

    def stop(self) -> None:
        """Kill the process (if any) and close the pipe; a later :meth:`start` makes a new one."""
        process, conn = self._process, self._conn
        self._process, self._conn = None, None
        if conn is not None:
            conn.close()
        if process is not None:
            if process.is_alive():
                process.kill()
            process.join(_STOP_WAIT_S)
            if process.exitcode is not None:  # a process the kernel has not reaped yet is left to it
                process.close()

    def run(self, job: DecodeJob, deadline: float) -> tuple[Any, ...]:
        """Send ``job`` and wait for the reply until ``deadline`` (:func:`time.monotonic`).

        Returns the worker's reply, ``("timeout",)`` past the deadline or ``("died",)`` when the
        process ended or the pipe broke; in those two cases the process is killed and replaced.
        """
        self.start()
        assert self._conn is not None
        try:
            self._conn.send(job)
            if not self._conn.poll(max(deadline - time.monotonic(), 0.0)):
                self._replace()
                return ("timeout",)
            reply: tuple[Any, ...] = self._conn.recv()
            return reply
        except (EOFError, OSError):
            self._replace()
            return ("died",)

    def _replace(self) -> None:
        """Kill the process and start its successor (a failed start is retried on next use)."""
        self.stop()
        try:
            self.start()
        except Exception:  # retried on next use; that use falls back (Decoder.decode)
            log.exception("could not start a replacement ECG decoder process")


class Decoder:
    """Decodes ECG jobs in ``processes`` worker processes (0: in the calling process).

    Thread-safe: request threads share one instance. Each decode holds one worker until it
    answers or its deadline passes; a worker past the deadline, or one that died, is killed and
    replaced (:attr:`replaced` counts them). When a worker process cannot be started at all, the
    decode runs in the calling process and the failure is logged once (:attr:`start_failures`).
    """

    def __init__(
        self,
        processes: int = DEFAULT_PROCESSES,
        *,
        inline_chars: int = INLINE_CHARS,
        max_decode_s: float = MAX_DECODE_S,
        work: Work = decode,
        start_method: str | None = None,
    ) -> None:
        if processes < 0:
            raise ValueError(f"processes must be 0 or more, got {processes}")
        self.processes = processes
        self.inline_chars = inline_chars
        self.max_decode_s = max_decode_s
        self.replaced = 0
        self.start_failures = 0
        self._work = work
        self._closed = False
        self._lock = threading.Lock()
        self._idle: queue.LifoQueue[_Worker] = queue.LifoQueue()
        self._warming = threading.Event()
        if processes:
            context = _context(start_method)
            for _ in range(processes):
                self._idle.put(_Worker(context, work))

    def __enter__(self) -> Decoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def warm_up(self, *, background: bool = False) -> None:
        """Start every idle worker now (app start), so the first ECG does not wait for one.

        The first start in a server process also starts the forkserver, which imports the readers,
        pydicom and wfdb (a second or two, more on a loaded machine); ``background=True`` does it
        on a daemon thread. A decode arriving meanwhile runs in the calling process: waiting for
        the workers would cost the first calls after start-up their whole budget.
        """
        if background:
            self._warming.set()
            threading.Thread(target=self._warm_up, name="ecglab-ecg-warm-up", daemon=True).start()
            return
        self._warm_up()

    def _warm_up(self) -> None:
        workers = self._drain()
        try:
            for worker in workers:
                worker.start()
        except Exception as exc:  # decodes fall back to this process (see _start_failed)
            self._start_failed(exc)
        finally:
            for worker in workers:
                self._release(worker)
            self._warming.clear()

    def decode(self, job: DecodeJob, deadline: float | None = None) -> EcgRecording:
        """The decoded recording of ``job``, abandoned at ``deadline`` (:func:`time.monotonic`).

        Without a deadline a decode may run :attr:`max_decode_s` seconds.

        Raises:
            EcgRejected: the reader's rejection; ``decode_timeout`` when no worker was free or the
                decode did not finish by the deadline; ``unreadable`` when the worker failed.
        """
        if self._closed:
            raise RuntimeError("the ECG decoder is closed")
        inline = job.inline_size
        if self.processes == 0 or (inline is not None and inline <= self.inline_chars):
            return self._work(job)
        if self._warming.is_set():  # start-up: the workers are not there yet (see warm_up)
            return self._work(job)
        now = time.monotonic()
        end = now + self.max_decode_s if deadline is None else min(deadline, now + self.max_decode_s)
        if end <= now:
            raise EcgRejected("decode_timeout", "no time left in the budget to decode this ECG")
        worker = self._acquire(end)
        try:
            reply = worker.run(job, end)
        except Exception as exc:  # the worker process could not be started at all
            self._start_failed(exc)
            return self._work(job)
        finally:
            self._release(worker)
        return self._answer(reply)

    def close(self) -> None:
        """Stop every worker process (idle ones now, busy ones when their decode returns)."""
        with self._lock:
            self._closed = True
        for worker in self._drain():
            worker.stop()

    # -- internals ------------------------------------------------------------------------------
    def _answer(self, reply: tuple[Any, ...]) -> EcgRecording:
        """The recording of a worker's reply, or the matching :class:`EcgRejected`."""
        kind = reply[0]
        if kind == "ok":
            recording: EcgRecording = reply[1]
            return recording
        if kind == "rejected":
            raise EcgRejected(str(reply[1]), str(reply[2]))
        if kind == "timeout":
            self._count_replaced()
            log.warning("ECG decode passed its deadline; worker process killed and replaced")
            raise EcgRejected("decode_timeout", "decoding did not finish within the time budget")
        if kind == "died":
            self._count_replaced()
            log.warning("ECG decoder process died while decoding; replaced")
            raise EcgRejected("unreadable", "the decoder process ended while decoding this file")
        log.warning("ECG decoder raised %s", str(reply[1])[:64])
        raise EcgRejected("unreadable", f"decoding failed ({str(reply[1])[:64]})")

    def _start_failed(self, exc: Exception) -> None:
        """A worker process could not be started: say so once, loudly. The decode that needed it
        runs in the calling process instead (no isolation, but the ECG is still read): a service
        whose processes cannot start must not reject every ECG. Typical cause: the service was
        started from a script that creates the app at import time without an
        ``if __name__ == "__main__":`` guard, which ``forkserver`` and ``spawn`` need."""
        with self._lock:
            first, self.start_failures = self.start_failures == 0, self.start_failures + 1
        if first:
            log.error(
                "ECG decoder processes cannot start (%s: %s); decoding in the request thread without "
                "isolation. Start the service through 'ecglab serve' or behind a __main__ guard.",
                type(exc).__name__,
                str(exc).strip().splitlines()[0][:120] if str(exc).strip() else "",
            )

    def _count_replaced(self) -> None:
        with self._lock:
            self.replaced += 1

    def _acquire(self, end: float) -> _Worker:
        """A free worker, waiting at most until ``end``."""
        try:
            return self._idle.get(timeout=max(end - time.monotonic(), 0.0))
        except queue.Empty:
            raise EcgRejected(
                "decode_timeout", "no ECG decoder process became free within the time budget"
            ) from None

    def _release(self, worker: _Worker) -> None:
        """Return ``worker`` to the idle set (or stop it when the decoder is closed)."""
        with self._lock:
            closed = self._closed
        if closed:
            worker.stop()
        else:
            self._idle.put(worker)

    def _drain(self) -> list[_Worker]:
        """Take every idle worker out of the idle set."""
        workers = []
        while True:
            try:
                workers.append(self._idle.get_nowait())
            except queue.Empty:
                return workers


def _context(start_method: str | None) -> multiprocessing.context.BaseContext:
    """The multiprocessing context: ``forkserver`` preloading :data:`PRELOAD`, else ``spawn``."""
    methods = multiprocessing.get_all_start_methods()
    method = start_method or ("forkserver" if "forkserver" in methods else "spawn")
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(list(PRELOAD))
    return context
