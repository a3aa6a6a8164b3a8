"""WFDB records (``.hea`` header + ``.dat`` signal files) shipped as a zip → :class:`EcgRecording`.

MIMIC-IV-ECG and PTB-XL distribute WFDB records; a hospital system that archives them attaches the
record as a zip. The zip is unpacked into a private temporary folder: only ``.hea``/``.dat``
members (at most :data:`MAX_MEMBERS`), stored or deflated, under their base names (no paths, so
nothing escapes the folder). Exactly one header is expected. Physical units come from the header
(``mV``, ``uV``). wfdb is imported lazily (it pulls in pandas).

**Bounded work.** A member's declared sizes are not evidence: members are inflated in steps with a
running byte cap (``ReadLimits.max_unpacked_bytes`` for all members together) and ratio cap
(``max_ratio``), after a first check of the declared sizes that refuses an obvious bomb without
inflating anything. The header is then read alone (``wfdb.rdheader``) and every number that drives
wfdb's work is checked before the signal is read: signal count, rate, signal length (which must be
stated: without it wfdb sizes the signal from the file), samples per frame, skew, byte offset,
gains and baselines, and the storage format (the FLAC formats 508/516/524 are compressed payloads
and refused). Each signal file the header names must be one of the zip's members (a header naming
``../x`` or an absolute path must not make wfdb read outside the folder).
"""

from __future__ import annotations

import io
import re
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from cds_service.ecg.readers.common import (
    MAX_OFFSET,
    MAX_SCALE,
    bounded_float,
    bounded_int,
    build_recording,
    check_counts,
    check_fs,
    check_inflated,
    volt_factor,
)
from cds_service.ecg.record import EcgRecording, EcgRejected, ReadLimits

FORMAT = "wfdb-zip"
"""This reader's format name (``EcgRecording.source_format``, ``ecg.yaml`` attachment formats)."""

MAX_MEMBERS: int = 64
"""Most ``.hea``/``.dat`` members a zip may hold (a record is one header and a few signal files)."""

MAX_SAMPLES_PER_FRAME: int = 16
"""Most samples per frame of one signal (multi-rate records; 12-lead ECGs have 1)."""

SIGNAL_FORMATS: frozenset[str] = frozenset({"8", "16", "24", "32", "61", "80", "160", "212", "310", "311"})
"""WFDB storage formats read; the FLAC formats (508, 516, 524) are compressed and refused."""

_SUFFIXES: frozenset[str] = frozenset({".hea", ".dat"})
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,100}")
_CHUNK = 64 * 1024


def sniff(data: bytes) -> bool:
    """Whether ``data`` is a zip whose directory lists a WFDB ``.hea`` header."""
    if not data.startswith(b"PK\x03\x04"):
        return False
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return any(name.lower().endswith(".hea") for name in archive.namelist())
    except (zipfile.BadZipFile, ValueError, OSError, EOFError):
        return False


def read(data: bytes, limits: ReadLimits) -> EcgRecording:
    """Decode the single WFDB record a zip holds.

    Raises:
        EcgRejected: ``unreadable`` (bad zip, no or several headers, a header wfdb cannot parse or
            that names files outside the zip), ``attachment_too_large`` (unpacks beyond the
            limits), ``unknown_units``, ``bad_fs``, ``bad_shape``, ``too_long``.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = [m for m in archive.infolist() if m.filename and not m.filename.endswith("/")]
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise EcgRejected("unreadable", f"WFDB attachment is not a valid zip ({exc})") from exc
    wanted = [m for m in members if PurePosixPath(m.filename).suffix.lower() in _SUFFIXES]
    if len(wanted) > MAX_MEMBERS:
        raise EcgRejected("unreadable", f"WFDB zip holds {len(wanted)} record files, more than {MAX_MEMBERS}")
    _check_declared(wanted, limits)
    headers = [m for m in wanted if m.filename.lower().endswith(".hea")]
    if len(headers) != 1:
        raise EcgRejected("unreadable", f"WFDB zip must hold exactly one .hea header, found {len(headers)}")
    import wfdb

    with tempfile.TemporaryDirectory(prefix="ecglab-wfdb-") as tmp:
        folder = Path(tmp)
        sizes: dict[str, int] = {}
        produced = 0
        for member in wanted:
            name = PurePosixPath(member.filename.replace("\\", "/")).name
            if not _PLAIN_NAME.fullmatch(name) or name in sizes:
                raise EcgRejected(
                    "unreadable", f"WFDB zip member name {name[:40]!r} is not a plain, unique file name"
                )
            content = _member_bytes(archive, member, limits, produced)
            produced += len(content)
            (folder / name).write_bytes(content)
            sizes[name] = len(content)
        record_name = PurePosixPath(headers[0].filename).stem
        try:
            header = wfdb.rdheader(str(folder / record_name))
            n_cells = _check_header(header, sizes, limits)
            record = wfdb.rdrecord(str(folder / record_name), physical=True)
        except EcgRejected:
            raise
        except (
            OSError,
            ValueError,
            IndexError,
            KeyError,
            TypeError,
            AttributeError,
            ZeroDivisionError,
        ) as exc:
            raise EcgRejected("unreadable", f"WFDB record {record_name!r} cannot be read ({exc})") from exc
    if record.p_signal is None:
        raise EcgRejected("unreadable", f"WFDB record {record_name!r} has no signal")
    signal = np.asarray(record.p_signal, dtype=np.float64)
    if signal.ndim != 2 or signal.size > n_cells:
        raise EcgRejected(
            "bad_shape", f"WFDB record {record_name!r} decoded to {signal.shape}, not its header"
        )
    units = [str(u) for u in (record.units or ["mV"] * signal.shape[1])]
    names = [str(n)[:64] for n in record.sig_name]
    columns = [
        signal[:, c] * volt_factor(units[c], f"WFDB signal {names[c]!r}") for c in range(signal.shape[1])
    ]
    return build_recording(columns, float(record.fs), names, limits, source_format=FORMAT, source_units=units)


def _check_declared(members: list[zipfile.ZipInfo], limits: ReadLimits) -> None:
    """Refuse members whose declared total size or compression ratio exceeds the limits.

    A first, cheap filter only: :func:`_member_bytes` enforces the same caps on what is inflated.
    """
    total = sum(m.file_size for m in members)
    if total > limits.max_unpacked_bytes:
        raise EcgRejected(
            "attachment_too_large", f"WFDB zip unpacks to more than {limits.max_unpacked_bytes} bytes"
        )
    for member in members:
        if member.file_size > limits.max_ratio * max(member.compress_size, 1):
            raise EcgRejected(
                "attachment_too_large",
                f"WFDB zip member inflates more than {limits.max_ratio:g} times (a zip bomb?)",
            )


def _member_bytes(
    archive: zipfile.ZipFile, member: zipfile.ZipInfo, limits: ReadLimits, before: int
) -> bytes:
    """A member's content, inflated step by step under the running caps.

    ``before`` is what earlier members inflated to (the byte cap is for all members together).

    Raises:
        EcgRejected: ``unreadable`` (not stored/deflated, encrypted, corrupt),
            ``attachment_too_large``.
    """
    if member.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise EcgRejected("unreadable", f"WFDB zip member uses compression method {member.compress_type}")
    what = f"WFDB zip member {PurePosixPath(member.filename).name[:40]!r}"
    out = bytearray()
    try:
        with archive.open(member) as stream:
            while chunk := stream.read(_CHUNK):
                out += chunk
                check_inflated(len(out), member.compress_size, limits, what)
                if before + len(out) > limits.max_unpacked_bytes:
                    raise EcgRejected(
                        "attachment_too_large", f"WFDB zip unpacks past {limits.max_unpacked_bytes} bytes"
                    )
    except (zipfile.BadZipFile, zlib.error, RuntimeError, ValueError, OSError, EOFError) as exc:
        raise EcgRejected("unreadable", f"{what} cannot be unpacked ({exc})") from exc
    return bytes(out)


def _check_header(header: Any, sizes: dict[str, int], limits: ReadLimits) -> int:
    """Range-check every header field that drives wfdb's work; the most samples it may decode.

    Raises:
        EcgRejected: ``unreadable``, ``bad_fs``, ``bad_shape``, ``too_long``.
    """
    if getattr(header, "seg_name", None) is not None:
        raise EcgRejected("unreadable", "multi-segment WFDB records are not read")
    n_sig = bounded_int(header.n_sig, "WFDB signal count", low=1, high=limits.max_leads)
    fs = check_fs(bounded_float(header.fs, "WFDB sampling rate", low=0, high=1e12))
    if header.sig_len is None:
        raise EcgRejected("unreadable", "WFDB header does not state the signal length")
    sig_len = bounded_int(header.sig_len, "WFDB signal length", low=1, high=limits.max_samples)
    fields = ("file_name", "fmt", "samps_per_frame", "skew", "byte_offset", "adc_gain", "baseline")
    per_signal = {name: list(getattr(header, name, None) or [None] * n_sig) for name in fields}
    if any(len(values) != n_sig for values in per_signal.values()):
        raise EcgRejected("unreadable", "WFDB header signal lines are incomplete")
    frames = 0
    for i in range(n_sig):
        what = f"WFDB signal {i + 1}"
        if str(per_signal["file_name"][i]) not in sizes:
            raise EcgRejected("unreadable", f"{what} names a signal file that is not in the zip")
        if str(per_signal["fmt"][i]) not in SIGNAL_FORMATS:
            raise EcgRejected(
                "unreadable", f"{what}: storage format {str(per_signal['fmt'][i])[:8]!r} is not read"
            )
        spf = per_signal["samps_per_frame"][i]
        frames += bounded_int(
            1 if spf is None else spf, f"{what} samples per frame", low=1, high=MAX_SAMPLES_PER_FRAME
        )
        skew = per_signal["skew"][i]
        bounded_int(
            0 if skew is None else skew,
            f"{what} skew",
            low=0,
            high=limits.max_samples,
            low_reason="unreadable",
        )
        offset = per_signal["byte_offset"][i]
        bounded_int(
            0 if offset is None else offset,
            f"{what} byte offset",
            low=0,
            high=sizes[str(per_signal["file_name"][i])],
            reason="unreadable",
            low_reason="unreadable",
        )
        bounded_float(per_signal["adc_gain"][i] or 0.0, f"{what} gain", low=-MAX_SCALE, high=MAX_SCALE)
        baseline = per_signal["baseline"][i]
        bounded_float(
            0 if baseline is None else baseline, f"{what} baseline", low=-MAX_OFFSET, high=MAX_OFFSET
        )
    check_counts(frames, sig_len, fs, limits, "WFDB header")
    return n_sig * sig_len
