"""The patient's data for one hook call: the FHIR resources the model inputs and the cards are read from.

Prefetch, FHIR fetching and the demo page all produce one :class:`PatientData`; feature
extraction and card building read it. Resources are plain FHIR JSON dicts, as received.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class PatientData:
    """What prefetch or FHIR fetching yields for one hook call (plain FHIR JSON dicts)."""

    patient: dict[str, Any] | None
    observations: list[dict[str, Any]] = field(default_factory=list)
    ecgs: list[dict[str, Any]] = field(default_factory=list)
    lab_results: list[dict[str, Any]] = field(default_factory=list)
    service_requests: list[dict[str, Any]] = field(default_factory=list)
