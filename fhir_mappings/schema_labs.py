"""Pydantic models of ``labs.yaml``: the labs the model may target and how they are ordered.

A :class:`LabSpec` ties a MIMIC-IV ``d_labitems.label`` to the LOINC codes of its FHIR results,
the LOINC code of its order, its UCUM unit, the card severity and, where the paper publishes one,
its abnormality threshold (:class:`PaperThreshold`). Uniqueness of keys, labels and codes across
labs is checked by the loader.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from fhir_mappings.schema_common import LOINC_SYSTEM, Coding, FieldIssue, StrictModel, require_key

LAB_CATEGORIES: tuple[str, ...] = (
    "cardiac",
    "renal",
    "hematological",
    "metabolic",
    "immunological",
    "coagulation",
)


class PaperThreshold(StrictModel):
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


class LabSpec(StrictModel):
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
        return require_key(value)

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


class LabsFile(StrictModel):
    """Top level of ``labs.yaml``."""

    mapping_version: str
    labs: list[LabSpec]
