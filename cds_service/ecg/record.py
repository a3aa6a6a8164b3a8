"""The one shape every ECG reader returns, the one error every ECG step raises, and read limits.

Readers (``cds_service.ecg.readers.*``) turn bytes in some vendor format into an
:class:`EcgRecording`: the leads as the file names them, in millivolts, at the file's sampling
rate, with what the file says about the device. :mod:`cds_service.ecg.canonical` then maps the
names to the model's leads and prepares the model input. Anything that makes an ECG unusable, in
any step, is an :class:`EcgRejected` whose ``reason`` is one of :data:`REASONS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import numpy.typing as npt

from fhir_mappings.errors import InputError

REASONS: dict[str, str] = {
    "attachment_too_large": "the attachment (or what it unpacks to) exceeds the byte limit",
    "attachment_unavailable": "the attachment URL could not be fetched",
    "no_attachment": "the resource carries no attachment",
    "unknown_content_type": "no reader knows the attachment's format",
    "unreadable": "the bytes are not valid for their format (DICOM, zip, XML, base64, ...)",
    "unsafe_xml": "the XML declares a DTD or entities",
    "no_waveform": "the file holds no rhythm waveform",
    "unknown_units": "the amplitude unit is missing or not a voltage",
    "implausible_amplitude": "the amplitudes are not those of an ECG in the stated unit",
    "non_numeric": "samples are not numbers",
    "bad_shape": "not a (samples, leads) array matching the lead names, or no samples",
    "wrong_length": "leads of unequal length",
    "bad_fs": "sampling rate not a finite number within the accepted range",
    "too_short": "shorter than one model window",
    "too_long": "more samples, leads or seconds than the reader accepts",
    "too_many_missing": "a lead misses too many samples",
    "non_finite": "a lead has no finite sample",
    "missing_leads": "a lead the model needs is absent and cannot be derived",
    "duplicate_leads": "two leads resolve to the same model lead",
    "no_time": "the resource carries no recording time",
    "too_old": "the recording is older than the accepted age",
    "decode_timeout": "decoding did not finish within the time budget",
}
"""Every reason code an :class:`EcgRejected` may carry, with its meaning (stable, logged, counted)."""


class EcgRejected(InputError):
    """An ECG that exists but cannot be used; ``reason`` (a key of :data:`REASONS`) says why."""

    def __init__(self, reason: str, message: str, reference: str | None = None) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown ECG rejection reason {reason!r}")
        super().__init__(f"{reference}: {message}" if reference else message)
        self.reason = reason
        self.reference = reference


@dataclass(frozen=True)
class ReadLimits:
    """Bounds on the work one ECG file may cause (hostile input is bounded before it is decoded)."""

    max_bytes: int = 10 * 1024 * 1024
    """Largest accepted file (or attachment) in bytes."""
    max_unpacked_bytes: int = 40 * 1024 * 1024
    """Largest total a compressed payload may inflate to (zip members, deflate, XLI, Huffman)."""
    max_ratio: float = 200.0
    """Largest inflation ratio of any compressed payload."""
    max_seconds: float = 60.0
    """Longest accepted recording."""
    max_leads: int = 64
    """Most leads (channels) a file may declare."""
    max_samples: int = 60 * 20_000
    """Most samples per lead (60 s at the highest accepted rate)."""


@dataclass(frozen=True)
class EcgRecording:
    """A decoded recording as the file holds it, in millivolts.

    ``signal`` is (T, C) float32 mV at ``fs`` Hz; column ``c`` is lead ``lead_names[c]`` spelled as
    the source spells it (canonical names come later). ``source_units`` names the unit the file
    stated for each lead before conversion. ``source_format`` is the reader's format name
    (``dicom``, ``wfdb-zip``, ``muse-xml``, ``sampled-data``, ...). ``warnings`` are quality notes
    that do not reject the ECG.
    """

    signal: npt.NDArray[np.float32]
    fs: float
    lead_names: tuple[str, ...]
    source_units: tuple[str, ...] = ()
    source_format: str = "unknown"
    device: str | None = None
    software: str | None = None
    recorded_at: datetime | None = None
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def duration_s(self) -> float:
        """Length of the recording in seconds."""
        return float(self.signal.shape[0]) / self.fs if self.fs > 0 else 0.0
