"""Pydantic models of ``features.yaml``: the model's metadata inputs and where each comes from.

A :class:`FeatureSpec` says, for one input of the model, where it is read on FHIR (Patient
element, US Core extension or Observation codes and panel components) and in MIMIC-IV (table,
column, OMR result names), its canonical unit and accepted units, plausibility limits, the time
window around the ECG and, for categorical inputs, how source values map to categories. Per-entry
consistency (a categorical feature has categories, a continuous one converts its canonical unit
with factor 1, an observation feature has a time window, ...) is checked here; the model's order
of the features is checked by the loader against :data:`MODEL_FEATURES`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Literal

from pydantic import Field, field_validator, model_validator

from fhir_mappings.schema_common import (
    Coding,
    FieldIssue,
    Limits,
    StrictModel,
    UnitConversion,
    Window,
    require_key,
)

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

_MIMIC_TABLE_RE = re.compile(r"^(hosp|ed|icu|ecg)/[a-z_]+$")


class ComponentRef(StrictModel):
    """A value carried as ``Observation.component`` of a panel (e.g. systolic BP inside 85354-9)."""

    panel: Coding
    component: Coding


FhirKind = Literal["patient-gender", "patient-birthdate", "patient-race", "observation"]


class FhirSource(StrictModel):
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


class MimicSource(StrictModel):
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


class CategoryRule(StrictModel):
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


class FeatureSpec(StrictModel):
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
        return require_key(value)

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


class FeaturesFile(StrictModel):
    """Top level of ``features.yaml``."""

    mapping_version: str
    features: list[FeatureSpec]
