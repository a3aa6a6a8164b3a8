"""The contract between MIMIC-IV training and the FHIR service.

Both ``model_training`` and ``cds_service`` read this package, and it imports nothing else of the
project, so whatever the two sides must agree on lives here once:

* the mapping files ``features.yaml``, ``labs.yaml`` and ``ecg.yaml``, read and validated by
  :func:`load_mappings` (:mod:`fhir_mappings.loader`) into the models of
  ``fhir_mappings.schema_common`` / ``schema_features`` / ``schema_labs`` / ``schema_ecg`` /
  ``schema_mappings``;
* lead names (:mod:`fhir_mappings.leads`), the error types (:mod:`fhir_mappings.errors`), the
  model manifest (:mod:`fhir_mappings.manifest`), the task list (:mod:`fhir_mappings.tasks`), the
  signal constants (:mod:`fhir_mappings.signal_spec`) and the metadata encoding
  (:mod:`fhir_mappings.metadata_encoding`), imported from their own modules.

This module re-exports the mapping API so that callers write::

    from fhir_mappings import load_mappings
    m = load_mappings()                       # cached for the packaged files
    m.feature("temperature").convert(37.0, "Cel")   # -> 98.6 (°F, the model's unit)
    m.ecg.resolve_lead("Lead aVR")            # -> "aVR"
"""

from __future__ import annotations

from fhir_mappings.loader import DEFAULT_DIR, MAPPING_VERSION, MappingError, load_mappings
from fhir_mappings.schema_common import Coding, FieldIssue, Limits, UnitConversion, Window, is_valid_loinc
from fhir_mappings.schema_ecg import MODEL_LEAD_ORDER, AttachmentFormat, EcgFile, EcgSpec
from fhir_mappings.schema_features import (
    MODEL_FEATURES,
    CategoryRule,
    ComponentRef,
    FeaturesFile,
    FeatureSpec,
    FhirSource,
    MimicSource,
)
from fhir_mappings.schema_labs import LAB_CATEGORIES, LabsFile, LabSpec, PaperThreshold
from fhir_mappings.schema_mappings import Mappings

__all__ = [
    "DEFAULT_DIR",
    "LAB_CATEGORIES",
    "MAPPING_VERSION",
    "MODEL_FEATURES",
    "MODEL_LEAD_ORDER",
    "AttachmentFormat",
    "CategoryRule",
    "Coding",
    "ComponentRef",
    "EcgFile",
    "EcgSpec",
    "FeatureSpec",
    "FeaturesFile",
    "FhirSource",
    "FieldIssue",
    "LabSpec",
    "LabsFile",
    "Limits",
    "MappingError",
    "Mappings",
    "MimicSource",
    "PaperThreshold",
    "UnitConversion",
    "Window",
    "is_valid_loinc",
    "load_mappings",
]
