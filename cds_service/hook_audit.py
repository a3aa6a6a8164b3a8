"""The audit trail as the hook pipeline writes it: one row per hook call, off the answer's path.

:mod:`cds_service.audit` defines the row and its storage; this module turns what one hook call
knew (:class:`CallFacts`, with the worker's :class:`CallTrace`) into an
:class:`~cds_service.audit.AuditRecord` and writes it on one background thread
(``ecglab-audit``) after the answer is computed: hashing the model inputs and the database write
add nothing to the EHR's wait, and a storage failure is logged, never a failed call.
:meth:`AuditTrail.flush` waits for the rows queued so far (tests, shutdown).

What a row holds depends on how far the call got:

* the model ran (outcomes ``cards``, ``no_cards``, ``shadow``): everything, including the cards
  returned (live) or withheld (shadow) and every target's probability and threshold;
* ``no_ecg``; ``ecg_rejected`` (the rejected ECG's reference); ``precondition_failed`` (412);
  ``budget_exceeded``; ``error``; ``off`` (the controls switched the service off): the call's
  facts without inputs or predictions.

A request that cannot be parsed (400) names no usable patient and is not audited.

**Model inputs hash.** For a :class:`~cds_service.inference.ModelRuntime` the hash covers exactly
the tensors the ONNX session received (the prepared ECG's samples of the manifest's windows, the
encoded categorical and continuous metadata), recomputed here on the audit thread with the
runtime's own preparation and the training encoding; the ECG amplitude statistics come from the
same prepared ECG. A runtime without a manifest (a test double) gets a hash of the raw signal and
metadata instead.

**Model identity.** ``model_sha256`` is the manifest's ONNX SHA-256 (the model the model card
describes, and the one ``ecglab monitor`` selects rows by); when a variant is served, its name is
appended to ``model_version`` as semver build metadata (``0.1.0+int8``).

**Key.** ``ECGLAB_AUDIT_KEY`` keys the patient hash (:func:`resolve_audit_key`): required with
auth and audit on; with auth off a random key is made for the process, with a warning, because
``ecglab monitor`` needs the service's key to match lab results to rows.

**Retention.** :meth:`AuditTrail.start_retention` deletes rows older than
``ECGLAB_AUDIT_RETENTION_DAYS`` at start-up and then once a day, on a daemon thread.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import Engine

from cds_service.audit import (
    AuditRecord,
    CardRef,
    TargetScore,
    ecg_amplitude_features,
    inputs_digest,
    load_audit_key,
    patient_key,
    purge_audit,
    write_audit,
)
from cds_service.background_writer import BackgroundWriter
from cds_service.fhir_values import reference
from fhir_mappings.errors import ConfigError
from fhir_mappings.metadata_encoding import encode_metadata
from fhir_mappings.signal_spec import CLIP_MV

if TYPE_CHECKING:
    from cds_service.cards import BuiltCard
    from cds_service.features import ModelInputs
    from cds_service.inference import TargetPrediction
    from cds_service.settings import Settings

log = logging.getLogger(__name__)

#: Seconds between two retention purges.
PURGE_INTERVAL_S = 24 * 3600.0


def resolve_audit_key(settings: Settings) -> bytes | None:
    """The audit HMAC key: ``None`` with audit off; :class:`ConfigError` with auth on and no key."""
    if not settings.audit:
        return None
    if settings.audit_key:
        return load_audit_key(settings.audit_key)
    if settings.auth:
        raise ConfigError(
            "ECGLAB_AUDIT_KEY: required while ECGLAB_AUTH and ECGLAB_AUDIT are on: 32+ bytes of secret "
            "text, the same for every worker and for 'ecglab monitor' (or set ECGLAB_AUDIT=off)"
        )
    log.warning(
        "ECGLAB_AUDIT_KEY is not set: the audit trail hashes patient ids with a random key of this "
        "process, so 'ecglab monitor' cannot match its rows to lab results (development only)"
    )
    return secrets.token_hex(32).encode("ascii")


@dataclass(frozen=True)
class ModelIdentity:
    """The served model as audit rows and cards name it."""

    sha256: str
    version: str

    @classmethod
    def of(cls, runtime: Any) -> ModelIdentity:
        """The runtime's manifest SHA-256 (empty without a manifest) and version (+ variant)."""
        manifest = getattr(runtime, "manifest", None)
        sha256 = str(manifest.onnx.sha256) if manifest is not None else ""
        version = str(runtime.version)
        variant = getattr(runtime, "variant", "fp32")
        if isinstance(variant, str) and variant != "fp32":
            version = f"{version}+{variant}"
        return cls(sha256, version)


@dataclass(frozen=True)
class InputFacts:
    """What a row says of the model inputs: their digest, the features as fed (with the ECG's
    amplitude statistics) and the features imputed. Kept with a reused prediction
    (:mod:`cds_service.prediction_cache`), whose ECG is not decoded again."""

    sha256: str
    features: Mapping[str, float | None]
    missing: tuple[str, ...]


@dataclass(frozen=True)
class CallTrace:
    """What the worker thread learnt before answering (empty where it stopped early).

    ``input_facts``, when set, are the facts of ``inputs`` computed already (a reused prediction's
    ``inputs`` carry no ECG samples); otherwise the audit thread computes them from ``inputs``.
    """

    inputs: ModelInputs | None = None
    ecgs: Sequence[Mapping[str, Any]] = ()
    ecg_reference: str | None = None
    predictions: Sequence[TargetPrediction] = ()
    cards: Sequence[BuiltCard] = ()
    input_facts: InputFacts | None = None


@dataclass(frozen=True)
class CallFacts:
    """One answered hook call, as the pipeline hands it to the audit trail."""

    time: datetime
    service_id: str
    hook_instance: str
    issuer: str | None
    patient_id: str
    mode: str
    outcome: str
    latency_ms: float
    trace: CallTrace


def _absent(value: float | None) -> bool:
    """Whether a metadata value is missing (and therefore imputed by the encoding)."""
    return value is None or not math.isfinite(float(value))


def _ecg_version(ecgs: Sequence[Mapping[str, Any]], ref: str | None) -> str | None:
    """``meta.versionId`` of the ECG resource named ``ref`` among ``ecgs``."""
    if ref is None:
        return None
    for resource in ecgs:
        if reference(resource) == ref:
            meta = resource.get("meta")
            version = meta.get("versionId") if isinstance(meta, Mapping) else None
            return str(version) if version is not None else None
    return None


class AuditTrail:
    """Builds and writes the audit rows of one app (``key=None``: audit off, nothing is written)."""

    def __init__(self, engine: Engine, key: bytes | None, runtime: Any) -> None:
        self.engine = engine
        self.enabled = key is not None
        self.model = ModelIdentity.of(runtime)
        self._key = key or b""
        self._runtime = runtime
        self._writer = BackgroundWriter("audit") if self.enabled else None
        self._stop = threading.Event()
        self._purger: threading.Thread | None = None

    # -- writing ----------------------------------------------------------------------------------------
    def submit(self, facts: CallFacts) -> None:
        """Queue the row of one call for the audit thread (returns at once)."""
        if self._writer is not None and not self._writer.submit(self._write, facts):  # shutting down
            log.warning("audit trail closed; a %s hook call was not audited", facts.outcome)

    def _write(self, facts: CallFacts) -> None:
        """Build and store one row; any failure is logged (the call was answered already)."""
        try:
            write_audit(self.engine, self.record(facts))
        except Exception:
            log.exception("could not write the audit row of a hook call (outcome %s)", facts.outcome)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until the rows queued so far are written; False when ``timeout_s`` ran out."""
        return self._writer is None or self._writer.flush(timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued (up to ``timeout_s``), then stop the audit and retention threads."""
        self._stop.set()
        if self._writer is not None and not self._writer.close(timeout_s):
            log.warning("audit rows still queued after %.0f s at shutdown were dropped", timeout_s)

    # -- the row ----------------------------------------------------------------------------------------
    def record(self, facts: CallFacts) -> AuditRecord:
        """The :class:`AuditRecord` of one call (see the module docstring for what each outcome holds)."""
        trace = facts.trace
        features: dict[str, float | None] = {}
        missing: tuple[str, ...] = ()
        digest = ""
        ecg_time = None
        ecg_ref = trace.ecg_reference
        if trace.inputs is not None:
            inputs = trace.inputs
            known = trace.input_facts or self.input_facts(inputs)
            digest, features, missing = known.sha256, dict(known.features), known.missing
            ecg_time = inputs.ecg.recorded_at
            ecg_ref = inputs.ecg.reference
        return AuditRecord(
            time=facts.time,
            service_id=facts.service_id,
            hook_instance=facts.hook_instance,
            issuer=facts.issuer,
            patient_key=patient_key(self._key, facts.patient_id),
            ecg_reference=ecg_ref,
            ecg_version=_ecg_version(trace.ecgs, ecg_ref),
            ecg_time=ecg_time,
            inputs_sha256=digest,
            missing_inputs=missing,
            predictions={
                p.target: TargetScore(float(p.probability), float(p.decision_threshold))
                for p in trace.predictions
            },
            cards=tuple(CardRef(str(c.card["uuid"]), c.lab_key, int(c.horizon_min)) for c in trace.cards),
            latency_ms=facts.latency_ms,
            model_sha256=self.model.sha256,
            model_version=self.model.version,
            mode="shadow" if facts.mode == "shadow" else "live",
            features=features,
            outcome=facts.outcome,
        )

    def input_facts(self, inputs: ModelInputs) -> InputFacts:
        """The digest, features and imputed features of ``inputs`` as a row records them."""
        arrays, keys = self._model_arrays(inputs)
        features = {key: inputs.metadata.get(key) for key in keys}
        features.update(ecg_amplitude_features(arrays[0].T, CLIP_MV))
        missing = tuple(key for key in keys if _absent(inputs.metadata.get(key)))
        return InputFacts(inputs_digest(*arrays), features, missing)

    def _model_arrays(self, inputs: ModelInputs) -> tuple[tuple[np.ndarray, ...], list[str]]:
        """(tensors the model received, ECG first as (samples, leads); the metadata keys it reads)."""
        manifest = getattr(self._runtime, "manifest", None)
        prepare = getattr(self._runtime, "prepare", None)
        if manifest is not None and callable(prepare):
            spec = manifest.metadata
            keys = [c.key for c in spec.categorical] + list(spec.continuous)
            prepared = np.asarray(prepare(inputs.ecg.signal, inputs.ecg.fs, inputs.ecg.lead_names))
            needed = manifest.ecg.window * manifest.ecg.n_windows
            ecg = np.ascontiguousarray(prepared[:needed], dtype=np.float32)
            cat, cont = encode_metadata({key: [inputs.metadata.get(key)] for key in keys}, spec)
            return (ecg, cat, cont.astype(np.float32)), keys
        keys = sorted(inputs.metadata)
        values = [inputs.metadata[key] for key in keys]
        metadata = np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)
        return (np.asarray(inputs.ecg.signal, dtype=np.float32), metadata), keys

    # -- retention --------------------------------------------------------------------------------------
    def start_retention(self, days: int) -> None:
        """Purge rows older than ``days`` now and every :data:`PURGE_INTERVAL_S` (0 = keep all rows)."""
        if days <= 0 or self._purger is not None:
            return
        age = timedelta(days=days)

        def purge_daily() -> None:
            while True:
                try:
                    removed = purge_audit(self.engine, age)
                    if removed:
                        log.info("audit retention: purged %d row(s) older than %d day(s)", removed, days)
                except Exception:
                    log.exception("audit retention purge failed; next attempt in a day")
                if self._stop.wait(PURGE_INTERVAL_S):
                    return

        self._purger = threading.Thread(target=purge_daily, name="ecglab-audit-retention", daemon=True)
        self._purger.start()
