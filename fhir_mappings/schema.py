"""Pydantic models of the three mapping files (features, labs, ECG) and their per-entry rules.

The mapping files are the single contract that training (MIMIC-IV) and the service (FHIR) both
read, so every rule that keeps the two sides in step is checked here rather than trusted:

* each model is ``extra="forbid"`` and frozen, so a typo'd key or a runtime edit fails loudly;
* codes carry their system, code and display; LOINC codes must pass the LOINC mod-10 check digit
  (catches most transcription slips before a search silently finds nothing);
* per-entry consistency (a categorical feature has categories, a continuous one converts its
  canonical unit with factor 1, an observation feature has a time window, ...) is raised as a
  :class:`FieldIssue`, which names the offending field so the loader can report
  ``file: entry: field``.

Rules that compare several entries (uniqueness, the model's feature order) live in the loader
(:mod:`fhir_mappings`), which knows the file and entry names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from fhir_mappings.signal_spec import MODEL_LEADS

LOINC_SYSTEM = "http://loinc.org"
UCUM_SYSTEM = "http://unitsofmeasure.org"
#: IEEE 11073-10101 (MDC): the URI HL7 terminology prefers first, then the OID form the FHIR R4
#: EKG example (Observation/ekg) uses. Both name the same code system.
MDC_SYSTEMS: tuple[str, ...] = ("urn:iso:std:iso:11073:10101", "urn:oid:2.16.840.1.113883.6.24")
CDC_RACE_SYSTEM = "urn:oid:2.16.840.1.113883.6.238"

#: The model's metadata inputs: (key, kind, has a ``{key}_missing`` indicator), in model order.
#: This is the layout the exported network expects (``cat`` = the categorical keys, ``cont`` = the
#: continuous keys followed by the indicators), so the mapping file may not drift from it.
MODEL_FEATURES: tuple[tuple[str, str, bool], ...] = (
    ("sex", "categorical", False),
    ("race", "categorical", True),
    ("age", "continuous", False),
    ("temperature", "continuous", True),
    ("heart_rate", "continuous", True),
    ("resp_rate", "continuous", True),
    ("spo2", "continuous", True),
    ("sbp", "continuous", True),
    ("dbp", "continuous", True),
    ("bmi", "continuous", True),
    ("weight", "continuous", True),
    ("height", "continuous", True),
)

#: ECG channel order of the model (CardioLab ``channel_stoi_default``; method §2.2).
MODEL_LEAD_ORDER: tuple[str, ...] = MODEL_LEADS

LAB_CATEGORIES: tuple[str, ...] = (
    "cardiac",
    "renal",
    "hematological",
    "metabolic",
    "immunological",
    "coagulation",
)

_KEY_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_LOINC_RE = re.compile(r"^(\d{1,7})-(\d)$")
_MIMIC_TABLE_RE = re.compile(r"^(hosp|ed|icu|ecg)/[a-z_]+$")


class FieldIssue(ValueError):
    """A rule broken inside one entry; ``field`` is the dotted path of the field at fault.

    Raised from model validators so that the loader can append the field to the entry's location
    (pydantic only knows the location of the model, not which of its fields a cross-field rule
    is about).
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def loinc_check_digit(number: str) -> int:
    """The LOINC mod-10 check digit of the numeric part of a LOINC code (LOINC Users' Guide).

    Double the number formed by the digits in odd positions (counted from the right), prepend the
    digits in even positions, add all digits, and subtract the sum from the next multiple of 10.
    """
    digits = number[::-1]
    odd = digits[0::2][::-1]
    even = digits[1::2][::-1]
    doubled = str(int(odd) * 2) if odd else ""
    total = sum(int(d) for d in even + doubled)
    return (10 - total % 10) % 10


def is_valid_loinc(code: str) -> bool:
    """Whether ``code`` looks like ``NNNNN-C`` and ``C`` is its LOINC check digit."""
    match = _LOINC_RE.match(code)
    if match is None:
        return False
    return loinc_check_digit(match.group(1)) == int(match.group(2))


def _require_key(value: str) -> str:
    if not _KEY_RE.match(value):
        raise ValueError(f"{value!r} is not a lower-case key (letters, digits, '_', starting with a letter)")
    return value


class _Strict(BaseModel):
    """Base of every mapping model: unknown keys are errors and loaded objects are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Coding(_Strict):
    """A FHIR ``Coding`` (system, code, display) as the mapping files spell it."""

    system: str = Field(min_length=1)
    code: str = Field(min_length=1)
    display: str = Field(min_length=1)

    @field_validator("system", "code", "display")
    @classmethod
    def _no_padding(cls, value: str) -> str:
        if value != value.strip():
            raise ValueError(f"{value!r} has leading or trailing blanks")
        return value

    @model_validator(mode="after")
    def _check_system_rules(self) -> Coding:
        if self.system == LOINC_SYSTEM and not is_valid_loinc(self.code):
            raise FieldIssue("code", f"{self.code!r} is not a LOINC code with a valid check digit")
        if self.system in MDC_SYSTEMS and not self.code.isdigit():
            raise FieldIssue("code", f"{self.code!r} is not a numeric IEEE 11073-10101 code")
        return self

    def matches(self, system: str | None, code: str | None) -> bool:
        """Whether a (system, code) pair found in a resource denotes this coding.

        MDC codes match under either of the two MDC system URIs (:data:`MDC_SYSTEMS`).
        """
        if code != self.code:
            return False
        if system == self.system:
            return True
        return system in MDC_SYSTEMS and self.system in MDC_SYSTEMS


class UnitConversion(_Strict):
    """Linear conversion to the canonical unit: ``canonical = value * factor + offset``."""

    factor: float
    offset: float = 0.0

    @field_validator("factor", "offset")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("factor")
    @classmethod
    def _non_zero(cls, value: float) -> float:
        if value == 0:
            raise ValueError("must not be 0 (the conversion must be invertible)")
        return value

    def to_canonical(self, value: float) -> float:
        """``value`` in the canonical unit."""
        return value * self.factor + self.offset

    def from_canonical(self, value: float) -> float:
        """A canonical ``value`` expressed in this unit (the inverse of :meth:`to_canonical`)."""
        return (value - self.offset) / self.factor


class Limits(_Strict):
    """Plausibility bounds; a value strictly below ``min`` or strictly above ``max`` is implausible."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Limits:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise FieldIssue("min", f"min {self.min} is above max {self.max}")
        return self

    def contains(self, value: float) -> bool:
        """Whether ``value`` is finite and inside the bounds (bounds themselves are plausible)."""
        if not math.isfinite(value):
            return False
        if self.min is not None and value < self.min:
            return False
        return not (self.max is not None and value > self.max)


class Window(_Strict):
    """Search window around the ECG time, in minutes before and after it (both inclusive)."""

    before_min: int = Field(ge=0)
    after_min: int = Field(ge=0)

    def contains(self, offset_min: float) -> bool:
        """Whether a measurement ``offset_min`` minutes after the ECG (negative: before) is inside."""
        return -self.before_min <= offset_min <= self.after_min


class ComponentRef(_Strict):
    """A value carried as ``Observation.component`` of a panel (e.g. systolic BP inside 85354-9)."""

    panel: Coding
    component: Coding


FhirKind = Literal["patient-gender", "patient-birthdate", "patient-race", "observation"]


class FhirSource(_Strict):
    """Where a feature comes from on FHIR.

    ``codes`` are the Observation codes (preferred first, then accepted alternates); ``components``
    lists panels whose components carry the value; ``extensions`` are the Patient extension URLs
    read for ``patient-race`` (race first, then ethnicity).
    """

    kind: FhirKind
    codes: list[Coding] = Field(default_factory=list)
    components: list[ComponentRef] = Field(default_factory=list)
    extensions: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> FhirSource:
        if self.kind == "observation":
            if not self.codes and not self.components:
                raise FieldIssue("codes", "an observation feature needs at least one code or component")
        else:
            if self.codes:
                raise FieldIssue(
                    "codes", f"a {self.kind} feature reads the Patient resource, not Observation codes"
                )
            if self.components:
                raise FieldIssue("components", f"a {self.kind} feature has no Observation components")
        if self.kind == "patient-race" and not self.extensions:
            raise FieldIssue(
                "extensions", "patient-race needs the US Core race (and ethnicity) extension URLs"
            )
        if self.kind != "patient-race" and self.extensions:
            raise FieldIssue("extensions", f"a {self.kind} feature reads no Patient extensions")
        return self

    def all_codes(self) -> list[Coding]:
        """Every Observation code that can carry this feature: direct codes, then panel codes."""
        panels = [ref.panel for ref in self.components]
        return [*self.codes, *panels]


class MimicSource(_Strict):
    """Where training reads the feature in MIMIC-IV.

    ``table`` is ``module/table`` (e.g. ``ed/vitalsign``), ``column`` the value column,
    ``result_names`` the ``hosp/omr.result_name`` values that hold the feature, ``factor`` the
    multiplier to the canonical unit, and ``also_tables`` further tables with the same column that
    are read too (race: ``hosp/admissions`` and ``ed/edstays``).
    """

    table: str
    column: str = Field(min_length=1)
    result_names: list[str] = Field(default_factory=list)
    factor: float = 1.0
    also_tables: list[str] = Field(default_factory=list)

    @field_validator("table")
    @classmethod
    def _table_name(cls, value: str) -> str:
        if not _MIMIC_TABLE_RE.match(value):
            raise ValueError(f"{value!r} is not a MIMIC-IV 'module/table' name such as 'ed/vitalsign'")
        return value

    @field_validator("also_tables")
    @classmethod
    def _table_names(cls, values: list[str]) -> list[str]:
        for value in values:
            cls._table_name(value)
        return values

    @field_validator("factor")
    @classmethod
    def _positive(cls, value: float) -> float:
        if not (math.isfinite(value) and value > 0):
            raise ValueError("must be a positive number")
        return value

    @model_validator(mode="after")
    def _omr_names(self) -> MimicSource:
        if self.table == "hosp/omr" and not self.result_names:
            raise FieldIssue("result_names", "hosp/omr rows are selected by result_name; list them")
        if self.table != "hosp/omr" and self.result_names:
            raise FieldIssue("result_names", "result_names only apply to hosp/omr")
        return self


class CategoryRule(_Strict):
    """How source values map to one category of a categorical feature.

    ``fhir_codes`` match codings found on FHIR; ``keywords`` match (upper-case substring) free
    text such as MIMIC race strings or the US Core race ``text``; ``mimic_values`` match a MIMIC
    column value exactly (case-insensitive). ``overrides`` makes a FHIR code match win over other
    matched categories (Hispanic ethnicity, see features.yaml).
    """

    category: str
    fhir_codes: list[Coding] = Field(default_factory=list)
    keywords: list[str] = Field(default_factory=list)
    mimic_values: list[str] = Field(default_factory=list)
    overrides: bool = False

    @field_validator("keywords")
    @classmethod
    def _upper(cls, values: list[str]) -> list[str]:
        for value in values:
            if not value or value != value.upper().strip():
                raise ValueError(f"keyword {value!r} must be non-empty upper case without padding")
        return values


_NEGATION_RE = r"(NOT|NON)[\s\-]*$"


def _keyword_in(keyword: str, text: str) -> bool:
    """Whether ``keyword`` occurs in ``text`` other than right after a negation ("NOT HISPANIC")."""
    start = text.find(keyword)
    while start >= 0:
        if not re.search(_NEGATION_RE, text[:start]):
            return True
        start = text.find(keyword, start + 1)
    return False


class FeatureSpec(_Strict):
    """One metadata input of the model: its FHIR source, MIMIC source, unit, limits and window."""

    key: str
    kind: Literal["categorical", "continuous"]
    display: str = Field(min_length=1)
    categories: list[str] | None = None
    category_rules: list[CategoryRule] = Field(default_factory=list)
    default_category: str | None = None
    unit: str | None = None
    accepted_units: dict[str, UnitConversion] = Field(default_factory=dict)
    unit_aliases: dict[str, str] = Field(default_factory=dict)
    plausible: Limits | None = None
    window: Window | None = None
    missing_indicator: bool
    fhir: FhirSource
    mimic: MimicSource
    notes: str = ""

    @field_validator("key")
    @classmethod
    def _key_format(cls, value: str) -> str:
        return _require_key(value)

    @model_validator(mode="after")
    def _consistent(self) -> FeatureSpec:
        if self.kind == "categorical":
            self._check_categorical()
        else:
            self._check_continuous()
        if self.fhir.kind == "observation" and self.window is None:
            raise FieldIssue("window", "an observation feature needs a time window around the ECG")
        if self.fhir.kind != "observation" and self.window is not None:
            raise FieldIssue("window", f"a {self.fhir.kind} feature has no time window")
        return self

    def _check_categorical(self) -> None:
        if not self.categories:
            raise FieldIssue("categories", "a categorical feature needs a non-empty list of categories")
        if len(set(self.categories)) != len(self.categories):
            raise FieldIssue("categories", "categories must be unique")
        if not self.category_rules:
            raise FieldIssue("category_rules", "a categorical feature needs rules mapping source values")
        for index, rule in enumerate(self.category_rules):
            if rule.category not in self.categories:
                raise FieldIssue(
                    f"category_rules[{index}].category", f"{rule.category!r} is not one of {self.categories}"
                )
        if self.default_category is not None and self.default_category not in self.categories:
            raise FieldIssue("default_category", f"{self.default_category!r} is not one of {self.categories}")
        for name in ("unit", "plausible"):
            if getattr(self, name) is not None:
                raise FieldIssue(name, "a categorical feature has no unit or plausibility limits")
        if self.accepted_units or self.unit_aliases:
            raise FieldIssue("accepted_units", "a categorical feature has no units")

    def _check_continuous(self) -> None:
        if self.categories is not None or self.category_rules or self.default_category is not None:
            raise FieldIssue("categories", "a continuous feature has no categories")
        if not self.unit:
            raise FieldIssue("unit", "a continuous feature needs its canonical UCUM unit")
        identity = self.accepted_units.get(self.unit)
        if identity is None:
            raise FieldIssue("accepted_units", f"must contain the canonical unit {self.unit!r}")
        if identity.factor != 1 or identity.offset != 0:
            raise FieldIssue(
                f"accepted_units.{self.unit}", "the canonical unit must convert with factor 1, offset 0"
            )
        for alias, target in self.unit_aliases.items():
            if target not in self.accepted_units:
                raise FieldIssue(f"unit_aliases.{alias}", f"{target!r} is not an accepted unit")
            if alias in self.accepted_units:
                raise FieldIssue(f"unit_aliases.{alias}", "is already an accepted unit")
        if self.plausible is None:
            raise FieldIssue(
                "plausible", "a continuous feature needs plausibility limits (null bounds allowed)"
            )

    # -- units and plausibility ----------------------------------------------------------------

    def _conversion(self, unit: str | None) -> UnitConversion | None:
        if unit is None:
            unit = self.unit
        if unit is None:
            return None
        unit = unit.strip()
        conversion = self.accepted_units.get(unit)
        if conversion is None and unit in self.unit_aliases:
            conversion = self.accepted_units[self.unit_aliases[unit]]
        return conversion

    def convert(self, value: float, unit: str | None) -> float | None:
        """``value`` given in ``unit`` (UCUM code or a listed alias) in the canonical unit.

        ``None`` when the unit is not accepted: an unknown unit is never guessed. ``unit=None``
        means the value is already canonical.
        """
        conversion = self._conversion(unit)
        return None if conversion is None else conversion.to_canonical(float(value))

    def from_canonical(self, value: float, unit: str) -> float | None:
        """A canonical ``value`` expressed in ``unit`` (e.g. to write test data in Cel)."""
        conversion = self._conversion(unit)
        return None if conversion is None else conversion.from_canonical(float(value))

    def is_plausible(self, value: float) -> bool:
        """Whether a canonical value passes the method's plausibility limits (strict: v < min or v > max fails)."""
        if self.plausible is None:
            return math.isfinite(value)
        return self.plausible.contains(float(value))

    def clean(self, value: float | None, unit: str | None = None) -> float | None:
        """Convert to the canonical unit and drop implausible values: the model-ready value or ``None``."""
        if value is None:
            return None
        canonical = self.convert(value, unit)
        if canonical is None or not self.is_plausible(canonical):
            return None
        return canonical

    # -- categories ------------------------------------------------------------------------------

    def category_index(self, category: str) -> int:
        """The integer the model sees for ``category`` (its position in ``categories``)."""
        if not self.categories or category not in self.categories:
            raise KeyError(f"feature {self.key!r} has no category {category!r}")
        return self.categories.index(category)

    def categorize_text(self, text: str | None) -> str | None:
        """Keyword mapping of free text (MIMIC race strings, US Core race ``text``).

        Rules are tried in file order; an unmatched non-empty text gets ``default_category``
        (MIMIC: "WHITE/BLACK/HISPANIC/ASIAN, else other"); empty text gives ``None``. A keyword
        right after "NOT"/"NON" does not count ("Not Hispanic or Latino").
        """
        if text is None or not text.strip():
            return None
        upper = " ".join(text.upper().split())
        for rule in self.category_rules:
            if any(_keyword_in(keyword, upper) for keyword in rule.keywords):
                return rule.category
        return self.default_category

    def categorize_mimic(self, value: str | None) -> str | None:
        """The category of a MIMIC-IV column value (exact ``mimic_values``, then keywords, then default)."""
        if value is None or not str(value).strip():
            return None
        upper = str(value).strip().upper()
        for rule in self.category_rules:
            if upper in (v.upper() for v in rule.mimic_values):
                return rule.category
        return self.categorize_text(upper)

    def categorize_fhir(
        self, codings: Iterable[tuple[str | None, str | None]], text: str | None = None
    ) -> str | None:
        """The category of FHIR codings (``(system, code)`` pairs), falling back to ``text``.

        * a matched rule with ``overrides`` wins (Hispanic ethnicity, as MIMIC files Hispanic
          patients under the single race field);
        * exactly one matched category is the answer;
        * several matched categories give ``default_category`` (MIMIC "MULTIPLE RACE" → other);
        * no matched code: the keyword mapping of ``text``; nothing at all: ``None`` (missing).

        For race pass the ``ombCategory`` (and ``detailed``) codings of the us-core-race extension
        plus the ``ombCategory`` of us-core-ethnicity, and the race extension's ``text`` only (the
        ethnicity text "Not Hispanic or Latino" is handled, but is not race information). For sex
        pass ``[(administrative-gender system, Patient.gender)]``.
        """
        pairs = list(codings)
        matched: list[CategoryRule] = [
            rule
            for rule in self.category_rules
            if any(coding.matches(system, code) for coding in rule.fhir_codes for system, code in pairs)
        ]
        for rule in matched:
            if rule.overrides:
                return rule.category
        categories = list(dict.fromkeys(rule.category for rule in matched))
        if len(categories) == 1:
            return categories[0]
        if len(categories) > 1:
            return self.default_category
        return self.categorize_text(text)


class PaperThreshold(_Strict):
    """A threshold the paper publishes for a lab; the code's rule is strict (``>`` high, ``<`` low)."""

    direction: Literal["high", "low"]
    value: float
    source: str = Field(min_length=1)

    @field_validator("value")
    @classmethod
    def _finite_positive(cls, value: float) -> float:
        if not (math.isfinite(value) and value > 0):
            raise ValueError("must be a positive number")
        return value

    def is_abnormal(self, value: float) -> bool:
        """Whether ``value`` is on the abnormal side of the threshold (strict, as the reference code)."""
        return value > self.value if self.direction == "high" else value < self.value


class LabSpec(_Strict):
    """One lab the model may target: MIMIC label, FHIR result and order codes, unit and severity."""

    key: str
    display: str = Field(min_length=1)
    mimic_label: str = Field(min_length=1)
    fluid: str = Field(min_length=1)
    category: Literal["cardiac", "renal", "hematological", "metabolic", "immunological", "coagulation"]
    result_codes: list[Coding] = Field(min_length=1)
    order_code: Coding
    unit: str = Field(min_length=1)
    severity: Literal["info", "warning", "critical"]
    paper_threshold: PaperThreshold | None = None
    notes: str = ""

    @field_validator("key")
    @classmethod
    def _key_format(cls, value: str) -> str:
        return _require_key(value)

    @model_validator(mode="after")
    def _loinc_only(self) -> LabSpec:
        for index, coding in enumerate(self.result_codes):
            if coding.system != LOINC_SYSTEM:
                raise FieldIssue(
                    f"result_codes[{index}].system", f"lab results are LOINC-coded ({LOINC_SYSTEM})"
                )
        if self.order_code.system != LOINC_SYSTEM:
            raise FieldIssue("order_code.system", f"lab orders are LOINC-coded ({LOINC_SYSTEM})")
        return self

    def has_result_code(self, system: str | None, code: str | None) -> bool:
        """Whether a result Observation coded ``(system, code)`` reports this lab."""
        return any(coding.matches(system, code) for coding in self.result_codes)


class AttachmentFormat(_Strict):
    """An accepted ECG attachment ``contentType`` and the reader format it selects."""

    content_type: str
    format: Literal["dicom", "wfdb-zip", "muse-xml"]
    description: str = Field(min_length=1)

    @field_validator("content_type")
    @classmethod
    def _media_type(cls, value: str) -> str:
        if not re.match(r"^[a-z]+/[a-z0-9.+\-]+$", value):
            raise ValueError(f"{value!r} is not a lower-case media type such as 'application/dicom'")
        return value


def _normalise_lead(name: str) -> str:
    """Lead-name matching key: trimmed, inner blanks collapsed, case-folded (signs are kept)."""
    return " ".join(name.split()).casefold()


class EcgSpec(_Strict):
    """How an ECG is found on FHIR and read: codes, attachment types, leads and limits."""

    observation_codes: list[Coding] = Field(min_length=1)
    media_codes: list[Coding] = Field(min_length=1)
    document_codes: list[Coding] = Field(min_length=1)
    code_paths: dict[Literal["observation", "media", "documentreference"], list[str]]
    attachment_formats: list[AttachmentFormat] = Field(min_length=1)
    lead_order: list[str]
    lead_aliases: dict[str, list[str]]
    mdc_lead_codes: dict[str, Coding]
    derived_leads: dict[str, dict[str, float]] = Field(default_factory=dict)
    amplitude_unit: str
    amplitude_units: dict[str, UnitConversion]
    max_age_minutes: int = Field(gt=0)
    max_attachment_bytes: int = Field(gt=0)
    min_duration_s: float = Field(gt=0)
    notes: str = ""

    _lookup: dict[str, str] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> EcgSpec:
        self._check_leads()
        self._check_derived()
        identity = self.amplitude_units.get(self.amplitude_unit)
        if identity is None or identity.factor != 1 or identity.offset != 0:
            raise FieldIssue(
                "amplitude_units", f"must convert the canonical {self.amplitude_unit!r} with factor 1"
            )
        if set(self.code_paths) != {"observation", "media", "documentreference"}:
            raise FieldIssue(
                "code_paths", "must list the code fields of observation, media and documentreference"
            )
        self._lookup = self._build_lookup()
        return self

    def _check_leads(self) -> None:
        if tuple(self.lead_order) != MODEL_LEAD_ORDER:
            raise FieldIssue("lead_order", f"must be the model's lead order {list(MODEL_LEAD_ORDER)}")
        for section in ("lead_aliases", "mdc_lead_codes"):
            keys = set(getattr(self, section))
            if keys != set(self.lead_order):
                extra = sorted(keys - set(self.lead_order))
                missing = [lead for lead in self.lead_order if lead not in keys]
                raise FieldIssue(
                    section, f"must have exactly the model leads (missing {missing}, unknown {extra})"
                )
        for lead, coding in self.mdc_lead_codes.items():
            if coding.system not in MDC_SYSTEMS:
                raise FieldIssue(
                    f"mdc_lead_codes.{lead}.system", f"must be an IEEE 11073-10101 system {list(MDC_SYSTEMS)}"
                )
        for lead, names in self.lead_aliases.items():
            for index, alias in enumerate(names):
                if not alias.strip() or alias.strip()[0] in "+-":
                    raise FieldIssue(
                        f"lead_aliases.{lead}[{index}]",
                        f"{alias!r} is empty or signed; an inverted lead ('-aVR') is a different signal",
                    )

    def _check_derived(self) -> None:
        derived = set(self.derived_leads)
        for lead, weights in self.derived_leads.items():
            if lead not in self.lead_order:
                raise FieldIssue(f"derived_leads.{lead}", "is not a model lead")
            if not weights:
                raise FieldIssue(f"derived_leads.{lead}", "needs at least one source lead")
            for source in weights:
                if source not in self.lead_order or source in derived:
                    raise FieldIssue(
                        f"derived_leads.{lead}.{source}", "must be a measured (not derived) model lead"
                    )

    def _build_lookup(self) -> dict[str, str]:
        lookup: dict[str, str] = {}

        def add(name: str, lead: str, field: str) -> None:
            key = _normalise_lead(name)
            other = lookup.get(key)
            if other is not None and other != lead:
                raise FieldIssue(field, f"{name!r} would resolve to both {other!r} and {lead!r}")
            lookup[key] = lead

        for lead in self.lead_order:
            add(lead, lead, f"lead_aliases.{lead}")
        for lead, names in self.lead_aliases.items():
            for index, alias in enumerate(names):
                add(alias, lead, f"lead_aliases.{lead}[{index}]")
        for lead, coding in self.mdc_lead_codes.items():
            add(coding.code, lead, f"mdc_lead_codes.{lead}.code")
            add(coding.display, lead, f"mdc_lead_codes.{lead}.display")
        return lookup

    @property
    def content_types(self) -> list[str]:
        """The accepted attachment ``contentType`` values, in file order."""
        return [fmt.content_type for fmt in self.attachment_formats]

    def attachment_format(self, content_type: str | None) -> str | None:
        """The reader format for an attachment ``contentType`` (parameters and case ignored)."""
        if not content_type:
            return None
        bare = content_type.split(";", 1)[0].strip().lower()
        for fmt in self.attachment_formats:
            if fmt.content_type == bare:
                return fmt.format
        return None

    def resolve_lead(self, name: str | None) -> str | None:
        """The model lead a source lead name denotes, or ``None``.

        Matches the model spelling, any alias, the MDC code or reference ID, ignoring case and
        surrounding/inner blanks. Signs are significant: ``'-aVR'`` (inverted aVR) is not aVR.
        """
        if name is None:
            return None
        return self._lookup.get(_normalise_lead(str(name)))

    def lead_for_coding(self, system: str | None, code: str | None) -> str | None:
        """The model lead of a ``valueSampledData`` component coded with an MDC lead code."""
        for lead, coding in self.mdc_lead_codes.items():
            if coding.matches(system, code):
                return lead
        return None

    def to_millivolts(self, value: float, unit: str) -> float | None:
        """An amplitude in ``unit`` (UCUM, e.g. ``uV``) in millivolts; ``None`` for unknown units."""
        conversion = self.amplitude_units.get(unit.strip())
        return None if conversion is None else conversion.to_canonical(float(value))


class FeaturesFile(_Strict):
    """Top level of ``features.yaml``."""

    mapping_version: str
    features: list[FeatureSpec]


class LabsFile(_Strict):
    """Top level of ``labs.yaml``."""

    mapping_version: str
    labs: list[LabSpec]


class EcgFile(EcgSpec):
    """Top level of ``ecg.yaml``: the :class:`EcgSpec` fields plus the mapping version."""

    mapping_version: str


class Mappings(_Strict):
    """All three mapping files, validated together; what :func:`fhir_mappings.load_mappings` returns."""

    version: str
    digest: str
    features: list[FeatureSpec]
    labs: list[LabSpec]
    ecg: EcgSpec

    _features: dict[str, FeatureSpec] = PrivateAttr(default_factory=dict)
    _labs: dict[str, LabSpec] = PrivateAttr(default_factory=dict)
    _labels: dict[str, LabSpec] = PrivateAttr(default_factory=dict)

    def model_post_init(self, context: Any, /) -> None:
        """Index features and labs once; the lists stay the ordered, public view."""
        self._features = {spec.key: spec for spec in self.features}
        self._labs = {lab.key: lab for lab in self.labs}
        self._labels = {lab.mimic_label: lab for lab in self.labs}

    def feature(self, key: str) -> FeatureSpec:
        """The feature ``key``; ``KeyError`` naming the known keys when absent."""
        try:
            return self._features[key]
        except KeyError:
            raise KeyError(f"no feature {key!r} in fhir_mappings (known: {list(self._features)})") from None

    def lab(self, key: str) -> LabSpec | None:
        """The lab with stable key ``key`` (e.g. ``'ntprobnp'``), or ``None``."""
        return self._labs.get(key)

    def lab_by_mimic_label(self, label: str) -> LabSpec | None:
        """The lab whose MIMIC-IV ``d_labitems.label`` is exactly ``label``, or ``None``."""
        return self._labels.get(label)

    def lab_by_result_code(self, system: str | None, code: str | None) -> LabSpec | None:
        """The lab a result Observation coded ``(system, code)`` reports, or ``None``."""
        for lab in self.labs:
            if lab.has_result_code(system, code):
                return lab
        return None

    @property
    def categorical_keys(self) -> list[str]:
        """Keys of the model's ``cat`` input, in order."""
        return [spec.key for spec in self.features if spec.kind == "categorical"]

    @property
    def continuous_keys(self) -> list[str]:
        """Keys of the continuous part of the model's ``cont`` input, in order."""
        return [spec.key for spec in self.features if spec.kind == "continuous"]

    @property
    def missing_indicator_keys(self) -> list[str]:
        """Keys whose ``{key}_missing`` indicator follows the continuous values in ``cont``, in order."""
        return [spec.key for spec in self.features if spec.missing_indicator]
