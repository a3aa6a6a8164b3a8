"""ONNX Runtime inference: raw ECG + metadata in, per-target probabilities with thresholds out.

The runtime is what the service (and ``ecglab score``) calls; it never imports torch. It

* loads the manifest, checks the ONNX file's SHA-256 and the mapping version, and refuses to start
  on any mismatch (:class:`fhir_mappings.manifest.ManifestError`);
* opens one ONNX Runtime session per process, shared by threads (``InferenceSession.run`` is
  thread-safe), with graph optimisations on. The provider list is configurable; the default is
  CUDA then CPU, but CUDA is only asked for when a driver and the CUDA/cuDNN libraries can actually
  be loaded. ``onnxruntime-gpu`` otherwise prints a loud library-load error on every start, so we
  detect first and log one informative line instead;
* applies the shared signal preprocessing (:func:`cds_service.ecg.prepare.prepare_ecg`, the same
  function training used), cuts the windows the manifest names, runs them as one batch, and
  averages the windows' probabilities per ECG as the method does (§2.2);
* encodes metadata exactly as training did: training-fold medians for missing values plus the
  missingness indicators (:func:`encode_metadata`, which training imports too);
* calibrates each target's window-averaged probability with the map the manifest stores (fitted
  on the validation fold; :class:`fhir_mappings.calibration.Calibrator`), so cards, ``ecglab score``
  and the evaluation report the same calibrated probabilities; the raw one is kept beside it;
* serves the fp32 graph or a variant the manifest lists (``ecglab quantize`` writes an ``int8``
  one): ``variant="auto"`` takes the fastest variant whose accuracy met its bounds when it was
  made (CPU speed measured then; on another provider ``auto`` keeps fp32), and a variant file is
  checked against its own SHA-256 like the fp32 one;
* optionally coalesces concurrent :meth:`ModelRuntime.predict` calls of one process into one
  ONNX Runtime call (:class:`cds_service.batching.MicroBatcher`, ``batch_max_wait_ms`` > 0).
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

from cds_service.batching import DEFAULT_MAX_BATCH, MicroBatcher
from cds_service.ecg.prepare import prepare_ecg
from fhir_mappings.calibration import Calibrator
from fhir_mappings.manifest import Manifest, ManifestError, find_manifest, load_manifest, sha256_file
from fhir_mappings.metadata_encoding import encode_metadata

log = logging.getLogger(__name__)

DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
#: What ``ECGLAB_MODEL_VARIANT`` and ``ecglab score --variant`` accept.
VARIANT_CHOICES = ("auto", "fp32", "int8")


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
    """The model's opinion on one target: a lab, a direction, now or a forecast horizon.

    ``probability`` is calibrated (the manifest's map; the raw network output when it has none) and
    ``raw_probability`` the window-averaged network output. ``auroc``/``auroc_ci_low`` are the
    test fold's (the honest estimate a card may show); ``auroc_val_ci_low`` is the validation
    fold's, which the card gate uses (:attr:`gate_auroc_ci_low`).
    """

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
    raw_probability: float | None = None
    auroc_val_ci_low: float | None = None

    @property
    def gate_auroc_ci_low(self) -> float | None:
        """The AUROC CI lower bound ``ECGLAB_MIN_AUROC`` is compared with: the validation fold's.

        A manifest written before validation figures were recorded has none; its test-fold bound
        is used then, so such a model keeps the gate it was deployed with.
        """
        return self.auroc_val_ci_low if self.auroc_val_ci_low is not None else self.auroc_ci_low

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


def choose_variant(manifest: Manifest, requested: str, provider: str = "CPUExecutionProvider") -> str:
    """The graph to serve: ``"fp32"`` or the name of one of ``manifest.variants``.

    ``fp32`` and a variant's name are taken as asked (a variant the manifest does not list is a
    ``ManifestError``; one that missed its accuracy bounds is served with a warning). ``auto``
    takes, among the variants with ``meets_bounds`` true and a measured CPU speed-up above 1, the
    one with the largest speed-up; the speed-up was measured on the CPU provider, so on any other
    provider, or when no variant qualifies, ``auto`` is ``fp32``.
    """
    if requested == "fp32":
        return "fp32"
    if requested != "auto":
        spec = manifest.variants.get(requested)
        if spec is None:
            listed = ", ".join(sorted(manifest.variants)) or "none"
            raise ManifestError(
                f"model variant {requested!r} is not in the manifest of {manifest.name} {manifest.version} "
                f"(variants: {listed}); run 'ecglab quantize' or choose fp32"
            )
        if not spec.meets_bounds:
            log.warning(
                "Model variant %s missed its accuracy bounds when it was made; serving it as asked", requested
            )
        return requested
    if provider != "CPUExecutionProvider":
        return "fp32"
    eligible = [
        (speedup, name)
        for name, spec in manifest.variants.items()
        if spec.meets_bounds and (speedup := spec.speedup_vs_fp32) is not None and speedup > 1.0
    ]
    return max(eligible)[1] if eligible else "fp32"


def variant_file(manifest_path: Path, manifest: Manifest, name: str) -> Path:
    """The ONNX file of ``name`` (``fp32`` or a variant) beside ``manifest_path``, its SHA-256 checked.

    The fp32 file is checked by :func:`load_manifest`; a variant's file must exist and match the
    ``sha256`` its manifest entry records, else ``ManifestError`` naming the file.
    """
    if name == "fp32":
        return manifest_path.parent / manifest.onnx.file
    spec = manifest.variants[name]
    path = manifest_path.parent / spec.file
    if not path.is_file():
        raise ManifestError(
            f"{manifest_path}: ONNX file {spec.file} named by 'variants.{name}.file' is missing"
        )
    actual = sha256_file(path)
    if actual != spec.sha256:
        raise ManifestError(
            f"{path}: sha256 {actual[:12]}… does not match the manifest's {spec.sha256[:12]}… "
            f"(variants.{name}); the model file is corrupt or was replaced"
        )
    return path


class ModelRuntime:
    """One exported model, loaded once per process and shared by every request thread."""

    def __init__(
        self,
        manifest: Manifest,
        model_path: Path,
        session: Any,
        *,
        variant: str = "fp32",
        batch_max_wait_ms: float = 0.0,
        batch_max_size: int = DEFAULT_MAX_BATCH,
    ) -> None:
        self._manifest = manifest
        self.model_path = model_path
        self._session = session
        self._input_names = [i.name for i in manifest.onnx.inputs]
        self._output_name = manifest.onnx.outputs[0].name
        self._lock = threading.Lock()  # guards the call counter only; sessions are thread-safe
        self.provider = session.get_providers()[0]
        self.variant = variant
        self._calibrator = Calibrator([lab.calibration for lab in manifest.labels])
        self.calls = 0  # ONNX Runtime calls (one per batch when batching)
        self._batcher: MicroBatcher[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
        if batch_max_wait_ms > 0:
            self._batcher = MicroBatcher(
                self._run_batch, max_wait_s=batch_max_wait_ms / 1000.0, max_batch=batch_max_size
            )

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        model_dir: Path,
        providers: Sequence[str] | None = None,
        *,
        intra_op_threads: int = 0,
        expected_mapping_version: str | None = None,
        variant: str = "fp32",
        batch_max_wait_ms: float = 0.0,
        batch_max_size: int = DEFAULT_MAX_BATCH,
    ) -> ModelRuntime:
        """Load the newest manifest in ``model_dir`` and open the ONNX session of ``variant``.

        ``variant`` is ``fp32`` (the exported graph), a variant the manifest lists (``int8``) or
        ``auto`` (:func:`choose_variant`). ``batch_max_wait_ms`` > 0 turns on micro-batching of
        concurrent :meth:`predict` calls (at most ``batch_max_size`` ECGs per ONNX call).

        Refuses (``ManifestError``) when the manifest is invalid, the ONNX file's (or the chosen
        variant's) SHA-256 differs, or the manifest was built against another ``fhir_mappings``
        version.
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
        if variant not in VARIANT_CHOICES and variant not in manifest.variants:
            raise ManifestError(f"model variant {variant!r} is not one of {', '.join(VARIANT_CHOICES)}")
        chosen = choose_providers(providers)
        name = choose_variant(manifest, variant, chosen[0])
        onnx_path = variant_file(manifest_path, manifest, name)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=chosen)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ManifestError(f"{onnx_path}: ONNX Runtime cannot load the model ({exc})") from exc
        runtime = cls(
            manifest,
            onnx_path,
            session,
            variant=name,
            batch_max_wait_ms=batch_max_wait_ms,
            batch_max_size=batch_max_size,
        )
        runtime._check_graph()
        log.info(
            "Loaded model %s %s (%s, %d targets, trained on %s) with %s; batching %s",
            manifest.name,
            manifest.version,
            name,
            len(manifest.labels),
            manifest.training_data.source,
            runtime.provider,
            f"up to {batch_max_size} ECGs, wait <= {batch_max_wait_ms:g} ms"
            if batch_max_wait_ms > 0
            else "off",
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

    def predict(self, inputs: _InputsLike, deadline: float | None = None) -> list[TargetPrediction]:
        """Score one patient's ECG and metadata; every target, positive or not, in manifest order.

        With batching on, the prepared inputs join concurrent calls' in one ONNX Runtime call
        (:meth:`predict_batched`); otherwise they run alone and ``deadline`` is not consulted.
        """
        if self._batcher is not None:
            return self.predict_batched(inputs, deadline)
        prepared = self.prepare(inputs.ecg.signal, inputs.ecg.fs, inputs.ecg.lead_names)
        cat, cont = self._encode(inputs)
        probs = self.predict_prepared(prepared[None], cat, cont)[0]
        return self.to_predictions(probs)

    def predict_batched(self, inputs: _InputsLike, deadline: float | None = None) -> list[TargetPrediction]:
        """:meth:`predict` through the micro-batcher: waits at most until ``deadline`` (monotonic).

        Raises :class:`cds_service.batching.BatchDeadlineExceeded` when the deadline passes first
        and ``BatchFailed`` when the batch's ONNX call failed; without batching on, runs alone.
        """
        if self._batcher is None:
            return self.predict(inputs)
        prepared = self.prepare(inputs.ecg.signal, inputs.ecg.fs, inputs.ecg.lead_names)
        cat, cont = self._encode(inputs)
        needed = self._manifest.ecg.window * self._manifest.ecg.n_windows
        probs = self._batcher.submit((prepared[:needed], cat[0], cont[0]), deadline)
        return self.to_predictions(probs)

    @property
    def batcher(self) -> MicroBatcher[tuple[np.ndarray, np.ndarray, np.ndarray]] | None:
        """The micro-batcher (``None`` when batching is off)."""
        return self._batcher

    def close(self) -> None:
        """Stop the micro-batcher's thread after the queued calls have run (no-op without batching)."""
        if self._batcher is not None:
            self._batcher.close()

    def _run_batch(self, items: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> np.ndarray:
        """The batcher's call: stack the items' prepared ECGs and metadata into one ONNX call."""
        ecg = np.stack([item[0] for item in items])
        cat = np.stack([item[1] for item in items])
        cont = np.stack([item[2] for item in items])
        return self.predict_prepared(ecg, cat, cont, batch_size=len(items))

    def _encode(self, inputs: _InputsLike) -> tuple[np.ndarray, np.ndarray]:
        """One patient's metadata encoded as training did: ``cat`` (1, n_cat), ``cont`` (1, n_cont)."""
        return encode_metadata(
            {k: [inputs.metadata.get(k)] for k in self._feature_keys()}, self._manifest.metadata
        )

    def calibrate(self, probs: np.ndarray) -> np.ndarray:
        """Raw probabilities (n_labels,) or (N, n_labels) → calibrated, per the manifest (float64)."""
        return self._calibrator(probs)

    def to_predictions(self, probs: np.ndarray) -> list[TargetPrediction]:
        """Calibrate one ECG's raw probability vector and attach the manifest's label facts and thresholds."""
        calibrated = self.calibrate(probs)
        return [
            TargetPrediction(
                target=lab.target,
                lab_key=lab.lab_key or lab.label,
                label=lab.label,
                direction=lab.direction,
                task=lab.task,
                horizon_min=lab.horizon_min,
                probability=float(c),
                decision_threshold=lab.decision_threshold,
                value_threshold=lab.value_threshold,
                unit=lab.unit,
                auroc=lab.auroc,
                auroc_ci_low=lab.ci_low,
                raw_probability=float(p),
                auroc_val_ci_low=lab.auroc_val_ci_low,
            )
            for lab, p, c in zip(self._manifest.labels, probs, calibrated, strict=True)
        ]

    def _feature_keys(self) -> list[str]:
        spec = self._manifest.metadata
        return [c.key for c in spec.categorical] + list(spec.continuous)
