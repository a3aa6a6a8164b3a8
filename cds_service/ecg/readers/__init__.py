"""The ECG file readers and the registry that picks one by the file's content.

Each reader module in this package exposes

* ``sniff(data: bytes) -> bool``: whether the bytes look like its format (cheap, never raises);
* ``read(data: bytes, limits: ReadLimits) -> EcgRecording``: decode them, raising
  :class:`~cds_service.ecg.record.EcgRejected` for anything unusable;
* optionally ``FORMAT``: the format's name (else the module name).

:data:`READER_MODULES` lists them in the order they are sniffed; adding a format means adding a
module here and its name to that tuple. :func:`read_file` detects the format from the content, so
a DICOM file labelled ``application/octet-stream`` (or mislabelled ``application/xml``) is still
read as DICOM; a FHIR content type is only a hint for bytes no reader recognises. FHIR
``valueSampledData`` is read from JSON, not bytes, by :mod:`.sampled_data` (not in the registry).
"""

from __future__ import annotations

import importlib
import logging
from functools import cache
from types import ModuleType

from cds_service.ecg.record import EcgRecording, EcgRejected, ReadLimits

__all__ = ["FORMATS", "READER_MODULES", "detect_format", "read_file"]

log = logging.getLogger(__name__)

READER_MODULES: tuple[str, ...] = ("dicom", "wfdb", "muse", "philips", "hl7_aecg", "scp", "edf")
"""Reader modules of this package, in sniffing order (most specific signature first)."""


@cache
def _formats() -> dict[str, ModuleType]:
    """Format name → reader module, in :data:`READER_MODULES` order."""
    found: dict[str, ModuleType] = {}
    for name in READER_MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        found[str(getattr(module, "FORMAT", name))] = module
    return found


FORMATS: dict[str, ModuleType] = _formats()
"""Format name (``dicom``, ``wfdb-zip``, ``muse-xml``, ...) → reader module."""


def detect_format(data: bytes) -> str | None:
    """The format whose reader recognises ``data``, or ``None`` (first match in sniffing order)."""
    for name, module in FORMATS.items():
        try:
            if module.sniff(data):
                return name
        except Exception:  # a sniffer must never fail a request; treat it as "not mine"
            log.debug("ECG sniffer %s raised; skipped", name, exc_info=True)
    return None


def read_file(data: bytes, limits: ReadLimits, fmt: str | None = None) -> EcgRecording:
    """Decode an ECG file, choosing the reader by content.

    Args:
        data: the file's bytes.
        limits: bounds on size and decoded content.
        fmt: a format name the caller believes (e.g. from the attachment's content type through
            ``ecg.yaml``); used only when no reader recognises the content.

    Raises:
        EcgRejected: ``attachment_too_large`` beyond ``limits.max_bytes``;
            ``unknown_content_type`` when neither content nor hint names a format; whatever the
            reader raises; and ``unreadable`` for any other exception of a reader (a reader
            failure is a rejected ECG, never a server error).
    """
    if len(data) > limits.max_bytes:
        raise EcgRejected("attachment_too_large", f"ECG file is {len(data)} bytes, over {limits.max_bytes}")
    detected = detect_format(data)
    chosen = detected or (fmt if fmt in FORMATS else None)
    if chosen is None:
        raise EcgRejected("unknown_content_type", f"no ECG reader recognises the content (hint {fmt!r})")
    if detected and fmt and detected != fmt:
        log.info(
            "ECG content is %s although its content type says %s; reading it as %s", detected, fmt, detected
        )
    try:
        recording: EcgRecording = FORMATS[chosen].read(data, limits)
        return recording
    except EcgRejected:
        raise
    except Exception as exc:  # any reader bug or library error on hostile bytes
        raise EcgRejected(
            "unreadable", f"{chosen} reader failed ({type(exc).__name__}: {str(exc)[:200]})"
        ) from exc
