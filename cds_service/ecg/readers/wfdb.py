"""WFDB records (``.hea`` header + ``.dat`` signal files) shipped as a zip → :class:`EcgRecording`.

MIMIC-IV-ECG and PTB-XL distribute WFDB records; a hospital system that archives them attaches the
record as a zip. The zip is unpacked into a private temporary folder: only ``.hea``/``.dat``
members, under their base names (no paths, so nothing escapes the folder), and only when their
declared total size and every member's compression ratio are within :class:`ReadLimits` (a zip
bomb is refused before inflating). Exactly one header is expected. Physical units come from the
header (``mV``, ``uV``). wfdb is imported lazily (it pulls in pandas).
"""

from __future__ import annotations

import io
import re
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np

from cds_service.ecg.readers.common import build_recording, volt_factor
from cds_service.ecg.record import EcgRecording, EcgRejected, ReadLimits

FORMAT = "wfdb-zip"
"""This reader's format name (``EcgRecording.source_format``, ``ecg.yaml`` attachment formats)."""

_SUFFIXES: frozenset[str] = frozenset({".hea", ".dat"})


def sniff(data: bytes) -> bool:
    """Whether ``data`` is a zip whose directory lists a WFDB ``.hea`` header."""
    if not data.startswith(b"PK\x03\x04"):
        return False
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return any(name.lower().endswith(".hea") for name in archive.namelist())
    except (zipfile.BadZipFile, ValueError, OSError):
        return False


def read(data: bytes, limits: ReadLimits) -> EcgRecording:
    """Decode the single WFDB record a zip holds.

    Raises:
        EcgRejected: ``unreadable`` (bad zip, no or several headers, wfdb cannot parse it),
            ``attachment_too_large`` (unpacks beyond the limits), ``unknown_units``, ``bad_fs``,
            ``too_long``.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = [m for m in archive.infolist() if not m.is_dir()]
    except (zipfile.BadZipFile, ValueError) as exc:
        raise EcgRejected("unreadable", f"WFDB attachment is not a valid zip ({exc})") from exc
    wanted = [m for m in members if PurePosixPath(m.filename).suffix.lower() in _SUFFIXES]
    _check_unpacked(wanted, limits)
    headers = [m for m in wanted if m.filename.lower().endswith(".hea")]
    if len(headers) != 1:
        raise EcgRejected("unreadable", f"WFDB zip must hold exactly one .hea header, found {len(headers)}")
    import wfdb

    with tempfile.TemporaryDirectory(prefix="ecglab-wfdb-") as tmp:
        folder = Path(tmp)
        for member in wanted:
            name = PurePosixPath(member.filename.replace("\\", "/")).name
            if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
                raise EcgRejected(
                    "unreadable", f"WFDB zip member name {name[:40]!r} is not a plain file name"
                )
            (folder / name).write_bytes(archive.read(member))
        record_name = PurePosixPath(headers[0].filename).stem
        try:
            record = wfdb.rdrecord(str(folder / record_name), physical=True)
        except (OSError, ValueError, IndexError, KeyError, TypeError, AttributeError) as exc:
            raise EcgRejected("unreadable", f"WFDB record {record_name!r} cannot be read ({exc})") from exc
    if record.p_signal is None:
        raise EcgRejected("unreadable", f"WFDB record {record_name!r} has no signal")
    signal = np.asarray(record.p_signal, dtype=np.float64)
    units = [str(u) for u in (record.units or ["mV"] * signal.shape[1])]
    names = [str(n) for n in record.sig_name]
    columns = [
        signal[:, c] * volt_factor(units[c], f"WFDB signal {names[c]!r}") for c in range(signal.shape[1])
    ]
    return build_recording(columns, float(record.fs), names, limits, source_format=FORMAT, source_units=units)


def _check_unpacked(members: list[zipfile.ZipInfo], limits: ReadLimits) -> None:
    """Refuse members whose declared total size or compression ratio exceeds the limits."""
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
