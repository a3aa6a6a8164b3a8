"""End to end on real FHIR servers: ``ecglab seed-fhir`` → ``cds_service.fetch`` (the hooks' data path) → features.

Runs once per server of ``tests/fhir_servers.py`` (sekmet-fhir, and Medplum when installed) so the
client and the extraction are checked against two independent R4 implementations.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from cds_service.cli import main
from cds_service.ecg.prepare import prepare_ecg
from cds_service.features import ModelInputs, extract_metadata, extract_model_inputs, parse_fhir_datetime
from cds_service.fhir_client import FhirClient, FhirNotFound
from fhir_mappings import load_mappings
from model_training.seed_fhir import (
    Carrier,
    Subject,
    carrier_for,
    patient_bundle,
    post_transaction,
    read_subjects,
)
from tests.fhir_servers import FhirServer

pytestmark = pytest.mark.fhir

PATIENTS = 6
EXAMPLES = Path(__file__).parents[1] / "data" / "fhir"


@pytest.fixture(scope="session")
def mappings() -> Any:
    return load_mappings()


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic MIMIC-IV-layout data set (``ecglab synth-mimic``), shared by both servers."""
    from model_training.synthetic import generate

    out = tmp_path_factory.mktemp("synth") / "mimic"
    generate(out, 30, 1, workers=1)
    return out


@pytest.fixture(scope="session")
def subjects(synth_dir: Path, mappings: Any) -> list[Subject]:
    """The subjects ``seed-fhir --patients 6 --seed 0`` picks, in carrier-plan order."""
    return read_subjects(synth_dir, PATIENTS, 0, mappings)


@pytest.fixture(scope="module")
def seeded(fhir_server: FhirServer, synth_dir: Path) -> FhirServer:
    """The server after one ``ecglab seed-fhir`` run."""
    argv = [
        "seed-fhir",
        "--fhir-url",
        fhir_server.base_url,
        "--from",
        str(synth_dir),
        "--patients",
        str(PATIENTS),
    ]
    assert main(argv) == 0
    return fhir_server


def _patient_data(client: FhirClient, patient_id: str, mappings: Any, **kw: Any) -> Any:
    """The patient's data through the hooks' data path, every prefetch key fetched."""
    from cds_service.fetch import gather_patient_data
    from cds_service.prefetch import build_queries

    return gather_patient_data(
        build_queries(mappings), patient_id, now=datetime.now(UTC), client=client, **kw
    )


def _fetch(base_url: str, patient_id: str, mappings: Any, **kw: Any) -> ModelInputs:
    with FhirClient(base_url, timeout=10.0, **kw) as client:
        data = _patient_data(client, patient_id, mappings)
        return extract_model_inputs(
            data, mappings=mappings, binary_loader=client.binary_loader(mappings.ecg.max_attachment_bytes)
        )


def test_seeded_patients_extract_through_every_carrier(
    seeded: FhirServer, subjects: list[Subject], mappings: Any
) -> None:
    """Each seeded carrier (teaching DICOM/MUSE XML, valueSampledData, DICOM, WFDB inline/Binary) yields model inputs."""
    race = mappings.feature("race")
    assert len(subjects) == PATIENTS
    for index, subject in enumerate(subjects):
        inputs = _fetch(seeded.base_url, f"ecglab-{subject.subject_id}", mappings)
        carrier = carrier_for(index)
        assert inputs.ecg.carrier == carrier.resource, carrier.label
        assert inputs.ecg.signal.shape == (5000, 12) and inputs.ecg.fs == 500.0
        assert inputs.metadata["sex"] == (1.0 if subject.gender == "M" else 0.0)
        assert inputs.metadata["age"] == subject.age_at_ecg  # the age at the ECG, as training computes it
        expected_race = race.categorize_mimic(subject.race)
        assert inputs.metadata["race"] == (
            None if expected_race is None else float(race.category_index(expected_race))
        )
        assert prepare_ecg(inputs.ecg.signal, inputs.ecg.fs, inputs.ecg.lead_names).shape == (1000, 12)


def test_teaching_ecg_as_dicom_media_and_muse_document_agree(
    seeded: FhirServer, subjects: list[Subject], mappings: Any
) -> None:
    """The real teaching ECG, once as Media/DICOM and once as DocumentReference→Binary MUSE XML: same model ECG."""
    dicom = _fetch(seeded.base_url, f"ecglab-{subjects[0].subject_id}", mappings).ecg
    muse = _fetch(seeded.base_url, f"ecglab-{subjects[1].subject_id}", mappings).ecg
    assert (carrier_for(0).fmt, carrier_for(1).fmt) == ("dicom", "muse-xml")
    np.testing.assert_allclose(dicom.signal, muse.signal, atol=4.88e-3 + 1e-6)  # one MUSE LSB (derived leads)
    a = prepare_ecg(dicom.signal, dicom.fs, dicom.lead_names)
    b = prepare_ecg(muse.signal, muse.fs, muse.lead_names)
    np.testing.assert_allclose(a, b, atol=5e-3)


def test_same_recording_in_three_carriers_gives_identical_model_inputs(
    seeded: FhirServer, subjects: list[Subject], mappings: Any
) -> None:
    """One patient's data with the same WFDB ECG as Observation, Media/DICOM and DocumentReference/Binary WFDB."""
    subject = subjects[2]
    ecg_time = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=3)
    carriers = {
        "obs": Carrier("observation", "sampled"),
        "media": Carrier("media", "dicom"),
        "doc": Carrier("documentreference", "wfdb-zip", via_binary=True),
    }
    results = {}
    with httpx.Client(headers={"Content-Type": "application/fhir+json"}, timeout=60) as http:
        for key, carrier in carriers.items():
            bundle, _ = patient_bundle(subject, carrier, f"ecglab-tri-{key}", ecg_time, mappings)
            post_transaction(http, seeded.base_url, bundle, key)
    for key in carriers:
        results[key] = _fetch(seeded.base_url, f"ecglab-tri-{key}", mappings)
    first = results["obs"]
    assert first.metadata["heart_rate"] is not None or first.metadata["temperature"] is not None
    for key in ("media", "doc"):
        other = results[key]
        assert other.ecg.carrier == carriers[key].resource
        assert other.metadata == first.metadata
        assert other.ecg.recorded_at == first.ecg.recorded_at and other.ecg.fs == first.ecg.fs
        np.testing.assert_allclose(other.ecg.signal, first.ecg.signal, atol=1e-6)
        np.testing.assert_allclose(
            prepare_ecg(other.ecg.signal, other.ecg.fs, other.ecg.lead_names),
            prepare_ecg(first.ecg.signal, first.ecg.fs, first.ecg.lead_names),
            atol=1e-5,
        )


def _ids(base_url: str, patient_id: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    with FhirClient(base_url, timeout=10.0, max_pages=20) as client:
        for kind in ("Observation", "Media", "DocumentReference", "ServiceRequest"):
            resources = client.search(kind, [("subject", f"Patient/{patient_id}"), ("_count", "200")])
            found[kind] = {r["id"] for r in resources}
            assert len(found[kind]) == len(resources)
        found["Patient"] = {client.read("Patient", patient_id)["meta"]["versionId"]}
    return found


def test_reseeding_updates_and_never_duplicates(
    seeded: FhirServer, synth_dir: Path, subjects: list[Subject]
) -> None:
    """Stable ids + PUT: a second seed-fhir run updates the same resources; counts stay equal."""
    patient_id = f"ecglab-{subjects[3].subject_id}"
    before = _ids(seeded.base_url, patient_id)
    argv = ["seed-fhir", "--fhir-url", seeded.base_url, "--from", str(synth_dir), "--patients", str(PATIENTS)]
    assert main(argv) == 0
    after = _ids(seeded.base_url, patient_id)
    for kind in ("Observation", "Media", "DocumentReference", "ServiceRequest"):
        assert after[kind] == before[kind], kind
    assert sum(len(v) for k, v in before.items() if k != "Patient") > 10
    assert before["Patient"] != after["Patient"]  # versionId moved: updated in place
    with httpx.Client(timeout=10) as http:
        bundle = http.get(
            f"{seeded.base_url}/Patient",
            params={"identifier": f"urn:ecglab:demo:subject|{subjects[3].subject_id}"},
        ).json()
    assert len([e for e in bundle.get("entry", []) if e["resource"]["resourceType"] == "Patient"]) == 1


def test_official_examples_round_trip_through_the_server(seeded: FhirServer, mappings: Any) -> None:
    """The official R4 vital-sign examples, stored and searched back, extract to the same values as locally."""
    patient = json.loads((EXAMPLES / "patient-example-us-core.json").read_text(encoding="utf-8"))
    patient["id"] = "ex-patient"
    observations = []
    for path in sorted(EXAMPLES.glob("observation-example-*.json")):
        resource = json.loads(path.read_text(encoding="utf-8"))
        resource["id"] = f"ex-{resource['id']}".replace("_", "-")
        resource["subject"] = {"reference": "Patient/ex-patient"}
        resource.pop("device", None)  # points at a DeviceMetric the test server does not hold
        resource.pop("performer", None)
        observations.append(resource)
    entries = [
        {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
        for r in [patient, *observations]
    ]
    with httpx.Client(headers={"Content-Type": "application/fhir+json"}, timeout=30) as http:
        post_transaction(
            http,
            seeded.base_url,
            {"resourceType": "Bundle", "type": "transaction", "entry": entries},
            "examples",
        )
    with FhirClient(seeded.base_url, timeout=10.0) as client:
        stored_patient = client.read("Patient", "ex-patient")
        stored = client.search("Observation", [("subject", "Patient/ex-patient"), ("_count", "50")])
    assert len(stored) == len(observations)
    for local in observations:
        at = parse_fhir_datetime(local["effectiveDateTime"])
        assert at is not None
        remote = next(r for r in stored if r["id"] == local["id"])
        assert extract_metadata(stored_patient, [remote], mappings, at) == extract_metadata(
            patient, [local], mappings, at
        )


def test_unknown_patient_is_not_found(seeded: FhirServer, mappings: Any) -> None:
    """Fetching an id the server does not hold raises FhirNotFound."""
    with FhirClient(seeded.base_url, timeout=10.0) as client, pytest.raises(FhirNotFound):
        _patient_data(client, "no-such-patient", mappings)


def test_fetch_fits_the_hook_budget(seeded: FhirServer, subjects: list[Subject], mappings: Any) -> None:
    """Fetching one patient's inputs (7 concurrent requests) returns well inside a 2 s deadline."""
    with FhirClient(seeded.base_url, timeout=2.0) as client:
        _patient_data(client, f"ecglab-{subjects[2].subject_id}", mappings)  # warm the connection pool
        started = time.monotonic()
        data = _patient_data(client, f"ecglab-{subjects[2].subject_id}", mappings, deadline=started + 2.0)
        elapsed = time.monotonic() - started
    assert data.ecgs and data.observations
    print(f"\n{seeded.name}: patient data fetch {elapsed * 1000:.0f} ms")
    assert elapsed < 2.0


def test_paging_follows_the_servers_next_links(seeded: FhirServer, subjects: list[Subject]) -> None:
    """sekmet pages with Bundle.link[next]: small pages followed to the end equal one big page."""
    params = [("subject", f"Patient/ecglab-{subjects[2].subject_id}")]
    with FhirClient(seeded.base_url, timeout=10.0) as client:
        everything = {r["id"] for r in client.search("Observation", [*params, ("_count", "500")])}
        raw = httpx.get(f"{seeded.base_url}/Observation", params=[*params, ("_count", "3")]).json()
    if not any(link.get("relation") == "next" for link in raw.get("link", [])):
        pytest.skip(f"{seeded.name} returns no next links (documented for the Medplum wrapper)")
    with FhirClient(seeded.base_url, timeout=10.0, max_pages=100) as client:
        paged = client.search("Observation", [*params, ("_count", "3")])
    with FhirClient(seeded.base_url, timeout=10.0, max_pages=2) as client:
        limited = client.search("Observation", [*params, ("_count", "3")])
    assert {r["id"] for r in paged} == everything and len(everything) > 6
    assert len(limited) == 6


# --------------------------------------------------------------------------- seed-fhir errors (no server needed)


def test_seed_cli_reports_an_unreachable_server(synth_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Server down: one line naming the URL, exit status 2 (no traceback)."""
    assert (
        main(
            [
                "seed-fhir",
                "--fhir-url",
                "http://127.0.0.1:9/fhir",
                "--from",
                str(synth_dir),
                "--patients",
                "1",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "http://127.0.0.1:9/fhir" in err and "cannot reach" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (
            httpx.Response(
                400,
                json={
                    "resourceType": "OperationOutcome",
                    "issue": [{"severity": "error", "code": "invalid", "diagnostics": "bad status"}],
                },
            ),
            "transaction for Patient/ecglab-",
        ),
        (
            httpx.Response(
                200,
                json={
                    "resourceType": "Bundle",
                    "type": "transaction-response",
                    "entry": [{"response": {"status": "201"}}, {"response": {"status": "400"}}],
                },
            ),
            "1 entries failed",
        ),
    ],
    ids=["rejected", "partly-applied"],
)
def test_seed_reports_rejected_transactions(
    subjects: list[Subject], mappings: Any, answer: httpx.Response, expected: str
) -> None:
    """A 4xx transaction, or a non-atomic server failing some entries, is an InputError naming URL and patient."""
    from fhir_mappings.errors import InputError
    from model_training.seed_fhir import seed

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/metadata"):
            return httpx.Response(200, json={"resourceType": "CapabilityStatement"})
        return answer

    with pytest.raises(InputError) as info:
        seed("http://fhir.test/fhir", subjects[2:3], mappings, transport=httpx.MockTransport(handler))
    assert "http://fhir.test/fhir" in str(info.value) and expected in str(info.value)


def test_score_cli_scores_patients_on_a_fhir_server(
    seeded: FhirServer, subjects: list[Subject], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``ecglab score --fhir-url --patient`` runs the service's client, features and runtime per patient."""
    from tests.onnx_fixtures import LABELS, build_toy_model_dir

    build_toy_model_dir(tmp_path / "model")
    ids = [f"ecglab-{s.subject_id}" for s in subjects[:3]]
    out = tmp_path / "scores.json"
    argv = ["score", "--model", str(tmp_path / "model"), "--fhir-url", seeded.base_url, "--out", str(out)]
    assert main([*argv, *(x for pid in ids for x in ("--patient", pid))]) == 0
    scores = json.loads(out.read_text())
    assert sorted(scores) == sorted(ids)
    for pid in ids:
        assert set(scores[pid]) == {f"{lab}_{d}_{t}" for lab, d, t in LABELS}
    printed = capsys.readouterr().out
    assert "patient #1" in printed and ids[0] not in printed  # no patient identifiers on screen
