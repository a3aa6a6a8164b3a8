"""Helpers every ECG reader shares: unit factors, base64, bounds, bounded inflation, building the record.

A reader decodes its format into per-lead sample vectors and hands them to :func:`build_recording`,
which checks what must hold for every format (equal lengths, a plausible sampling rate, the
:class:`~cds_service.ecg.record.ReadLimits`) and returns the one
:class:`~cds_service.ecg.record.EcgRecording` shape. Every failure is an
:class:`~cds_service.ecg.record.EcgRejected` with a reason code.

**Bounded work.** Every number a file states that drives work (a count, a rate, a gain, an
offset) goes through :func:`bounded_int` / :func:`bounded_float` and :func:`check_counts` before
it is used, so a hostile header fails before anything is allocated or looped over; no decoded
signal may hold more than :func:`max_cells` samples (all leads together), whatever the per-lead
limits allow. Every inflating path uses :func:`inflate_raw` or :func:`check_inflated`: a running
byte cap and a ratio cap, whatever size the container declares.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import zlib
from collections.abc import Mapping, Sequence
from xml.etree import ElementTree

import numpy as np
import numpy.typing as npt

from cds_service.ecg.readers._vendor_xml import parse_xml, xml_text
from cds_service.ecg.record import EcgRecording, EcgRejected, ReadLimits
from fhir_mappings.signal_spec import MAX_FS, MIN_FS

VOLT_FACTORS: dict[str, float] = {"V": 1000.0, "mV": 1.0, "uV": 1e-3, "nV": 1e-6}
"""UCUM voltage unit → factor to mV (the units of ``ecg.yaml``'s ``amplitude_units`` and nV)."""

MAX_SCALE: float = 1e6
"""Largest magnitude of a gain, sensitivity or correction factor a file may state.

Real values are a few units (µV per bit, units per mV); a bound keeps ``sample × gain`` far from
float overflow for every integer sample width (2**63 × 1e6 × 1e6 is still finite)."""

MAX_OFFSET: float = 1e9
"""Largest magnitude of a baseline or origin offset a file may state (same reason)."""

INFLATE_CHUNK: int = 64 * 1024
"""Bytes fed to, and taken from, a decompressor per step (the running caps are checked per step)."""

_EXTERNAL_DOCTYPE = re.compile(
    r"""\s*<!DOCTYPE\s+[A-Za-z_][\w.:-]{0,63}"""
    r"""(?:\s+(?:SYSTEM|PUBLIC\s+(?:"[^"<>\[\]]{0,256}"|'[^'<>\[\]]{0,256}'))"""
    r"""\s+(?:"[^"<>\[\]]{0,256}"|'[^'<>\[\]]{0,256}'))?\s*>"""
)
"""A DOCTYPE naming only an external DTD (no internal subset ``[...]``, so no entity declarations)."""

_XML_DECLARATION = re.compile(r"\A\s*<\?xml[^>]{0,256}\?>")


def volt_factor(unit: str | None, what: str, units: Mapping[str, float] = VOLT_FACTORS) -> float:
    """Factor from ``unit`` to mV.

    Raises:
        EcgRejected: ``unknown_units`` naming ``what`` carried the unit.
    """
    if isinstance(unit, str) and unit.strip() in units:
        return units[unit.strip()]
    raise EcgRejected(
        "unknown_units", f"{what}: unit {unit!r} is not one of the voltage units {sorted(units)}"
    )


def b64decode(text: str, what: str) -> bytes:
    """Decode base64 that may contain line breaks.

    Raises:
        EcgRejected: ``unreadable`` when ``text`` is not base64.
    """
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EcgRejected("unreadable", f"{what}: not valid base64 ({exc})") from exc


def b64_size(text: str) -> int:
    """How many bytes the base64 ``text`` decodes to at most (without decoding it)."""
    return len(text) * 3 // 4


def bounded_float(value: object, what: str, *, low: float, high: float, reason: str = "unreadable") -> float:
    """``value`` (a number or its text) as a finite float within ``[low, high]``.

    Raises:
        EcgRejected: ``unreadable`` for something that is not one number (text too long to be
            one, a list, ``nan``), ``reason`` for a number outside the range.
    """
    if isinstance(value, bool) or (isinstance(value, str | bytes) and len(value) > 64):
        raise EcgRejected("unreadable", f"{what} is not a number")
    try:
        number = float(value)  # type: ignore[arg-type]  # anything else is refused below
    except (TypeError, ValueError, OverflowError) as exc:
        raise EcgRejected("unreadable", f"{what} is not a number") from exc
    if math.isnan(number):
        raise EcgRejected("unreadable", f"{what} is not a number")
    if not low <= number <= high:  # also refuses ±inf
        raise EcgRejected(reason, f"{what} is {number:g}, outside [{low:g}, {high:g}]")
    return number


def bounded_int(
    value: object,
    what: str,
    *,
    low: int,
    high: int,
    reason: str = "too_long",
    low_reason: str = "bad_shape",
) -> int:
    """``value`` (an integer or its text) within ``[low, high]``.

    Raises:
        EcgRejected: ``unreadable`` when it is not a whole number; ``low_reason`` below ``low``
            (by default ``bad_shape``: a count of nothing); ``reason`` above ``high``.
    """
    if isinstance(value, bool) or (isinstance(value, str | bytes) and len(value) > 32):
        raise EcgRejected("unreadable", f"{what} is not a whole number")
    try:
        number = int(value)  # type: ignore[call-overload]  # anything else is refused below
    except (TypeError, ValueError, OverflowError) as exc:
        raise EcgRejected("unreadable", f"{what} is not a whole number") from exc
    if isinstance(value, float) and value != number:
        raise EcgRejected("unreadable", f"{what} is not a whole number")
    if number < low:
        raise EcgRejected(low_reason, f"{what} is {number}, less than {low}")
    if number > high:
        raise EcgRejected(reason, f"{what} is {number}, more than {high}")
    return number


def max_cells(limits: ReadLimits) -> int:
    """Most samples (all leads together) one decoded signal may hold.

    The per-lead limits alone admit 64 leads × 60 s × 20 kHz; this caps the whole signal so its
    float64 working copy fits in ``limits.max_unpacked_bytes`` (5 M samples by default, 14 times
    a 12-lead 60 s strip at 500 Hz).
    """
    return max(limits.max_unpacked_bytes // 8, 1)


def check_counts(n_leads: int, n_samples: int, fs: float | None, limits: ReadLimits, what: str) -> None:
    """Refuse a declared size beyond ``limits`` before any sample is decoded.

    Raises:
        EcgRejected: ``bad_shape`` for a negative count; ``too_long`` for too many leads, samples
            per lead, seconds, or samples in all (:func:`max_cells`).
    """
    if n_leads < 0 or n_samples < 0:
        raise EcgRejected("bad_shape", f"{what} declares {n_leads} leads of {n_samples} samples")
    if n_leads > limits.max_leads:
        raise EcgRejected("too_long", f"{what} declares {n_leads} leads, more than {limits.max_leads}")
    if n_samples > limits.max_samples:
        raise EcgRejected(
            "too_long", f"{what} declares {n_samples} samples per lead, more than {limits.max_samples}"
        )
    if fs is not None and math.isfinite(fs) and fs > 0 and n_samples / fs > limits.max_seconds:
        raise EcgRejected(
            "too_long", f"{what} lasts {n_samples / fs:.1f} s, longer than {limits.max_seconds:g} s"
        )
    if n_leads * n_samples > max_cells(limits):
        raise EcgRejected(
            "too_long",
            f"{what} declares {n_leads} × {n_samples} samples, more than {max_cells(limits)} in all",
        )


def check_fs(fs: float) -> float:
    """``fs`` as a float when it is a finite rate within [MIN_FS, MAX_FS] Hz.

    Raises:
        EcgRejected: ``bad_fs``. A wrong header rate is not harmless: resampling to 100 Hz
            upsamples by 100 / fs, so a strip declared at 0.001 Hz would become gigabytes.
    """
    if not math.isfinite(fs) or not MIN_FS <= fs <= MAX_FS:
        raise EcgRejected(
            "bad_fs", f"ECG sampling rate must be between {MIN_FS:g} and {MAX_FS:g} Hz, got {fs!r}"
        )
    return float(fs)


def check_inflated(produced: int, consumed: int, limits: ReadLimits, what: str) -> None:
    """Running cap on a decompressor: ``produced`` output bytes from ``consumed`` input bytes.

    Raises:
        EcgRejected: ``attachment_too_large`` past ``max_unpacked_bytes`` or ``max_ratio``.
    """
    if produced > limits.max_unpacked_bytes:
        raise EcgRejected("attachment_too_large", f"{what} inflates past {limits.max_unpacked_bytes} bytes")
    if produced > limits.max_ratio * max(consumed, 1):
        raise EcgRejected(
            "attachment_too_large",
            f"{what} inflates {produced} bytes from {consumed}, more than {limits.max_ratio:g} times",
        )


def inflate_raw(data: bytes, limits: ReadLimits, what: str) -> bytes:
    """Inflate a raw deflate stream (no zlib header) under :func:`check_inflated`'s running caps.

    The input is fed in :data:`INFLATE_CHUNK` steps and each step's output is bounded, so a bomb is
    stopped after at most one step past the cap, never after inflating the whole stream. Bytes
    after the end of the stream are ignored.

    Raises:
        EcgRejected: ``attachment_too_large``; ``unreadable`` for a corrupt or truncated stream.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    consumed = 0
    try:
        for start in range(0, len(data), INFLATE_CHUNK):
            pending = data[start : start + INFLATE_CHUNK]
            consumed += len(pending)
            while pending and not inflater.eof:
                out += inflater.decompress(pending, INFLATE_CHUNK)
                check_inflated(len(out), consumed, limits, what)
                pending = inflater.unconsumed_tail
            if inflater.eof:
                break
        out += inflater.flush(INFLATE_CHUNK)
    except zlib.error as exc:
        raise EcgRejected("unreadable", f"{what} is not a valid deflate stream ({exc})") from exc
    check_inflated(len(out), consumed, limits, what)
    if not inflater.eof:
        raise EcgRejected("unreadable", f"{what} ends before its deflate stream does")
    return bytes(out)


def parse_xml_external_dtd(data: bytes, what: str) -> ElementTree.Element:
    """Parse XML that may name an external DTD (never fetched), with ``defusedxml``, bounded.

    GE MUSE exports start with ``<!DOCTYPE RestingECG SYSTEM "restecg.dtd">``. The text is decoded
    by what the bytes are (:func:`~cds_service.ecg.readers._vendor_xml.xml_text`: BOM, UTF-16
    NUL pattern, UTF-8, the declared 8-bit encoding), its XML declaration and such a DOCTYPE —
    a name and an external identifier, nothing else — are removed, and the rest is parsed by
    :func:`~cds_service.ecg.readers._vendor_xml.parse_xml`: defusedxml with DTDs forbidden and
    nesting depth and element count capped. A DOCTYPE with an internal subset (where entities
    are declared), a second DOCTYPE, or one after a comment therefore stays and is refused.

    Raises:
        EcgRejected: ``unsafe_xml`` for any other DTD or entity; ``unreadable`` for text that is
            not well-formed XML or exceeds the caps.
    """
    text = _XML_DECLARATION.sub("", xml_text(data, what).lstrip("\ufeff"), count=1)
    doctype = _EXTERNAL_DOCTYPE.match(text)
    if doctype is not None:
        text = text[doctype.end() :]
    return parse_xml(text.encode("utf-8"), what)


def build_recording(
    columns: Sequence[npt.ArrayLike],
    fs: float,
    names: Sequence[str],
    limits: ReadLimits,
    *,
    source_format: str,
    source_units: Sequence[str] = (),
    device: str | None = None,
    software: str | None = None,
    warnings: Sequence[str] = (),
) -> EcgRecording:
    """Stack per-lead sample vectors (already in mV) into an :class:`EcgRecording`.

    Raises:
        EcgRejected: ``bad_shape`` (no leads or no samples), ``wrong_length``, ``bad_fs``,
            ``too_long``.
    """
    if not columns:
        raise EcgRejected("bad_shape", "ECG has no leads")
    arrays = [np.asarray(c, dtype=np.float64) for c in columns]
    if any(a.ndim != 1 for a in arrays):
        raise EcgRejected("bad_shape", "ECG leads must be one-dimensional sample vectors")
    lengths = {a.shape[0] for a in arrays}
    if len(lengths) != 1:
        raise EcgRejected("wrong_length", f"ECG leads differ in length: {sorted(lengths)} samples")
    rate = check_fs(fs)
    (n_samples,) = lengths
    if n_samples == 0:
        raise EcgRejected("bad_shape", "ECG leads have no samples")
    check_counts(len(arrays), n_samples, rate, limits, source_format)
    signal = np.empty((n_samples, len(arrays)), dtype=np.float32)
    for column, values in enumerate(arrays):
        signal[:, column] = values
    return EcgRecording(
        signal=signal,
        fs=rate,
        lead_names=tuple(str(n) for n in names),
        source_units=tuple(source_units),
        source_format=source_format,
        device=device,
        software=software,
        warnings=tuple(warnings),
    )
