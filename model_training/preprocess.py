"""``ecglab preprocess``: build the training set from MIMIC-IV exactly as the method describes (§1.2, §2).

Usage::

    ecglab preprocess --mimic-root ROOT --out DATASET [--workers 4] [--max-records N]
    ecglab preprocess --hosp DIR --ed DIR --ecg DIR --ecg-icd FILE --out DATASET

Output (``DATASET/``), every table row-aligned with ``records.parquet`` and the memmap:

* ``records.parquet``: ``study_id, subject_id, ecg_time, strat_fold``, memmap row order
  (``record_list.csv`` order);
* ``ecg.npy``: float32 (N, 1000, 12) mV, 100 Hz, model lead order (``numpy.load(mmap_mode='r')``);
* ``labels.parquet``: ``study_id`` + one float32 column per kept target
  ``{label}_{low|high}_{est|mon30|mon60|mon120}`` holding 1.0 / 0.0 / NaN;
* ``metadata.parquet``: ``study_id`` + raw ``sex, race, age, temperature, heart_rate, resp_rate,
  spo2, sbp, dbp, bmi, weight, height`` (float64, NaN = missing; sex/race as codes);
* ``thresholds.json``: per lab ``lower, upper, unit, fluid, itemids, count`` (+ class counts);
* ``dataset.json``: counts per target, task and fold; every filter decision with its counts;
  source paths and versions; the generator seed when ``ROOT/ground_truth.json`` exists.

How: the label, cohort and metadata steps run as SQL in DuckDB (bounded memory, spilling to
disk), see :mod:`model_training.preprocess_tables`, :mod:`model_training.labels` and
:mod:`model_training.metadata`; waveforms are converted by worker processes
(:mod:`model_training.waveforms`); ``dataset.json`` is assembled by
:mod:`model_training.dataset_info`. This module is the command line and the order of the steps.
Everything is written into
``DATASET.tmp-<random>`` next to the target and renamed at the end, so a half-written data set never
looks complete. Re-running the same command after an interruption reuses that folder: the table
step is skipped when its inputs are unchanged and the waveform conversion continues where it
stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from fhir_mappings.errors import InputError
from model_training import labels as lab
from model_training import waveforms
from model_training.dataset_info import dataset_info
from model_training.mimic_tables import MimicSources, connect
from model_training.preprocess_tables import build_tables, drop_failed

logger = logging.getLogger(__name__)

PIPELINE_VERSION = "1"
"""Bumped whenever a change to this pipeline makes earlier partial outputs unusable."""

OUTPUT_FILES: tuple[str, ...] = (
    "records.parquet",
    "ecg.npy",
    "labels.parquet",
    "metadata.parquet",
    "thresholds.json",
    "dataset.json",
)
_INTERNAL_FILES: tuple[str, ...] = ("stats.json", "waveform_paths.parquet", "ecg_status.npy", "state.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the ``ecglab preprocess`` flags."""
    src = parser.add_argument_group("sources (either --mimic-root, or the four paths)")
    src.add_argument(
        "--mimic-root", type=Path, help="folder holding mimic-iv/, mimic-iv-ed/, mimic-iv-ecg/, ..."
    )
    src.add_argument("--hosp", type=Path, help="MIMIC-IV hosp folder (labevents, d_labitems, patients, ...)")
    src.add_argument("--ed", type=Path, help="MIMIC-IV-ED ed folder (edstays, vitalsign)")
    src.add_argument("--ecg", type=Path, help="MIMIC-IV-ECG release folder (record_list.csv, files/)")
    src.add_argument("--ecg-icd", type=Path, help="MIMIC-IV-ECG-ICD records_w_diag_icd10.csv (strat_fold)")
    parser.add_argument("--out", type=Path, required=True, help="output DATASET folder")
    parser.add_argument(
        "--workers", type=int, default=min(4, os.cpu_count() or 1), help="waveform worker processes"
    )
    parser.add_argument(
        "--max-records", type=int, default=None, help="use only the first N ECG records (quick runs)"
    )
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1), help="DuckDB threads")
    parser.add_argument(
        "--memory-limit", default="2GB", help="DuckDB memory limit (spills to disk beyond it)"
    )
    parser.add_argument(
        "--min-class-count",
        type=int,
        default=lab.MIN_CLASS_COUNT,
        help="positives and negatives a target needs in each of folds 18 and 19 (method: 10; lower only for tiny test sets)",
    )
    parser.add_argument(
        "--abnormal-rule",
        choices=lab.ABNORMAL_RULES,
        default="strict",
        help="abnormal = below/above the threshold (strict: < and >, as the reference code; "
        "inclusive: <= and >=, as the paper's text)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DATASET")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def sources_from_args(args: argparse.Namespace) -> MimicSources:
    """The source locations: ``--mimic-root`` layout, with any explicit path flag taking precedence."""
    explicit = {"hosp": args.hosp, "ed": args.ed, "ecg": args.ecg, "ecg_icd": args.ecg_icd}
    if args.mimic_root is not None:
        if not args.mimic_root.is_dir():
            raise InputError(f"--mimic-root folder not found: {args.mimic_root}")
        base = MimicSources.from_root(args.mimic_root)
        return MimicSources(**{k: v if v is not None else getattr(base, k) for k, v in explicit.items()})
    missing = [f"--{k.replace('_', '-')}" for k, v in explicit.items() if v is None]
    if missing:
        raise InputError(
            f"give --mimic-root or all of --hosp, --ed, --ecg, --ecg-icd (missing {', '.join(missing)})"
        )
    return MimicSources(**explicit)


def run(args: argparse.Namespace) -> int:
    """CLI entry point: preprocess and print a one-paragraph summary."""
    if args.workers < 1 or args.threads < 1:
        raise InputError("--workers and --threads must be at least 1")
    if args.max_records is not None and args.max_records < 1:
        raise InputError("--max-records must be at least 1")
    if args.min_class_count < 1:
        raise InputError("--min-class-count must be at least 1")
    info = preprocess(
        sources_from_args(args),
        args.out,
        generator_root=args.mimic_root,
        workers=args.workers,
        max_records=args.max_records,
        min_class_count=args.min_class_count,
        abnormal_rule=args.abnormal_rule,
        threads=args.threads,
        memory_limit=args.memory_limit,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    n_targets = {task: len(names) for task, names in info["targets"].items()}
    print(f"wrote {args.out}: {info['n_records']} ECG records, targets per task {n_targets}")
    return 0


def preprocess(
    sources: MimicSources,
    out: Path,
    *,
    generator_root: Path | None = None,
    workers: int = 1,
    max_records: int | None = None,
    min_class_count: int = lab.MIN_CLASS_COUNT,
    abnormal_rule: str = "strict",
    threads: int = 2,
    memory_limit: str = "2GB",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Build DATASET ``out`` from the MIMIC sources; returns the ``dataset.json`` content.

    Raises:
        InputError: for a missing folder, file or column (named), an existing ``out`` without
            ``overwrite``, or inputs that yield no usable target.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(f"{out} already exists; pass --overwrite to replace it")
    tables = sources.check()
    options = {
        "max_records": max_records,
        "min_class_count": min_class_count,
        "abnormal_rule": abnormal_rule,
        "pipeline_version": PIPELINE_VERSION,
    }
    fingerprint = _fingerprint(tables, options)
    work = _work_dir(out, fingerprint)
    state = _read_json(work / "state.json") or {"fingerprint": fingerprint}
    started = time.time()
    if not state.get("tables_done"):
        try:
            stats = build_tables(
                tables,
                work,
                max_records=max_records,
                min_class_count=min_class_count,
                abnormal_rule=abnormal_rule,
                threads=threads,
                memory_limit=memory_limit,
                progress=progress,
            )
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)  # nothing resumable yet: leave no work folder behind
            raise
        (work / "stats.json").write_text(json.dumps(stats, indent=1), encoding="utf-8")
        state["tables_done"] = True
        (work / "state.json").write_text(json.dumps(state), encoding="utf-8")
    else:
        logger.info("reusing the label and metadata tables in %s", work)
    stats = _read_json(work / "stats.json") or {}
    rel_paths = pq.read_table(work / "waveform_paths.parquet", columns=["path"]).column("path").to_pylist()
    _check_waveform_files(sources.ecg, rel_paths)
    wave_counts = waveforms.convert(
        sources.ecg, rel_paths, work / "ecg.npy", work / "ecg_status.npy", workers=workers, progress=progress
    )
    stats["waveforms"] = wave_counts
    keep = np.load(work / "ecg_status.npy") == waveforms.DONE
    if not keep.all():
        # Removing records rewrites the tables and shifts memmap rows in place: a crash half-way
        # would leave them inconsistent, so the work folder stops counting as resumable first.
        (work / "state.json").write_text(json.dumps({"fingerprint": fingerprint}), encoding="utf-8")
        (work / "ecg_status.npy").unlink()
    stats["after_waveforms"] = drop_failed(
        work,
        keep,
        min_class_count=min_class_count,
        threads=threads,
        memory_limit=memory_limit,
    )
    con = connect(None, memory_limit=memory_limit, threads=threads, temp_dir=work / "duckdb_tmp")
    try:
        info = dataset_info(
            con,
            work,
            stats,
            sources,
            tables,
            _generator_info(generator_root),
            options,
            workers,
            time.time() - started,
        )
    finally:
        con.close()
        shutil.rmtree(work / "duckdb_tmp", ignore_errors=True)
    (work / "dataset.json").write_text(json.dumps(info, indent=1, default=str), encoding="utf-8")
    for name in _INTERNAL_FILES:  # state.json goes last: until then a crash leaves a resumable folder
        (work / name).unlink(missing_ok=True)
    _publish(work, out)
    return info


def _fingerprint(tables: dict[str, Path], options: dict[str, Any]) -> str:
    """Digest of the inputs (path, size, mtime of every table) and options that shape the tables."""
    parts = [json.dumps(options, sort_keys=True)]
    for name in sorted(tables):
        st = tables[name].stat()
        parts.append(f"{name}|{tables[name].resolve()}|{st.st_size}|{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _generator_info(generator_root: Path | None) -> dict[str, Any] | None:
    """The synthetic generator's seed and planted targets when ``ROOT/ground_truth.json`` exists."""
    if generator_root is None or not (generator_root / "ground_truth.json").is_file():
        return None
    truth = _read_json(generator_root / "ground_truth.json") or {}
    return {
        "ground_truth": str(generator_root / "ground_truth.json"),
        "seed": truth.get("seed"),
        "subjects": truth.get("subjects"),
        "planted_targets": truth.get("planted_targets"),
    }


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``; None when the file is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _work_dir(out: Path, fingerprint: str) -> Path:
    """The ``OUT.tmp-<random>`` folder to build in: a previous one with the same inputs, else a new one.

    Earlier work folders of this output with other inputs are removed (they can never be resumed).
    """
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    found: Path | None = None
    for candidate in sorted(parent.glob(f"{out.name}.tmp-*")):
        state = _read_json(candidate / "state.json")
        if state is None:
            continue
        if state.get("fingerprint") == fingerprint and found is None:
            found = candidate
        else:
            logger.info("removing stale work folder %s", candidate)
            shutil.rmtree(candidate, ignore_errors=True)
    if found is not None:
        logger.info("resuming in %s", found)
        return found
    work = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=parent))
    (work / "state.json").write_text(json.dumps({"fingerprint": fingerprint}), encoding="utf-8")
    return work


def _check_waveform_files(root: Path, rel_paths: list[str]) -> None:
    """Every cohort record must have its WFDB header; raise naming the first missing one."""
    if not root.is_dir():
        raise InputError(f"MIMIC-IV-ECG folder not found: {root}")
    missing = [p for p in rel_paths if not (root / f"{p}.hea").is_file()]
    if missing:
        raise InputError(
            f"WFDB file not found: {root / (missing[0] + '.hea')} ({len(missing)} record(s) missing)"
        )


def _publish(work: Path, out: Path) -> None:
    """Rename the finished work folder to ``out`` (replacing an existing one only after success)."""
    old: Path | None = None
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(work, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
