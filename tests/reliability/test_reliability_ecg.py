"""Bad ECGs through the prefetch: every malformed recording gets a defined outcome, never a failure.

The real ONNX runtime (the toy model of :mod:`tests.onnx_fixtures`, every target positive) and the
real signal path (``ecg.readers`` → ``ecg.select`` → ``ecg.prepare.prepare_ecg``) run behind a hook call
whose prefetch carries the ECG as an Observation with one ``valueSampledData`` per lead. Two
outcomes are allowed, and which one applies is the method's decision, pinned per case here:

=========================  ====================================================================
case                       outcome (method §2.2 / BRIEF "ECG conventions")
=========================  ====================================================================
leads of unequal length    no card, reason ``wrong_length``: which samples belong together is
                           unknowable
shorter than 2.5 s         no card, ``too_short``: not one model window of real signal
V5, V6 missing             no card, ``missing_leads``: the model needs all twelve
only I, II, V1-V6          prediction: III, aVR, aVL, aVF are exact linear combinations of I and
                           II (Einthoven, Goldberger), derived as GE MUSE exports need
a few NaN samples          prediction on the repaired signal: linear interpolation per lead
                           (``E`` markers, ≤ 20 % of a lead)
a lead 30 % NaN            no card, ``too_many_missing``: interpolation would invent the signal
a literal "NaN" token      no card, ``non_numeric`` (SampledData allows only numbers and E/L/U)
flat lines (all zero)      prediction: the method has no lead-off rule; a flat ECG is valid input
absurd amplitudes (50 mV)  prediction on the repaired signal: clipped to ±3 mV
beyond float range         no card, ``too_many_missing`` (1e308 µV overflows to inf = missing)
500 Hz instead of 100 Hz   prediction: resampled to 100 Hz (resample_poly)
period 0                   no card, ``bad_fs``
leads at different rates   no card, ``bad_fs``
0.001 Hz (period 1e6 ms)   no card, ``bad_fs``, at once: resampling it to 100 Hz would have
                           allocated ~24 GB (found by this suite; rates outside 50 Hz-20 kHz are
                           now refused by the readers)
unit mm[Hg]                no card, ``unknown_units``
=========================  ====================================================================

"No card" is a 200 ``{"cards": []}`` with a log line naming the reason (cdshooks.md §7: no advice
is an answer, not an error).

Hostile files (issue 14) take the same way as Media attachments: a DICOM deflate bomb
(``attachment_too_large``), a UTF-16 MUSE export declaring entities (``unsafe_xml``), a WFDB zip
lying about its member sizes (``unreadable``: the member stops at its declared size and fails its
CRC); each within the budget. An ECG whose subject is another patient is never used, and the log
does not name that patient.
"""

from __future__ import annotations

import base64
import io
import logging
import re
import struct
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask import Flask

from cds_service.app import create_app
from cds_service.ecg.prepare import prepare_ecg
from cds_service.inference import ModelRuntime, TargetPrediction
from fhir_mappings import load_mappings
from fhir_mappings.signal_spec import MODEL_LEADS
from tests.figures import record_figure
from tests.onnx_fixtures import build_toy_model_dir
from tests.service_fixtures import LOINC, PATIENT_ID, clinical_record, hook_request, iso, prefetch_from

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

DATA = Path(__file__).resolve().parents[1] / "data" / "ecg"
FS = 100.0
SECONDS = 10.0


@dataclass
class RecordingRuntime:
    """The real ONNX runtime, remembering what each hook call handed it."""

    runtime: ModelRuntime
    seen: list[Any] = field(default_factory=list)

    @property
    def version(self) -> str:
        """The wrapped model's version."""
        return self.runtime.version

    @property
    def trained_on_synthetic(self) -> bool:
        """Whether the wrapped model was trained on synthetic data."""
        return self.runtime.trained_on_synthetic

    @property
    def provider(self) -> str:
        """The wrapped session's execution provider."""
        return str(self.runtime.provider)

    def predict(self, inputs: Any) -> list[TargetPrediction]:
        """Record the inputs and predict with the real runtime."""
        self.seen.append(inputs)
        return self.runtime.predict(inputs)


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> ModelRuntime:
    """The toy ONNX model, every target positive (threshold 0), on the CPU provider."""
    folder = tmp_path_factory.mktemp("toy-model")
    build_toy_model_dir(folder, decision_threshold=0.0)
    return ModelRuntime.load(folder, ["CPUExecutionProvider"])


@pytest.fixture
def service(tmp_path: Path, runtime: ModelRuntime) -> Iterator[tuple[Flask, RecordingRuntime]]:
    """A service (auth off) running the real runtime, and the recorder around it."""
    recorder = RecordingRuntime(runtime)
    app = create_app(
        {"auth": False, "issuers": "", "database_url": f"sqlite:///{tmp_path / 'ecg.sqlite3'}"},
        runtime=recorder,
    )
    yield app, recorder
    app.extensions["ecglab"].close()


# -- building ECGs -------------------------------------------------------------------------------------------


def clean_signal(seconds: float = SECONDS, fs: float = FS, leads: Sequence[str] = MODEL_LEADS) -> np.ndarray:
    """A plausible (T, C) ECG in mV: a 1.2 Hz wave per lead, phase-shifted, ±0.8 mV, plus noise."""
    rng = np.random.default_rng(11)
    t = np.arange(int(seconds * fs)) / fs
    return np.stack(
        [0.8 * np.sin(2 * np.pi * 1.2 * t + i) + rng.normal(0, 0.02, t.size) for i in range(len(leads))],
        axis=1,
    )


def sample_text(column: np.ndarray) -> str:
    """SampledData ``data`` in µV: integers, ``E`` for NaN, ``inf`` spelled as a huge number."""
    tokens = []
    for value in column:
        if np.isnan(value):
            tokens.append("E")
        elif np.isinf(value):
            tokens.append("1e400")
        else:
            tokens.append(str(round(float(value) * 1000.0, 3)))
    return " ".join(tokens)


def ecg_observation(
    signal: np.ndarray | Sequence[np.ndarray],
    leads: Sequence[str] = MODEL_LEADS,
    *,
    period_ms: float | Sequence[float] = 10.0,
    unit: str = "uV",
    data: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A 12-lead ECG Observation (LOINC 11524-6), one component per lead with its MDC code.

    ``signal`` is (T, C) mV or one column per lead (lengths may differ); ``period_ms`` may differ
    per lead; ``data`` overrides the sample text of named leads.
    """
    mdc = load_mappings().ecg.mdc_lead_codes
    columns = (
        [signal[:, i] for i in range(signal.shape[1])] if isinstance(signal, np.ndarray) else list(signal)
    )
    periods = [period_ms] * len(leads) if isinstance(period_ms, int | float) else list(period_ms)
    components = []
    for lead, column, period in zip(leads, columns, periods, strict=True):
        coding = mdc[lead]
        components.append(
            {
                "code": {
                    "coding": [{"system": coding.system, "code": coding.code, "display": coding.display}]
                },
                "valueSampledData": {
                    "origin": {"value": 0, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
                    "period": period,
                    "factor": 1,
                    "dimensions": 1,
                    "data": (data or {}).get(lead) or sample_text(column),
                },
            }
        )
    return {
        "resourceType": "Observation",
        "id": "ecg-under-test",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "11524-6", "display": "EKG study"}]},
        "subject": {"reference": f"Patient/{PATIENT_ID}"},
        "effectiveDateTime": iso(datetime.now(UTC) - timedelta(minutes=10)),
        "component": components,
    }


def call_with(app: Flask, observation: dict[str, Any]) -> tuple[Any, float]:
    """POST patient-view with the record's prefetch, its ECG replaced by ``observation``."""
    record = clinical_record()
    record["ecgObservations"] = [observation]
    started = time.perf_counter()
    response = app.test_client().post(
        "/cds-services/ecglab-patient-view", json=hook_request("patient-view", prefetch=prefetch_from(record))
    )
    return response, time.perf_counter() - started


# -- the cases -----------------------------------------------------------------------------------------------


def with_nans(fraction: float) -> np.ndarray:
    """The clean signal with ``fraction`` of lead V2's samples missing (spread in short gaps)."""
    signal = clean_signal()
    rng = np.random.default_rng(3)
    starts = rng.choice(
        np.arange(0, signal.shape[0] - 5, 10), size=int(signal.shape[0] * fraction / 5), replace=False
    )
    for start in starts:
        signal[start : start + 5, MODEL_LEADS.index("V2")] = np.nan
    return signal


def interpolated(signal: np.ndarray) -> np.ndarray:
    """The method's repair by hand: linear interpolation of NaN samples per lead."""
    repaired = signal.copy()
    t = np.arange(signal.shape[0])
    for lead in range(signal.shape[1]):
        bad = np.isnan(repaired[:, lead])
        if bad.any():
            repaired[bad, lead] = np.interp(t[bad], t[~bad], repaired[~bad, lead])
    return repaired


def with_spikes() -> np.ndarray:
    """The clean signal with ±50 mV spikes in lead II (a pacing artefact scaled wrong)."""
    signal = clean_signal()
    signal[100::97, MODEL_LEADS.index("II")] = 50.0
    signal[150::89, MODEL_LEADS.index("II")] = -50.0
    return signal


@dataclass(frozen=True)
class Case:
    """One bad ECG: how to build its Observation, and its outcome (a rejection reason, or a repair)."""

    build: Callable[[], dict[str, Any]]
    reason: str | None = None  # the logged rejection reason; None = a prediction is made
    repaired: Callable[[], tuple[np.ndarray, float, Sequence[str]]] | None = None  # what the model must see


LIMB_AND_CHEST = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")
CASES: dict[str, Case] = {
    "leads of unequal length": Case(
        lambda: ecg_observation([clean_signal()[:, 0], *[clean_signal()[:-37, i] for i in range(1, 12)]]),
        reason="wrong_length",
    ),
    "shorter than 2.5 s": Case(lambda: ecg_observation(clean_signal(seconds=2.0)), reason="too_short"),
    "V5 and V6 missing": Case(
        lambda: ecg_observation(clean_signal(leads=MODEL_LEADS[:6]), MODEL_LEADS[:6]), reason="missing_leads"
    ),
    "limb leads derived from I and II": Case(
        lambda: ecg_observation(clean_signal(leads=LIMB_AND_CHEST), LIMB_AND_CHEST),
        repaired=lambda: (clean_signal(leads=LIMB_AND_CHEST), FS, LIMB_AND_CHEST),
    ),
    "a few NaN samples": Case(
        lambda: ecg_observation(with_nans(0.05)),
        repaired=lambda: (interpolated(with_nans(0.05)), FS, MODEL_LEADS),
    ),
    "a lead 30 % NaN": Case(lambda: ecg_observation(with_nans(0.30)), reason="too_many_missing"),
    "a literal NaN token": Case(
        lambda: ecg_observation(clean_signal(), data={"V3": "0 1 NaN 2 " * 250}), reason="non_numeric"
    ),
    "flat lines": Case(
        lambda: ecg_observation(np.zeros((1000, 12))),
        repaired=lambda: (np.zeros((1000, 12)), FS, MODEL_LEADS),
    ),
    "absurd amplitudes (50 mV spikes)": Case(
        lambda: ecg_observation(with_spikes()),
        repaired=lambda: (np.clip(with_spikes(), -3, 3), FS, MODEL_LEADS),
    ),
    "amplitudes beyond float range": Case(
        lambda: ecg_observation(clean_signal(), data={"I": "1e308 " * 1000}), reason="too_many_missing"
    ),
    "500 Hz instead of 100 Hz": Case(
        lambda: ecg_observation(clean_signal(fs=500.0), period_ms=2.0),
        repaired=lambda: (clean_signal(fs=500.0), 500.0, MODEL_LEADS),
    ),
    "period 0": Case(lambda: ecg_observation(clean_signal(), period_ms=0), reason="bad_fs"),
    "leads at different rates": Case(
        lambda: ecg_observation(clean_signal(), period_ms=[10.0] * 11 + [4.0]), reason="bad_fs"
    ),
    "0.001 Hz (period 1e6 ms)": Case(lambda: ecg_observation(clean_signal(), period_ms=1e6), reason="bad_fs"),
    "unit mm[Hg]": Case(lambda: ecg_observation(clean_signal(), unit="mm[Hg]"), reason="unknown_units"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_ecg_gets_its_defined_outcome(
    service: tuple[Flask, RecordingRuntime], caplog: pytest.LogCaptureFixture, case: str
) -> None:
    """§7 + method §2.2: a malformed ECG → no card with its reason logged, or cards from the repaired signal."""
    app, recorder = service
    spec = CASES[case]
    with caplog.at_level(logging.INFO, logger="cds_service"):
        response, elapsed = call_with(app, spec.build())
    assert response.status_code == 200, response.get_json()
    cards = response.get_json()["cards"]
    record_figure(
        f"bad ECG {case}",
        f"{'no card (' + spec.reason + ')' if spec.reason else f'{len(cards)} cards'} in {1000 * elapsed:.0f} ms",
    )
    assert elapsed < 1.5, "within the default hook budget"
    if spec.reason is not None:
        assert cards == [] and recorder.seen == []
        assert f"ECG rejected (reason={spec.reason}); no cards" in caplog.text
        return
    assert cards, "the repaired ECG is scored and flagged (every toy target is positive)"
    assert spec.repaired is not None and len(recorder.seen) == 1
    ecg = recorder.seen[0].ecg
    signal, fs, leads = spec.repaired()
    seen_by_model = prepare_ecg(ecg.signal, ecg.fs, ecg.lead_names)
    expected = (
        prepare_ecg(signal, fs, leads) if leads == MODEL_LEADS else _with_derived_limb_leads(signal, fs)
    )
    np.testing.assert_allclose(seen_by_model, expected, atol=2e-3)  # µV text rounding
    assert np.isfinite(seen_by_model).all() and np.abs(seen_by_model).max() <= 3.0


def _with_derived_limb_leads(signal: np.ndarray, fs: float) -> np.ndarray:
    """Prepared 12 leads from I, II, V1-V6: III = II − I, aVR = −(I + II)/2, aVL = I − II/2, aVF = II − I/2."""
    lead_i, lead_ii = signal[:, 0], signal[:, 1]
    full = np.column_stack(
        [signal, lead_ii - lead_i, -(lead_i + lead_ii) / 2, lead_i - lead_ii / 2, lead_ii - lead_i / 2]
    )
    return prepare_ecg(full, fs, (*LIMB_AND_CHEST, "III", "aVR", "aVL", "aVF"))


def test_a_rejected_newest_ecg_falls_back_to_an_older_good_one(
    service: tuple[Flask, RecordingRuntime],
) -> None:
    """features "ECG choice": a corrupt newest upload does not hide a good recording taken minutes earlier."""
    app, recorder = service
    bad = ecg_observation(clean_signal(), period_ms=0)
    good = {
        **ecg_observation(clean_signal()),
        "id": "ecg-older",
        "effectiveDateTime": iso(datetime.now(UTC) - timedelta(minutes=40)),
    }
    record = clinical_record()
    record["ecgObservations"] = [bad, good]
    response = app.test_client().post(
        "/cds-services/ecglab-patient-view", json=hook_request("patient-view", prefetch=prefetch_from(record))
    )
    assert response.status_code == 200 and response.get_json()["cards"]
    assert recorder.seen[0].ecg.reference == "Observation/ecg-older"


# -- hostile ECG files and other patients' ECGs through the hook ------------------------------------------


def _media(content: bytes, content_type: str, pid: str = PATIENT_ID) -> dict[str, Any]:
    """An ECG Media resource (DICOM modality ECG) carrying ``content`` inline, recorded 5 min ago."""
    return {
        "resourceType": "Media",
        "id": "hostile-file",
        "status": "completed",
        "modality": {"coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "ECG"}]},
        "subject": {"reference": f"Patient/{pid}"},
        "createdDateTime": iso(datetime.now(UTC) - timedelta(minutes=5)),
        "content": {"contentType": content_type, "data": base64.b64encode(content).decode("ascii")},
    }


def _deflate_bomb() -> bytes:
    """A DICOM ECG whose deflated data set (a few dozen KB) inflates to 60 MB."""
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = pydicom.dcmread(DATA / "guangxi_teaching_sinus_rhythm.dcm")
    ds.add_new(0x00091010, "OB", bytes(60 * 2**20))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def _utf16_entities() -> bytes:
    """The teaching MUSE export re-encoded as UTF-16 with an entity-expansion DTD inside."""
    text = (DATA / "guangxi_teaching_sinus_rhythm.xml").read_text(encoding="utf-8")
    text = re.sub(r"<!DOCTYPE[^>]*>", '<!DOCTYPE RestingECG [<!ENTITY a "aaaaaaaaaa">]>', text, count=1)
    return text.replace("<RestingECG>", "<RestingECG>&a;&a;&a;", 1).encode("utf-16")


def _lying_zip() -> bytes:
    """A WFDB zip whose signal member declares 64 bytes and inflates to 20 MB."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("rec.hea", "rec 12 500 5000\n" + "rec.dat 16 200 16 0 0 0 0 I\n" * 12)
        archive.writestr("rec.dat", bytes(20 * 2**20))
    return re.sub(
        rb"PK\x01\x02(.{16})(.{4})(.{4})",
        lambda m: b"PK\x01\x02" + m.group(1) + m.group(2) + struct.pack("<I", 64),
        out.getvalue(),
        flags=re.DOTALL,
    )


HOSTILE_FILES: dict[str, tuple[Callable[[], bytes], str, str]] = {
    "DICOM deflate bomb": (_deflate_bomb, "application/dicom", "attachment_too_large"),
    "UTF-16 MUSE with entities": (_utf16_entities, "application/xml", "unsafe_xml"),
    # the member stops at its declared 64 bytes, then fails its CRC: never 20 MB inflated
    "WFDB zip lying about its size": (_lying_zip, "application/zip", "unreadable"),
}


@pytest.mark.parametrize("case", list(HOSTILE_FILES))
def test_hostile_ecg_file_is_a_rejected_ecg_within_the_budget(
    service: tuple[Flask, RecordingRuntime], caplog: pytest.LogCaptureFixture, case: str
) -> None:
    """Issue 14: a hostile attachment costs bounded work and ends as 200, no card, its reason logged."""
    app, recorder = service
    build, content_type, reason = HOSTILE_FILES[case]
    record = clinical_record()
    record["ecgObservations"] = []
    record["ecgMedia"] = [_media(build(), content_type)]
    with caplog.at_level(logging.INFO, logger="cds_service"):
        started = time.perf_counter()
        response = app.test_client().post(
            "/cds-services/ecglab-patient-view",
            json=hook_request("patient-view", prefetch=prefetch_from(record)),
        )
        elapsed = time.perf_counter() - started
    assert response.status_code == 200 and response.get_json()["cards"] == []
    assert recorder.seen == []
    assert f"ECG rejected (reason={reason}); no cards" in caplog.text
    record_figure(f"hostile ECG {case}", f"no card ({reason}) in {1000 * elapsed:.0f} ms")
    assert elapsed < 1.5, "within the default hook budget"


def test_another_patients_ecg_in_the_prefetch_is_never_used(
    service: tuple[Flask, RecordingRuntime], caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 14 (patient binding): an ECG whose subject is another patient gives no card; logged without ids."""
    app, recorder = service
    record = clinical_record()
    record["ecgObservations"] = [
        {**ecg_observation(clean_signal()), "subject": {"reference": "Patient/someone-else"}}
    ]
    with caplog.at_level(logging.INFO, logger="cds_service"):
        response = app.test_client().post(
            "/cds-services/ecglab-patient-view",
            json=hook_request("patient-view", prefetch=prefetch_from(record)),
        )
    assert response.status_code == 200 and response.get_json()["cards"] == []
    assert recorder.seen == []
    assert "someone-else" not in caplog.text
