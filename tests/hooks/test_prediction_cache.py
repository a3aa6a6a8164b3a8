"""Predictions reused across hook calls (``cds_service.prediction_cache``, ``ECGLAB_PREDICTION_CACHE_S``).

Issue 18, "Predictions reused across hooks": an order-select or order-sign call after patient-view
on the same ECG answers from the stored prediction (no ECG decoding, no inference) and is audited
with it; any change of input (the ECG's version or bytes, the bytes behind its attachment URL, a
metadata value, the model) misses; entries expire after the TTL; every app sharing the database
shares them; ``/metrics`` counts hits and misses. The model is a counting double unless a test
needs the real runtime's probabilities.
"""

from __future__ import annotations

import base64
import copy
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

import cds_service.fetch
from cds_service.audit import AuditRecord, iter_audit
from cds_service.settings import default_model_dir
from tests.service_fixtures import (
    EHR_FHIR,
    PATIENT_ID,
    FakeRuntime,
    MockFhir,
    clinical_record,
    hook_request,
    iso,
    lab_order,
    prediction,
    prefetch_from,
    vital,
)

SERVICE_OF_HOOK = {
    "patient-view": "ecglab-patient-view",
    "order-select": "ecglab-order-select",
    "order-sign": "ecglab-order-sign",
}
CACHE_ON = {"auth": False, "issuers": "", "dev_fhir_servers": EHR_FHIR, "prediction_cache_s": 600}
REAL_ECG = Path(__file__).resolve().parents[1] / "data" / "ecg" / "guangxi_teaching_sinus_rhythm.dcm"
REAL_ECG_XML = REAL_ECG.with_suffix(".xml")


def counting_runtime(version: str = "9.9.9-test") -> FakeRuntime:
    """A fake model flagging NT-proBNP; ``len(runtime.seen)`` counts its calls."""
    return FakeRuntime([prediction("ntprobnp", 0.91), prediction("potassium", 0.2)], version=version)


def post(client: Any, hook: str, prefetch: dict[str, Any], **kwargs: Any) -> Any:
    """POST a ``hook`` call with ``prefetch`` (order hooks draft a potassium order); assert 200."""
    body = hook_request(hook, prefetch=prefetch, draft_orders=[lab_order("potassium", "draft-1")], **kwargs)
    response = client.post(f"/cds-services/{SERVICE_OF_HOOK[hook]}", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)[:500]
    return response


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the calls that choose and decode an ECG (``extract_model_inputs`` on the data path)."""
    calls: list[int] = []
    real = cds_service.fetch.extract_model_inputs

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cds_service.fetch, "extract_model_inputs", counted)
    return calls


def metric(client: Any, name: str, labels: str = "") -> float:
    """The value of one sample on ``/metrics`` (0 when it is not there yet)."""
    text = client.get("/metrics").get_data(as_text=True)
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" (\S+)"
    found = re.search(r"^" + pattern + r"$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def cache_counts(client: Any) -> tuple[float, float, float]:
    """(memory hits, database hits, misses) as ``/metrics`` states them."""
    return (
        metric(client, "ecglab_prediction_cache_hits_total", 'tier="memory"'),
        metric(client, "ecglab_prediction_cache_hits_total", 'tier="database"'),
        metric(client, "ecglab_prediction_cache_misses_total"),
    )


def audit_rows(app: Any) -> list[AuditRecord]:
    """Every audit row of ``app`` (after the audit thread has written what was queued)."""
    state = app.extensions["ecglab"]
    assert state.audit.flush()
    return list(iter_audit(state.engine, datetime(2000, 1, 1, tzinfo=UTC)))


# -- hits -----------------------------------------------------------------------------------------------


def test_order_hooks_after_patient_view_answer_without_decoding_or_inference(make_app, decodes) -> None:
    """Same ECG and chart: order-select and order-sign reuse patient-view's prediction (cards included)."""
    runtime = counting_runtime()
    client = make_app(runtime=runtime, fhir=MockFhir([]), **CACHE_ON).test_client()
    prefetch = prefetch_from(clinical_record())
    first = post(client, "patient-view", prefetch)
    assert len(runtime.seen) == 1 and len(decodes) == 1
    for hook in ("order-select", "order-sign"):
        answer = post(client, hook, prefetch)
        topics = [c["source"]["topic"]["code"] for c in answer.get_json()["cards"]]
        assert topics == ["ECGLABNTPROBNP"]
    assert len(runtime.seen) == 1, "the model ran again"
    assert len(decodes) == 1, "the ECG was decoded again"
    assert [c["source"]["topic"]["code"] for c in first.get_json()["cards"]] == ["ECGLABNTPROBNP"]


def test_a_hit_is_audited_with_the_stored_prediction_and_input_facts(make_app) -> None:
    """Every call gets its audit row; a hit's row carries the first call's probabilities, ECG and input digest."""
    app = make_app(runtime=counting_runtime(), fhir=MockFhir([]), audit_key="a" * 40, **CACHE_ON)
    client = app.test_client()
    prefetch = prefetch_from(clinical_record())
    post(client, "patient-view", prefetch)
    post(client, "order-select", prefetch)
    first, reused = audit_rows(app)
    assert (first.service_id, reused.service_id) == ("ecglab-patient-view", "ecglab-order-select")
    assert reused.outcome == first.outcome == "cards"
    assert (
        reused.predictions == first.predictions
        and reused.predictions["NTproBNP_high_est"].probability == 0.91
    )
    assert reused.inputs_sha256 == first.inputs_sha256 != ""
    assert reused.features == first.features and reused.missing_inputs == first.missing_inputs
    assert (reused.ecg_reference, reused.ecg_time) == (first.ecg_reference, first.ecg_time)
    assert reused.patient_key == first.patient_key


class RecordingRuntime:
    """The real runtime, with every prediction it computed kept in ``computed``."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.computed: list[list[Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def predict(self, inputs: Any) -> list[Any]:
        """Run the model and keep its answer."""
        self.computed.append(self.model.predict(inputs))
        return self.computed[-1]


def test_a_hit_returns_the_real_runtimes_calibrated_and_raw_probabilities(make_app) -> None:
    """With the bundled ONNX model: the reused predictions equal the computed ones exactly, raw included."""
    from cds_service.inference import ModelRuntime

    runtime = RecordingRuntime(
        ModelRuntime.load(default_model_dir(), ["CPUExecutionProvider"], variant="fp32")
    )
    app = make_app(runtime=runtime, fhir=MockFhir([]), **CACHE_ON)
    client = app.test_client()
    prefetch = prefetch_from(clinical_record())
    post(client, "patient-view", prefetch)
    post(client, "order-sign", prefetch)
    assert len(runtime.computed) == 1
    computed = runtime.computed[0]
    first, reused = audit_rows(app)
    assert reused.predictions == first.predictions
    assert {t: s.probability for t, s in reused.predictions.items()} == {
        p.target: p.probability for p in computed
    }
    assert reused.inputs_sha256 == first.inputs_sha256 and reused.features == first.features
    assert reused.features["ecg_rms_mv"] is not None
    cache = app.extensions["ecglab"].pipeline.deps.predictions
    assert cache.flush()
    found = [cache.get(key) for key in list(cache._memory)]
    assert [(p.probability, p.raw_probability) for p in found[0][0].predictions] == [
        (p.probability, p.raw_probability) for p in computed
    ]


# -- misses -----------------------------------------------------------------------------------------------


def _ecg(record: dict[str, Any]) -> dict[str, Any]:
    return dict(record["ecgObservations"][0])


def _new_version(record: dict[str, Any]) -> None:
    record["ecgObservations"] = [{**_ecg(record), "meta": {"versionId": "2"}}]


def _new_last_updated(record: dict[str, Any]) -> None:
    record["ecgObservations"] = [{**_ecg(record), "meta": {"lastUpdated": "2026-01-01T00:00:00Z"}}]


def _new_samples(record: dict[str, Any]) -> None:
    ecg = copy.deepcopy(_ecg(record))
    data = ecg["component"][3]["valueSampledData"]
    data["data"] = data["data"].replace("1", "2", 1)
    record["ecgObservations"] = [ecg]


def _new_heart_rate(record: dict[str, Any]) -> None:
    taken = datetime.now(UTC) - timedelta(minutes=10)
    record["vitals"] = [vital("8867-4", 89, "/min", taken, "hr-1"), *record["vitals"][1:]]


def _new_birth_date(record: dict[str, Any]) -> None:
    record["patient"] = [{**record["patient"][0], "birthDate": "1957-03-14"}]


def _new_sex(record: dict[str, Any]) -> None:
    record["patient"] = [{**record["patient"][0], "gender": "male"}]


@pytest.mark.parametrize(
    "change",
    [_new_version, _new_last_updated, _new_samples, _new_heart_rate, _new_birth_date, _new_sex],
    ids=["ecg-versionId", "ecg-lastUpdated", "ecg-samples", "heart-rate", "birth-date", "sex"],
)
def test_every_change_of_input_misses(make_app, change: Callable[[dict[str, Any]], None]) -> None:
    """Another ECG version or sample, or another metadata value: the model runs again."""
    runtime = counting_runtime()
    client = make_app(runtime=runtime, fhir=MockFhir([]), **CACHE_ON).test_client()
    record = clinical_record()
    post(client, "patient-view", prefetch_from(record))
    changed = copy.deepcopy(record)
    change(changed)
    post(client, "order-select", prefetch_from(changed))
    assert len(runtime.seen) == 2
    post(client, "order-sign", prefetch_from(changed))
    assert len(runtime.seen) == 2, "the changed inputs' own prediction is reused in turn"


def test_another_context_patient_never_gets_the_entry(make_app) -> None:
    """``context.patientId`` is part of the key: the same resources under another patient's call miss."""
    client = make_app(runtime=counting_runtime(), fhir=MockFhir([]), **CACHE_ON).test_client()
    prefetch = prefetch_from(clinical_record())
    post(client, "patient-view", prefetch)
    before = cache_counts(client)
    post(client, "order-select", prefetch, pid="pat-another-one")
    after = cache_counts(client)
    assert (after[0] - before[0], after[1] - before[1]) == (0, 0)


def test_another_model_misses_even_on_the_same_database(make_app) -> None:
    """The served model is part of the key: a new version computes afresh; the old one's entry stays its own."""
    old, new = counting_runtime("1.0.0"), counting_runtime("2.0.0")
    prefetch = prefetch_from(clinical_record())
    post(make_app(runtime=old, **CACHE_ON).test_client(), "patient-view", prefetch)
    post(make_app(runtime=new, **CACHE_ON).test_client(), "order-select", prefetch)
    assert (len(old.seen), len(new.seen)) == (1, 1)


def test_other_bytes_behind_the_same_attachment_url_miss(make_app, decodes) -> None:
    """A DocumentReference whose ``url`` is unchanged but whose Binary now holds another file: decoded again."""
    content = {"bytes": REAL_ECG.read_bytes()}
    record = clinical_record()
    taken = datetime.now(UTC) - timedelta(minutes=10)
    document = {
        "resourceType": "DocumentReference",
        "id": "ecg-file-1",
        "status": "current",
        "type": {"coding": [{"system": "http://loinc.org", "code": "11524-6"}]},
        "subject": {"reference": f"Patient/{PATIENT_ID}"},
        "date": iso(taken),
        "content": [
            {"attachment": {"contentType": "application/dicom", "url": f"{EHR_FHIR}/Binary/ecg-file"}}
        ],
    }
    record.update(ecgObservations=[], ecgDocuments=[document])
    binary_reads: list[str] = []

    def serve(request: httpx.Request) -> httpx.Response:
        binary_reads.append(request.url.path)
        return httpx.Response(200, content=content["bytes"], headers={"content-type": "application/dicom"})

    runtime = counting_runtime()
    app = make_app(runtime=runtime, **CACHE_ON)
    app.extensions["ecglab"].pipeline.deps.fhir_transport = httpx.MockTransport(serve)
    client = app.test_client()
    fhir = {"fhir_server": EHR_FHIR, "token": "t0k3n-of-the-call"}
    post(client, "patient-view", prefetch_from(record), **fhir)
    post(client, "order-select", prefetch_from(record), **fhir)
    assert (len(runtime.seen), len(decodes), len(binary_reads)) == (1, 1, 2)
    content["bytes"] = REAL_ECG_XML.read_bytes()
    post(client, "order-sign", prefetch_from(record), **fhir)
    assert len(decodes) == 2 and len(binary_reads) == 3, "the attachment is read once per call"
    assert len(runtime.seen) == 2


def test_a_prediction_from_an_older_ecg_standing_in_is_not_reused(make_app) -> None:
    """The newest ECG is unreadable, so an older one is used: not stored (a retry may read the newest)."""
    runtime = counting_runtime()
    client = make_app(runtime=runtime, fhir=MockFhir([]), **CACHE_ON).test_client()
    record = clinical_record()
    broken = copy.deepcopy(_ecg(record))
    broken.update(id="ecg-2", effectiveDateTime=iso(datetime.now(UTC) - timedelta(minutes=2)))
    for component in broken["component"]:
        component["valueSampledData"]["data"] = "x y z"
    record["ecgObservations"].insert(0, broken)
    for hook in ("patient-view", "order-select"):
        post(client, hook, prefetch_from(record))
    assert [inputs.ecg.reference for inputs in runtime.seen] == ["Observation/ecg-1"] * 2


def test_a_short_string_spelling_a_digest_does_not_pass_for_the_long_one() -> None:
    """The key hashes long strings on their own: it stays exact (a key per distinct JSON value)."""
    import hashlib

    from cds_service.prediction_cache import prediction_key

    samples = "1 2 3 " * 200
    spelled = hashlib.sha256(samples.encode()).hexdigest()
    keys = {
        prediction_key("m", ["p"], [{"resourceType": "Observation", "component": [{"data": text}]}], {})
        for text in (samples, spelled, samples + " ")
    }
    assert len(keys) == 3
    same = prediction_key("m", ["p"], [{"resourceType": "Observation", "component": [{"data": samples}]}], {})
    assert same in keys


# -- lifetime, sharing, metrics --------------------------------------------------------------------------


def test_entries_expire_after_the_ttl(make_app) -> None:
    """ECGLAB_PREDICTION_CACHE_S=60: reused at 59 s, computed afresh at 61 s (memory and database alike)."""
    runtime = counting_runtime()
    app = make_app(runtime=runtime, fhir=MockFhir([]), **{**CACHE_ON, "prediction_cache_s": 60})
    cache = app.extensions["ecglab"].pipeline.deps.predictions
    clock = [1_000_000.0]
    cache.clock = lambda: clock[0]
    client = app.test_client()
    prefetch = prefetch_from(clinical_record())
    post(client, "patient-view", prefetch)
    assert cache.flush()
    clock[0] += 59
    post(client, "order-select", prefetch)
    assert len(runtime.seen) == 1
    clock[0] += 2
    post(client, "order-sign", prefetch)
    assert len(runtime.seen) == 2


def test_apps_on_one_database_share_predictions(make_app) -> None:
    """A second app (another worker) on the same database answers from the first one's prediction."""
    first, second = counting_runtime(), counting_runtime()
    one = make_app(runtime=first, fhir=MockFhir([]), **CACHE_ON)
    two = make_app(runtime=second, fhir=MockFhir([]), **CACHE_ON)
    prefetch = prefetch_from(clinical_record())
    post(one.test_client(), "patient-view", prefetch)
    assert one.extensions["ecglab"].pipeline.deps.predictions.flush()
    client = two.test_client()
    before = cache_counts(client)
    post(client, "order-select", prefetch)
    post(client, "order-sign", prefetch)
    assert (len(first.seen), len(second.seen)) == (1, 0)
    after = cache_counts(client)
    assert (after[0] - before[0], after[1] - before[1], after[2] - before[2]) == (1, 1, 0)


def test_metrics_count_hits_and_misses(make_app) -> None:
    """``ecglab_prediction_cache_hits_total{tier}`` and ``ecglab_prediction_cache_misses_total`` on /metrics."""
    client = make_app(runtime=counting_runtime(), fhir=MockFhir([]), **CACHE_ON).test_client()
    before = cache_counts(client)
    record = clinical_record()
    post(client, "patient-view", prefetch_from(record))
    post(client, "order-select", prefetch_from(record))
    post(client, "order-sign", prefetch_from(record))
    _new_heart_rate(record)
    post(client, "order-sign", prefetch_from(record))
    after = cache_counts(client)
    assert (after[0] - before[0], after[1] - before[1], after[2] - before[2]) == (2, 0, 2)


def test_cache_off_runs_the_model_on_every_call_and_counts_nothing(make_app) -> None:
    """ECGLAB_PREDICTION_CACHE_S=0: no cache, no lookups."""
    runtime = counting_runtime()
    app = make_app(runtime=runtime, fhir=MockFhir([]), **{**CACHE_ON, "prediction_cache_s": 0})
    assert app.extensions["ecglab"].pipeline.deps.predictions is None
    client = app.test_client()
    before = cache_counts(client)
    prefetch = prefetch_from(clinical_record())
    post(client, "patient-view", prefetch)
    post(client, "order-select", prefetch)
    assert len(runtime.seen) == 2 and cache_counts(client) == before


def test_stored_rows_hold_no_patient_identifier(make_app) -> None:
    """The database row's key is a hash and its value names no patient (the audit holds what it must)."""
    from sqlalchemy import select

    from cds_service.db import CachedPredictionRow

    app = make_app(runtime=counting_runtime(), fhir=MockFhir([]), **CACHE_ON)
    post(app.test_client(), "patient-view", prefetch_from(clinical_record()))
    state = app.extensions["ecglab"]
    assert state.pipeline.deps.predictions.flush()
    with state.engine.connect() as conn:
        rows = conn.execute(select(CachedPredictionRow.cache_key, CachedPredictionRow.payload)).all()
    assert len(rows) == 1
    assert re.fullmatch(r"[0-9a-f]{64}", rows[0].cache_key)
    assert (
        PATIENT_ID not in rows[0].payload
        and base64.b64encode(PATIENT_ID.encode()).decode() not in rows[0].payload
    )
