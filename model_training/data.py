"""The preprocessed DATASET on disk → model-ready tensors (method.md §2.2, §2.3, §2.5).

A DATASET directory (written by ``ecglab preprocess`` or ``ecglab synth-mimic``) holds

* ``records.parquet``: study_id, subject_id, ecg_time, strat_fold, one row per ECG in the order
  of the waveform memmap;
* ``ecg.npy``: float32 (N, 1000, 12) in mV, model lead order, opened memory-mapped;
* ``labels.parquet``: study_id + targets ``{label}_{low|high}_{task}`` holding 1.0 / 0.0 / NaN;
* ``metadata.parquet``: study_id + the raw features of the brief's table (NaN = missing);
* ``dataset.json`` (provenance) and ``thresholds.json`` (lab value cut-offs).

Metadata encoding uses :func:`fhir_mappings.metadata_encoding.encode_metadata`, the function the service
runs, with medians computed on the training folds only; so training, evaluation and serving
cannot drift apart. Missing values take the training median (categorical: the median code,
rounded) and every feature with an indicator gets a ``{key}_missing`` input.

ECG windows: training draws one random 250-sample crop per record per epoch, evaluation cuts the
record into non-overlapping windows (4 for 10 s) whose probabilities are averaged per record.
Crop starts are a pure function of (seed, epoch, position), so shuffling and cropping are
reproducible, identical under any number of DataLoader workers and exactly resumable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from numpy.typing import NDArray
from torch.utils.data import Dataset

from fhir_mappings import load_mappings
from fhir_mappings.errors import InputError
from fhir_mappings.manifest import CategoricalFeature, MetadataSpec
from fhir_mappings.metadata_encoding import encode_metadata
from fhir_mappings.signal_spec import MODEL_LEADS
from fhir_mappings.tasks import TASKS

log = logging.getLogger(__name__)

TARGET_PATTERN = re.compile(r"^(?P<label>.+)_(?P<direction>low|high)_(?P<task>est|mon30|mon60|mon120)$")

# The feature lists come from the one contract both sides read (fhir_mappings/features.yaml), so
# training cannot drift from what the service extracts.
_MAPPINGS = load_mappings()
#: Categorical features and their code order (brief, "Metadata features").
CATEGORICAL: dict[str, tuple[str, ...]] = {
    f.key: tuple(f.categories or ()) for f in _MAPPINGS.features if f.kind == "categorical"
}
#: Continuous features in model order.
CONTINUOUS: tuple[str, ...] = tuple(_MAPPINGS.continuous_keys)
#: Features with a missingness indicator, in model order (appended after the continuous block).
MISSING_INDICATORS: tuple[str, ...] = tuple(_MAPPINGS.missing_indicator_keys)

RECORD_COLUMNS = ("study_id", "subject_id", "ecg_time", "strat_fold")
REQUIRED_FILES = ("records.parquet", "ecg.npy", "labels.parquet", "metadata.parquet")
#: Files up to this size are hashed in full; larger ones (the waveform memmap) by sampled blocks.
_FULL_HASH_LIMIT = 256 << 20


@dataclass(frozen=True)
class TargetName:
    """A target column split into lab label, direction and task."""

    label: str
    direction: str
    task: str


def parse_target(name: str) -> TargetName:
    """Split ``{label}_{low|high}_{task}``; ValueError when the name does not follow it."""
    match = TARGET_PATTERN.match(name)
    if match is None:
        raise ValueError(
            f"'{name}' is not a target column '{{label}}_{{low|high}}_{{est|mon30|mon60|mon120}}'"
        )
    return TargetName(match["label"], match["direction"], match["task"])


def cont_feature_names(spec: MetadataSpec) -> list[str]:
    """Names of the model's ``cont`` columns: continuous features, then ``{key}_missing``."""
    return list(spec.continuous) + [f"{key}_missing" for key in spec.missing_indicators]


# --------------------------------------------------------------------------------------------
# Reading a DATASET
# --------------------------------------------------------------------------------------------
@dataclass
class LabDataset:
    """A DATASET directory loaded for training or evaluation; rows follow the ECG memmap."""

    root: Path
    records: pd.DataFrame  # (N, ...) study_id, subject_id, ecg_time, strat_fold
    ecg: np.ndarray  # (N, T, 12) float32 memmap
    targets: list[str]  # target column names, in labels.parquet order
    labels: NDArray[np.float32]  # (N, K) 1/0/NaN
    metadata: pd.DataFrame  # (N, features) raw values aligned to records
    info: dict[str, Any]  # dataset.json (empty when absent)

    @property
    def folds(self) -> NDArray[np.int64]:
        """strat_fold of every record, in memmap order."""
        return self.records["strat_fold"].to_numpy(dtype=np.int64)

    def rows_in(self, folds: Sequence[int]) -> NDArray[np.int64]:
        """Row indices whose strat_fold is one of ``folds``, in memmap order."""
        return np.flatnonzero(np.isin(self.folds, np.asarray(list(folds), dtype=np.int64))).astype(np.int64)


def _read_parquet(path: Path) -> pd.DataFrame:
    """Read a parquet file; InputError naming it when unreadable."""
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read parquet ({exc})") from exc


def _align(frame: pd.DataFrame, study_ids: pd.Series, path: Path) -> pd.DataFrame:
    """Rows of ``frame`` in the order of ``study_ids``; study_ids absent from it become NaN rows."""
    if "study_id" not in frame.columns:
        raise InputError(f"{path}: column 'study_id' is missing")
    duplicated = frame["study_id"].duplicated()
    if duplicated.any():
        first = frame.loc[duplicated, "study_id"].iloc[0]
        raise InputError(f"{path}: column 'study_id' has duplicates (e.g. {first})")
    aligned = frame.set_index("study_id").reindex(study_ids.to_numpy())
    absent = int((~study_ids.isin(frame["study_id"])).sum())
    if absent:
        log.warning(
            "%s: %d of %d records have no row; their values are treated as missing",
            path.name,
            absent,
            len(aligned),
        )
    return aligned.reset_index(drop=True)


def open_dataset(
    root: Path, tasks: Sequence[str] = TASKS, targets: Sequence[str] | None = None
) -> LabDataset:
    """Load a DATASET directory; ``targets`` (if given) must all exist and fixes the label order.

    Raises InputError naming the file and column at fault.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"dataset directory {root} does not exist")
    for name in REQUIRED_FILES:
        if not (root / name).is_file():
            raise InputError(
                f"{root / name}: required dataset file is missing (run 'ecglab preprocess' first)"
            )

    records = _read_parquet(root / "records.parquet")
    for column in RECORD_COLUMNS:
        if column not in records.columns:
            raise InputError(f"{root / 'records.parquet'}: column '{column}' is missing")
    if records["strat_fold"].isna().any():
        raise InputError(f"{root / 'records.parquet'}: column 'strat_fold' has missing values")
    records = records.reset_index(drop=True)

    try:
        ecg = np.load(root / "ecg.npy", mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise InputError(f"{root / 'ecg.npy'}: cannot open as a numpy memmap ({exc})") from exc
    if ecg.ndim != 3 or ecg.shape[2] != len(MODEL_LEADS) or ecg.shape[0] != len(records):
        raise InputError(
            f"{root / 'ecg.npy'}: shape {ecg.shape} is not (N={len(records)} records, T, {len(MODEL_LEADS)} leads)"
        )
    if ecg.dtype != np.float32:
        raise InputError(f"{root / 'ecg.npy'}: dtype {ecg.dtype} is not float32")

    label_path = root / "labels.parquet"
    label_frame = _align(_read_parquet(label_path), records["study_id"], label_path)
    if targets is None:
        chosen = [
            c
            for c in label_frame.columns
            if TARGET_PATTERN.match(str(c)) and parse_target(str(c)).task in tasks
        ]
        ignored = [c for c in label_frame.columns if not TARGET_PATTERN.match(str(c))]
        if ignored:
            log.warning("%s: ignoring columns that are not targets: %s", label_path.name, ignored[:5])
        if not chosen:
            raise InputError(
                f"{label_path}: no target columns '{{label}}_{{low|high}}_{{task}}' for tasks {list(tasks)}"
            )
    else:
        chosen = list(targets)
        missing = [t for t in chosen if t not in label_frame.columns]
        if missing:
            raise InputError(f"{label_path}: target column '{missing[0]}' (used by the model) is missing")
    labels = label_frame[chosen].to_numpy(dtype=np.float32, na_value=np.nan)
    bad = ~(np.isnan(labels) | (labels == 0.0) | (labels == 1.0))
    if bad.any():
        column = chosen[int(np.nonzero(bad)[1][0])]
        raise InputError(f"{label_path}: column '{column}' holds values other than 1, 0 and NaN")

    meta_path = root / "metadata.parquet"
    metadata = _align(_read_parquet(meta_path), records["study_id"], meta_path)
    for key in (*CATEGORICAL, *CONTINUOUS):
        if key not in metadata.columns:
            raise InputError(f"{meta_path}: feature column '{key}' is missing")
    metadata = metadata[[*CATEGORICAL, *CONTINUOUS]].astype(np.float64)

    info: dict[str, Any] = {}
    if (root / "dataset.json").is_file():
        try:
            info = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InputError(f"{root / 'dataset.json'}: not valid JSON ({exc})") from exc
    return LabDataset(root, records, ecg, chosen, labels, metadata, info)


# --------------------------------------------------------------------------------------------
# Metadata: training-fold medians + indicators
# --------------------------------------------------------------------------------------------
def fit_metadata_spec(
    metadata: pd.DataFrame, train_rows: NDArray[np.int64], *, missing_indicators: bool = True
) -> MetadataSpec:
    """Medians of every feature over the training rows only (method.md §2.3).

    ``missing_indicators=False`` (train config ``use_missing_indicators``) leaves out the
    ``{key}_missing`` inputs, as the published model does (it builds them but never feeds them).

    Categorical medians are rounded to a valid code (race: median of the index, rounded). A
    feature never observed in the training folds gets median 0.0 and a warning, so that
    training still runs on a partial extract; its indicator is then always 1 there.
    """
    train = metadata.iloc[train_rows]
    medians: dict[str, float] = {}
    for key in (*CATEGORICAL, *CONTINUOUS):
        column = train[key].to_numpy(dtype=np.float64)
        observed = column[np.isfinite(column)]
        if observed.size == 0:
            log.warning("feature '%s' is missing in every training record; imputing 0.0", key)
            medians[key] = 0.0
            continue
        median = float(np.median(observed))
        if key in CATEGORICAL:
            median = float(np.clip(np.rint(median), 0, len(CATEGORICAL[key]) - 1))
        medians[key] = median
    return MetadataSpec(
        categorical=[CategoricalFeature(key=k, categories=list(v)) for k, v in CATEGORICAL.items()],
        continuous=list(CONTINUOUS),
        missing_indicators=list(MISSING_INDICATORS) if missing_indicators else [],
        medians=medians,
    )


def encode_features(
    metadata: pd.DataFrame, spec: MetadataSpec
) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """``cat`` int64 (N, 2) and ``cont`` float32 (N, 20) exactly as the service encodes them."""
    values = {key: metadata[key].to_numpy(dtype=np.float64) for key in (*CATEGORICAL, *CONTINUOUS)}
    return encode_metadata(values, spec)


# --------------------------------------------------------------------------------------------
# Windows and the torch Dataset
# --------------------------------------------------------------------------------------------
def crop_starts(n: int, length: int, window: int, seed: int, epoch: int) -> NDArray[np.int64]:
    """Random crop start per record for one epoch, uniform in [0, length - window].

    A pure function of (seed, epoch): the same crops come back after a resume and under any
    number of workers or processes.
    """
    rng = np.random.default_rng([seed, epoch, 0xC60])
    return rng.integers(0, length - window + 1, size=n, dtype=np.int64)


def eval_windows(ecg: torch.Tensor, window: int) -> torch.Tensor:
    """Cut (B, 12, T) records into non-overlapping windows: (B * T // window, 12, window).

    Windows of one record are consecutive in the output, so ``view(B, n_windows, ...)``
    recovers them; a tail shorter than a window is dropped (none for 1000 / 250).
    """
    b, c, t = ecg.shape
    n = t // window
    if n < 1:
        raise ValueError(f"record length {t} is shorter than one window ({window})")
    windows = ecg[:, :, : n * window].reshape(b, c, n, window)  # (B, C, n, W)
    return windows.permute(0, 2, 1, 3).reshape(b * n, c, window)  # (B*n, C, W)


class EcgLabWindows(Dataset[dict[str, torch.Tensor]]):
    """Records of one split as model inputs.

    ``train=True``: ``ecg`` is one random crop (12, window) whose start changes with
    :meth:`set_epoch`; ``train=False``: ``ecg`` is the whole record (12, T) for
    :func:`eval_windows`. Each item also has ``cat`` (2,), ``cont`` (n_cont,), ``y`` (K,) with NaN
    for unmeasured labels, and ``row`` (the record's row in the DATASET).
    NaN samples in the waveform become 0, as the reference model does.
    """

    def __init__(
        self,
        ecg: np.ndarray,
        rows: NDArray[np.int64],
        cat: NDArray[np.int64],
        cont: NDArray[np.float32],
        labels: NDArray[np.float32],
        window: int,
        train: bool,
        seed: int = 0,
    ) -> None:
        """Keep the memmap and slice this split's encoded inputs and labels into tensors."""
        if ecg.shape[1] < window:
            raise InputError(f"ECG records have {ecg.shape[1]} samples, fewer than the model window {window}")
        self.ecg = ecg
        self.rows = np.asarray(rows, dtype=np.int64)
        self.cat = torch.from_numpy(np.ascontiguousarray(cat[self.rows]))
        self.cont = torch.from_numpy(np.ascontiguousarray(cont[self.rows]))
        self.labels = torch.from_numpy(np.ascontiguousarray(labels[self.rows]))
        self.window = window
        self.train = train
        self.seed = seed
        self.starts = np.zeros(len(self.rows), dtype=np.int64)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's crop starts (training only; evaluation windows are fixed)."""
        if self.train:
            self.starts = crop_starts(len(self.rows), self.ecg.shape[1], self.window, self.seed, epoch)

    def __len__(self) -> int:
        """Number of records in the split."""
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """The ``i``-th record of the split as a dict of tensors (see the class docstring)."""
        record = self.ecg[self.rows[i]]  # (T, 12) memmap view
        if self.train:
            start = int(self.starts[i])
            record = record[start : start + self.window]
        signal = np.nan_to_num(np.asarray(record, dtype=np.float32).T, nan=0.0, posinf=0.0, neginf=0.0)
        return {
            "ecg": torch.from_numpy(np.ascontiguousarray(signal)),
            "cat": self.cat[i],
            "cont": self.cont[i],
            "y": self.labels[i],
            "row": torch.tensor(self.rows[i], dtype=torch.int64),
        }


# --------------------------------------------------------------------------------------------
# Provenance
# --------------------------------------------------------------------------------------------
def file_digest(path: Path) -> dict[str, Any]:
    """SHA-256 of a file: full for files up to 256 MiB, else of 64 evenly spaced 1 MiB blocks.

    The waveform memmap of the full MIMIC cohort is tens of GB; hashing it in full at every
    start would take minutes, while sampled blocks plus the size still detect a replaced or
    rewritten file. The ``method`` field says which was done.
    """
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        if size <= _FULL_HASH_LIMIT:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
            method = "sha256"
        else:
            digest.update(str(size).encode())
            for k in range(64):
                fh.seek((size - (1 << 20)) * k // 63)
                digest.update(fh.read(1 << 20))
            method = "sha256-sampled-64x1MiB"
    return {"bytes": size, "method": method, "digest": digest.hexdigest()}


def dataset_provenance(dataset: LabDataset) -> dict[str, Any]:
    """Where the training data came from: path, dataset.json summary and file digests."""
    files = [*REQUIRED_FILES, "dataset.json", "thresholds.json"]
    hashes = {name: file_digest(dataset.root / name) for name in files if (dataset.root / name).is_file()}
    summary = {k: v for k, v in dataset.info.items() if isinstance(v, str | int | float | bool) or v is None}
    return {
        "path": str(dataset.root.resolve()),
        "n_records": len(dataset.records),
        "ecg_shape": list(dataset.ecg.shape),
        "dataset_json": json.loads(json.dumps(dataset.info, default=str)),
        "summary": summary,
        "hashes": hashes,
    }
