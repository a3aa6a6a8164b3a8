"""Tests of the fhir_mappings contract: files validate, codes are right, rules hold, errors are clear.

Each test pins one rule; docstrings cite the method section (``shared/docs/method.md``), the brief
or the standard the rule comes from.
"""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from fhir_mappings import (
    DEFAULT_DIR,
    MAPPING_VERSION,
    MODEL_LEAD_ORDER,
    Coding,
    MappingError,
    Mappings,
    is_valid_loinc,
    load_mappings,
)
from fhir_mappings.errors import ConfigError
from fhir_mappings.leads import canonical_lead
from fhir_mappings.schema_common import CDC_RACE_SYSTEM, LOINC_SYSTEM, MDC_SYSTEMS, loinc_check_digit

TABLES = Path(__file__).parents[1] / "data" / "code_tables"
MODEL_ORDER = [
    "sex",
    "race",
    "age",
    "temperature",
    "heart_rate",
    "resp_rate",
    "spo2",
    "sbp",
    "dbp",
    "bmi",
    "weight",
    "height",
]
CDC = CDC_RACE_SYSTEM
GENDER = "http://hl7.org/fhir/administrative-gender"


@pytest.fixture(scope="module")
def m() -> Mappings:
    return load_mappings()


def _all_codings(m: Mappings) -> list[tuple[str, Coding]]:
    """Every Coding in the three files, with where it was found."""
    found: list[tuple[str, Coding]] = []
    for spec in m.features:
        found += [(f"features.yaml {spec.key}.fhir.codes", c) for c in spec.fhir.codes]
        for ref in spec.fhir.components:
            found += [
                (f"features.yaml {spec.key}.components", ref.panel),
                (f"features.yaml {spec.key}.components", ref.component),
            ]
        for rule in spec.category_rules:
            found += [(f"features.yaml {spec.key}.category_rules", c) for c in rule.fhir_codes]
    for lab in m.labs:
        found += [(f"labs.yaml {lab.key}.result_codes", c) for c in lab.result_codes]
        found.append((f"labs.yaml {lab.key}.order_code", lab.order_code))
    ecg = m.ecg
    for section in ("observation_codes", "media_codes", "document_codes"):
        found += [(f"ecg.yaml {section}", c) for c in getattr(ecg, section)]
    found += [(f"ecg.yaml mdc_lead_codes.{lead}", c) for lead, c in ecg.mdc_lead_codes.items()]
    return found


def _code_tables() -> dict[tuple[str, str], str]:
    """(system, code) -> display from the committed tables (MDC under both system URIs)."""
    table: dict[tuple[str, str], str] = {}
    with (TABLES / "loinc.csv").open() as f:
        table.update({(LOINC_SYSTEM, r["code"]): r["display"] for r in csv.DictReader(f)})
    with (TABLES / "mdc.csv").open() as f:
        for r in csv.DictReader(f):
            table.update({(system, r["code"]): r["display"] for system in MDC_SYSTEMS})
    with (TABLES / "cdc_race_ethnicity.csv").open() as f:
        table.update({(CDC, r["code"]): r["display"] for r in csv.DictReader(f)})
    with (TABLES / "hl7_other.csv").open() as f:
        table.update({(r["system"], r["code"]): r["display"] for r in csv.DictReader(f)})
    return table


# -- the files validate --------------------------------------------------------------------------------


def test_packaged_mapping_files_validate(m: Mappings) -> None:
    """features.yaml, labs.yaml and ecg.yaml load and validate together (brief: fhir_mappings API)."""
    assert m.version == MAPPING_VERSION
    assert len(m.features) == 12
    assert len(m.labs) >= 40
    assert len(m.digest) == 64


def test_default_mappings_are_cached_and_custom_directories_are_not(tmp_path: Path) -> None:
    """The packaged files are loaded once (lru_cache); a copied directory is read afresh."""
    assert load_mappings() is load_mappings()
    copy = shutil.copytree(DEFAULT_DIR, tmp_path / "m", ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    first, second = load_mappings(copy), load_mappings(copy)
    assert first is not second
    assert first.digest == second.digest == load_mappings().digest


def test_mapping_error_is_a_config_error() -> None:
    """A broken mapping is a configuration error (brief: MappingError subclasses ConfigError)."""
    assert issubclass(MappingError, ConfigError)


def test_missing_directory_is_named(tmp_path: Path) -> None:
    """A directory that does not exist is reported with its path, not as a traceback."""
    with pytest.raises(MappingError, match="nowhere"):
        load_mappings(tmp_path / "nowhere")


# -- features -------------------------------------------------------------------------------------------


def test_features_follow_the_model_order(m: Mappings) -> None:
    """Features are listed exactly in the model's input order (brief: Metadata features table)."""
    assert [f.key for f in m.features] == MODEL_ORDER


def test_model_input_layout_matches_the_brief(m: Mappings) -> None:
    """cat = [sex, race]; cont = 10 continuous values then 10 missing indicators (brief)."""
    assert m.categorical_keys == ["sex", "race"]
    assert m.continuous_keys == MODEL_ORDER[2:]
    assert m.missing_indicator_keys == ["race", *MODEL_ORDER[3:]]


def test_categorical_encodings_match_the_brief(m: Mappings) -> None:
    """sex: 0 female, 1 male; race: 0 asian, 1 black, 2 hispanic, 3 other, 4 white (method §2.3)."""
    assert m.feature("sex").categories == ["female", "male"]
    assert m.feature("race").categories == ["asian", "black", "hispanic", "other", "white"]
    assert m.feature("sex").category_index("male") == 1
    assert m.feature("race").category_index("white") == 4


def test_unknown_feature_key_raises_key_error(m: Mappings) -> None:
    """Asking for a feature that does not exist fails loudly, naming the key."""
    with pytest.raises(KeyError, match="pulse"):
        m.feature("pulse")


@pytest.mark.parametrize(
    ("key", "canonical"),
    [
        ("age", "a"),
        ("temperature", "[degF]"),
        ("heart_rate", "/min"),
        ("resp_rate", "/min"),
        ("spo2", "%"),
        ("sbp", "mm[Hg]"),
        ("dbp", "mm[Hg]"),
        ("bmi", "kg/m2"),
        ("weight", "kg"),
        ("height", "cm"),
    ],
)
def test_canonical_units_are_the_training_units(m: Mappings, key: str, canonical: str) -> None:
    """Each continuous feature's canonical unit is MIMIC's unit and converts to itself (brief)."""
    spec = m.feature(key)
    assert spec.unit == canonical
    assert spec.convert(12.5, canonical) == 12.5


@pytest.mark.parametrize(
    ("key", "value", "unit", "expected"),
    [
        ("temperature", 37.0, "Cel", 98.6),
        ("temperature", 37.0, "°C", 98.6),
        ("temperature", 310.15, "K", 98.6),
        ("weight", 154.0, "[lb_av]", 69.85),
        ("weight", 154.0, "lbs", 69.85),
        ("weight", 70500.0, "g", 70.5),
        ("height", 70.0, "[in_i]", 177.8),
        ("height", 1.778, "m", 177.8),
        ("heart_rate", 72.0, "{beats}/min", 72.0),
        ("sbp", 16.0, "kPa", 120.01),
        ("sbp", 120.0, "mmHg", 120.0),
    ],
)
def test_unit_conversions(m: Mappings, key: str, value: float, unit: str, expected: float) -> None:
    """UCUM conversions to the canonical unit: 37 °C = 98.6 °F, 154 lb = 69.85 kg, 70 in = 177.8 cm."""
    assert m.feature(key).convert(value, unit) == pytest.approx(expected, abs=0.01)


def test_conversion_back_from_the_canonical_unit(m: Mappings) -> None:
    """98.6 °F converts back to 37 °C (the conversion is invertible)."""
    assert m.feature("temperature").from_canonical(98.6, "Cel") == pytest.approx(37.0)
    assert m.feature("height").from_canonical(177.8, "[in_i]") == pytest.approx(70.0)


def test_pounds_use_the_method_factor(m: Mappings) -> None:
    """FHIR pounds use 0.453592 like the MIMIC omr conversion (method §2.3), so both agree exactly."""
    weight = m.feature("weight")
    assert weight.convert(154.0, "[lb_av]") == 154.0 * weight.mimic.factor == 154.0 * 0.453592
    assert m.feature("height").mimic.factor == 2.54


@pytest.mark.parametrize(
    ("key", "unit"), [("temperature", "degR"), ("weight", "stone"), ("spo2", "1"), ("heart_rate", "Hz")]
)
def test_unknown_units_are_not_guessed(m: Mappings, key: str, unit: str) -> None:
    """A unit that is not listed converts to None rather than to a wrong number."""
    assert m.feature(key).convert(1.0, unit) is None
    assert m.feature(key).clean(1.0, unit) is None


@pytest.mark.parametrize(
    ("key", "inside", "outside"),
    [
        ("temperature", [50.0, 98.6, 150.0], [49.99, 150.01]),
        ("heart_rate", [0.0, 700.0], [700.1]),
        ("resp_rate", [300.0], [300.1]),
        ("spo2", [0.0, 100.0], [-0.1, 100.1]),
        ("sbp", [500.0], [500.5]),
        ("dbp", [500.0], [501.0]),
        ("bmi", [100.0], [100.01]),
        ("weight", [20.0, 400.0], [19.99, 400.01]),
        ("height", [60.0, 400.0], [59.99, 400.01]),
    ],
)
def test_plausibility_limits_are_strict(
    m: Mappings, key: str, inside: list[float], outside: list[float]
) -> None:
    """Values strictly outside the method's limits become missing; the limits themselves are kept (method §2.3)."""
    spec = m.feature(key)
    assert all(spec.is_plausible(v) for v in inside)
    assert not any(spec.is_plausible(v) for v in outside)
    assert spec.clean(outside[0]) is None
    assert spec.clean(inside[0]) == inside[0]


def test_non_finite_values_are_implausible(m: Mappings) -> None:
    """NaN and infinity never reach the model as values."""
    assert not m.feature("heart_rate").is_plausible(math.nan)
    assert not m.feature("height").is_plausible(math.inf)


def test_implausible_after_conversion_is_missing(m: Mappings) -> None:
    """Plausibility is judged in the canonical unit: 10 °C is 50 °F (kept), 9 °C is 48.2 °F (dropped)."""
    temperature = m.feature("temperature")
    assert temperature.clean(10.0, "Cel") == pytest.approx(50.0)
    assert temperature.clean(9.0, "Cel") is None


@pytest.mark.parametrize(
    ("key", "minutes"),
    [(k, 30) for k in MODEL_ORDER[3:9]] + [(k, 43200) for k in ("bmi", "weight", "height")],
)
def test_windows_around_the_ecg(m: Mappings, key: str, minutes: int) -> None:
    """Vitals: closest value within ±30 min; biometrics: within ±30 days (method §2.3)."""
    window = m.feature(key).window
    assert window is not None
    assert (window.before_min, window.after_min) == (minutes, minutes)
    assert window.contains(-minutes) and window.contains(minutes)
    assert not window.contains(minutes + 1)


def test_patient_features_have_no_window(m: Mappings) -> None:
    """Sex, race and age come from the Patient resource, not from time-stamped Observations."""
    assert all(m.feature(k).window is None for k in ("sex", "race", "age"))


@pytest.mark.parametrize(
    ("key", "table", "column"),
    [
        ("sex", "hosp/patients", "gender"),
        ("age", "hosp/patients", "anchor_age"),
        ("race", "hosp/admissions", "race"),
        ("temperature", "ed/vitalsign", "temperature"),
        ("heart_rate", "ed/vitalsign", "heartrate"),
        ("resp_rate", "ed/vitalsign", "resprate"),
        ("spo2", "ed/vitalsign", "o2sat"),
        ("sbp", "ed/vitalsign", "sbp"),
        ("dbp", "ed/vitalsign", "dbp"),
    ],
)
def test_mimic_sources(m: Mappings, key: str, table: str, column: str) -> None:
    """Training reads each feature from the MIMIC-IV table and column the method names (method §2.1, §2.3)."""
    mimic = m.feature(key).mimic
    assert (mimic.table, mimic.column) == (table, column)


@pytest.mark.parametrize(
    ("key", "names"),
    [
        ("bmi", ["BMI (kg/m2)", "BMI"]),
        ("weight", ["Weight (Lbs)", "Weight"]),
        ("height", ["Height (Inches)", "Height"]),
    ],
)
def test_omr_result_names(m: Mappings, key: str, names: list[str]) -> None:
    """Biometrics come from hosp/omr by result_name, with and without the unit suffix (MIMIC-IV omr)."""
    mimic = m.feature(key).mimic
    assert mimic.table == "hosp/omr"
    assert mimic.result_names == names


def test_race_also_reads_ed_stays(m: Mappings) -> None:
    """Race comes from hosp/admissions and ed/edstays (method §2.3)."""
    assert m.feature("race").mimic.also_tables == ["ed/edstays"]


def test_blood_pressure_is_read_from_the_panel_and_standalone(m: Mappings) -> None:
    """SBP/DBP are components of 85354-9 or standalone 8480-6/8462-4 Observations (FHIR vital signs)."""
    for key, code in (("sbp", "8480-6"), ("dbp", "8462-4")):
        source = m.feature(key).fhir
        assert [c.code for c in source.codes] == [code]
        assert [(r.panel.code, r.component.code) for r in source.components] == [("85354-9", code)]


# -- categories: sex and race -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("WHITE", "white"),
        ("WHITE - RUSSIAN", "white"),
        ("BLACK/AFRICAN AMERICAN", "black"),
        ("HISPANIC/LATINO - PUERTO RICAN", "hispanic"),
        ("HISPANIC OR LATINO", "hispanic"),
        ("ASIAN - CHINESE", "asian"),
        ("AMERICAN INDIAN/ALASKA NATIVE", "other"),
        ("MULTIPLE RACE/ETHNICITY", "other"),
        ("UNKNOWN", "other"),
        ("PATIENT DECLINED TO ANSWER", "other"),
        (None, None),
        ("", None),
    ],
)
def test_mimic_race_keyword_mapping(m: Mappings, value: str | None, expected: str | None) -> None:
    """MIMIC race strings: WHITE/BLACK/HISPANIC/ASIAN keywords, else other; no value is missing (method §2.3)."""
    assert m.feature("race").categorize_mimic(value) == expected


@pytest.mark.parametrize(
    ("codes", "text", "expected"),
    [
        ([(CDC, "2106-3")], "White", "white"),
        ([(CDC, "2054-5")], None, "black"),
        ([(CDC, "2028-9")], None, "asian"),
        ([(CDC, "2106-3"), (CDC, "2135-2")], "White", "hispanic"),
        ([(CDC, "2054-5"), (CDC, "2186-5")], None, "black"),
        ([(CDC, "2106-3"), (CDC, "2054-5")], "Mixed", "other"),
        ([(CDC, "1002-5")], None, "other"),
        ([("http://terminology.hl7.org/CodeSystem/v3-NullFlavor", "ASKU")], None, "other"),
        ([], "Asian Indian", "asian"),
        ([], "Not Hispanic or Latino", "other"),
        ([], None, None),
    ],
)
def test_fhir_race_mapping(
    m: Mappings, codes: list[tuple[str, str]], text: str | None, expected: str | None
) -> None:
    """US Core race/ethnicity → model race: Hispanic ethnicity overrides, several races → other (features.yaml notes)."""
    assert m.feature("race").categorize_fhir(codes, text) == expected


@pytest.mark.parametrize(("value", "expected"), [("M", "male"), ("F", "female"), ("m", "male")])
def test_mimic_sex_mapping(m: Mappings, value: str, expected: str) -> None:
    """MIMIC gender M → male (1), anything else → female (0) (method §2.3)."""
    assert m.feature("sex").categorize_mimic(value) == expected


@pytest.mark.parametrize(
    ("gender", "expected"), [("male", "male"), ("female", "female"), ("other", None), ("unknown", None)]
)
def test_fhir_sex_mapping(m: Mappings, gender: str, expected: str | None) -> None:
    """Patient.gender male/female map directly; other/unknown are missing (MIMIC knows only M and F)."""
    assert m.feature("sex").categorize_fhir([(GENDER, gender)]) == expected


# -- labs ------------------------------------------------------------------------------------------------------


REQUIRED_LABS = [
    "NTproBNP", "Troponin T", "Hemoglobin", "Hematocrit", "Albumin", "Urea Nitrogen", "Creatinine",
    "Potassium", "Sodium", "Glucose", "White Blood Cells", "Platelet Count", "INR(PT)", "PTT",
    "C-Reactive Protein", "Lactate", "Magnesium", "Calcium, Total", "Phosphate", "Bicarbonate",
    "Chloride", "Anion Gap", "Creatine Kinase (CK)", "Red Blood Cells", "MCV", "MCH", "MCHC", "RDW",
    "Alanine Aminotransferase (ALT)", "Asparate Aminotransferase (AST)", "Alkaline Phosphatase",
    "Bilirubin, Total", "Lactate Dehydrogenase (LD)", "Lipase", "Creatine Kinase, MB Isoenzyme", "PT",
    "Fibrinogen, Functional", "Neutrophils", "Lymphocytes", "Monocytes", "Eosinophils", "Basophils",
    "Estimated GFR (MDRD equation)",
]  # fmt: skip


@pytest.mark.parametrize("label", REQUIRED_LABS)
def test_required_labs_are_mapped_by_mimic_label(m: Mappings, label: str) -> None:
    """Every lab the issue names is present under its verbatim MIMIC d_labitems label (method §1.2)."""
    lab = m.lab_by_mimic_label(label)
    assert lab is not None
    assert m.lab(lab.key) is lab
    assert lab.fluid == "Blood"


def test_unknown_lab_is_none(m: Mappings) -> None:
    """Looking up a lab the mappings do not know returns None (the service then makes no card)."""
    assert m.lab("unobtainium") is None
    assert m.lab_by_mimic_label("Aspartate Aminotransferase (AST)") is None  # MIMIC spells it 'Asparate'


def test_lab_categories_cover_all_six_organ_systems(m: Mappings) -> None:
    """Labs span the paper's six categories (method §1.1)."""
    assert {lab.category for lab in m.labs} == {
        "cardiac",
        "renal",
        "hematological",
        "metabolic",
        "immunological",
        "coagulation",
    }


PAPER_THRESHOLDS = [
    ("NTproBNP", "high", 353.0, "pg/mL"),
    ("Hemoglobin", "high", 17.5, "g/dL"),
    ("Albumin", "high", 5.2, "g/dL"),
    ("Hematocrit", "high", 51.0, "%"),
    ("Urea Nitrogen", "low", 6.0, "mg/dL"),
    ("Creatinine", "low", 0.5, "mg/dL"),
]


@pytest.mark.parametrize(("label", "direction", "value", "unit"), PAPER_THRESHOLDS)
def test_paper_thresholds_present(m: Mappings, label: str, direction: str, value: float, unit: str) -> None:
    """The six thresholds the paper publishes are recorded with direction and unit (method §1.1)."""
    lab = m.lab_by_mimic_label(label)
    assert lab is not None and lab.paper_threshold is not None
    assert (lab.paper_threshold.direction, lab.paper_threshold.value, lab.unit) == (direction, value, unit)


def test_only_published_thresholds_are_recorded(m: Mappings) -> None:
    """No lab carries an invented paper threshold; the others come from the manifest (method §1.1)."""
    assert sum(lab.paper_threshold is not None for lab in m.labs) == len(PAPER_THRESHOLDS)


def test_threshold_rule_is_strict(m: Mappings) -> None:
    """The reference code labels high if value > threshold and low if value < threshold (method §1.1)."""
    ntprobnp = m.lab("ntprobnp")
    bun = m.lab("urea_nitrogen")
    assert ntprobnp is not None and ntprobnp.paper_threshold is not None
    assert bun is not None and bun.paper_threshold is not None
    assert not ntprobnp.paper_threshold.is_abnormal(353.0) and ntprobnp.paper_threshold.is_abnormal(353.1)
    assert not bun.paper_threshold.is_abnormal(6.0) and bun.paper_threshold.is_abnormal(5.9)


@pytest.mark.parametrize(
    ("code", "key"),
    [
        ("718-7", "hemoglobin"),
        ("30313-1", "hemoglobin"),
        ("33762-6", "ntprobnp"),
        ("67151-1", "troponin_t"),
        ("2028-9", "bicarbonate"),
    ],
)
def test_lab_found_by_result_code(m: Mappings, code: str, key: str) -> None:
    """Recent FHIR results are matched to labs by their LOINC code, alternates included (issue: result codes)."""
    lab = m.lab_by_result_code(LOINC_SYSTEM, code)
    assert lab is not None and lab.key == key


@pytest.mark.parametrize(
    ("key", "order"), [("ntprobnp", "33762-6"), ("troponin_t", "6598-7"), ("potassium", "2823-3")]
)
def test_order_codes_are_individual_tests(m: Mappings, key: str, order: str) -> None:
    """Each lab is ordered with its own LOINC test code, never a shared panel such as 24326-1 (issue)."""
    lab = m.lab(key)
    assert lab is not None and lab.order_code.code == order
    assert all(lab.order_code.code != "24326-1" for lab in m.labs)


def test_lab_keys_are_stable_lower_case(m: Mappings) -> None:
    """Lab keys are lower-case identifiers usable in URLs, logs and the manifest."""
    assert all(lab.key.replace("_", "").isalnum() and lab.key == lab.key.lower() for lab in m.labs)


# -- codes against the committed code tables --------------------------------------------------------------


def test_every_code_display_matches_the_code_table(m: Mappings) -> None:
    """Each Coding's display is the official one from tests/data/code_tables (house style §9.7)."""
    table = _code_tables()
    wrong = []
    for where, coding in _all_codings(m):
        expected = table.get((coding.system, coding.code))
        if expected != coding.display:
            wrong.append(f"{where}: {coding.system}|{coding.code} '{coding.display}' (table: {expected!r})")
    assert not wrong, "\n".join(wrong)


def test_code_tables_cite_their_source() -> None:
    """Every row of every code table says where its display comes from."""
    tables = sorted(TABLES.glob("*.csv"))
    assert "loinc.csv" in {path.name for path in tables}, TABLES
    for path in tables:
        with path.open() as f:
            rows = list(csv.DictReader(f))
        assert rows, path
        assert all(row["source"].strip() for row in rows), path
        if path.name == "loinc.csv":
            assert all(row["source"] == f"https://loinc.org/{row['code']}/" for row in rows)


@pytest.mark.parametrize(
    ("code", "valid"),
    [
        ("8867-4", True),
        ("718-7", True),
        ("2160-0", True),
        ("33762-6", True),
        ("8867-3", False),
        ("718", False),
    ],
)
def test_loinc_check_digit(code: str, valid: bool) -> None:
    """LOINC codes carry a mod-10 check digit (LOINC Users' Guide); a typo'd code is refused."""
    assert is_valid_loinc(code) is valid


def test_every_loinc_code_in_the_table_has_a_valid_check_digit() -> None:
    """The committed LOINC table itself has no transcription slip."""
    with (TABLES / "loinc.csv").open() as f:
        codes = [row["code"] for row in csv.DictReader(f)]
    assert all(int(c.split("-")[1]) == loinc_check_digit(c.split("-")[0]) for c in codes)


# -- ECG ------------------------------------------------------------------------------------------------------


def test_ecg_lead_order_is_the_model_order(m: Mappings) -> None:
    """The model reads leads I, II, V1-V6, III, aVR, aVL, aVF (method §2.2)."""
    assert (
        m.ecg.lead_order
        == list(MODEL_LEAD_ORDER)
        == ["I", "II", "V1", "V2", "V3", "V4", "V5", "V6", "III", "aVR", "aVL", "aVF"]
    )


def test_ecg_lead_order_matches_the_signal_module(m: Mappings) -> None:
    """fhir_mappings and cds_service.signal agree on the model's lead order (one contract, brief)."""
    from fhir_mappings.signal_spec import MODEL_LEADS

    assert tuple(m.ecg.lead_order) == tuple(MODEL_LEADS)


@pytest.mark.parametrize(
    ("name", "lead"),
    [
        ("I", "I"),
        ("Lead I", "I"),
        ("lead   i", "I"),
        ("DI", "I"),
        ("LEAD_I", "I"),
        ("MDC_ECG_LEAD_I", "I"),
        ("DIII", "III"),
        ("avr", "aVR"),
        ("AVR", "aVR"),
        (" aVL", "aVL"),
        ("MDC_ECG_LEAD_AVR", "aVR"),
        ("MDC_ECG_ELEC_POTL_AVF", "aVF"),
        ("V1 ", "V1"),
        ("v6", "V6"),
        ("C3", "V3"),
        ("131330", "II"),
        ("131389", "III"),
        ("2:61", "III"),
        ("2:3", "V1"),
    ],
)
def test_lead_aliases_resolve(m: Mappings, name: str, lead: str) -> None:
    """Lead names from WFDB, DICOM, GE MUSE, HL7 aECG and MDC resolve to the model lead (ecg.yaml)."""
    assert m.ecg.resolve_lead(name) == lead


@pytest.mark.parametrize(
    "name",
    ["-aVR", "+aVR", "Lead -aVR", "aVR inverted", "MDC_ECG_LEAD_AVRneg", "V7", "V4R", "MLII", "X", "", None],
)
def test_inverted_or_foreign_leads_do_not_resolve(m: Mappings, name: str | None) -> None:
    """Inverted aVR (Cabrera, in any spelling), extra leads and empty names are not model leads."""
    assert m.ecg.resolve_lead(name) is None


@pytest.mark.parametrize(
    "name", ["-aVR", "Lead -aVR", "aVR inverted", "Lead II", "DIII", "131390", "2:62", "V4R"]
)
def test_resolve_lead_agrees_with_the_one_lead_resolver(m: Mappings, name: str) -> None:
    """EcgSpec.resolve_lead is canonical_lead with ecg.yaml's names, keeping only upright leads (issue 13)."""
    aliases = {
        lead: [*m.ecg.lead_aliases[lead], m.ecg.mdc_lead_codes[lead].code, m.ecg.mdc_lead_codes[lead].display]
        for lead in m.ecg.lead_order
    }
    match = canonical_lead(name, aliases)
    expected = match.lead if match is not None and match.sign > 0 else None
    assert m.ecg.resolve_lead(name) == expected
    if name.endswith(("-aVR", "inverted")):
        assert match == ("aVR", -1.0)  # the sign-aware resolver still knows which lead it is


@pytest.mark.parametrize(
    ("system", "code", "lead"),
    [(MDC_SYSTEMS[0], "131329", "I"), (MDC_SYSTEMS[1], "131390", "aVR"), (MDC_SYSTEMS[1], "131336", "V6")],
)
def test_sampled_data_components_map_by_mdc_code(m: Mappings, system: str, code: str, lead: str) -> None:
    """valueSampledData components are identified by MDC lead code under either MDC system URI (FHIR R4 Observation/ekg)."""
    assert m.ecg.lead_for_coding(system, code) == lead
    assert m.ecg.lead_for_coding("http://loinc.org", code) is None


def test_mdc_lead_codes_follow_the_partition_arithmetic(m: Mappings) -> None:
    """MDC_ECG_ELEC_POTL_* context-free codes are 2 * 65536 + term code (IEEE 11073-10101)."""
    terms = {
        "I": 257,
        "II": 258,
        "V1": 259,
        "V2": 260,
        "V3": 261,
        "V4": 262,
        "V5": 263,
        "V6": 264,
        "III": 317,
        "aVR": 318,
        "aVL": 319,
        "aVF": 320,
    }
    assert {lead: int(c.code) - 2 * 65536 for lead, c in m.ecg.mdc_lead_codes.items()} == terms


def test_derived_limb_leads_follow_einthoven_and_goldberger(m: Mappings) -> None:
    """III = II - I, aVR = -(I+II)/2, aVL = I - II/2, aVF = II - I/2 from electrode potentials."""
    rng = np.random.default_rng(0)
    ra, la, ll = rng.normal(size=(3, 50))
    leads = {
        "I": la - ra,
        "II": ll - ra,
        "III": ll - la,
        "aVR": ra - (la + ll) / 2,
        "aVL": la - (ra + ll) / 2,
        "aVF": ll - (ra + la) / 2,
    }
    assert set(m.ecg.derived_leads) == {"III", "aVR", "aVL", "aVF"}
    for target, weights in m.ecg.derived_leads.items():
        computed = sum(weight * leads[source] for source, weight in weights.items())
        np.testing.assert_allclose(computed, leads[target], atol=1e-12)


@pytest.mark.parametrize(
    ("content_type", "fmt"),
    [
        ("application/dicom", "dicom"),
        ("application/zip", "wfdb-zip"),
        ("application/x-wfdb+zip", "wfdb-zip"),
        ("application/xml", "muse-xml"),
        ("text/xml; charset=UTF-8", "muse-xml"),
        ("Application/DICOM", "dicom"),
        ("application/pdf", None),
        (None, None),
    ],
)
def test_attachment_content_types(m: Mappings, content_type: str | None, fmt: str | None) -> None:
    """DICOM, WFDB ZIP and GE MUSE XML attachments are accepted; others are not (issue: ecg.yaml)."""
    assert m.ecg.attachment_format(content_type) == fmt


def test_ecg_limits(m: Mappings) -> None:
    """ECGs older than the longest task window (120 min), larger than 10 MiB or shorter than one 2.5 s
    window are refused (method §2.2, §2.4)."""
    assert m.ecg.max_age_minutes == 120
    assert m.ecg.max_attachment_bytes == 10 * 1024 * 1024
    assert m.ecg.min_duration_s == 2.5


@pytest.mark.parametrize(
    ("value", "unit", "mv"), [(1500.0, "uV", 1.5), (1.5, "mV", 1.5), (0.0015, "V", 1.5), (1.0, "cm", None)]
)
def test_amplitude_units(m: Mappings, value: float, unit: str, mv: float | None) -> None:
    """Sample amplitudes convert to the model's mV; an unknown unit gives None."""
    result = m.ecg.to_millivolts(value, unit)
    assert result == pytest.approx(mv) if mv is not None else result is None


def test_ecg_codes(m: Mappings) -> None:
    """ECG Observations are found by LOINC 11524-6 / 34534-8 or MDC 131328 (issue: ecg.yaml)."""
    codes = {(c.system, c.code) for c in m.ecg.observation_codes}
    assert {(LOINC_SYSTEM, "11524-6"), (LOINC_SYSTEM, "34534-8"), (MDC_SYSTEMS[0], "131328")} <= codes


# -- broken files: the message names file, entry and field ----------------------------------------------------


@pytest.fixture
def broken(tmp_path: Path) -> Path:
    """A writable copy of the packaged YAML files."""
    target = tmp_path / "mappings"
    target.mkdir()
    for name in ("features.yaml", "labs.yaml", "ecg.yaml"):
        shutil.copy(DEFAULT_DIR / name, target / name)
    return target


def _edit(directory: Path, name: str, change: Any) -> None:
    """Load one YAML file, let ``change`` modify the data, write it back."""
    path = directory / name
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def _entry(data: dict[str, Any], section: str, key: str) -> dict[str, Any]:
    return next(item for item in data[section] if item["key"] == key)


def _error(directory: Path) -> MappingError:
    with pytest.raises(MappingError) as info:
        load_mappings(directory)
    return info.value


def test_broken_field_names_file_entry_and_field(broken: Path) -> None:
    """A wrong order code reads 'labs.yaml: lab 'ntprobnp': field 'order_code.code': ...' (issue)."""
    _edit(broken, "labs.yaml", lambda d: _entry(d, "labs", "ntprobnp")["order_code"].update(code="3376-6"))
    error = _error(broken)
    assert str(error).startswith("labs.yaml: lab 'ntprobnp': field 'order_code.code': ")
    assert "check digit" in str(error)
    assert (error.file, error.entry, error.field) == ("labs.yaml", "lab 'ntprobnp'", "order_code.code")


def test_yaml_syntax_error_names_the_line(broken: Path) -> None:
    """A YAML syntax error is reported with file and line, not as a parser traceback."""
    path = broken / "features.yaml"
    lines = path.read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if line.strip() == "- key: heart_rate")
    lines[index + 1] = "    kind: [continuous"
    path.write_text("\n".join(lines) + "\n")
    error = _error(broken)
    assert error.file == "features.yaml"
    assert error.entry is not None and error.entry.startswith("line ")
    assert "YAML syntax error" in str(error)


def test_unknown_key_names_entry_and_field(broken: Path) -> None:
    """An unknown key (extra='forbid') names the entry and the key itself."""
    _edit(broken, "features.yaml", lambda d: _entry(d, "features", "heart_rate").update(colour="red"))
    error = _error(broken)
    assert str(error).startswith("features.yaml: feature 'heart_rate': field 'colour': unknown key")


def test_duplicate_yaml_key_names_entry_field_and_lines(broken: Path) -> None:
    """A key given twice in one mapping is refused (PyYAML would silently keep the last one)."""
    path = broken / "labs.yaml"
    text = path.read_text()
    anchor = "  - key: sodium\n"
    assert anchor in text
    path.write_text(text.replace(anchor, anchor + '    unit: "mmol/L"\n', 1))
    error = _error(broken)
    assert (error.file, error.entry, error.field) == ("labs.yaml", "lab 'sodium'", "unit")
    assert "duplicate key 'unit' on line" in str(error)


def test_duplicate_lab_entry_is_refused(broken: Path) -> None:
    """Two labs with the same key are refused, naming the key."""
    _edit(broken, "labs.yaml", lambda d: d["labs"].append(dict(_entry(d, "labs", "sodium"))))
    error = _error(broken)
    assert str(error).startswith("labs.yaml: lab 'sodium': field 'key': duplicate")


def test_shared_order_code_is_refused(broken: Path) -> None:
    """Two labs ordered with one code (e.g. a panel) are refused: each lab needs its own order code."""

    def share(d: dict[str, Any]) -> None:
        _entry(d, "labs", "sodium")["order_code"] = dict(_entry(d, "labs", "potassium")["order_code"])

    _edit(broken, "labs.yaml", share)
    error = _error(broken)
    assert (error.entry, error.field) == ("lab 'sodium'", "order_code.code")


def test_features_out_of_order_are_refused(broken: Path) -> None:
    """Swapping two features breaks the model's input layout and is refused."""

    def swap(d: dict[str, Any]) -> None:
        d["features"][3], d["features"][4] = d["features"][4], d["features"][3]

    _edit(broken, "features.yaml", swap)
    error = _error(broken)
    assert str(error).startswith(
        "features.yaml: feature 'heart_rate': field 'key': position 4 must be 'temperature'"
    )


def test_categorical_feature_without_categories_is_refused(broken: Path) -> None:
    """A categorical feature must list its categories (issue: categories non-empty)."""
    _edit(broken, "features.yaml", lambda d: _entry(d, "features", "race").update(categories=[]))
    error = _error(broken)
    assert (error.entry, error.field) == ("feature 'race'", "categories")


def test_conversions_must_cover_the_canonical_unit(broken: Path) -> None:
    """A continuous feature must convert its own canonical unit (issue: conversions cover the unit)."""
    _edit(
        broken,
        "features.yaml",
        lambda d: _entry(d, "features", "temperature")["accepted_units"].pop("[degF]"),
    )
    error = _error(broken)
    assert (error.entry, error.field) == ("feature 'temperature'", "accepted_units")
    assert "[degF]" in str(error)


def test_threshold_direction_must_be_high_or_low(broken: Path) -> None:
    """A paper threshold direction other than high/low is refused (issue: direction valid)."""
    _edit(
        broken,
        "labs.yaml",
        lambda d: _entry(d, "labs", "albumin")["paper_threshold"].update(direction="above"),
    )
    error = _error(broken)
    assert (error.entry, error.field) == ("lab 'albumin'", "paper_threshold.direction")


def test_plausibility_bounds_must_be_ordered(broken: Path) -> None:
    """min above max is refused, naming plausible.min."""
    _edit(broken, "features.yaml", lambda d: _entry(d, "features", "weight")["plausible"].update(min=500))
    error = _error(broken)
    assert (error.entry, error.field) == ("feature 'weight'", "plausible.min")


def test_ambiguous_lead_alias_is_refused(broken: Path) -> None:
    """An alias that would resolve to two leads is refused, naming the alias."""
    _edit(broken, "ecg.yaml", lambda d: d["lead_aliases"]["V1"].append("dii"))
    error = _error(broken)
    assert error.file == "ecg.yaml"
    assert (error.entry, error.field) == ("lead_aliases 'V1'", "[5]")


def test_signed_lead_alias_is_refused(broken: Path) -> None:
    """'-aVR' is the inverted signal and may not be listed as an alias of aVR."""
    _edit(broken, "ecg.yaml", lambda d: d["lead_aliases"]["aVR"].append("-aVR"))
    error = _error(broken)
    assert (error.entry, error.field) == ("lead_aliases 'aVR'", "[4]")


@pytest.mark.parametrize(("lead", "alias"), [("aVR", "aVR inverted"), ("V4", "V4R"), ("V6", "V7")])
def test_alias_that_is_another_signal_is_refused(broken: Path, lead: str, alias: str) -> None:
    """An inverted spelling or a right-sided/posterior chest lead is no alias; the loader names it."""
    _edit(broken, "ecg.yaml", lambda d: d["lead_aliases"][lead].append(alias))
    error = _error(broken)
    index = len(yaml.safe_load((DEFAULT_DIR / "ecg.yaml").read_text())["lead_aliases"][lead])
    assert (error.file, error.entry, error.field) == ("ecg.yaml", f"lead_aliases '{lead}'", f"[{index}]")
    assert alias in error.problem


def test_wrong_lead_order_is_refused(broken: Path) -> None:
    """The ECG lead order must be the model's channel order (method §2.2)."""
    _edit(
        broken,
        "ecg.yaml",
        lambda d: d.update(
            lead_order=["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
        ),
    )
    error = _error(broken)
    assert (error.file, error.entry, error.field) == ("ecg.yaml", None, "lead_order")


def test_version_mismatch_between_files_is_refused(broken: Path) -> None:
    """The three files form one version; a file with another version is refused."""
    _edit(broken, "ecg.yaml", lambda d: d.update(mapping_version="9.9.9"))
    error = _error(broken)
    assert (error.file, error.field) == ("ecg.yaml", "mapping_version")


def test_missing_required_field_is_named(broken: Path) -> None:
    """A lab without its unit is refused, naming the lab and 'unit'."""
    _edit(broken, "labs.yaml", lambda d: _entry(d, "labs", "glucose").pop("unit"))
    error = _error(broken)
    assert str(error).startswith("labs.yaml: lab 'glucose': field 'unit': required field is missing")
