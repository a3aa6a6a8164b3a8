"""Building blocks shared by the three mapping files: codings, units, limits, windows, code systems.

Every mapping model derives from :class:`StrictModel` (``extra="forbid"`` and frozen), so a typo'd
key or a runtime edit fails loudly. Codes carry their system, code and display; LOINC codes must
pass the LOINC mod-10 check digit (catches most transcription slips before a search silently finds
nothing) and MDC codes must be numeric.

A rule broken inside one entry is raised as a :class:`FieldIssue`, which names the offending field
so that the loader (:mod:`fhir_mappings.loader`) can report ``file: entry: field``. Rules that
compare several entries (uniqueness, the model's feature order) live in the loader, which knows
the file and entry names.
"""

from __future__ import annotations

import math
import re

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

LOINC_SYSTEM = "http://loinc.org"
UCUM_SYSTEM = "http://unitsofmeasure.org"
#: IEEE 11073-10101 (MDC): the URI HL7 terminology prefers first, then the OID form the FHIR R4
#: EKG example (Observation/ekg) uses. Both name the same code system.
MDC_SYSTEMS: tuple[str, ...] = ("urn:iso:std:iso:11073:10101", "urn:oid:2.16.840.1.113883.6.24")
CDC_RACE_SYSTEM = "urn:oid:2.16.840.1.113883.6.238"

_KEY_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_LOINC_RE = re.compile(r"^(\d{1,7})-(\d)$")


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


def require_key(value: str) -> str:
    """``value`` if it is a stable entry key (lower case, digits, ``_``); ``ValueError`` otherwise."""
    if not _KEY_RE.match(value):
        raise ValueError(f"{value!r} is not a lower-case key (letters, digits, '_', starting with a letter)")
    return value


class StrictModel(BaseModel):
    """Base of every mapping model: unknown keys are errors and loaded objects are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Coding(StrictModel):
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


class UnitConversion(StrictModel):
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


class Limits(StrictModel):
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


class Window(StrictModel):
    """Search window around the ECG time, in minutes before and after it (both inclusive)."""

    before_min: int = Field(ge=0)
    after_min: int = Field(ge=0)

    def contains(self, offset_min: float) -> bool:
        """Whether a measurement ``offset_min`` minutes after the ECG (negative: before) is inside."""
        return -self.before_min <= offset_min <= self.after_min
