"""ONNX Runtime inference: raw ECG + metadata in, per-target probabilities with thresholds out.

The runtime is what the service (and ``ecglab score``) calls; it never imports torch. It

* loads the manifest, checks the ONNX file's SHA-256 and the mapping version, and refuses to start
  on any mismatch (:class:`fhir_mappings.manifest.ManifestError`);
* opens one ONNX Runtime session per process, shared by threads (``InferenceSession.run`` is
  thread-safe), with graph optimisations on. The provider list is configurable; the default is
  CUDA then CPU, but CUDA is only asked for when a driver and the CUDA/cuDNN libraries can actually
  be loaded. ``onnxruntime-gpu`` otherwise prints a loud library-load error on every start, so we
  detect first and log one informative line instead;
* applies the shared signal preprocessing (:func:`cds_service.signal.prepare_ecg`, the same
  function training used), cuts the windows the manifest names, runs them as one batch, and
  averages the windows' probabilities per ECG as the method does (§2.2);
* encodes metadata exactly as training did: training-fold medians for missing values plus the
  missingness indicators (:func:`encode_metadata`, which training imports too).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cds_service.signal import prepare_ecg
from fhir_mappings.manifest import Manifest, ManifestError, find_manifest, load_manifest
from fhir_mappings.metadata_encoding import encode_metadata

log = logging.getLogger(__name__)

DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


class _EcgLike(Protocol):
    """What the runtime reads of an ECG (:class:`cds_service.features.EcgRecord`)."""

    @property
    def signal(self) -> np.ndarray: ...
    @property
    def fs(self) -> float: ...
    @property
    def lead_names(self) -> Sequence[str]: ...


class _InputsLike(Protocol):
    """What the runtime reads of one patient's inputs (:class:`cds_service.features.ModelInputs`)."""

    @property
    def ecg(self) -> _EcgLike: ...
    @property
    def metadata(self) -> Mapping[str, float | None]: ...


@dataclass(frozen=True)
class TargetPrediction:
    """The model's opinion on one target: a lab, a direction, now or a forecast horizon."""

    target: str
    lab_key: str
    label: str
    direction: str
    task: str
    horizon_min: int
    probability: float
    decision_threshold: float
    value_threshold: float | None
    unit: str | None
    auroc: float | None
    auroc_ci_low: float | None = None

    @property
    def positive(self) -> bool:
        """Whether the probability passes the validation-chosen decision threshold."""
        return self.probability >= self.decision_threshold


def cuda_unavailable_reason() -> str | None:
    """``None`` when the CUDA provider can really run here, else the reason it cannot.

    Checks, cheapest first: an NVIDIA device node, the driver library, then the CUDA runtime,
    cuBLAS and cuDNN that onnxruntime-gpu links against (loaded from the ``nvidia-*`` wheels via
    ``onnxruntime.preload_dlls`` when they are installed, else from the system paths).
    """
    if not any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia/version")):
        return "no NVIDIA GPU device on this machine"
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "the NVIDIA driver library libcuda.so.1 is not loadable"
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload(cuda=True, cudnn=True, directory="")
        except Exception as exc:  # a partial CUDA install must not stop the service
            log.debug("onnxruntime.preload_dlls failed: %s", exc)
    for lib in ("libcudart.so", "libcublas.so", "libcudnn.so"):
        if not _loadable_any(lib):
            return f"{lib} (CUDA/cuDNN runtime) is not loadable; install onnxruntime-gpu[cuda,cudnn]"
    return None


def _loadable_any(stem: str) -> bool:
    for suffix in ("", ".13", ".12", ".9"):
        try:
            ctypes.CDLL(stem + suffix, mode=getattr(ctypes, "RTLD_GLOBAL", 0))
            return True
        except OSError:
            continue
    return False


def choose_providers(requested: Sequence[str] | None = None) -> list[str]:
    """The provider list to open the session with, dropping CUDA cleanly when it cannot run."""
    import onnxruntime as ort

    wanted = list(requested or DEFAULT_PROVIDERS)
    available = set(ort.get_available_providers())
    chosen: list[str] = []
    for provider in wanted:
        if provider not in available:
            log.info("ONNX Runtime provider %s is not built into this onnxruntime; skipping it", provider)
            continue
        if provider in {"CUDAExecutionProvider", "TensorrtExecutionProvider"}:
            reason = cuda_unavailable_reason()
            if reason is not None:
                log.info("Not using %s: %s; running on CPU", provider, reason)
                continue
        chosen.append(provider)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


class ModelRuntime:
    """One exported model, loaded once per process and shared by every request thread."""

    def __init__(self, manifest: Manifest, model_path: Path, session: Any) -> None:
        self._manifest = manifest
        self.model_path = model_path
        self._session = session
        self._input_names = [i.name for i in manifest.onnx.inputs]
        self._output_name = manifest.onnx.outputs[0].name
        self._lock = threading.Lock()  # guards the call counter only; sessions are thread-safe
        self.provider = session.get_providers()[0]
        self.calls = 0

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        model_dir: Path,
        providers: Sequence[str] | None = None,
        *,
        intra_op_threads: int = 0,
        expected_mapping_version: str | None = None,
    ) -> ModelRuntime:
        """Load the newest manifest in ``model_dir`` and open its ONNX session.

        Refuses (``ManifestError``) when the manifest is invalid, the ONNX file's SHA-256 differs,
        or the manifest was built against another ``fhir_mappings`` version.
        """
        import onnxruntime as ort

        manifest_path = find_manifest(Path(model_dir))
        manifest = load_manifest(manifest_path, verify_file=True)
        if expected_mapping_version is None:
            from fhir_mappings import MAPPING_VERSION

            expected_mapping_version = MAPPING_VERSION
        if manifest.mapping_version != expected_mapping_version:
            raise ManifestError(
                f"{manifest_path}: built against fhir_mappings {manifest.mapping_version}, but this service "
                f"uses {expected_mapping_version}; re-export the model with the current mappings"
            )
        onnx_path = manifest_path.parent / manifest.onnx.file
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        chosen = choose_providers(providers)
        try:
            session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=chosen)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ManifestError(f"{onnx_path}: ONNX Runtime cannot load the model ({exc})") from exc
        runtime = cls(manifest, onnx_path, session)
        runtime._check_graph()
        log.info(
            "Loaded model %s %s (%d targets, trained on %s) with %s",
            manifest.name,
            manifest.version,
            len(manifest.labels),
            manifest.training_data.source,
            runtime.provider,
        )
        return runtime

    def _check_graph(self) -> None:
        graph_inputs = [i.name for i in self._session.get_inputs()]
        graph_outputs = [o.name for o in self._session.get_outputs()]
        if graph_inputs != self._input_names or self._output_name not in graph_outputs:
            raise ManifestError(
                f"{self.model_path}: graph inputs {graph_inputs} / outputs {graph_outputs} do not match the "
                f"manifest's {self._input_names} / {self._output_name}"
            )

    # -- properties the service reads -----------------------------------------------------------------
    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def version(self) -> str:
        return self._manifest.version

    @property
    def trained_on_synthetic(self) -> bool:
        return self._manifest.trained_on_synthetic

    @property
    def labels(self) -> list[str]:
        return [lab.target for lab in self._manifest.labels]

    # -- inference --------------------------------------------------------------------------------
    def windows(self, prepared: np.ndarray) -> np.ndarray:
        """Cut a prepared (T, 12) ECG into the manifest's non-overlapping windows: (W, 12, window)."""
        spec = self._manifest.ecg
        needed = spec.window * spec.n_windows
        x = prepared[:needed].T  # (12, W*window)
        return np.ascontiguousarray(
            x.reshape(x.shape[0], spec.n_windows, spec.window).transpose(1, 0, 2), dtype=np.float32
        )  # (W, 12, window)

    def prepare(self, signal: np.ndarray, fs: float, lead_names: Sequence[str]) -> np.ndarray:
        """Raw ECG (any rate, known lead names, mV) → (T, 12) float32 at the model's rate."""
        return prepare_ecg(signal, fs, lead_names)

    def predict_prepared(
        self, ecg: np.ndarray, cat: np.ndarray, cont: np.ndarray, *, batch_size: int = 64
    ) -> np.ndarray:
        """Probabilities (N, n_labels) for prepared ECGs (N, T, 12) with encoded metadata.

        Every ECG's windows go through the network in the same batch and their probabilities are
        averaged (the method's aggregation). ``batch_size`` counts ECGs per ONNX call.
        """
        n_windows = self._manifest.ecg.n_windows
        out = np.empty((len(ecg), len(self._manifest.labels)), dtype=np.float32)
        for start in range(0, len(ecg), batch_size):
            stop = min(start + batch_size, len(ecg))
            windows = np.concatenate([self.windows(e) for e in ecg[start:stop]])  # (n*W, 12, window)
            feeds = {
                self._input_names[0]: windows,
                self._input_names[1]: np.repeat(cat[start:stop], n_windows, axis=0),
                self._input_names[2]: np.repeat(cont[start:stop], n_windows, axis=0).astype(np.float32),
            }
            probs = self._session.run([self._output_name], feeds)[0]  # (n*W, n_labels)
            out[start:stop] = probs.reshape(stop - start, n_windows, -1).mean(axis=1)
        with self._lock:
            self.calls += 1
        return out

    def predict(self, inputs: _InputsLike) -> list[TargetPrediction]:
        """Score one patient's ECG and metadata; every target, positive or not, in manifest order."""
        prepared = self.prepare(inputs.ecg.signal, inputs.ecg.fs, inputs.ecg.lead_names)
        cat, cont = encode_metadata(
            {k: [inputs.metadata.get(k)] for k in self._feature_keys()}, self._manifest.metadata
        )
        probs = self.predict_prepared(prepared[None], cat, cont)[0]
        return self.to_predictions(probs)

    def to_predictions(self, probs: np.ndarray) -> list[TargetPrediction]:
        """Attach the manifest's label facts and thresholds to one ECG's probability vector."""
        return [
            TargetPrediction(
                target=lab.target,
                lab_key=lab.lab_key or lab.label,
                label=lab.label,
                direction=lab.direction,
                task=lab.task,
                horizon_min=lab.horizon_min,
                probability=float(p),
                decision_threshold=lab.decision_threshold,
                value_threshold=lab.value_threshold,
                unit=lab.unit,
                auroc=lab.auroc,
                auroc_ci_low=lab.ci_low,
            )
            for lab, p in zip(self._manifest.labels, probs, strict=True)
        ]

    def _feature_keys(self) -> list[str]:
        spec = self._manifest.metadata
        return [c.key for c in spec.categorical] + list(spec.continuous)
