"""``dataset.json`` of ``ecglab preprocess``: counts per target, task and fold, filters, provenance.

Read by training (provenance), evaluation (the generator's ground truth) and people deciding
whether a data set is usable: every filter decision of the table step is kept with its counts.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cds_service import __version__
from fhir_mappings.signal_spec import MODEL_LEADS, TARGET_FS, TARGET_SAMPLES
from model_training import labels as lab
from model_training.metadata import METADATA_COLUMNS
from model_training.mimic_tables import MimicSources, execute, sql_string


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


def dataset_info(
    con: Any,
    work: Path,
    stats: dict[str, Any],
    sources: MimicSources,
    tables: dict[str, Path],
    generator: dict[str, Any] | None,
    options: dict[str, Any],
    workers: int,
    seconds: float,
) -> dict[str, Any]:
    """The ``dataset.json`` content: counts per target/task/fold, filter decisions, provenance.

    ``generator`` is the synthetic generator's seed and planted targets (None for real data).
    """
    import duckdb

    n_records, per_fold, counts = _label_counts(con, work)
    targets = list(counts)
    by_task = {task: [t for t in targets if t.endswith(f"_{task}")] for task in lab.TASKS}
    return {
        "format": "ecglab-dataset",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "ecglab_version": __version__,
        "pipeline_version": options["pipeline_version"],
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
