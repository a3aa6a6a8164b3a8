"""FHIR resources → model inputs: one test per extraction rule (``cds_service.features`` docstring).

Rules cite method.md §2.3 (metadata windows, plausibility), §2.2 (ECG leads), the brief's
"Metadata features" table and ``fhir_mappings`` (codes, units, race categories, ECG carriers).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cds_service.ecg.prepare import prepare_ecg
from cds_service.features import (
    EcgRejected,
    ModelInputs,
    NoEcgError,
    PatientData,
    extract_metadata,
    extract_model_inputs,
    parse_fhir_datetime,
)
from cds_service.fhir_client import FhirTooLarge
from fhir_mappings import load_mappings
from fhir_mappings.errors import EcglabError
from fhir_mappings.signal_spec import MODEL_LEADS
from model_training.seed_fhir import Carrier, Recording, ecg_resources

EXAMPLES = Path(__file__).parents[1] / "data" / "fhir"
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
ECG_AT = NOW - timedelta(minutes=10)
PID = "p1"
MIMIC_ORDER = ("I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6")


@pytest.fixture(scope="module")
def mappings() -> Any:
    return load_mappings()


def _recording(seed: int = 0, names: tuple[str, ...] = MIMIC_ORDER, n: int = 5000) -> Recording:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 500.0
    digital = np.sin(2 * np.pi * 1.1 * t)[:, None] * rng.uniform(200, 900, len(names)) + rng.normal(
        0, 20, (n, len(names))
    )
    return Recording(np.rint(digital).astype(np.int16), 1.0, 500.0, names, "rec")


def _ecg(
    mappings: Any, carrier: Carrier, at: datetime = ECG_AT, rid: str = "ecg", seed: int = 0, **kw: Any
) -> list[dict[str, Any]]:
    resources = ecg_resources(carrier, _recording(seed, **kw), None, PID, at, mappings)
    for resource in resources:
        resource["id"] = resource["id"].replace(f"{PID}-ecg", rid)
        if "content" in resource and resource["resourceType"] == "DocumentReference":
            att = resource["content"][0]["attachment"]
            if "url" in att:
                att["url"] = att["url"].replace(f"{PID}-ecg", rid)
    return resources


OBS = Carrier("observation", "sampled")
MEDIA = Carrier("media", "dicom")
DOC = Carrier("documentreference", "wfdb-zip")
DOC_BINARY = Carrier("documentreference", "wfdb-zip", via_binary=True)


def _patient(**extra: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": PID, "gender": "male", "birthDate": "1960-01-01", **extra}


def _vital(code: str, value: float, unit: str, at: datetime, rid: str = "o", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": rid,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": f"Patient/{PID}"},
        "effectiveDateTime": at.isoformat(),
        "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
        **extra,
    }


def _inputs(
    mappings: Any,
    observations: Sequence[dict[str, Any]] = (),
    patient: dict[str, Any] | None = None,
    ecgs: list[dict[str, Any]] | None = None,
    **kw: Any,
) -> ModelInputs:
    """extract_model_inputs at NOW for a default male patient and a valueSampledData ECG."""
    data = PatientData(
        patient=patient if patient is not None else _patient(),
        observations=list(observations),
        ecgs=ecgs if ecgs is not None else _ecg(mappings, OBS),
    )
    return extract_model_inputs(data, mappings=mappings, now=NOW, **kw)


def _metadata(
    mappings: Any, observations: list[dict[str, Any]], patient: dict[str, Any] | None = None
) -> dict[str, float | None]:
    return extract_metadata(patient or _patient(), observations, mappings, ECG_AT)[0]


# --------------------------------------------------------------------------- official examples


def _example(name: str) -> dict[str, Any]:
    return json.loads((EXAMPLES / name).read_text(encoding="utf-8"))


OFFICIAL = [
    ("observation-example-heart-rate.json", {"heart_rate": 44.0}),
    ("observation-example-respiratory-rate.json", {"resp_rate": 26.0}),
    ("observation-example-body-temperature.json", {"temperature": 36.5 * 1.8 + 32}),
    ("observation-example-bloodpressure.json", {"sbp": 107.0, "dbp": 60.0}),
    ("observation-example-satO2.json", {"spo2": 95.0}),
    ("observation-example-body-weight.json", {"weight": 185 * 0.453592}),
    ("observation-example-body-height.json", {"height": 66.899999999999991 * 2.54}),
    ("observation-example-bmi.json", {"bmi": 16.2}),
]


@pytest.mark.parametrize(
    ("name", "expected"), OFFICIAL, ids=[n.split("example-")[1][:-5] for n, _ in OFFICIAL]
)
def test_official_vital_sign_examples_extract_exactly(
    mappings: Any, name: str, expected: dict[str, float]
) -> None:
    """Each official R4 vital-sign example yields its value in the canonical unit (°F, kg, cm) at its own time."""
    resource = _example(name)
    at = parse_fhir_datetime(resource["effectiveDateTime"])
    assert at is not None
    patient = _example("patient-example-us-core.json")
    metadata, sources = extract_metadata(patient, [resource], mappings, at)
    for key, value in expected.items():
        assert metadata[key] == pytest.approx(value, rel=1e-9)
        assert sources[key] == f"Observation/{resource['id']}"
    others = {k for k, v in metadata.items() if v is not None} - set(expected) - {"sex", "race", "age"}
    assert others == set()


def test_official_examples_survive_a_json_round_trip(mappings: Any) -> None:
    """Serialise → parse the official examples and extract again: identical values (no hidden state)."""
    resources = [_example(name) for name, _ in OFFICIAL]
    again = json.loads(json.dumps(resources))
    at = datetime(1999, 7, 2, tzinfo=UTC)
    patient = _example("patient-example-us-core.json")
    assert extract_metadata(patient, resources, mappings, at) == extract_metadata(
        copy.deepcopy(patient), again, mappings, at
    )


def test_us_core_patient_example_sex_age_and_hispanic_ethnicity(mappings: Any) -> None:
    """US Core Patient example: female → 0; several OMB races but Hispanic ethnicity → 'hispanic' (override rule)."""
    patient = _example("patient-example-us-core.json")
    metadata, sources = extract_metadata(patient, [], mappings, datetime(2025, 2, 19, tzinfo=UTC))
    race = mappings.feature("race")
    assert metadata["sex"] == 0.0
    assert metadata["race"] == float(race.category_index("hispanic"))
    assert metadata["age"] == 37.0  # born 1987-02-20, ECG the day before the 38th birthday
    assert sources["race"] == "Patient/example"


# --------------------------------------------------------------------------- patient rules


@pytest.mark.parametrize(
    ("gender", "expected"), [("male", 1.0), ("female", 0.0), ("other", None), ("unknown", None), (None, None)]
)
def test_rule_sex_from_gender(mappings: Any, gender: str | None, expected: float | None) -> None:
    """Brief: sex 1 = male, 0 = female; FHIR other/unknown/absent → missing (imputed)."""
    patient = _patient(gender=gender) if gender else {"resourceType": "Patient", "id": PID}
    assert _metadata(mappings, [], patient)["sex"] == expected


@pytest.mark.parametrize(
    ("birth", "expected"),
    [
        ("1960-06-01", 65.0),  # birthday on the ECG day counts
        ("1960-06-02", 64.0),
        ("1960", 64.0),  # partial year → mid-year (1960-07-01)
        ("1960-05", 65.0),  # partial month → the 15th
        ("2026-01-01", None),  # born after the ECG: implausible (min 0)
        ("garbage", None),
    ],
)
def test_rule_age_in_completed_years_at_ecg_time(mappings: Any, birth: str, expected: float | None) -> None:
    """Age = completed years from birthDate to the ECG time (not to now); partial dates at mid-period."""
    patient = _patient(birthDate=birth)
    assert extract_metadata(patient, [], mappings, datetime(2025, 6, 1, 8, tzinfo=UTC))[0]["age"] == expected


CDC_RACE = "urn:oid:2.16.840.1.113883.6.238"
NULL_FLAVOR = "http://terminology.hl7.org/CodeSystem/v3-NullFlavor"


def _race_ext(
    omb: tuple[str, ...] = (), text: str | None = None, ethnicity: str | None = None, system: str = CDC_RACE
) -> list[dict[str, Any]]:
    """US Core race (and optionally ethnicity) extensions with the given ombCategory codes."""
    base = "http://hl7.org/fhir/us/core/StructureDefinition/"
    parts: list[dict[str, Any]] = [
        {"url": "ombCategory", "valueCoding": {"system": system, "code": c}} for c in omb
    ]
    if text:
        parts.append({"url": "text", "valueString": text})
    out = [{"url": base + "us-core-race", "extension": parts}]
    if ethnicity:
        out.append(
            {
                "url": base + "us-core-ethnicity",
                "extension": [
                    {
                        "url": "ombCategory",
                        "valueCoding": {"system": CDC_RACE, "code": ethnicity},
                    }
                ],
            }
        )
    return out


@pytest.mark.parametrize(
    ("extension", "category"),
    [
        (_race_ext(("2106-3",)), "white"),
        (_race_ext(("2054-5",)), "black"),
        (_race_ext(("2028-9",)), "asian"),
        (_race_ext(("2106-3", "2054-5")), "other"),  # several OMB races (MIMIC "MULTIPLE RACE")
        (_race_ext(("2106-3",), ethnicity="2135-2"), "hispanic"),  # Hispanic ethnicity overrides
        (_race_ext(("2106-3",), ethnicity="2186-5"), "white"),  # not Hispanic
        (_race_ext(text="Black/African American"), "black"),  # text keyword mapping
        (_race_ext(("UNK",), system=NULL_FLAVOR), "other"),  # unknown: MIMIC 'UNKNOWN' → other
        (_race_ext(("9999-9",)), None),  # an unmapped code and no text: missing
        ([], None),  # no extension: missing
    ],
    ids=[
        "white",
        "black",
        "asian",
        "multiple",
        "hispanic",
        "not-hispanic",
        "text",
        "unk",
        "unmapped",
        "none",
    ],
)
def test_rule_race_from_us_core_extensions(
    mappings: Any, extension: list[dict[str, Any]], category: str | None
) -> None:
    """fhir_mappings race rules: OMB code → category, several → other, Hispanic ethnicity wins, text keywords."""
    value = _metadata(mappings, [], _patient(extension=extension))["race"]
    assert value == (None if category is None else float(mappings.feature("race").category_index(category)))


# --------------------------------------------------------------------------- observation rules


def test_rule_vitals_window_is_30_minutes_either_side(mappings: Any) -> None:
    """method §2.3: vital signs count within ±30 min of the ECG (inclusive), not beyond."""
    inside = _vital("8867-4", 70, "/min", ECG_AT + timedelta(minutes=30), "a")
    outside = _vital("8867-4", 80, "/min", ECG_AT - timedelta(minutes=31), "b")
    assert _metadata(mappings, [inside])["heart_rate"] == 70
    assert _metadata(mappings, [outside])["heart_rate"] is None


def test_rule_biometrics_window_is_30_days_either_side(mappings: Any) -> None:
    """method §2.3: weight, height and BMI count within ±30 days of the ECG."""
    inside = _vital("29463-7", 80, "kg", ECG_AT - timedelta(days=29), "a")
    outside = _vital("8302-2", 180, "cm", ECG_AT + timedelta(days=31), "b")
    metadata = _metadata(mappings, [inside, outside])
    assert metadata["weight"] == 80 and metadata["height"] is None


def test_rule_closest_value_wins_ties_earlier_then_lower(mappings: Any) -> None:
    """Closest to the ECG wins; at equal distance the earlier, then the lower value (as training)."""
    far = _vital("8867-4", 90, "/min", ECG_AT - timedelta(minutes=20), "far")
    after = _vital("8867-4", 60, "/min", ECG_AT + timedelta(minutes=5), "after")
    before = _vital("8867-4", 70, "/min", ECG_AT - timedelta(minutes=5), "before")
    metadata, sources = extract_metadata(_patient(), [far, after, before], mappings, ECG_AT)
    assert metadata["heart_rate"] == 70 and sources["heart_rate"] == "Observation/before"
    same_a = _vital("8867-4", 75, "/min", ECG_AT - timedelta(minutes=5), "x")
    same_b = _vital("8867-4", 72, "/min", ECG_AT - timedelta(minutes=5), "y")
    assert _metadata(mappings, [same_a, same_b])["heart_rate"] == 72


def test_rule_implausible_values_dropped_before_choosing(mappings: Any) -> None:
    """method §2.3 limits: an implausible closer value (HR 800) is ignored; the next plausible one is used."""
    bad = _vital("8867-4", 800, "/min", ECG_AT, "bad")
    good = _vital("8867-4", 66, "/min", ECG_AT + timedelta(minutes=20), "good")
    assert _metadata(mappings, [bad, good])["heart_rate"] == 66
    assert _metadata(mappings, [bad])["heart_rate"] is None
    assert _metadata(mappings, [_vital("29463-7", 19, "kg", ECG_AT)])["weight"] is None  # < 20 kg


@pytest.mark.parametrize(
    ("code", "value", "unit", "key", "expected"),
    [
        ("8310-5", 37.0, "Cel", "temperature", 98.6),
        ("8310-5", 99.1, "[degF]", "temperature", 99.1),
        ("29463-7", 150, "[lb_av]", "weight", 68.0388),
        ("8302-2", 1.8, "m", "height", 180.0),
        ("8480-6", 16, "kPa", "sbp", 120.01),
    ],
)
def test_rule_ucum_units_converted_to_canonical(
    mappings: Any, code: str, value: float, unit: str, key: str, expected: float
) -> None:
    """UCUM conversion to the model's unit (°F, kg, cm, mm[Hg]) through the mapping's factors."""
    assert _metadata(mappings, [_vital(code, value, unit, ECG_AT)])[key] == pytest.approx(expected, abs=0.01)


def test_rule_unit_text_alias_used_when_code_absent_and_unknown_units_never_guessed(mappings: Any) -> None:
    """``Quantity.unit`` 'mmHg' resolves via the mapping's aliases; an unknown unit makes the value missing."""
    alias = _vital("8480-6", 130, "mmHg", ECG_AT)
    alias["valueQuantity"].pop("code")
    unknown = _vital("8867-4", 70, "furlongs", ECG_AT)
    metadata = _metadata(mappings, [alias, unknown])
    assert metadata["sbp"] == 130 and metadata["heart_rate"] is None


def test_rule_blood_pressure_panel_components(mappings: Any) -> None:
    """SBP/DBP come from the 85354-9 panel's 8480-6/8462-4 components; a standalone 8480-6 works too."""
    panel = {
        "resourceType": "Observation",
        "id": "bp",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}]},
        "subject": {"reference": f"Patient/{PID}"},
        "effectiveDateTime": ECG_AT.isoformat(),
        "component": [
            {
                "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
                "valueQuantity": {"value": 141, "code": "mm[Hg]"},
            },
            {
                "code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
                "dataAbsentReason": {"text": "cuff slipped"},
            },
        ],
    }
    metadata, sources = extract_metadata(_patient(), [panel], mappings, ECG_AT)
    assert metadata["sbp"] == 141 and sources["sbp"] == "Observation/bp"
    assert metadata["dbp"] is None  # the component with dataAbsentReason gives nothing


@pytest.mark.parametrize("status", ["entered-in-error", "cancelled"])
def test_rule_withdrawn_observations_ignored(mappings: Any, status: str) -> None:
    """Observations with status entered-in-error or cancelled never supply a value."""
    obs = _vital("8867-4", 70, "/min", ECG_AT, status=status)
    assert _metadata(mappings, [obs])["heart_rate"] is None


def test_rule_data_absent_reason_ignored(mappings: Any) -> None:
    """An Observation with dataAbsentReason is no value, even if a valueQuantity is present."""
    obs = _vital("8867-4", 70, "/min", ECG_AT, dataAbsentReason={"text": "unable"})
    assert _metadata(mappings, [obs])["heart_rate"] is None


@pytest.mark.parametrize(
    "timing",
    [
        lambda at: {"effectivePeriod": {"start": at.isoformat()}},
        lambda at: {"effectiveInstant": at.isoformat()},
        lambda at: {"issued": at.isoformat()},
        lambda at: {"effectiveDateTime": at.replace(tzinfo=None).isoformat()},  # no zone: UTC
    ],
    ids=["period", "instant", "issued", "naive"],
)
def test_rule_effective_time_sources(mappings: Any, timing: Any) -> None:
    """Time from effectiveDateTime, effectivePeriod.start, effectiveInstant or issued (zone-less = UTC)."""
    obs = _vital("8867-4", 70, "/min", ECG_AT)
    obs.pop("effectiveDateTime")
    near = {**obs, **timing(ECG_AT)}
    far = {**obs, **timing(ECG_AT + timedelta(hours=2))}
    assert _metadata(mappings, [near])["heart_rate"] == 70
    assert _metadata(mappings, [far])["heart_rate"] is None


def test_rule_observation_without_time_ignored(mappings: Any) -> None:
    """No effective[x] and no issued: the value cannot be placed in a window and is ignored."""
    obs = _vital("8867-4", 70, "/min", ECG_AT)
    obs.pop("effectiveDateTime")
    assert _metadata(mappings, [obs])["heart_rate"] is None


def test_rule_other_patients_observations_ignored(mappings: Any) -> None:
    """An Observation whose subject is another patient is never used (defence against mixed prefetch)."""
    obs = _vital("8867-4", 70, "/min", ECG_AT, subject={"reference": "Patient/someone-else"})
    assert _metadata(mappings, [obs])["heart_rate"] is None


def test_rule_bmi_computed_from_weight_and_height_when_absent(mappings: Any) -> None:
    """Deviation (documented): without a BMI Observation, BMI = kg / m² from the chosen weight and height."""
    weight = _vital("29463-7", 81, "kg", ECG_AT - timedelta(days=2), "w")
    height = _vital("8302-2", 180, "cm", ECG_AT - timedelta(days=3), "h")
    metadata, sources = extract_metadata(_patient(), [weight, height], mappings, ECG_AT)
    assert metadata["bmi"] == pytest.approx(25.0)
    assert sources["bmi"] == "computed from Observation/w and Observation/h"
    charted = _vital("39156-5", 27.5, "kg/m2", ECG_AT - timedelta(days=10), "b")
    assert _metadata(mappings, [weight, height, charted])["bmi"] == 27.5  # a charted BMI wins


def test_rule_metadata_window_is_relative_to_the_ecg_not_now(mappings: Any) -> None:
    """The vital sign window centres on the chosen ECG's time (method §2.3), whatever ``now`` is."""
    older_ecg = ECG_AT - timedelta(minutes=100)
    vital = _vital("8867-4", 61, "/min", older_ecg + timedelta(minutes=10))
    inputs = _inputs(mappings, [vital], ecgs=_ecg(mappings, OBS, at=older_ecg))
    assert inputs.ecg.recorded_at == older_ecg
    assert inputs.metadata["heart_rate"] == 61


def test_model_inputs_have_every_feature_key(mappings: Any) -> None:
    """ModelInputs.metadata lists every mapping feature (None = missing), in model order."""
    inputs = _inputs(mappings)
    assert list(inputs.metadata) == [spec.key for spec in mappings.features]
    assert inputs.metadata["temperature"] is None and inputs.metadata["sex"] == 1.0


# --------------------------------------------------------------------------- ECG rules


@pytest.mark.parametrize("carrier", [OBS, MEDIA, DOC, DOC_BINARY], ids=lambda c: c.label)
def test_rule_each_carrier_decodes_to_model_leads(mappings: Any, carrier: Carrier) -> None:
    """Observation valueSampledData, Media DICOM, DocumentReference WFDB (inline or Binary URL) → (T, 12) mV."""
    resources = _ecg(mappings, carrier)
    binaries = {f"Binary/{r['id']}": r for r in resources if r["resourceType"] == "Binary"}
    import base64

    loader = (lambda url: base64.b64decode(binaries[url]["data"])) if binaries else None
    ecgs = [r for r in resources if r["resourceType"] != "Binary"]
    inputs = _inputs(mappings, ecgs=ecgs, binary_loader=loader)
    rec = _recording()
    expected = rec.digital[:, [MIMIC_ORDER.index(lead) for lead in MODEL_LEADS]] * 1e-3
    assert inputs.ecg.lead_names == MODEL_LEADS and inputs.ecg.fs == 500.0
    assert inputs.ecg.carrier == carrier.resource
    assert inputs.ecg.reference == f"{ecgs[0]['resourceType']}/ecg"
    np.testing.assert_allclose(inputs.ecg.signal, expected, atol=1e-6)


def test_rule_ecg_record_is_what_the_runtime_prepares(mappings: Any) -> None:
    """The EcgRecord feeds cds_service.ecg.prepare.prepare_ecg directly: (1000, 12) float32 at 100 Hz."""
    ecg = _inputs(mappings).ecg
    prepared = prepare_ecg(ecg.signal, ecg.fs, ecg.lead_names)
    assert prepared.shape == (1000, 12) and prepared.dtype == np.float32


def test_rule_newest_ecg_within_max_age_is_chosen(mappings: Any) -> None:
    """Several ECGs: the newest one not older than ecg.max_age_minutes is used."""
    old = _ecg(mappings, MEDIA, at=NOW - timedelta(minutes=90), rid="old", seed=1)
    new = _ecg(mappings, OBS, at=NOW - timedelta(minutes=30), rid="new", seed=2)
    assert _inputs(mappings, ecgs=old + new).ecg.reference == "Observation/new"


def test_rule_ecg_older_than_max_age_is_no_ecg(mappings: Any) -> None:
    """An ECG older than max_age_minutes (120 min) is not used: NoEcgError (nothing to predict from)."""
    too_old = _ecg(mappings, OBS, at=NOW - timedelta(minutes=mappings.ecg.max_age_minutes + 1))
    with pytest.raises(NoEcgError):
        _inputs(mappings, ecgs=too_old)
    with pytest.raises(NoEcgError):
        _inputs(mappings, ecgs=[])


def test_rule_future_dated_ecg_ignored(mappings: Any) -> None:
    """An ECG stamped more than 5 min after now (clock error) is not chosen over a real one."""
    future = _ecg(mappings, OBS, at=NOW + timedelta(hours=1), rid="future")
    real = _ecg(mappings, MEDIA, at=NOW - timedelta(hours=1), rid="real")
    assert _inputs(mappings, ecgs=future + real).ecg.reference == "Media/real"


def test_rule_malformed_newest_ecg_falls_back_to_older(mappings: Any) -> None:
    """The newest ECG is corrupt: the next newest within max age is used instead."""
    broken = _ecg(mappings, OBS, at=NOW - timedelta(minutes=5), rid="broken")
    broken[0]["component"][3]["valueSampledData"]["data"] += " oops"
    good = _ecg(mappings, MEDIA, at=NOW - timedelta(minutes=50), rid="good")
    assert _inputs(mappings, ecgs=broken + good).ecg.reference == "Media/good"


def test_rule_all_ecgs_malformed_raises_newest_reason(mappings: Any) -> None:
    """Every recent ECG is rejected: EcgRejected carrying the newest one's reason and reference."""
    broken = _ecg(mappings, OBS, at=NOW - timedelta(minutes=5), rid="broken")
    broken[0]["component"][3]["valueSampledData"]["data"] += " oops"
    short = _ecg(mappings, OBS, at=NOW - timedelta(minutes=50), rid="short", n=1000)
    with pytest.raises(EcgRejected) as info:
        _inputs(mappings, ecgs=broken + short)
    assert info.value.reason == "non_numeric"
    assert "Observation/broken" in str(info.value) and "1 older" in str(info.value)


def test_rule_withdrawn_or_uncoded_ecgs_ignored(mappings: Any) -> None:
    """entered-in-error ECGs and Media without an ECG code (e.g. a photo) are not ECG candidates."""
    withdrawn = _ecg(mappings, OBS, rid="w")
    withdrawn[0]["status"] = "entered-in-error"
    photo = _ecg(mappings, MEDIA, rid="photo")
    photo[0]["modality"] = {
        "coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "XC"}]
    }
    with pytest.raises(NoEcgError):
        _inputs(mappings, ecgs=withdrawn + photo)


def test_rule_ecg_of_another_patient_ignored(mappings: Any) -> None:
    """An ECG whose subject is another patient is never used."""
    other = _ecg(mappings, OBS)
    other[0]["subject"] = {"reference": "Patient/other"}
    with pytest.raises(NoEcgError):
        _inputs(mappings, ecgs=other)


def test_rule_ecg_without_time_rejected(mappings: Any) -> None:
    """An ECG resource with no recording time cannot be checked against max age: no_time."""
    undated = _ecg(mappings, MEDIA)
    undated[0].pop("createdDateTime")
    with pytest.raises(EcgRejected) as info:
        _inputs(mappings, ecgs=undated)
    assert info.value.reason == "no_time"


def test_rule_sampled_data_leads_by_mdc_code_or_text(mappings: Any) -> None:
    """valueSampledData leads are named by their MDC code, or by a display/text alias when uncoded."""
    ecgs = _ecg(mappings, OBS)
    for component in ecgs[0]["component"]:
        lead = component["code"]["text"]
        component["code"] = {"text": f"Lead {lead}"}
    assert _inputs(mappings, ecgs=ecgs).ecg.lead_names == MODEL_LEADS


def test_rule_eight_lead_ecg_gets_derived_limb_leads(mappings: Any) -> None:
    """I, II, V1–V6 only: III, aVR, aVL, aVF are derived (ecg.derived_leads, Einthoven/Goldberger)."""
    eight = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")
    ecg = _inputs(mappings, ecgs=_ecg(mappings, MEDIA, names=eight)).ecg
    one, two, three = (ecg.signal[:, ecg.lead_names.index(n)] for n in ("I", "II", "III"))
    np.testing.assert_allclose(three, two - one, atol=1e-6)


def test_rule_missing_chest_lead_rejected(mappings: Any) -> None:
    """A chest lead cannot be derived: an ECG without V6 is rejected (missing_leads)."""
    seven = ("I", "II", "V1", "V2", "V3", "V4", "V5")
    with pytest.raises(EcgRejected) as info:
        _inputs(mappings, ecgs=_ecg(mappings, OBS, names=seven))
    assert info.value.reason == "missing_leads"


def test_rule_unknown_content_type_rejected(mappings: Any) -> None:
    """An attachment no reader recognises and whose contentType names no ECG format (a PDF printout)."""
    import base64

    media = _ecg(mappings, MEDIA)
    media[0]["content"]["contentType"] = "application/pdf"
    media[0]["content"]["data"] = base64.b64encode(b"%PDF-1.4 a printed ECG").decode()
    with pytest.raises(EcgRejected) as info:
        _inputs(mappings, ecgs=media)
    assert info.value.reason == "unknown_content_type"


@pytest.mark.parametrize(
    "content_type", ["application/pdf", "application/xml", "application/octet-stream", None]
)
def test_rule_format_is_detected_from_content_not_the_mime_type(
    mappings: Any, content_type: str | None
) -> None:
    """A DICOM ECG under a wrong or missing contentType is still read as DICOM (the type is only a hint)."""
    media = _ecg(mappings, MEDIA)
    if content_type is None:
        media[0]["content"].pop("contentType")
    else:
        media[0]["content"]["contentType"] = content_type
    ecg = _inputs(mappings, ecgs=media).ecg
    assert ecg.reference == "Media/ecg" and ecg.lead_names == MODEL_LEADS


def test_rule_reader_crash_rejects_that_ecg_and_falls_back(
    mappings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader raising an unexpected exception rejects its ECG as unreadable; an older one is used."""
    from cds_service.ecg.readers import FORMATS

    def crash(data: bytes, limits: Any) -> Any:
        raise ZeroDivisionError("reader bug")

    monkeypatch.setattr(FORMATS["dicom"], "read", crash)
    newest = _ecg(mappings, MEDIA, at=NOW - timedelta(minutes=5), rid="crashing")
    older = _ecg(mappings, OBS, at=NOW - timedelta(minutes=50), rid="older")
    assert _inputs(mappings, ecgs=newest + older).ecg.reference == "Observation/older"
    with pytest.raises(EcgRejected) as info:
        _inputs(mappings, ecgs=newest)
    assert info.value.reason == "unreadable" and "Media/crashing" in str(info.value)


def test_rule_inverted_avr_component_is_used_inverted(mappings: Any) -> None:
    """A valueSampledData component named '-aVR' (Cabrera) holding −aVR gives the same input as aVR."""
    plain = _inputs(mappings).ecg
    ecgs = _ecg(mappings, OBS)
    for component in ecgs[0]["component"]:
        if component["code"]["text"] == "aVR":
            component["code"] = {"text": "-aVR"}
            sampled = component["valueSampledData"]
            sampled["data"] = " ".join(str(-int(v)) for v in sampled["data"].split())
    inverted = _inputs(mappings, ecgs=ecgs).ecg
    np.testing.assert_array_equal(inverted.signal, plain.signal)


def test_rule_right_sided_lead_is_not_taken_for_v4(mappings: Any) -> None:
    """A recording with V4R instead of V4 is incomplete (missing_leads), never read as V4."""
    names = tuple("V4R" if n == "V4" else n for n in MIMIC_ORDER)
    with pytest.raises(EcgRejected) as info:
        _inputs(mappings, ecgs=_ecg(mappings, DOC, names=names))
    assert info.value.reason == "missing_leads" and "V4R" in str(info.value)


def test_rule_document_reference_uses_the_readable_attachment(mappings: Any) -> None:
    """A DocumentReference with a PDF rendering and the WFDB zip: the zip is read."""
    doc = _ecg(mappings, DOC)
    doc[0]["content"].insert(0, {"attachment": {"contentType": "application/pdf", "data": "JVBERi0="}})
    assert _inputs(mappings, ecgs=doc).ecg.carrier == "documentreference"


def test_rule_oversized_attachment_rejected(mappings: Any) -> None:
    """Declared or inline size above ecg.max_attachment_bytes → attachment_too_large, before decoding."""
    media = _ecg(mappings, MEDIA)
    media[0]["content"]["size"] = mappings.ecg.max_attachment_bytes + 1
    with pytest.raises(EcgRejected) as info:
        _inputs(mappings, ecgs=media)
    assert info.value.reason == "attachment_too_large"


def test_rule_attachment_url_needs_loader_and_loader_errors_are_named(mappings: Any) -> None:
    """URL attachments: no loader → attachment_unavailable; loader too-large → attachment_too_large."""
    resources = _ecg(mappings, DOC_BINARY)
    doc = [r for r in resources if r["resourceType"] == "DocumentReference"]
    with pytest.raises(EcgRejected) as info:
        _inputs(mappings, ecgs=doc)
    assert info.value.reason == "attachment_unavailable"

    def too_large(url: str) -> bytes:
        raise FhirTooLarge("read Binary: attachment exceeds the limit")

    with pytest.raises(EcgRejected) as info:
        _inputs(mappings, ecgs=doc, binary_loader=too_large)
    assert info.value.reason == "attachment_too_large"

    def down(url: str) -> bytes:
        raise EcglabError("server down")

    with pytest.raises(EcgRejected) as info:
        _inputs(mappings, ecgs=doc, binary_loader=down)
    assert info.value.reason == "attachment_unavailable"


def test_rule_carriers_of_the_same_recording_give_the_same_inputs(mappings: Any) -> None:
    """The same recording as Observation, Media/DICOM and DocumentReference/WFDB → identical model inputs."""
    import base64

    results = []
    for carrier in (OBS, MEDIA, DOC_BINARY):
        resources = _ecg(mappings, carrier, seed=7)
        binaries = {
            f"Binary/{r['id']}": base64.b64decode(r["data"])
            for r in resources
            if r["resourceType"] == "Binary"
        }
        ecgs = [r for r in resources if r["resourceType"] != "Binary"]
        results.append(
            _inputs(
                mappings,
                [_vital("8867-4", 70, "/min", ECG_AT)],
                ecgs=ecgs,
                binary_loader=binaries.__getitem__,
            )
        )
    for other in results[1:]:
        assert other.metadata == results[0].metadata
        np.testing.assert_allclose(other.ecg.signal, results[0].ecg.signal, atol=1e-6)
        np.testing.assert_allclose(
            prepare_ecg(other.ecg.signal, other.ecg.fs, other.ecg.lead_names),
            prepare_ecg(results[0].ecg.signal, results[0].ecg.fs, results[0].ecg.lead_names),
            atol=1e-5,
        )


def test_parse_fhir_datetime_forms() -> None:
    """FHIR date/dateTime/instant forms parse to aware UTC; partial dates take their first instant."""
    assert parse_fhir_datetime("2024") == datetime(2024, 1, 1, tzinfo=UTC)
    assert parse_fhir_datetime("2024-03") == datetime(2024, 3, 1, tzinfo=UTC)
    assert parse_fhir_datetime("2024-03-05") == datetime(2024, 3, 5, tzinfo=UTC)
    assert parse_fhir_datetime("2024-03-05T10:00:00") == datetime(2024, 3, 5, 10, tzinfo=UTC)
    assert parse_fhir_datetime("2024-13") is None and parse_fhir_datetime(" ") is None
    assert parse_fhir_datetime("2024-03-05T10:00:00+01:00") == datetime(2024, 3, 5, 9, tzinfo=UTC)
    assert parse_fhir_datetime("2024-03-05T10:00:00.123Z") == datetime(
        2024, 3, 5, 10, 0, 0, 123000, tzinfo=UTC
    )
    assert parse_fhir_datetime("yesterday") is None and parse_fhir_datetime(None) is None


def test_cards_and_features_share_the_partial_date_rule() -> None:
    """One time rule: a lab result dated '2024-03' is 2024-03-01T00:00Z for the cards too."""
    from cds_service.cards import result_time

    for value in ("2024", "2024-03", "2024-03-05", "2024-03-05T10:00:00+01:00", "2024-03-05T10:00:00"):
        assert result_time({"effectiveDateTime": value}) == parse_fhir_datetime(value)
    assert result_time({"effectiveDateTime": "2024-03"}) == datetime(2024, 3, 1, tzinfo=UTC)
