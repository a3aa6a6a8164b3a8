"""Seeding a FHIR R4 server with demo patients, each with an ECG in a different carrier.

The code behind ``ecglab seed-fhir`` (:mod:`model_training.seed_fhir.command`). It lives with the
training tools, not the service, because it generates MIMIC-IV-layout data with
:mod:`model_training.synthetic` and writes ECG files with :mod:`model_training.ecg_writers`; the
service only ever reads what it wrote.

* :mod:`~model_training.seed_fhir.subjects` reads the source subjects (MIMIC-IV layout) and the
  teaching ECG;
* :mod:`~model_training.seed_fhir.resources` builds each patient's FHIR resources and Bundle;
* :mod:`~model_training.seed_fhir.server` writes the Bundles to the server;
* :mod:`~model_training.seed_fhir.command` is the CLI (``add_arguments``/``run``).
"""

from __future__ import annotations

from model_training.seed_fhir.resources import (
    CARRIER_PLAN,
    Carrier,
    carrier_for,
    ecg_resources,
    patient_bundle,
)
from model_training.seed_fhir.server import post_transaction, seed
from model_training.seed_fhir.subjects import Recording, Subject, read_subjects

__all__ = [
    "CARRIER_PLAN",
    "Carrier",
    "Recording",
    "Subject",
    "carrier_for",
    "ecg_resources",
    "patient_bundle",
    "post_transaction",
    "read_subjects",
    "seed",
]
