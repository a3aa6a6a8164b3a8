"""The three mapping files validated together: :class:`Mappings`, what the loader returns.

It indexes features by key and labs by key and MIMIC label once, and answers the questions both
sides ask (which lab a result code reports, the model's categorical / continuous / indicator
input keys) so that no caller walks the lists itself.
"""

from __future__ import annotations

from typing import Any

from pydantic import PrivateAttr

from fhir_mappings.schema_common import StrictModel
from fhir_mappings.schema_ecg import EcgSpec
from fhir_mappings.schema_features import FeatureSpec
from fhir_mappings.schema_labs import LabSpec


class Mappings(StrictModel):
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
