"""The patient's data for one hook call: the FHIR resources the model inputs and the cards are read from.

Prefetch and FHIR fetching fill the same prefetch keys (:mod:`cds_service.prefetch`);
:func:`assemble` is the one place where those per-key resources become a :class:`PatientData`,
whichever route each key took. Feature extraction and card building read it. Resources are plain
FHIR JSON dicts, as received.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cds_service.prefetch import PrefetchQuery


@dataclass
class PatientData:
    """What prefetch or FHIR fetching yields for one hook call (plain FHIR JSON dicts)."""

    patient: dict[str, Any] | None
    observations: list[dict[str, Any]] = field(default_factory=list)
    ecgs: list[dict[str, Any]] = field(default_factory=list)
    lab_results: list[dict[str, Any]] = field(default_factory=list)
    service_requests: list[dict[str, Any]] = field(default_factory=list)
    patient_id: str | None = None
    """The hook's ``context.patientId`` once the data is bound to it (:meth:`bound_to`)."""

    def bound_to(self, patient_id: str) -> PatientData:
        """A copy holding only this patient's resources (:func:`cds_service.features.bind_to_patient`)."""
        from cds_service.features import bind_to_patient  # features imports this module

        return bind_to_patient(self, patient_id)


def assemble(resources: Mapping[str, list[dict[str, Any]]], queries: Sequence[PrefetchQuery]) -> PatientData:
    """Merge per-key resources (prefetched, fetched or both) into one :class:`PatientData`.

    Keys are visited in the order of ``queries``, so the three ECG carriers always land in
    ``ecgs`` in the same order (Observations, Media, DocumentReferences) whatever route each
    took; a key without resources contributes nothing.
    """
    data = PatientData(patient=None)
    for query in queries:
        found = resources.get(query.key, [])
        if query.target == "patient":
            data.patient = found[0] if found else None
        else:
            getattr(data, query.target).extend(found)
    return data
