"""``ecglab score``: run an exported model over a preprocessed data set or over FHIR patients.

This is how a model team validates an exported model on another site's data: preprocess that
site's MIMIC-format tables with ``ecglab preprocess``, then score them through exactly the runtime
the service uses (ONNX Runtime, manifest-driven encoding), not through PyTorch. The output has
``study_id`` plus one probability column per target (calibrated by the manifest's maps, as the
service reports it), named exactly as in ``labels.parquet``, so
the two files join on ``study_id`` for any metric.

With ``--fhir-url`` and ``--patient`` it scores patients on a FHIR server through the data path
the hooks use (:func:`cds_service.fetch.gather_patient_data` with every prefetch key fetched,
then :func:`cds_service.fetch.model_inputs`), and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from fhir_mappings.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", type=Path, required=True, help="folder (or manifest) of the exported model"
    )
    parser.add_argument(
        "--data", type=Path, help="preprocessed DATASET folder (records/metadata parquet + ecg.npy)"
    )
    parser.add_argument("--out", type=Path, help="output .parquet (with --data) or .json (with --fhir-url)")
    parser.add_argument("--batch-size", type=int, default=64, help="ECGs per ONNX Runtime call (default 64)")
    parser.add_argument(
        "--providers", default=None, help="comma-separated ONNX Runtime providers (default CUDA,CPU)"
    )
    parser.add_argument("--fhir-url", help="FHIR R4 base URL to read patients from")
    parser.add_argument(
        "--patient", action="append", default=[], help="Patient id on --fhir-url (repeatable)"
    )
    parser.add_argument("--token", help="bearer token for --fhir-url (default: $ECGLAB_FHIR_TOKEN)")
    parser.add_argument(
        "--variant",
        choices=("auto", "fp32", "int8"),
        default="auto",
        help="model graph: fp32, int8 (from 'ecglab quantize') or auto = fastest within its accuracy bounds",
    )


def run(args: argparse.Namespace) -> int:
    from cds_service.inference import ModelRuntime

    if (args.data is None) == (args.fhir_url is None):
        raise InputError("give exactly one of --data DATASET or --fhir-url URL")
    if args.batch_size < 1:
        raise InputError("--batch-size must be at least 1")
    providers = args.providers.split(",") if args.providers else None
    runtime = ModelRuntime.load(args.model, providers, variant=args.variant)
    if args.data is not None:
        if args.out is None:
            raise InputError("--out FILE.parquet is required with --data")
        return _score_dataset(runtime, args.data, args.out, args.batch_size)
    if not args.patient:
        raise InputError("--patient ID is required with --fhir-url (repeat it for several patients)")
    return _score_fhir(runtime, args.fhir_url, args.patient, args.token, args.out)


def _require(path: Path) -> Path:
    if not path.exists():
        raise InputError(f"{path}: not found (expected the layout written by 'ecglab preprocess')")
    return path


def _score_dataset(runtime: object, data: Path, out: Path, batch_size: int) -> int:
    import pandas as pd

    from cds_service.inference import ModelRuntime
    from fhir_mappings.metadata_encoding import encode_metadata

    assert isinstance(runtime, ModelRuntime)
    records = pd.read_parquet(_require(data / "records.parquet"))
    metadata = pd.read_parquet(_require(data / "metadata.parquet"))
    try:
        ecg = np.load(_require(data / "ecg.npy"), mmap_mode="r")
    except ValueError as exc:
        raise InputError(f"{data / 'ecg.npy'}: not a NumPy array file ({exc})") from exc
    if "study_id" not in records.columns:
        raise InputError(f"{data / 'records.parquet'}: column 'study_id' is missing")
    if ecg.ndim != 3 or ecg.shape[0] != len(records) or ecg.shape[2] != len(runtime.manifest.ecg.lead_order):
        raise InputError(
            f"{data / 'ecg.npy'}: shape {ecg.shape} does not match {len(records)} records × T × 12 leads"
        )
    spec = runtime.manifest.metadata
    keys = [c.key for c in spec.categorical] + list(spec.continuous)
    absent = [k for k in keys if k not in metadata.columns]
    if absent:
        raise InputError(f"{data / 'metadata.parquet'}: columns {absent} are missing")
    metadata = records[["study_id"]].merge(metadata, on="study_id", how="left", validate="one_to_one")
    cat, cont = encode_metadata({k: metadata[k].to_numpy(dtype=np.float64) for k in keys}, spec)
    started = time.perf_counter()
    chunk = max(batch_size, 1) * 16
    parts = []
    for start in range(0, len(records), chunk):
        stop = min(start + chunk, len(records))
        raw = runtime.predict_prepared(
            np.asarray(ecg[start:stop]), cat[start:stop], cont[start:stop], batch_size=batch_size
        )
        parts.append(runtime.calibrate(raw).astype(np.float32))  # the manifest's calibration, as cards show
    probs = np.concatenate(parts) if parts else np.zeros((0, len(runtime.labels)), dtype=np.float32)
    seconds = time.perf_counter() - started
    frame = pd.DataFrame(probs, columns=runtime.labels)
    frame.insert(0, "study_id", records["study_id"].to_numpy())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(out)
    rate = len(records) / seconds if seconds > 0 else float("inf")
    print(
        f"scored {len(records)} ECGs × {len(runtime.labels)} targets in {seconds:.1f} s ({rate:.1f} ECG/s, {runtime.provider}) → {out}"
    )
    return 0


def _score_fhir(
    runtime: object, base_url: str, patients: list[str], token: str | None, out: Path | None
) -> int:
    import os
    from datetime import UTC, datetime

    from cds_service.ecg.record import EcgRejected
    from cds_service.features import NoEcgError
    from cds_service.fetch import gather_patient_data, model_inputs
    from cds_service.fhir_client import FhirClient, FhirError
    from cds_service.inference import ModelRuntime
    from cds_service.prefetch import build_queries
    from fhir_mappings import load_mappings

    assert isinstance(runtime, ModelRuntime)
    mappings = load_mappings()
    queries = build_queries(mappings)
    token = token or os.environ.get("ECGLAB_FHIR_TOKEN")
    results: dict[str, object] = {}
    with FhirClient(base_url, token, timeout=10.0) as client:
        for index, patient_id in enumerate(patients, start=1):
            label = f"patient #{index}"
            now = datetime.now(UTC)
            try:
                data = gather_patient_data(queries, patient_id, now=now, client=client)
                inputs = model_inputs(data, mappings=mappings, now=now, client=client)
            except (NoEcgError, EcgRejected) as exc:
                print(f"{label}: no prediction ({exc})")
                results[patient_id] = {"error": str(exc)}
                continue
            except FhirError as exc:
                raise InputError(f"{base_url}: {label}: {exc}") from exc
            predictions = runtime.predict(inputs)
            results[patient_id] = {p.target: round(p.probability, 4) for p in predictions}
            flagged = [p for p in predictions if p.positive]
            print(f"{label}: {len(flagged)} of {len(predictions)} targets above their decision threshold")
            for p in sorted(flagged, key=lambda p: -p.probability):
                when = "now" if p.horizon_min == 0 else f"within {p.horizon_min} min"
                print(
                    f"    {p.label:<32} {p.direction:<4} {when:<16} p={p.probability:.2f} (threshold {p.decision_threshold:.2f})"
                )
    if out is not None:
        out.write_text(json.dumps(results, indent=2), encoding="utf-8")
    sys.stdout.flush()
    return 0
