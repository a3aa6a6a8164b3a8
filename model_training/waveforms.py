"""MIMIC-IV-ECG WFDB records → the (N, 1000, 12) float32 waveform memmap, in parallel and resumable.

Each record is read with ``wfdb.rdrecord``, its leads are matched by the header's signal names
(never by position) and it goes through :func:`cds_service.ecg.prepare.prepare_ecg_batch`, the
same code the service runs (:func:`~cds_service.ecg.prepare.prepare_ecg` is its batch of one, so
the output is bit-identical).

Resumability: the memmap is created once with :func:`numpy.lib.format.open_memmap`; a status file
(``ecg_status.npy``, one byte per record: 0 to do, 1 done, ≥2 failed with a reason) is updated
after each chunk, once the chunk's rows are flushed. An interrupted run therefore resumes at the
first chunk not marked done. Records whose signal cannot be used (a lead missing or all-NaN, too
short, unreadable) are marked failed and later removed by :func:`compact`; a *missing* file is
bad input and stops the run with an :class:`InputError` naming it.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from numpy.lib.format import open_memmap
from tqdm import tqdm

from cds_service.ecg.prepare import prepare_ecg_batch
from cds_service.ecg.record import EcgRejected
from fhir_mappings.errors import InputError
from fhir_mappings.signal_spec import MODEL_LEADS, TARGET_SAMPLES

logger = logging.getLogger(__name__)

PENDING, DONE = 0, 1
FAILURE_REASONS: tuple[str, ...] = (
    "unreadable",
    "unknown_units",
    "bad_shape",
    "bad_fs",
    "missing_leads",
    "duplicate_leads",
    "non_finite",
    "too_short",
)
"""Status code ``2 + i`` means the record failed for ``FAILURE_REASONS[i]`` (reasons of
:data:`cds_service.ecg.record.REASONS`; the order is part of the status file format)."""

VOLT_FACTORS: dict[str, float] = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "v": 1000.0}
"""WFDB ``units`` (lower case) → factor to mV."""

CHUNK: int = 64
"""Records per work unit: large enough to batch the resampling, small enough to resume cheaply."""


def _code(reason: str) -> int:
    return 2 + FAILURE_REASONS.index(reason)


def read_record(path: Path) -> tuple[np.ndarray, float, tuple[str, ...]]:
    """Read one WFDB record (``path`` without extension) as (T, C) float64 mV, fs and lead names.

    Raises:
        InputError: when the header or a signal file is missing (named).
        EcgRejected: ``unreadable`` for a corrupt record, ``unknown_units`` for a non-voltage unit.
    """
    import wfdb

    try:
        record = wfdb.rdrecord(str(path))
    except FileNotFoundError as exc:
        raise InputError(f"WFDB file not found: {exc.filename or path}") from exc
    except (OSError, ValueError, IndexError, TypeError) as exc:
        raise EcgRejected("unreadable", f"{path}: cannot read WFDB record ({exc})") from exc
    if record.p_signal is None or record.sig_name is None:
        raise EcgRejected("unreadable", f"{path}: WFDB record has no physical signal")
    signal = np.asarray(record.p_signal, dtype=np.float64)
    units = record.units or ["mV"] * signal.shape[1]
    factors = []
    for name, unit in zip(record.sig_name, units, strict=True):
        factor = VOLT_FACTORS.get(str(unit).strip().lower())
        if factor is None:
            raise EcgRejected("unknown_units", f"{path}: lead {name} is in {unit!r}, not a voltage")
        factors.append(factor)
    if any(f != 1.0 for f in factors):
        signal = signal * np.asarray(factors)
    return signal, float(record.fs), tuple(str(n) for n in record.sig_name)


def _convert_chunk(job: tuple[str, str, list[tuple[int, str]]]) -> list[tuple[int, int]]:
    """Worker: convert the records of one chunk into the memmap; returns (index, status) pairs."""
    npy_path, root, items = job
    out = np.load(npy_path, mmap_mode="r+")
    status: dict[int, int] = {}
    groups: dict[tuple[float, int, tuple[str, ...]], list[tuple[int, np.ndarray]]] = {}
    for index, rel in items:
        try:
            signal, fs, names = read_record(Path(root) / rel)
        except EcgRejected as exc:
            status[index] = _code(exc.reason)
            continue
        groups.setdefault((fs, signal.shape[0], names), []).append((index, signal))
    for (fs, _, names), members in groups.items():
        try:
            prepared = prepare_ecg_batch(np.stack([s for _, s in members]), fs, names)
            results = [(index, prepared[k], DONE) for k, (index, _) in enumerate(members)]
        except EcgRejected:
            # find the culprit(s): prepare one by one (same code path, batch of one)
            results = []
            for index, signal in members:
                try:
                    results.append((index, prepare_ecg_batch(signal[np.newaxis], fs, names)[0], DONE))
                except EcgRejected as exc:
                    results.append(
                        (
                            index,
                            np.full((TARGET_SAMPLES, len(MODEL_LEADS)), np.nan, np.float32),
                            _code(exc.reason),
                        )
                    )
        for index, rows, code in results:
            out[index] = rows
            status[index] = code
    out.flush()
    del out
    return sorted(status.items())


def _chunks(todo: np.ndarray, paths: Sequence[str]) -> Iterator[list[tuple[int, str]]]:
    for start in range(0, len(todo), CHUNK):
        yield [(int(i), paths[int(i)]) for i in todo[start : start + CHUNK]]


def open_outputs(npy_path: Path, status_path: Path, n: int) -> np.memmap:
    """Open (or create) the memmap and its status array; returns the status array (read-write memmap).

    An existing pair is reused only when both match ``n`` records; otherwise both start afresh.
    """
    shape = (n, TARGET_SAMPLES, len(MODEL_LEADS))
    if npy_path.is_file() and status_path.is_file():
        try:
            existing = np.load(npy_path, mmap_mode="r")
            status = np.load(status_path, mmap_mode="r+")
            if existing.shape == shape and existing.dtype == np.float32 and status.shape == (n,):
                assert isinstance(status, np.memmap)
                return status
        except (ValueError, OSError):
            logger.warning("waveform progress in %s is unreadable; starting over", npy_path.parent)
    open_memmap(npy_path, mode="w+", dtype=np.float32, shape=shape).flush()
    status = open_memmap(status_path, mode="w+", dtype=np.uint8, shape=(n,))
    status.flush()
    return status


def convert(
    root: Path,
    rel_paths: Sequence[str],
    npy_path: Path,
    status_path: Path,
    *,
    workers: int = 1,
    progress: bool = True,
) -> dict[str, int]:
    """Convert every record not yet done; resumes from ``status_path``.

    Args:
        root: the MIMIC-IV-ECG release folder (``record_list.csv``'s ``path`` is relative to it).
        rel_paths: record path of each memmap row, without extension.
        npy_path: the (N, 1000, 12) float32 memmap.
        status_path: the per-record status array.
        workers: worker processes (1 = convert in this process).
        progress: show a tqdm bar.

    Returns:
        ``done`` plus the count of each failure reason over all records.

    Raises:
        InputError: naming a missing WFDB file (the progress made so far is kept).
    """
    status = open_outputs(npy_path, status_path, len(rel_paths))
    todo = np.flatnonzero(status == PENDING)
    if len(todo) < len(rel_paths):
        logger.info(
            "resuming waveform conversion: %d of %d records already done",
            len(rel_paths) - len(todo),
            len(rel_paths),
        )
    jobs = ((str(npy_path), str(root), chunk) for chunk in _chunks(todo, rel_paths))
    bar = tqdm(total=len(todo), unit="ecg", desc="waveforms", disable=None if progress else True)
    try:
        if workers <= 1:
            results: Iterator[list[tuple[int, int]]] = map(_convert_chunk, jobs)
            _drain(results, status, bar)
        else:
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(workers) as pool:
                _drain(pool.imap_unordered(_convert_chunk, jobs), status, bar)
    finally:
        bar.close()
        status.flush()
    counts = {"done": int((status == DONE).sum())}
    for i, reason in enumerate(FAILURE_REASONS):
        counts[reason] = int((status == 2 + i).sum())
    return counts


def _drain(results: Iterator[list[tuple[int, int]]], status: np.memmap, bar: tqdm) -> None:
    """Record each finished chunk's statuses (after its rows were flushed by the worker)."""
    for pairs in results:
        for index, code in pairs:
            status[index] = code
        status.flush()
        bar.update(len(pairs))


def compact(npy_path: Path, keep: np.ndarray) -> int:
    """Remove the rows of failed records from the memmap in place; returns the new row count.

    Rows move towards the start (row j ← row i, j ≤ i), then the ``.npy`` header is rewritten for
    the smaller shape (same header length) and the file truncated. No second copy of the array is
    needed, which matters at MIMIC scale (~38 GB).
    """
    arr = np.load(npy_path, mmap_mode="r+")
    kept = np.flatnonzero(keep)
    for j, i in enumerate(kept.tolist()):
        if i != j:
            arr[j] = arr[i]
    arr.flush()
    n = len(kept)
    offset = arr.offset
    del arr
    with npy_path.open("r+b") as fh:
        version = np.lib.format.read_magic(fh)
        header_start = fh.tell()
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                  "shape": (n, TARGET_SAMPLES, len(MODEL_LEADS))}  # fmt: skip
        text = repr(header).encode("latin1")
        length_bytes = 2 if version == (1, 0) else 4
        room = offset - header_start - length_bytes
        if len(text) + 1 > room:
            raise ValueError(f"{npy_path}: header has no room for shape {header['shape']}")
        fh.seek(header_start + length_bytes)
        fh.write(text + b" " * (room - len(text) - 1) + b"\n")
        fh.truncate(offset + n * TARGET_SAMPLES * len(MODEL_LEADS) * 4)
    return n
