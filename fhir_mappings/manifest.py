"""The model manifest: the contract between ``ecglab export`` (training side) and the service.

An exported model is two files side by side, ``ecglab-<version>.onnx`` and
``ecglab-<version>.manifest.json``. The manifest says everything the runtime must know to feed the
network and to read its output, so that the service never unpickles anything and never imports
torch: tensor names and shapes, the ECG's sampling rate, window and lead order, the metadata
encoding with the training-fold imputation medians, the label list with thresholds and
calibration, the evaluation summary and where the training data came from.

Which fold each number came from is part of the contract (issue 15: no test fold in any choice):
decision thresholds (``threshold_fold``), calibrations (``calibration.fold``) and the card gate's
AUROC CI (``auroc_val*``) come from the validation fold; ``auroc``/``ci_low``/``ci_high`` are the
test fold's (``auroc_fold``), reported as the honest estimate and never used to choose anything.
Every field added for this is optional, so manifests written before it keep loading (a label
without ``calibration`` serves its raw probability).

It is validated with pydantic (``extra="forbid"``): a manifest written by another version of the
exporter, or edited by hand, fails loudly with the field that is wrong rather than producing
silently wrong probabilities.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fhir_mappings.calibration import Calibration
from fhir_mappings.errors import ConfigError
from fhir_mappings.tasks import TASK_HORIZON_MIN

MANIFEST_FORMAT = 1
MANIFEST_SUFFIX = ".manifest.json"

#: Named rules that choose a decision threshold on the validation fold: ``youden`` (max
#: sensitivity + specificity − 1), ``sensitivity=X`` (the highest threshold reaching sensitivity X),
#: ``ppv=X`` (the lowest threshold reaching PPV X), ``f1`` (max F1); see ``model_training.thresholds``.
THRESHOLD_RULE_PATTERN = r"^(youden|f1|(sensitivity|ppv)=(0(\.\d+)?|1(\.0+)?))$"


class ManifestError(ConfigError):
    """The manifest or the ONNX file beside it cannot be trusted; the service must not start."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """One graph input or output: its name, element type and shape (``None`` = dynamic axis)."""

    name: str
    dtype: Literal["float32", "int64"]
    shape: list[int | None]


class OnnxSpec(_Strict):
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    opset: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


class EcgSpec(_Strict):
    """How a raw ECG becomes the network's input windows."""

    sampling_rate_hz: float = 100.0
    duration_s: float = 10.0
    window: int = 250
    n_windows: int = 4
    aggregation: Literal["mean"] = "mean"
    lead_order: list[str]
    units: Literal["mV"] = "mV"
    clip_mv: float = 3.0


class CategoricalFeature(_Strict):
    key: str
    categories: list[str]


class MetadataSpec(_Strict):
    """Metadata encoding: categorical codes, continuous order, indicator order and medians."""

    categorical: list[CategoricalFeature]
    continuous: list[str]
    missing_indicators: list[str]
    medians: dict[str, float]

    @model_validator(mode="after")
    def _medians_cover_inputs(self) -> MetadataSpec:
        needed = [c.key for c in self.categorical] + list(self.continuous)
        missing = [k for k in needed if k not in self.medians]
        if missing:
            raise ValueError(f"medians lack {missing}")
        unknown = [k for k in self.missing_indicators if k not in needed]
        if unknown:
            raise ValueError(f"missing_indicators name unknown features {unknown}")
        return self


class Coding(_Strict):
    system: str
    code: str
    display: str


class LabelSpec(_Strict):
    """One output of the network: a lab, a direction and a task (now or a forecast horizon)."""

    target: str
    label: str
    lab_key: str | None
    order_code: Coding | None
    direction: Literal["low", "high"]
    task: Literal["est", "mon30", "mon60", "mon120"]
    horizon_min: int
    value_threshold: float | None
    unit: str | None
    decision_threshold: float = Field(ge=0.0, le=1.0)
    threshold_rule: str
    auroc: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    n_pos: int | None = None
    n_neg: int | None = None
    #: Fold of ``auroc``/``ci_low``/``ci_high``/``n_pos``/``n_neg`` (``test``; absent in old manifests).
    auroc_fold: Literal["val", "test"] | None = None
    #: Validation-fold AUROC with its 95 % CI: what the card gate (``ECGLAB_MIN_AUROC``) compares.
    auroc_val: float | None = None
    auroc_val_ci_low: float | None = None
    auroc_val_ci_high: float | None = None
    #: Where ``decision_threshold`` was chosen: ``val`` (export), ``local`` (``ecglab recalibrate``).
    threshold_fold: str | None = None
    #: Raw network probability → calibrated probability; ``decision_threshold`` applies to the latter.
    calibration: Calibration | None = None

    @model_validator(mode="after")
    def _consistent(self) -> LabelSpec:
        if self.target != f"{self.label}_{self.direction}_{self.task}":
            raise ValueError(f"target {self.target!r} is not '{{label}}_{{direction}}_{{task}}'")
        if self.horizon_min != TASK_HORIZON_MIN[self.task]:
            raise ValueError(f"horizon_min {self.horizon_min} does not match task {self.task}")
        return self


class TrainingData(_Strict):
    source: Literal["synthetic", "MIMIC-IV"]
    versions: dict[str, str] = {}
    details: dict[str, str | int | float | None] = {}


#: Names a variant may not take: the exported graph itself is ``fp32``, and ``auto`` is a choice rule.
RESERVED_VARIANT_NAMES = ("fp32", "auto")


class VariantSpec(_Strict):
    """A faster, approximate copy of the exported graph (e.g. ``int8``) beside the fp32 file.

    Same inputs and outputs as ``onnx``; written by ``ecglab quantize``. ``parity`` holds
    max |p_variant − p_fp32| on random and real inputs, ``accuracy`` the test-fold AUROC of both
    and their differences, ``speed`` CPU latencies measured side by side when it was made, and
    ``bounds`` the limits ``meets_bounds`` was judged against. The service's ``auto`` choice
    takes only variants with ``meets_bounds`` true and a measured ``speedup_vs_fp32`` above 1.
    """

    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    precision: Literal["int8"]
    method: str
    created: str
    calibration: dict[str, str | int | float | None] = {}
    parity: dict[str, float] = {}
    accuracy: dict[str, float | None] = {}
    speed: dict[str, float] = {}
    bounds: dict[str, float] = {}
    meets_bounds: bool

    @property
    def speedup_vs_fp32(self) -> float | None:
        """CPU latency of the fp32 graph over this variant's (one ECG), when it was measured."""
        return self.speed.get("speedup_vs_fp32")


class Manifest(_Strict):
    """The whole manifest; see the module docstring."""

    format: int = MANIFEST_FORMAT
    name: str = "ecglab"
    version: str
    created: str
    intended_use: str
    training_data: TrainingData
    mapping_version: str
    onnx: OnnxSpec
    ecg: EcgSpec
    metadata: MetadataSpec
    labels: list[LabelSpec]
    evaluation: dict[str, object] = {}
    parity: dict[str, float] = {}
    software: dict[str, str] = {}
    variants: dict[str, VariantSpec] = {}
    #: The rule every label's decision threshold was chosen by (see :data:`THRESHOLD_RULE_PATTERN`).
    threshold_rule: str | None = Field(default=None, pattern=THRESHOLD_RULE_PATTERN)
    #: How a lab value was labelled abnormal in training: ``strict`` (< lower / > upper, the reference
    #: code) or ``inclusive`` (≤ / ≥, the paper's text); ``None`` in manifests written before it was recorded.
    abnormal_rule: Literal["strict", "inclusive"] | None = None

    @property
    def trained_on_synthetic(self) -> bool:
        return self.training_data.source == "synthetic"

    @model_validator(mode="after")
    def _labels_match_output(self) -> Manifest:
        if self.format != MANIFEST_FORMAT:
            raise ValueError(f"format {self.format} is not supported (expected {MANIFEST_FORMAT})")
        targets = [lab.target for lab in self.labels]
        if len(set(targets)) != len(targets):
            raise ValueError("labels contain duplicate targets")
        out = self.onnx.outputs[0].shape if self.onnx.outputs else []
        if len(out) != 2 or out[1] != len(self.labels):
            raise ValueError(f"output shape {out} does not match {len(self.labels)} labels")
        for name, variant in self.variants.items():
            if name in RESERVED_VARIANT_NAMES or not name.isidentifier():
                raise ValueError(f"variant name {name!r} is reserved or not a plain identifier")
            if variant.file == self.onnx.file:
                raise ValueError(f"variant {name!r} names the fp32 file {variant.file}")
        return self


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks so large models do not load twice into memory."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def find_manifest(model_dir: Path) -> Path:
    """The manifest to serve from ``model_dir`` (or ``model_dir`` itself when it is a manifest).

    With several manifests in one folder the newest version wins (versions compare numerically
    part by part), so dropping a new export next to the old one switches to it on restart.
    """
    if model_dir.is_file():
        return model_dir
    if not model_dir.is_dir():
        raise ManifestError(f"model directory {model_dir} does not exist (set ECGLAB_MODEL_DIR)")
    found = sorted(model_dir.glob(f"*{MANIFEST_SUFFIX}"), key=lambda p: _version_key(p.name))
    if not found:
        raise ManifestError(f"no *{MANIFEST_SUFFIX} in {model_dir}: run 'ecglab export' first")
    return found[-1]


def _version_key(name: str) -> tuple[int | str, ...]:
    stem = name.removesuffix(MANIFEST_SUFFIX).split("-", 1)[-1]
    return tuple(int(p) if p.isdigit() else p for p in stem.replace("+", ".").split("."))


def load_manifest(path: Path, *, verify_file: bool = True) -> Manifest:
    """Read and validate a manifest; with ``verify_file`` also check the ONNX file's SHA-256."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ManifestError(f"{path}: manifest not found") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not readable JSON ({exc})") from exc
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ManifestError(f"{path}: field '{where}': {first['msg']}") from exc
    if verify_file:
        onnx_path = path.parent / manifest.onnx.file
        if not onnx_path.is_file():
            raise ManifestError(f"{path}: ONNX file {onnx_path.name} named by 'onnx.file' is missing")
        actual = sha256_file(onnx_path)
        if actual != manifest.onnx.sha256:
            raise ManifestError(
                f"{onnx_path}: sha256 {actual[:12]}… does not match the manifest's {manifest.onnx.sha256[:12]}…; "
                "the model file is corrupt or was replaced"
            )
    return manifest
