"""Train/serve parity (issue 15): one synthetic patient, two pipelines, identical model inputs.

The training side is ``ecglab preprocess`` on a ``synth-mimic`` folder (MIMIC tables → DuckDB →
``metadata.parquet`` and ``ecg.npy``); the serving side is that same subject written as FHIR
resources by the demo seeder (:mod:`model_training.seed_fhir.resources`) and read back by the
service (:func:`cds_service.features.extract_model_inputs` → :func:`prepare_ecg`). Both then go
through :func:`encode_metadata` with one spec. Rules pinned: age is the age at the ECG on both
sides (MIMIC ``anchor_age + (ECG year − anchor_year)``, FHIR from ``birthDate``), BMI is computed
from weight and height on both sides when none is charted, and the lead rules (derived limb
leads, missing leads) and the short-strip padding are the same code path on both sides.
"""

from __future__ import annotations

import csv
import gzip
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from cds_service.cli import main
from cds_service.ecg.prepare import prepare_ecg, prepare_ecg_batch
from cds_service.ecg.record import EcgRejected
from cds_service.features import ModelInputs, extract_model_inputs
from cds_service.patient_data import PatientData
from fhir_mappings import load_mappings
from fhir_mappings.metadata_encoding import encode_metadata
from model_training.data import fit_metadata_spec
from model_training.seed_fhir.resources import Carrier, ecg_resources, patient_bundle
from model_training.seed_fhir.subjects import Recording, Subject, read_subjects
from model_training.waveforms import read_record

SAMPLED = Carrier("observation", "sampled")
BMI_NAME = "BMI (kg/m2)"


@pytest.fixture(scope="module")
def mappings() -> Any:
    return load_mappings()


def _drop_bmi_of_even_subjects(root: Path) -> None:
    """Remove the charted BMI of every even subject_id, so both sides must compute it."""
    path = root / "mimic-iv" / "3.1" / "hosp" / "omr.csv.gz"
    with gzip.open(path, "rt", encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        fields = list(reader.fieldnames or [])
        rows = [r for r in reader if not (r["result_name"] == BMI_NAME and int(r["subject_id"]) % 2 == 0)]
    with gzip.open(path, "wt", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``synth-mimic`` (150 subjects, seed 7, half without charted BMI) → ``preprocess``: (root, DATASET)."""
    from model_training.synthetic import generate

    base = tmp_path_factory.mktemp("parity")
    generate(base / "mimic", 150, 7, workers=1)
    _drop_bmi_of_even_subjects(base / "mimic")
    args = ["preprocess", "--no-progress", "--workers", "1", "--threads", "1", "--min-class-count", "1"]
    assert main([*args, "--mimic-root", str(base / "mimic"), "--out", str(base / "dataset")]) == 0
    return base / "mimic", base / "dataset"


def _served_inputs(subject: Subject, mappings: Any) -> ModelInputs:
    """The subject as the demo seeder writes it to FHIR (ECG at its source time), read by the service."""
    ecg_time = subject.ecg_time.replace(tzinfo=UTC)
    bundle, _ = patient_bundle(
        subject, SAMPLED, f"p{subject.subject_id}", ecg_time, mappings, now=ecg_time + timedelta(days=60)
    )
    resources = [entry["resource"] for entry in bundle["entry"]]
    is_ecg = [r["resourceType"] == "Observation" and r["id"].endswith("-ecg") for r in resources]
    data = PatientData(
        patient=next(r for r in resources if r["resourceType"] == "Patient"),
        observations=[
            r for r, e in zip(resources, is_ecg, strict=True) if r["resourceType"] == "Observation" and not e
        ],
        ecgs=[r for r, e in zip(resources, is_ecg, strict=True) if e],
    )
    return extract_model_inputs(data, mappings=mappings, now=ecg_time + timedelta(minutes=10))


def test_same_patient_gives_identical_model_inputs(synthetic: tuple[Path, Path], mappings: Any) -> None:
    """Metadata (raw and encoded) and the prepared ECG agree exactly between training and FHIR."""
    root, dataset = synthetic
    records = pd.read_parquet(dataset / "records.parquet")
    metadata = pd.read_parquet(dataset / "metadata.parquet").set_index("study_id")
    ecg = np.load(dataset / "ecg.npy", mmap_mode="r")
    row_of = {int(s): i for i, s in enumerate(records["study_id"])}
    spec = fit_metadata_spec(metadata.reset_index(), np.arange(len(metadata)))
    keys = [c.key for c in spec.categorical] + list(spec.continuous)
    paths = pd.read_csv(root / "mimic-iv-ecg" / "1.0" / "record_list.csv").set_index("study_id")["path"]
    compared = computed_bmi = shifted_age = exact_ecg = 0
    for subject in read_subjects(root, 40, 0, mappings):
        study = int(subject.recording.record_name)
        if study not in row_of:
            continue  # the ECG chosen for the demo has no kept target: not in the DATASET
        trained = metadata.loc[study, keys].to_dict()
        served = _served_inputs(subject, mappings)
        for key in keys:
            expected = trained[key]
            got = served.metadata[key]
            assert (got is None) == bool(np.isnan(expected)), (study, key, got, expected)
            if got is not None:
                assert got == pytest.approx(expected, rel=1e-12, abs=1e-12), (study, key)
        cat_t, cont_t = encode_metadata({k: [trained[k]] for k in keys}, spec)
        cat_s, cont_s = encode_metadata({k: [served.metadata[k]] for k in keys}, spec)
        np.testing.assert_array_equal(cat_s, cat_t)
        np.testing.assert_array_equal(cont_s, cont_t)
        prepared = prepare_ecg(served.ecg.signal, served.ecg.fs, served.ecg.lead_names)
        # A source record with invalid samples: both sides interpolate them, but the demo writer
        # does so before encoding whole µV (valueSampledData/DICOM hold integers), so those few
        # samples differ by the encoding's half-quantum; everything else is identical.
        gaps = bool(np.isnan(read_record(root / "mimic-iv-ecg" / "1.0" / paths[study])[0]).any())
        np.testing.assert_allclose(prepared, ecg[row_of[study]], rtol=0, atol=1e-3 if gaps else 1e-6)
        exact_ecg += not gaps
        compared += 1
        computed_bmi += served.sources.get("bmi", "").startswith("computed")
        shifted_age += subject.anchor_year is not None and subject.ecg_time.year != subject.anchor_year
    assert compared >= 10 and exact_ecg >= 5, "too few demo subjects are in the DATASET to compare"
    assert computed_bmi >= 1, "no subject exercised BMI = weight / height² on both sides"
    assert shifted_age >= 1, "no subject had an ECG in another year than its anchor_year"


def test_age_is_age_at_the_ecg_on_both_sides(synthetic: tuple[Path, Path], mappings: Any) -> None:
    """MIMIC: anchor_age + (ECG year − anchor_year); FHIR: completed years from birthDate to the ECG."""
    root, dataset = synthetic
    metadata = pd.read_parquet(dataset / "metadata.parquet").set_index("study_id")
    checked = 0
    for subject in read_subjects(root, 40, 0, mappings):
        study = int(subject.recording.record_name)
        if study in metadata.index and subject.anchor_age is not None and subject.anchor_year is not None:
            expected = subject.anchor_age + subject.ecg_time.year - subject.anchor_year
            assert metadata.loc[study, "age"] == expected
            assert _served_inputs(subject, mappings).metadata["age"] == expected
            checked += 1
    assert checked > 0, "no synthetic subject reached both sides"


def _write_wfdb(folder: Path, name: str, recording: Recording) -> Path:
    """The recording as a WFDB record, as MIMIC-IV-ECG stores one (the training reader's input)."""
    import wfdb

    gain = 1000.0 / recording.uv_per_unit
    n_leads = len(recording.lead_names)
    wfdb.wrsamp(
        name,
        fs=recording.fs,
        units=["mV"] * n_leads,
        sig_name=list(recording.lead_names),
        d_signal=recording.digital.astype(np.int16),
        adc_gain=[gain] * n_leads,
        baseline=[0] * n_leads,
        fmt=["16"] * n_leads,
        write_dir=str(folder),
    )
    return folder / name


def _trained(recording: Recording, folder: Path) -> np.ndarray:
    """Training's preparation: the WFDB reader of ``ecglab preprocess``, then the batch preparation."""
    signal, fs, names = read_record(_write_wfdb(folder, recording.record_name, recording))
    return prepare_ecg_batch(signal[np.newaxis], fs, names)[0]


def _served(recording: Recording, mappings: Any) -> np.ndarray:
    """The service's preparation of the recording sent as an Observation with valueSampledData."""
    when = datetime(2150, 1, 1, 12, 0, tzinfo=UTC)
    ecgs = ecg_resources(SAMPLED, recording, None, "p1", when, mappings)
    data = PatientData(patient={"resourceType": "Patient", "id": "p1"}, ecgs=ecgs)
    served = extract_model_inputs(data, mappings=mappings, now=when + timedelta(minutes=5)).ecg
    return prepare_ecg(served.signal, served.fs, served.lead_names)


def _recording(seconds: float, leads: tuple[str, ...], seed: int = 0) -> Recording:
    """A random ±2 mV recording at 500 Hz, integers at 1 µV (WFDB gain 1000/mV)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 500)) / 500.0
    mv = 0.8 * np.sin(2 * np.pi * 1.1 * t)[:, None] + 0.2 * rng.standard_normal((len(t), len(leads)))
    return Recording(np.rint(mv * 1000).astype(np.int16), 1.0, 500.0, leads, "parity")


MIMIC_LEADS = ("I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6")


def test_short_strip_is_padded_the_same_on_both_sides(tmp_path: Path, mappings: Any) -> None:
    """A 5 s strip is edge-padded to 10 s identically by the training reader and the service."""
    recording = _recording(5.0, MIMIC_LEADS)
    trained, served = _trained(recording, tmp_path), _served(recording, mappings)
    assert trained.shape == served.shape == (1000, 12)
    np.testing.assert_allclose(served, trained, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(trained[500:], np.repeat(trained[499:500], 500, axis=0))


def test_lead_rules_are_the_same_on_both_sides(tmp_path: Path, mappings: Any) -> None:
    """Eight stored leads: limb leads derived identically; a missing chest lead is refused by both."""
    eight = tuple(lead for lead in MIMIC_LEADS if lead not in ("III", "aVR", "aVF", "aVL"))
    recording = _recording(10.0, eight, seed=1)
    np.testing.assert_allclose(_served(recording, mappings), _trained(recording, tmp_path), rtol=0, atol=1e-6)
    without_v3 = tuple(lead for lead in MIMIC_LEADS if lead != "V3")
    recording = replace(_recording(10.0, without_v3, seed=2), record_name="novthree")
    with pytest.raises(EcgRejected) as training_error:
        _trained(recording, tmp_path)
    with pytest.raises(EcgRejected) as serving_error:
        _served(recording, mappings)
    assert training_error.value.reason == serving_error.value.reason == "missing_leads"
