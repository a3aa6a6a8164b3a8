"""The audit trail: one row per hook call, enough to reconstruct what the model saw and said.

A hospital piloting a predictive service must be able to answer, long after the fact, "what did
the model say about this patient, from which ECG, with which model file, and what did the EHR
show?" — and to measure the model on its own patients later (``ecglab monitor``). Each hook call
that reaches the model writes one :class:`AuditRecord` to the ``hook_audit`` table of the service
database (the same SQLAlchemy ``Base`` as :mod:`cds_service.db`, so ``init_db`` creates it):

* time, service id, ``hookInstance``, the JWT issuer, the mode (``live`` or ``shadow``) and the
  hook outcome;
* a **keyed hash of the patient id** (HMAC-SHA256 with a secret key, :func:`patient_key`), never
  the id: the monitor re-derives the same key from the ``subject`` of lab results it reads, so
  predictions and outcomes join without the database ever holding an identifier;
* the ECG resource's reference, ``meta.versionId`` and recording time;
* the SHA-256 of the exact model inputs (:func:`inputs_digest`), the inputs that were missing and
  therefore imputed with the training medians, and the metadata values as fed to the model
  (age capped at 90 years, the HIPAA safe-harbour bound) plus the ECG's amplitude statistics
  (:func:`ecg_amplitude_features`) for drift and subgroup analysis;
* every target's calibrated probability and decision threshold;
* the cards returned (uuid, lab, horizon), latency and the model's SHA-256 and version.

JSON columns are ``Text`` so the table is identical on SQLite and PostgreSQL. Rows are kept
until :func:`purge_audit` removes those older than the retention period.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import numpy as np
from sqlalchemy import Engine, Float, Integer, String, Text, delete, func, insert, select
from sqlalchemy.orm import Mapped, mapped_column

from cds_service.db import Base, UtcDateTime
from fhir_mappings.errors import ConfigError, InputError

AuditMode = Literal["live", "shadow"]
MODES: tuple[str, ...] = ("live", "shadow")

#: Shortest accepted audit key, in bytes: HMAC-SHA256 wants at least its output size.
MIN_KEY_BYTES = 32

#: Ages above this are stored as this value (HIPAA safe harbour: ages over 89 are identifying).
MAX_STORED_AGE = 90.0


class HookAudit(Base):
    """One audited hook call (see the module docstring for what each column holds)."""

    __tablename__ = "hook_audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), index=True)
    service_id: Mapped[str] = mapped_column(String(128))
    hook_instance: Mapped[str] = mapped_column(String(256))
    issuer: Mapped[str | None] = mapped_column(String(512), nullable=True)
    patient_key: Mapped[str] = mapped_column(String(64), index=True)
    ecg_reference: Mapped[str | None] = mapped_column(String(512), nullable=True)
    ecg_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    ecg_time: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    inputs_sha256: Mapped[str] = mapped_column(String(64))
    missing_inputs: Mapped[str] = mapped_column(Text)  # JSON list of feature keys
    features: Mapped[str] = mapped_column(Text)  # JSON object key -> value or null
    predictions: Mapped[str] = mapped_column(Text)  # JSON object target -> {p, t}
    cards: Mapped[str] = mapped_column(Text)  # JSON list of {uuid, lab, horizon_min}
    latency_ms: Mapped[float] = mapped_column(Float)
    model_sha256: Mapped[str] = mapped_column(String(64), index=True)
    model_version: Mapped[str] = mapped_column(String(64))
    mode: Mapped[str] = mapped_column(String(8))
    outcome: Mapped[str] = mapped_column(String(32))


@dataclass(frozen=True)
class TargetScore:
    """One target's calibrated probability and the decision threshold it was compared with."""

    probability: float
    threshold: float


@dataclass(frozen=True)
class CardRef:
    """A card the call returned (or, in shadow mode, would have returned)."""

    uuid: str
    lab: str
    horizon_min: int


@dataclass(frozen=True)
class AuditRecord:
    """Everything audited about one hook call; ``patient_key`` comes from :func:`patient_key`."""

    time: datetime
    service_id: str
    hook_instance: str
    issuer: str | None
    patient_key: str
    ecg_reference: str | None
    ecg_version: str | None
    ecg_time: datetime | None
    inputs_sha256: str
    missing_inputs: tuple[str, ...]
    predictions: Mapping[str, TargetScore]
    cards: tuple[CardRef, ...]
    latency_ms: float
    model_sha256: str
    model_version: str
    mode: AuditMode
    features: Mapping[str, float | None] = field(default_factory=dict)
    outcome: str = "cards"
    id: int | None = None

    def __post_init__(self) -> None:
        """Refuse records that would store something unsafe or meaningless."""
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if len(self.patient_key) != 64 or any(c not in "0123456789abcdef" for c in self.patient_key):
            raise ValueError("patient_key must be the 64-hex HMAC from audit.patient_key(), never an id")
        if self.time.tzinfo is None or (self.ecg_time is not None and self.ecg_time.tzinfo is None):
            raise ValueError("audit times must be timezone-aware")


# -- keys and digests ---------------------------------------------------------------------------------


def load_audit_key(raw: str | bytes, name: str = "ECGLAB_AUDIT_KEY") -> bytes:
    """The HMAC key from a setting or key file; :class:`ConfigError` naming ``name`` when too short.

    Surrounding whitespace (a key file's trailing newline) is removed. The key is never logged.
    """
    key = raw.strip() if isinstance(raw, bytes) else raw.strip().encode("utf-8")
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"{name}: the audit key must be at least {MIN_KEY_BYTES} bytes of secret text")
    return key


def patient_key(key: bytes, patient_id: str) -> str:
    """HMAC-SHA256 (hex) of a FHIR Patient id: stable per patient, useless without the key."""
    return hmac.new(key, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()


def inputs_digest(*arrays: np.ndarray) -> str:
    """SHA-256 over the model's input tensors (dtype, shape and bytes of each, in order).

    Two calls get the same digest exactly when the ONNX session received identical inputs, so an
    audited prediction can be reproduced bit for bit from a stored ECG.
    """
    digest = hashlib.sha256()
    for array in arrays:
        contiguous = np.ascontiguousarray(array)
        digest.update(f"{contiguous.dtype.str}{contiguous.shape}".encode("ascii"))
        digest.update(contiguous.tobytes())
    return digest.hexdigest()


def ecg_amplitude_features(ecg: np.ndarray, clip_mv: float) -> dict[str, float | None]:
    """Amplitude statistics of the prepared ECG (leads × samples, mV), audited for drift monitoring.

    ``ecg_rms_mv``: root mean square over all leads and samples; ``ecg_p2p_mv``: median over leads
    of the peak-to-peak amplitude; ``ecg_clipped_fraction``: share of samples at ``±clip_mv``. A
    new ECG cart, a gain setting or a lead mix-up shows up here before it shows up in outcomes.
    """
    values = np.asarray(ecg, dtype=np.float64)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"expected a (leads, samples) array, got shape {values.shape}")
    finite = np.isfinite(values)
    if not finite.any():
        return {"ecg_rms_mv": None, "ecg_p2p_mv": None, "ecg_clipped_fraction": None}
    filled = np.where(finite, values, np.nan)
    peak_to_peak = np.nanmax(filled, axis=1) - np.nanmin(filled, axis=1)
    return {
        "ecg_rms_mv": float(np.sqrt(np.mean(values[finite] ** 2))),
        "ecg_p2p_mv": float(np.nanmedian(peak_to_peak)),
        "ecg_clipped_fraction": float(np.mean(np.abs(values[finite]) >= clip_mv - 1e-9)),
    }


def storable_features(values: Mapping[str, float | None]) -> dict[str, float | None]:
    """Metadata values as stored: non-finite → ``None``, age capped at :data:`MAX_STORED_AGE`."""
    out: dict[str, float | None] = {}
    for key, value in values.items():
        if value is None or not math.isfinite(float(value)):
            out[key] = None
        elif key == "age":
            out[key] = min(float(value), MAX_STORED_AGE)
        else:
            out[key] = float(value)
    return out


# -- writing, reading, purging ------------------------------------------------------------------------


def _row(record: AuditRecord) -> dict[str, Any]:
    """The table row of ``record`` (JSON columns serialised with sorted keys)."""
    return {
        "created_at": record.time,
        "service_id": record.service_id[:128],
        "hook_instance": record.hook_instance[:256],
        "issuer": record.issuer[:512] if record.issuer else None,
        "patient_key": record.patient_key,
        "ecg_reference": record.ecg_reference[:512] if record.ecg_reference else None,
        "ecg_version": record.ecg_version[:64] if record.ecg_version else None,
        "ecg_time": record.ecg_time,
        "inputs_sha256": record.inputs_sha256,
        "missing_inputs": json.dumps(sorted(record.missing_inputs)),
        "features": json.dumps(storable_features(record.features), sort_keys=True),
        "predictions": json.dumps(
            {t: {"p": float(s.probability), "t": float(s.threshold)} for t, s in record.predictions.items()},
            sort_keys=True,
        ),
        "cards": json.dumps(
            [{"uuid": c.uuid, "lab": c.lab, "horizon_min": c.horizon_min} for c in record.cards]
        ),
        "latency_ms": float(record.latency_ms),
        "model_sha256": record.model_sha256,
        "model_version": record.model_version[:64],
        "mode": record.mode,
        "outcome": record.outcome[:32],
    }


def write_audit(engine: Engine, record: AuditRecord) -> int:
    """Insert one record; returns its row id."""
    with engine.begin() as conn:
        result = conn.execute(insert(HookAudit).values(**_row(record)).returning(HookAudit.id))
        return int(result.scalar_one())


def purge_audit(engine: Engine, older_than: datetime | timedelta, *, now: datetime | None = None) -> int:
    """Delete rows created before ``older_than`` (a cut-off time, or an age before ``now``); returns how many."""
    cutoff = (now or datetime.now(UTC)) - older_than if isinstance(older_than, timedelta) else older_than
    if cutoff.tzinfo is None:
        raise InputError("purge_audit: the cut-off must be timezone-aware")
    with engine.begin() as conn:
        removed = conn.execute(delete(HookAudit).where(HookAudit.created_at < cutoff).returning(HookAudit.id))
        return len(removed.all())


def _record(row: Any) -> AuditRecord:
    """An :class:`AuditRecord` from a table row (JSON columns decoded)."""
    predictions = {t: TargetScore(v["p"], v["t"]) for t, v in json.loads(row.predictions).items()}
    cards = tuple(CardRef(c["uuid"], c["lab"], int(c["horizon_min"])) for c in json.loads(row.cards))
    return AuditRecord(
        time=row.created_at,
        service_id=row.service_id,
        hook_instance=row.hook_instance,
        issuer=row.issuer,
        patient_key=row.patient_key,
        ecg_reference=row.ecg_reference,
        ecg_version=row.ecg_version,
        ecg_time=row.ecg_time,
        inputs_sha256=row.inputs_sha256,
        missing_inputs=tuple(json.loads(row.missing_inputs)),
        predictions=predictions,
        cards=cards,
        latency_ms=row.latency_ms,
        model_sha256=row.model_sha256,
        model_version=row.model_version,
        mode=row.mode,
        features=json.loads(row.features),
        outcome=row.outcome,
        id=row.id,
    )


def iter_audit(
    engine: Engine,
    since: datetime,
    until: datetime | None = None,
    *,
    model_sha256: str | None = None,
    batch: int = 1000,
) -> Iterator[AuditRecord]:
    """Records created in ``[since, until)`` in id order, read ``batch`` rows at a time."""
    last = 0
    while True:
        query = select(HookAudit.__table__).where(HookAudit.created_at >= since, HookAudit.id > last)
        if until is not None:
            query = query.where(HookAudit.created_at < until)
        if model_sha256 is not None:
            query = query.where(HookAudit.model_sha256 == model_sha256)
        with engine.connect() as conn:
            rows = conn.execute(query.order_by(HookAudit.id).limit(batch)).all()
        if not rows:
            return
        for row in rows:
            yield _record(row)
        last = rows[-1].id


def count_audit(engine: Engine, since: datetime, until: datetime | None = None) -> int:
    """How many records :func:`iter_audit` would yield without a model filter (for progress bars)."""
    query = select(func.count()).select_from(HookAudit).where(HookAudit.created_at >= since)
    if until is not None:
        query = query.where(HookAudit.created_at < until)
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


EXPORT_COLUMNS: tuple[str, ...] = tuple(c.name for c in HookAudit.__table__.columns)


def export_rows(records: Sequence[AuditRecord] | Iterator[AuditRecord]) -> Iterator[dict[str, Any]]:
    """Flat rows for CSV/Parquet: scalars and UTC datetimes as they are, JSON columns as JSON text."""
    for record in records:
        row = _row(record)
        row["id"] = record.id
        row["created_at"] = record.time.astimezone(UTC)
        row["ecg_time"] = record.ecg_time.astimezone(UTC) if record.ecg_time else None
        yield {name: row[name] for name in EXPORT_COLUMNS}
