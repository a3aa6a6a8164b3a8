"""The table step of ``ecglab preprocess``: records, labels, cohort and metadata into the work folder.

The label, cohort and metadata steps run as SQL in DuckDB (bounded memory, spilling to disk), see
:mod:`model_training.labels` and :mod:`model_training.metadata`. After the waveform conversion,
:func:`drop_failed` removes the records whose waveform could not be read and re-applies the
per-fold target filter, so the tables and the memmap stay row-aligned.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from fhir_mappings.errors import InputError
from model_training import labels as lab
from model_training import waveforms
from model_training.metadata import build_metadata
from model_training.mimic_tables import connect, execute, read_csv_sql, sql_name, sql_string


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
    """Create table ``ecg(rn, subject_id, study_id, ecg_time, strat_fold, path, gender, anchor_age, anchor_year)``.

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
        SELECT subject_id, any_value(gender) AS gender, any_value(anchor_age) AS anchor_age,
               any_value(anchor_year) AS anchor_year
        FROM {read_csv_sql(tables["patients"], "patients")} GROUP BY subject_id;
        CREATE OR REPLACE TABLE folds AS SELECT study_id, min(strat_fold)::INTEGER AS strat_fold
        FROM {read_csv_sql(tables["records_w_diag_icd10"], "records_w_diag_icd10")} GROUP BY study_id;
        CREATE OR REPLACE TABLE ecg AS
        SELECT r.rn, r.subject_id, r.study_id, r.ecg_time, f.strat_fold, r.path, p.gender, p.anchor_age,
               p.anchor_year
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


def build_tables(
    tables: dict[str, Path],
    work: Path,
    *,
    max_records: int | None,
    min_class_count: int,
    threads: int,
    memory_limit: str,
    progress: bool,
    abnormal_rule: str = "strict",
) -> dict[str, Any]:
    """Labels (values compared by ``abnormal_rule``), cohort, metadata and records into ``work``; returns the filter report."""
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
        thresholds, lab_report = lab.derive_thresholds(con, abnormal_rule)
        steps.update()
        steps.set_postfix_str("windows")
        pairs = lab.window_labels(con, abnormal_rule)
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


def drop_failed(
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
