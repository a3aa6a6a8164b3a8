"""Predictions reused across hook calls: patient-view, then order-select and order-sign on the same ECG.

A clinician's order hooks usually follow patient-view within minutes, on the same ECG and the same
chart. Decoding that ECG again and running the model again would give the same probabilities, so
the first call's predictions are kept for ``ECGLAB_PREDICTION_CACHE_S`` seconds (0 = off) and a
later call whose inputs are identical answers from them without decoding or inference
(:func:`cds_service.fetch.probe_predictions` consults the cache before the ECG is decoded).

**Key** (:func:`prediction_key`, SHA-256). Everything the chosen ECG and its prediction can depend
on, computed without decoding:

* this format's version, the ``fhir_mappings`` version and the served model
  (:func:`model_identity`: the ONNX SHA-256, the variant and its SHA-256, the version);
* the hook's ``context.patientId``, and the ids the ECG selection binds to (the data's bound
  patient, the Patient resource's id): no entry serves another patient's call;
* every ECG resource within the maximum age at the call's time, whole: reference, ``meta``
  (``versionId``, ``lastUpdated``), status, times, codes and the sampled data or inline
  attachment bytes themselves (a digest of its JSON, :func:`prediction_key`);
* the SHA-256 of the bytes behind every attachment URL of those resources (fetched once; the
  decoding then reuses them).

The ECG the selection takes and its time follow from the key. The **metadata** (age, sex, vitals
... as the model reads them) is extracted at that time for every call, which needs no decoding,
and must match the stored digest (:func:`metadata_digest`); so any change of an input (ECG version
or bytes, a metadata value, the model) misses. A prediction is stored only when the ECG used is the
newest one within the maximum age (an older one stands in when the newest could not be decoded,
which a retry may not repeat: such a prediction is not reused).

**Value** (:class:`CachedPrediction`): the predictions as the runtime returned them (calibrated
and raw probabilities with the manifest's facts), the ECG's reference, time, carrier, rate and
lead names (the cards and the audit row name them), the metadata digest, and the audit's facts of
the inputs (:class:`cds_service.hook_audit.InputFacts`: digest, features, imputed features), so a
reused prediction is audited like the first one without its ECG samples, which are never stored.

**Tiers.** An in-process LRU of :data:`MEMORY_ENTRIES` entries in front of the service database
(table ``ecglab_prediction_cache``, :class:`cds_service.db.CachedPredictionRow`, created by
``init_db`` with the others), so every worker and machine sharing the database shares the
entries. Rows are written on a background thread (``ecglab-prediction-cache``) and expired rows
purged there at most once a minute; a database failure is logged and counts as a miss, never as a
failed call. The key is a hash; the value holds nothing the audit row does not (the ECG's
reference and time, probabilities, features), and no patient id.

**Metrics.** ``ecglab_prediction_cache_hits_total{tier="memory|database"}`` and
``ecglab_prediction_cache_misses_total``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from prometheus_client import Counter
from sqlalchemy import Engine, delete, select
from sqlalchemy.dialects import postgresql, sqlite

from cds_service.background_writer import BackgroundWriter
from cds_service.db import CachedPredictionRow
from cds_service.hook_audit import InputFacts
from cds_service.inference import TargetPrediction
from fhir_mappings import MAPPING_VERSION

__all__ = [
    "CACHE_FORMAT",
    "MEMORY_ENTRIES",
    "CachedPrediction",
    "PredictionCache",
    "metadata_digest",
    "model_identity",
    "prediction_key",
]

log = logging.getLogger(__name__)

CACHE_FORMAT = "ecglab-prediction-cache/1"
"""Part of every key: a change of what an entry holds changes it, so old rows are never read."""

MEMORY_ENTRIES: int = 256
"""Entries the in-process LRU keeps (each about 80 KB with the bundled model's 111 targets: 20 MB)."""

PURGE_INTERVAL_S: float = 60.0
"""Least seconds between two deletions of expired rows."""

LONG_TEXT: int = 256
"""Strings longer than this are hashed on their own in a key (:func:`_resource_digest`)."""

Tier = Literal["memory", "database"]

HITS = Counter(
    "ecglab_prediction_cache_hits",
    "Hook calls answered from a stored prediction (no ECG decoding, no inference), by tier",
    ["tier"],
)
MISSES = Counter(
    "ecglab_prediction_cache_misses", "Hook calls whose prediction was not stored (or no longer matched)"
)


# -- keys ----------------------------------------------------------------------------------------------


def _canonical(value: Any) -> bytes:
    """One byte string per JSON value (keys sorted, no whitespace, ASCII: lone surrogates included)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode("ascii")


def _resource_digest(resource: Any) -> bytes:
    """SHA-256 of a JSON value, exact up to SHA-256 collisions, cheap for large strings.

    Strings longer than :data:`LONG_TEXT` (sampled data, base64 attachments) are hashed on their
    own and stand in the canonical JSON as their digest; the paths of those strings are hashed
    too, so a short string that happens to spell a digest cannot pass for a long one. About three
    times faster than the canonical JSON of a 12-lead ``valueSampledData`` Observation.
    """
    replaced: list[tuple[str | int, ...]] = []

    def light(value: Any, path: tuple[str | int, ...]) -> Any:
        if isinstance(value, dict):
            return {k: light(v, (*path, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [light(v, (*path, i)) for i, v in enumerate(value)]
        if isinstance(value, str) and len(value) > LONG_TEXT:
            replaced.append(path)
            return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
        return value

    shape = light(resource, ())
    return hashlib.sha256(_canonical([shape, replaced])).digest()


def model_identity(runtime: Any) -> str:
    """The served model as keys name it: ONNX SHA-256, variant and its SHA-256, version.

    A runtime without a manifest (a test double) is named by its type and version.
    """
    manifest = getattr(runtime, "manifest", None)
    version = str(getattr(runtime, "version", ""))
    if manifest is None:
        return f"{type(runtime).__name__}:{version}"
    variant = str(getattr(runtime, "variant", "fp32"))
    spec = manifest.variants.get(variant) if variant != "fp32" else None
    variant_sha = str(spec.sha256) if spec is not None else ""
    return f"{manifest.onnx.sha256}:{variant}:{variant_sha}:{version}"


def prediction_key(
    model: str,
    patient_ids: Sequence[str | None],
    ecgs: Sequence[Mapping[str, Any]],
    attachments: Mapping[str, bytes],
) -> str:
    """The cache key of a call (module docstring): model, patient ids, recent ECGs and attachment bytes."""
    digest = hashlib.sha256()
    for part in (CACHE_FORMAT, MAPPING_VERSION, model, _canonical(list(patient_ids)).decode()):
        digest.update(part.encode())
        digest.update(b"\0")
    for resource in ecgs:
        digest.update(_resource_digest(resource))
    for url in sorted(attachments):
        digest.update(url.encode())
        digest.update(hashlib.sha256(attachments[url]).digest())
    return digest.hexdigest()


def metadata_digest(metadata: Mapping[str, float | None]) -> str:
    """SHA-256 of the raw metadata values (every feature key, ``None`` where missing)."""
    return hashlib.sha256(_canonical({k: metadata[k] for k in sorted(metadata)})).hexdigest()


# -- values --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CachedPrediction:
    """A stored prediction and what a call answering from it needs (module docstring, "Value")."""

    predictions: tuple[TargetPrediction, ...]
    metadata_sha256: str
    ecg_reference: str
    ecg_recorded_at: datetime
    ecg_carrier: str
    ecg_fs: float
    ecg_lead_names: tuple[str, ...]
    input_facts: InputFacts | None = None

    def to_json(self) -> str:
        """The stored form."""
        facts = self.input_facts
        return json.dumps(
            {
                "predictions": [dataclasses.asdict(p) for p in self.predictions],
                "metadata_sha256": self.metadata_sha256,
                "ecg": {
                    "reference": self.ecg_reference,
                    "recorded_at": self.ecg_recorded_at.isoformat(),
                    "carrier": self.ecg_carrier,
                    "fs": self.ecg_fs,
                    "lead_names": list(self.ecg_lead_names),
                },
                "input_facts": None
                if facts is None
                else {
                    "sha256": facts.sha256,
                    "features": dict(facts.features),
                    "missing": list(facts.missing),
                },
            }
        )

    @classmethod
    def from_json(cls, text: str) -> CachedPrediction:
        """Read :meth:`to_json`'s form back (``ValueError``, ``KeyError`` or ``TypeError`` when it is not)."""
        data = json.loads(text)
        ecg = data["ecg"]
        facts = data["input_facts"]
        return cls(
            predictions=tuple(TargetPrediction(**p) for p in data["predictions"]),
            metadata_sha256=str(data["metadata_sha256"]),
            ecg_reference=str(ecg["reference"]),
            ecg_recorded_at=datetime.fromisoformat(ecg["recorded_at"]),
            ecg_carrier=str(ecg["carrier"]),
            ecg_fs=float(ecg["fs"]),
            ecg_lead_names=tuple(str(name) for name in ecg["lead_names"]),
            input_facts=None
            if facts is None
            else InputFacts(str(facts["sha256"]), dict(facts["features"]), tuple(facts["missing"])),
        )


# -- the cache -----------------------------------------------------------------------------------------


class PredictionCache:
    """The in-process LRU in front of the database table, with a TTL; one per app, thread-safe.

    ``model`` is :func:`model_identity` of the served model (part of every key). ``clock`` gives
    epoch seconds (tests move it).
    """

    def __init__(
        self,
        engine: Engine,
        ttl_s: float,
        model: str,
        *,
        memory_entries: int = MEMORY_ENTRIES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError("a prediction cache needs a TTL above 0 s (0 turns it off)")
        self.engine = engine
        self.ttl_s = float(ttl_s)
        self.model = model
        self.clock = clock
        self._memory_entries = memory_entries
        self._memory: OrderedDict[str, tuple[float, CachedPrediction]] = OrderedDict()
        self._lock = threading.Lock()
        self._writer = BackgroundWriter("prediction-cache")
        self._last_purge = 0.0

    # -- reading ---------------------------------------------------------------------------------
    def get(self, key: str) -> tuple[CachedPrediction, Tier] | None:
        """The unexpired entry of ``key`` and where it was found (memory first, then the database)."""
        now = self.clock()
        with self._lock:
            found = self._memory.get(key)
            if found is not None:
                if found[0] > now:
                    self._memory.move_to_end(key)
                    return found[1], "memory"
                del self._memory[key]
        row = self._read_row(key, now)
        if row is None:
            return None
        expires_at, entry = row
        self._remember(key, expires_at, entry)
        return entry, "database"

    def _read_row(self, key: str, now: float) -> tuple[float, CachedPrediction] | None:
        """The unexpired database row of ``key`` (a failure or an unreadable row is logged: none)."""
        stored = CachedPredictionRow
        try:
            with self.engine.connect() as conn:
                row = conn.execute(
                    select(stored.expires_at, stored.payload).where(
                        stored.cache_key == key, stored.expires_at > now
                    )
                ).first()
        except Exception:
            log.warning("prediction cache: the database could not be read; computing afresh", exc_info=True)
            return None
        if row is None:
            return None
        try:
            return float(row.expires_at), CachedPrediction.from_json(row.payload)
        except (ValueError, KeyError, TypeError):
            log.warning("prediction cache: a stored entry is unreadable; computing afresh")
            return None

    @staticmethod
    def counted(tier: Tier | None) -> None:
        """Count one call's outcome: a hit from ``tier``, or a miss (``None``)."""
        if tier is None:
            MISSES.inc()
        else:
            HITS.labels(tier).inc()

    # -- writing ---------------------------------------------------------------------------------
    def put(self, key: str, entry: CachedPrediction) -> None:
        """Keep ``entry`` for the TTL: in memory now, in the database on the writer thread."""
        expires_at = self.clock() + self.ttl_s
        self._remember(key, expires_at, entry)
        if not self._writer.submit(self._write, key, expires_at, entry.to_json()):  # shutting down
            log.debug("prediction cache closed; entry kept in memory only")

    def _remember(self, key: str, expires_at: float, entry: CachedPrediction) -> None:
        with self._lock:
            self._memory[key] = (expires_at, entry)
            self._memory.move_to_end(key)
            while len(self._memory) > self._memory_entries:
                self._memory.popitem(last=False)

    def _write(self, key: str, expires_at: float, payload: str) -> None:
        """Upsert one row, and purge expired rows at most every :data:`PURGE_INTERVAL_S` (failures logged)."""
        row = CachedPredictionRow
        insert = postgresql.insert if self.engine.dialect.name == "postgresql" else sqlite.insert
        statement = (
            insert(row)
            .values(cache_key=key, expires_at=expires_at, payload=payload)
            .on_conflict_do_update(
                index_elements=["cache_key"], set_={"expires_at": expires_at, "payload": payload}
            )
        )
        now = self.clock()
        try:
            with self.engine.begin() as conn:
                conn.execute(statement)
                if now - self._last_purge >= PURGE_INTERVAL_S:
                    self._last_purge = now
                    conn.execute(delete(row).where(row.expires_at <= now))
        except Exception:
            log.warning("prediction cache: could not store an entry in the database", exc_info=True)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until the entries queued so far are in the database; False when ``timeout_s`` ran out."""
        return self._writer.flush(timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued (up to ``timeout_s``), then stop the writer thread (idempotent)."""
        if not self._writer.close(timeout_s):
            log.warning(
                "prediction cache: entries still queued after %.0f s at shutdown were dropped", timeout_s
            )
