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
disk), see :mod:`model_training.labels` and :mod:`model_training.metadata`; waveforms are
converted by worker processes (:mod:`model_training.waveforms`). Everything is written into
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
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from cds_service import __version__
from fhir_mappings.errors import InputError
from fhir_mappings.signal_spec import MODEL_LEADS, TARGET_FS, TARGET_SAMPLES
from model_training import labels as lab
from model_training import waveforms
from model_training.metadata import METADATA_COLUMNS, build_metadata
from model_training.mimic_tables import MimicSources, connect, execute, read_csv_sql, sql_name, sql_string

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
        "pipeline_version": PIPELINE_VERSION,
    }
    fingerprint = _fingerprint(tables, options)
    work = _work_dir(out, fingerprint)
    state = _read_json(work / "state.json") or {"fingerprint": fingerprint}
    started = time.time()
    if not state.get("tables_done"):
        try:
            stats = _build_tables(
                tables,
                work,
                max_records=max_records,
                min_class_count=min_class_count,
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
    stats["after_waveforms"] = _drop_failed(
        work,
        keep,
        min_class_count=min_class_count,
        threads=threads,
        memory_limit=memory_limit,
    )
    con = connect(None, memory_limit=memory_limit, threads=threads, temp_dir=work / "duckdb_tmp")
    try:
        info = _dataset_info(
            con, work, stats, sources, tables, generator_root, options, workers, time.time() - started
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


def _read_json(path: Path) -> dict[str, Any] | None:
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


def _read_records(path: Path, max_records: int | None) -> tuple[Any, int]:
    """``record_list.csv`` (a pyarrow table with ``rn`` = file position) and its total row count."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    try:
        table = pacsv.read_csv(
            path,
            convert_options=pacsv.ConvertOptions(
                include_columns=["subject_id", "study_id", "ecg_time", "path"],
                column_types={
                    "subject_id": pa.int64(),
                    "study_id": pa.int64(),
                    "ecg_time": pa.timestamp("us"),
                    "path": pa.string(),
                },
            ),
        )
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{path}: cannot read ({str(exc).splitlines()[0]})") from exc
    n_file = table.num_rows
    if max_records is not None:
        table = table.slice(0, max_records)
    return table.append_column("rn", pa.array(range(table.num_rows), pa.int64())), n_file


def load_records(con: Any, tables: dict[str, Path], max_records: int | None) -> dict[str, int]:
    """Create table ``ecg(rn, subject_id, study_id, ecg_time, strat_fold, path, gender, anchor_age)``.

    One row per ``record_list.csv`` record (the first ``max_records``) whose subject is in
    ``patients`` (an inner join, as in the reference code); ``strat_fold`` from MIMIC-IV-ECG-ICD
    (NULL when absent). ``rn`` is the record's position in ``record_list.csv``.

    Returns:
        Record counts for ``dataset.json``.

    Raises:
        InputError: a file that cannot be parsed, or a ``study_id`` listed twice.
    """
    records, n_file = _read_records(tables["record_list"], max_records)
    con.register("rec_arrow", records)
    execute(con, "CREATE OR REPLACE TABLE rec AS SELECT * FROM rec_arrow", str(tables["record_list"]))
    con.unregister("rec_arrow")
    dup = execute(
        con, "SELECT study_id FROM rec GROUP BY study_id HAVING count(*) > 1 LIMIT 1", "rec"
    ).fetchone()
    if dup is not None:
        raise InputError(f"{tables['record_list']}: study_id {dup[0]} appears more than once")
    execute(
        con,
        f"""
        CREATE OR REPLACE TABLE patients AS
        SELECT subject_id, any_value(gender) AS gender, any_value(anchor_age) AS anchor_age
        FROM {read_csv_sql(tables["patients"], "patients")} GROUP BY subject_id;
        CREATE OR REPLACE TABLE folds AS SELECT study_id, min(strat_fold)::INTEGER AS strat_fold
        FROM {read_csv_sql(tables["records_w_diag_icd10"], "records_w_diag_icd10")} GROUP BY study_id;
        CREATE OR REPLACE TABLE ecg AS
        SELECT r.rn, r.subject_id, r.study_id, r.ecg_time, f.strat_fold, r.path, p.gender, p.anchor_age
        FROM rec AS r JOIN patients AS p USING (subject_id) LEFT JOIN folds AS f USING (study_id)
        ORDER BY r.rn;
        """,
        f"{tables['patients']}, {tables['records_w_diag_icd10']}",
    )

    def count(sql: str) -> int:
        return int(execute(con, sql, "ecg").fetchone()[0])

    n_ecg = count("SELECT count(*) FROM ecg")
    return {
        "record_list_rows": n_file,
        "records_used": records.num_rows,
        "records_without_patient_row": records.num_rows - n_ecg,
        "records_with_patient_row": n_ecg,
        "records_with_strat_fold": count("SELECT count(*) FROM ecg WHERE strat_fold IS NOT NULL"),
    }


def _build_tables(
    tables: dict[str, Path],
    work: Path,
    *,
    max_records: int | None,
    min_class_count: int,
    threads: int,
    memory_limit: str,
    progress: bool,
) -> dict[str, Any]:
    """Labels, cohort, metadata and records into ``work``; returns the filter report."""
    from tqdm import tqdm

    database = work / "work.duckdb"
    for leftover in (database, work / "work.duckdb.wal"):
        leftover.unlink(missing_ok=True)
    con = connect(database, memory_limit=memory_limit, threads=threads, temp_dir=work / "duckdb_tmp")
    steps = tqdm(total=8, desc="tables", unit="step", disable=None if progress else True)
    try:
        steps.set_postfix_str("records")
        record_report = load_records(con, tables, max_records)
        steps.update()
        steps.set_postfix_str("labevents")
        if progress and sys.stderr.isatty():
            con.execute("SET enable_progress_bar = true")
        row_report = lab.load_lab_rows(con, tables["labevents"], tables["d_labitems"])
        steps.update()
        steps.set_postfix_str("thresholds")
        thresholds, lab_report = lab.derive_thresholds(con)
        steps.update()
        steps.set_postfix_str("windows")
        pairs = lab.window_labels(con)
        steps.update()
        steps.set_postfix_str("target filter")
        kept, target_report = lab.select_targets(con, thresholds, min_class_count)
        steps.update()
        steps.set_postfix_str("cohort")
        cohort_report = lab.build_cohort(con, kept)
        if cohort_report["cohort"] == 0:
            raise InputError(
                "no ECG record has a lab target that passes the filters (≥200 rows per lab, "
                f"≥{min_class_count} positives and negatives in strat_fold 18 and 19); "
                "check the inputs or raise --max-records"
            )
        target_names = lab.write_labels(con, thresholds, kept, work / "labels.parquet")
        steps.update()
        steps.set_postfix_str("metadata")
        metadata_report = build_metadata(con, tables, work / "metadata.parquet")
        steps.update()
        steps.set_postfix_str("writing")
        execute(
            con,
            f"""
            COPY (SELECT study_id, subject_id, ecg_time, strat_fold FROM cohort ORDER BY rn)
              TO {sql_string(work / "records.parquet")} (FORMAT parquet);
            COPY (SELECT study_id, path FROM cohort ORDER BY rn)
              TO {sql_string(work / "waveform_paths.parquet")} (FORMAT parquet);
            """,
            "cohort",
        )
        thresholds_json = {t.label: t.to_json() for t in thresholds}
        (work / "thresholds.json").write_text(json.dumps(thresholds_json, indent=1), encoding="utf-8")
        steps.update()
    finally:
        steps.close()
        con.close()
    database.unlink(missing_ok=True)
    shutil.rmtree(work / "duckdb_tmp", ignore_errors=True)
    return {
        "records": record_report,
        "lab_rows": row_report,
        "labs": lab_report,
        "window_pairs": pairs,
        "targets": target_report,
        "cohort": cohort_report,
        "metadata": metadata_report,
        "target_names": target_names,
    }


def _check_waveform_files(root: Path, rel_paths: list[str]) -> None:
    """Every cohort record must have its WFDB header; raise naming the first missing one."""
    if not root.is_dir():
        raise InputError(f"MIMIC-IV-ECG folder not found: {root}")
    missing = [p for p in rel_paths if not (root / f"{p}.hea").is_file()]
    if missing:
        raise InputError(
            f"WFDB file not found: {root / (missing[0] + '.hea')} ({len(missing)} record(s) missing)"
        )


def _drop_failed(
    work: Path, keep: np.ndarray, *, min_class_count: int, threads: int, memory_limit: str
) -> dict[str, Any]:
    """Remove records whose waveform failed, re-apply the target filter and compact the memmap.

    Dropping records can push a target under 10 positives or negatives in fold 18 or 19, and
    dropping that target can leave a record without any label; both are re-checked until stable.
    """
    report: dict[str, Any] = {
        "failed_waveforms": int((~keep).sum()),
        "targets_dropped": [],
        "records_dropped": 0,
    }
    if keep.all():
        return report
    con = connect(None, memory_limit=memory_limit, threads=threads, temp_dir=work / "duckdb_tmp")
    try:
        paths = {name: work / f"{name}.parquet" for name in ("records", "labels", "metadata")}
        con.execute(
            f"CREATE TABLE rec AS SELECT file_row_number AS pos, * EXCLUDE (file_row_number) "
            f"FROM read_parquet({sql_string(paths['records'])}, file_row_number = true)"
        )
        con.execute(
            f"CREATE TABLE lbl AS SELECT file_row_number AS pos, * EXCLUDE (file_row_number) "
            f"FROM read_parquet({sql_string(paths['labels'])}, file_row_number = true)"
        )
        con.execute("CREATE TABLE keep (pos BIGINT)")
        con.executemany("INSERT INTO keep VALUES (?)", [(int(i),) for i in np.flatnonzero(keep)])
        targets = [
            d[0]
            for d in con.execute("SELECT * FROM lbl LIMIT 0").description
            if d[0] not in ("pos", "study_id")
        ]
        while True:
            failing = []
            for target in targets:
                for fold in lab.EVAL_FOLDS:
                    pos, neg = con.execute(
                        f"SELECT count(*) FILTER (WHERE l.{sql_name(target)} = 1), count(*) FILTER (WHERE l.{sql_name(target)} = 0) "
                        f"FROM lbl AS l JOIN rec AS r USING (pos) WHERE l.pos IN (SELECT pos FROM keep) AND r.strat_fold = {fold}"
                    ).fetchone()
                    if pos < min_class_count or neg < min_class_count:
                        failing.append(target)
                        break
            targets = [t for t in targets if t not in failing]
            report["targets_dropped"].extend(failing)
            present = " OR ".join(f"{sql_name(t)} IS NOT NULL" for t in targets) or "false"
            before = int(con.execute("SELECT count(*) FROM keep").fetchone()[0])
            con.execute(f"DELETE FROM keep WHERE pos NOT IN (SELECT pos FROM lbl WHERE {present})")
            after = int(con.execute("SELECT count(*) FROM keep").fetchone()[0])
            if not failing and after == before:
                break
        if not targets or after == 0:
            raise InputError(
                "after removing records with unusable waveforms no lab target passes the filters"
            )
        columns = ", ".join(["study_id", *(sql_name(t) for t in targets)])
        con.execute(
            f"COPY (SELECT {columns} FROM lbl WHERE pos IN (SELECT pos FROM keep) ORDER BY pos) "
            f"TO {sql_string(work / 'labels.filtered.parquet')} (FORMAT parquet)"
        )
        for name in ("records", "metadata"):
            con.execute(
                f"COPY (SELECT * EXCLUDE (file_row_number) FROM read_parquet({sql_string(paths[name])}, file_row_number = true) "
                f"WHERE file_row_number IN (SELECT pos FROM keep) ORDER BY file_row_number) "
                f"TO {sql_string(work / f'{name}.filtered.parquet')} (FORMAT parquet)"
            )
        final_keep = np.zeros(len(keep), dtype=bool)
        final_keep[[int(r[0]) for r in con.execute("SELECT pos FROM keep").fetchall()]] = True
    finally:
        con.close()
        shutil.rmtree(work / "duckdb_tmp", ignore_errors=True)
    for name, path in paths.items():
        os.replace(work / f"{name}.filtered.parquet", path)
    report["records_dropped"] = int(len(keep) - final_keep.sum())
    waveforms.compact(work / "ecg.npy", final_keep)
    return report


def _label_counts(con: Any, work: Path) -> tuple[int, dict[str, int], dict[str, Any]]:
    """Records, records per fold, and per target its positives/negatives/missing overall and per fold."""
    rec = sql_string(work / "records.parquet")
    lbl = sql_string(work / "labels.parquet")
    n_records = int(execute(con, f"SELECT count(*) FROM read_parquet({rec})", "records").fetchone()[0])
    per_fold = {
        str(fold): int(n)
        for fold, n in execute(
            con, f"SELECT strat_fold, count(*) FROM read_parquet({rec}) GROUP BY 1 ORDER BY 1", "records"
        ).fetchall()
    }
    targets = [
        d[0] for d in execute(con, f"SELECT * FROM read_parquet({lbl}) LIMIT 0", "labels").description
    ][1:]
    counts: dict[str, Any] = {
        t: {"task": t.rsplit("_", 1)[1], "pos": 0, "neg": 0, "missing": n_records, "folds": {}}
        for t in targets
    }
    if targets:
        # UNPIVOT drops the NULL (missing) cells, so this streams only the labelled values.
        rows = execute(
            con,
            f"""
            SELECT u.target, r.strat_fold, u.v, count(*)
            FROM (UNPIVOT (SELECT * FROM read_parquet({lbl})) ON COLUMNS(* EXCLUDE (study_id))
                  INTO NAME target VALUE v) AS u
            JOIN read_parquet({rec}) AS r USING (study_id)
            GROUP BY ALL ORDER BY ALL
            """,
            "labels",
        ).fetchall()
        for target, fold, value, n in rows:
            entry = counts[target]
            key = "pos" if value == 1 else "neg"
            entry[key] += int(n)
            entry["missing"] -= int(n)
            entry["folds"].setdefault(str(fold), {"pos": 0, "neg": 0})[key] += int(n)
    return n_records, per_fold, counts


def _dataset_info(
    con: Any,
    work: Path,
    stats: dict[str, Any],
    sources: MimicSources,
    tables: dict[str, Path],
    generator_root: Path | None,
    options: dict[str, Any],
    workers: int,
    seconds: float,
) -> dict[str, Any]:
    """The ``dataset.json`` content: counts per target/task/fold, filter decisions, provenance."""
    import duckdb

    n_records, per_fold, counts = _label_counts(con, work)
    targets = list(counts)
    by_task = {task: [t for t in targets if t.endswith(f"_{task}")] for task in lab.TASKS}
    generator = None
    if generator_root is not None and (generator_root / "ground_truth.json").is_file():
        truth = _read_json(generator_root / "ground_truth.json") or {}
        generator = {
            "ground_truth": str(generator_root / "ground_truth.json"),
            "seed": truth.get("seed"),
            "subjects": truth.get("subjects"),
            "planted_targets": truth.get("planted_targets"),
        }
    return {
        "format": "ecglab-dataset",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "ecglab_version": __version__,
        "pipeline_version": PIPELINE_VERSION,
        "duckdb_version": duckdb.__version__,
        "seconds": round(seconds, 1),
        "sources": {
            "paths": {name: str(path) for name, path in tables.items()},
            "versions": sources.versions(),
        },
        "versions": {
            **{name: v for name, v in sources.versions().items() if v is not None},
            "ecglab": __version__,
            "duckdb": duckdb.__version__,
        },
        "generator": generator,
        "options": {**options, "workers": workers},
        "n_records": n_records,
        "records_per_fold": per_fold,
        "ecg": {
            "file": "ecg.npy",
            "shape": [n_records, TARGET_SAMPLES, len(MODEL_LEADS)],
            "dtype": "float32",
            "fs": TARGET_FS,
            "units": "mV",
            "leads": list(MODEL_LEADS),
        },
        "metadata_columns": list(METADATA_COLUMNS),
        "targets": by_task,
        "counts_per_task": {
            task: {
                "targets": len(names),
                "labelled_values": sum(counts[t]["pos"] + counts[t]["neg"] for t in names),
            }
            for task, names in by_task.items()
        },
        "counts": counts,
        "filters": {k: v for k, v in stats.items() if k != "target_names"},
    }


def _publish(work: Path, out: Path) -> None:
    """Rename the finished work folder to ``out`` (replacing an existing one only after success)."""
    old: Path | None = None
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(work, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
