"""Reading values out of FHIR JSON: times, codings, references, and fields of the wrong type.

Resources arrive from the EHR as arbitrary JSON: a field that should hold a list or a string may
hold a number or an object. These helpers read such fields defensively, so a malformed resource
is skipped instead of failing the whole hook call. Feature extraction, ECG selection and the cards
all read FHIR through them, so a time or a code means the same thing everywhere.

**The time rule** (:func:`parse_fhir_datetime`, the one FHIR time parser of the service): a FHIR
``date``, ``dateTime`` or ``instant`` is an aware UTC datetime; a value without a zone is taken as
UTC; a partial date is the *start* of the period it names, in UTC (``2024`` → 2024-01-01T00:00Z,
``2024-03`` → 2024-03-01T00:00Z, ``2024-03-05`` → 2024-03-05T00:00Z). The start is the one
instant the value certainly does not precede, and it is how FHIR search reads the lower bound of a
partial date; every comparison (ECG age, metadata windows, "resulted recently" for cards) then
sees the same instant. (A partial *birth* date answers a different question, the patient's age,
and :mod:`cds_service.features` documents its own rule for it.)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "IGNORED_STATUSES",
    "as_list",
    "as_text",
    "codings",
    "first_time",
    "has_code",
    "media_type",
    "of_patient",
    "parse_fhir_datetime",
    "reference",
    "usable",
]

IGNORED_STATUSES: frozenset[str] = frozenset({"entered-in-error", "cancelled", "superseded", "not-done"})
"""Resource statuses that mean "this did not happen or was withdrawn"."""

_YEAR = re.compile(r"\d{4}")
_YEAR_MONTH = re.compile(r"(\d{4})-(\d{2})")


def parse_fhir_datetime(value: object) -> datetime | None:
    """A FHIR ``date``/``dateTime``/``instant`` as an aware UTC datetime; ``None`` if unparsable.

    Partial dates are the start of their period in UTC; a value without a zone is taken as UTC
    (the module docstring's time rule).
    """
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    try:
        if _YEAR.fullmatch(text):
            parsed = datetime(int(text), 1, 1)
        elif month := _YEAR_MONTH.fullmatch(text):
            parsed = datetime(int(month.group(1)), int(month.group(2)), 1)
        else:
            parsed = datetime.fromisoformat(text)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError):  # OverflowError: 0001-01-01T00:00+01:00 has no UTC instant
        return None


def first_time(resource: Mapping[str, Any], paths: Sequence[str]) -> datetime | None:
    """The first parsable time among ``paths`` (``a.b`` walks into nested objects)."""
    for path in paths:
        node: Any = resource
        for part in path.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        parsed = parse_fhir_datetime(node)
        if parsed is not None:
            return parsed
    return None


def as_list(value: Any) -> list[Any]:
    """``value`` when it is a JSON array, else an empty list."""
    return value if isinstance(value, list) else []


def as_text(value: Any) -> str | None:
    """``value`` when it is a string, else ``None``."""
    return value if isinstance(value, str) else None


def codings(node: Any) -> list[tuple[str | None, str | None]]:
    """(system, code) pairs of a CodeableConcept, a list of them, or a Coding (non-strings as ``None``)."""
    if isinstance(node, list):
        return [pair for item in node for pair in codings(item)]
    if not isinstance(node, Mapping):
        return []
    if "coding" in node:
        return [
            (as_text(c.get("system")), as_text(c.get("code")))
            for c in as_list(node.get("coding"))
            if isinstance(c, Mapping)
        ]
    if "code" in node:
        return [(as_text(node.get("system")), as_text(node.get("code")))]
    return []


def has_code(node: Any, codes: Iterable[Any]) -> bool:
    """Whether a CodeableConcept (or list of them) carries one of the mapping ``codes``.

    ``codes`` are objects with ``matches(system, code)`` (``fhir_mappings.Coding``).
    """
    pairs = codings(node)
    return any(code.matches(system, value) for code in codes for system, value in pairs)


def resource_id(resource: Mapping[str, Any] | None) -> str | None:
    """A resource's ``id`` when it is a non-empty string, else ``None``."""
    rid = resource.get("id") if isinstance(resource, Mapping) else None
    return rid if isinstance(rid, str) and rid else None


def reference(resource: Mapping[str, Any]) -> str:
    """``Type/id`` of a resource (``Type/?`` without an id)."""
    return f"{resource.get('resourceType', '?')}/{resource.get('id', '?')}"


def of_patient(resource: Mapping[str, Any], patient_ref: str | None) -> bool:
    """False when the resource names another patient as subject (or patient)."""
    if patient_ref is None:
        return True
    subject = resource.get("subject") or resource.get("patient")
    ref = subject.get("reference") if isinstance(subject, Mapping) else None
    if not isinstance(ref, str):
        return True
    return ref == patient_ref or ref.endswith("/" + patient_ref)


def usable(resource: Mapping[str, Any]) -> bool:
    """False for withdrawn or erroneous resources (:data:`IGNORED_STATUSES`)."""
    return as_text(resource.get("status")) not in IGNORED_STATUSES


def media_type(content_type: str | None) -> str:
    """The MIME type without parameters, lower case (``"Application/XML; charset=utf-8"`` → ``"application/xml"``)."""
    return (content_type or "").split(";", 1)[0].strip().lower()
