"""``ecglab preprocess`` benchmark: the label step (rows per second, peak memory) and the waveform step
(ECGs per second per core, peak memory, extrapolated to all of MIMIC-IV-ECG).

Run: ``.venv/bin/python benchmarks/preprocess.py [--rows 20000000] [--ecgs 512] [--workdir DIR]
[--threads 2]``. ``--rows 0`` or ``--ecgs 0`` skips that step. Prints one ``name: value`` line per
figure. The label step:

* ``labevents_rows_per_s``: rows of ``labevents.csv.gz`` divided by the wall time of the label
  step, i.e. everything :mod:`model_training.labels` does: stream and filter ``labevents``, choose
  fluids, derive the median thresholds, join every lab row to the ECGs of its subject within
  [−60, +120] min, build the est/mon labels, apply the fold-18/19 target filter, pick the cohort
  and write ``labels.parquet``.
* ``peak_rss_mb``: the peak resident memory of the process running that step plus its children
  (``getrusage`` self + children, so DuckDB's threads and any helper process count).
* ``labevents_rows``, ``ecg_records``, ``label_step_s``, ``label_step_cpu_s`` (user + system time
  of the step; on a shared machine wall time can be far above it), ``targets_kept``, ``cohort``:
  context.

The input is generated, not real: ``--rows`` labevents rows in MIMIC-IV's column layout (all 16
columns, gzip) for ``rows / 400`` subjects, half of them with five ECGs 30 days apart. Each subject's
rows are clustered around its encounters (−200 to +500 min), so the time-window join does real
work, and include the rows the filters drop (empty valuenum, zero reference ranges, H/I/L labels,
a minority fluid, a dropped unit). Generating 20 M rows takes about two minutes (gzip is the
bottleneck); ``--workdir`` keeps the files so a rerun skips that. The label step runs in a fresh
child process so the generator's memory does not count.

The waveform step (:func:`model_training.waveforms.convert`: WFDB record → leads by name → the
service's preparation → one row of the (N, 1000, 12) float32 memmap), on ``--ecgs`` synthetic
records written by the generator's own writer (MIMIC-IV-ECG layout: 500 Hz, 10 s, 12 leads, WFDB
format 16, one record in ten with a NaN span to interpolate):

* ``waveform_ecgs_per_s_per_core``: records converted per second of CPU time (user + system) of one
  worker process; the step's workers are independent processes, so N cores convert N times that.
* ``waveform_peak_rss_mb``: the peak resident memory of that worker.
* ``waveform_800k_on_16_cores_h``: hours for all 800 000 MIMIC-IV-ECG records with 16 workers on
  16 cores at that rate (CPU only: reading 800 000 × 120 kB from the disk is on top if it is slower).
* ``waveform_ecgs``, ``waveform_step_s`` (wall), ``waveform_step_cpu_s``, ``waveform_failed``: context.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path
from queue import Empty
from typing import Any

LAB_ITEMS = 150
ROWS_PER_SUBJECT = 400
ECGS_PER_SUBJECT = 5
MIMIC_ECGS = 800_000  # records in MIMIC-IV-ECG 1.0
FULL_SCALE_CORES = 16


def _write_inputs(root: Path, rows: int, threads: int) -> dict[str, Path]:
    """Write labevents (``rows`` rows) and the small tables the label step reads; returns their paths."""
    import duckdb

    from model_training.mimic_tables import sql_string

    hosp = root / "hosp"
    ecg = root / "ecg"
    hosp.mkdir(parents=True, exist_ok=True)
    ecg.mkdir(parents=True, exist_ok=True)
    subjects = max(1, rows // ROWS_PER_SUBJECT)
    paths = {
        "labevents": hosp / "labevents.csv.gz",
        "d_labitems": hosp / "d_labitems.csv.gz",
        "patients": hosp / "patients.csv.gz",
        "record_list": ecg / "record_list.csv",
        "records_w_diag_icd10": ecg / "records_w_diag_icd10.csv",
    }
    marker = root / "inputs.json"
    if marker.is_file() and json.loads(marker.read_text()).get("rows") == rows:
        return paths
    con = duckdb.connect()
    con.execute(f"SET threads = {threads}")
    # 150 items: 3 are the H/I/L serum indices, one label has a second (urine) itemid, D-Dimer has a dropped unit.
    con.execute(
        f"""
        COPY (
            SELECT 50800 + i AS itemid,
                   CASE i WHEN 0 THEN 'H' WHEN 1 THEN 'I' WHEN 2 THEN 'L' WHEN 3 THEN 'D-Dimer'
                          WHEN 4 THEN 'Lab 5' ELSE 'Lab ' || i END AS label,
                   CASE WHEN i = 4 THEN 'Urine' ELSE 'Blood' END AS fluid,
                   'Chemistry' AS category
            FROM range({LAB_ITEMS}) t(i)
        ) TO {sql_string(paths["d_labitems"])} (HEADER, COMPRESSION gzip)
        """
    )
    con.execute(
        f"""
        COPY (
            SELECT 10000000 + s AS subject_id, CASE WHEN s % 2 = 0 THEN 'M' ELSE 'F' END AS gender,
                   18 + s % 70 AS anchor_age, 2150 AS anchor_year, '2011 - 2013' AS anchor_year_group, NULL AS dod
            FROM range({subjects}) t(s)
        ) TO {sql_string(paths["patients"])} (HEADER, COMPRESSION gzip)
        """
    )
    encounter = "TIMESTAMP '2150-01-01 08:00:00' + INTERVAL 1 DAY * ((s * 7919) % 3000) + INTERVAL 30 DAY * k"
    con.execute(
        f"""
        COPY (
            SELECT 10000000 + s AS subject_id, 40000000 + s * {ECGS_PER_SUBJECT} + k AS study_id,
                   (40000000 + s * {ECGS_PER_SUBJECT} + k)::VARCHAR AS file_name,
                   {encounter} + INTERVAL 1 MINUTE * ((s * 31 + k * 17) % 120) AS ecg_time,
                   'files/p' || (1000 + s // 1000) || '/p' || (10000000 + s) || '/s' || (40000000 + s * 5 + k)
                     || '/' || (40000000 + s * 5 + k) AS path
            FROM range(0, {subjects}, 2) t(s), range({ECGS_PER_SUBJECT}) u(k)
            ORDER BY subject_id, study_id
        ) TO {sql_string(paths["record_list"])} (HEADER)
        """
    )
    con.execute(
        f"""
        COPY (
            SELECT study_id, subject_id, hash(subject_id) % 20 AS strat_fold
            FROM read_csv({sql_string(paths["record_list"])})
        ) TO {sql_string(paths["records_w_diag_icd10"])} (HEADER)
        """
    )
    started = time.perf_counter()
    per_encounter = ROWS_PER_SUBJECT // ECGS_PER_SUBJECT
    con.execute(
        f"""
        COPY (
            WITH r AS (
                SELECT i, i // {ROWS_PER_SUBJECT} AS s, (i % {ROWS_PER_SUBJECT}) // {per_encounter} AS k,
                       i % {per_encounter} AS j, hash(i) AS h
                FROM range({rows}) t(i)
            )
            SELECT i + 1 AS labevent_id, 10000000 + s AS subject_id,
                   CASE WHEN h % 5 = 0 THEN NULL ELSE 20000000 + s * 10 + k END AS hadm_id,
                   i // 12 AS specimen_id,
                   50800 + (h // 7) % {LAB_ITEMS} AS itemid,
                   'P' || (h % 5000) AS order_provider_id,
                   {encounter} + INTERVAL 1 MINUTE * (j * 9 - 200) AS charttime,
                   {encounter} + INTERVAL 1 MINUTE * (j * 9 - 140) AS storetime,
                   CASE WHEN h % 50 = 0 THEN '___' ELSE (round((h // 11) % 8000 / 100.0, 2))::VARCHAR END AS value,
                   CASE WHEN h % 50 = 0 THEN NULL ELSE round((h // 11) % 8000 / 100.0, 2) END AS valuenum,
                   CASE WHEN (h // 7) % {LAB_ITEMS} = 3 AND h % 3 = 0 THEN 'ng/mL DDU' ELSE 'mg/dL' END AS valueuom,
                   CASE WHEN h % 97 = 0 THEN 0.0 WHEN h % 13 = 0 THEN NULL ELSE 10.0 + (h // 13) % 2 END AS ref_range_lower,
                   CASE WHEN h % 97 = 0 THEN 0.0 WHEN h % 13 = 0 THEN NULL ELSE 60.0 END AS ref_range_upper,
                   CASE WHEN (h // 11) % 8000 > 6000 THEN 'abnormal' END AS flag,
                   CASE WHEN h % 3 = 0 THEN 'STAT' ELSE 'ROUTINE' END AS priority,
                   NULL AS comments
            FROM r
        ) TO {sql_string(paths["labevents"])} (HEADER, COMPRESSION gzip)
        """
    )
    con.close()
    print(f"# generated {rows} labevents rows in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    marker.write_text(json.dumps({"rows": rows}))
    return paths


def _label_step(paths: dict[str, Path], work: Path, threads: int, memory_limit: str, queue: Any) -> None:
    """Child process: run the label step and report its wall time, CPU time and peak RSS (self + children)."""
    from model_training import labels as lab
    from model_training.mimic_tables import connect
    from model_training.preprocess_tables import load_records

    work.mkdir(parents=True, exist_ok=True)
    database = work / "bench.duckdb"
    database.unlink(missing_ok=True)
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    con = connect(database, memory_limit=memory_limit, threads=threads, temp_dir=work / "spill")
    load_records(con, paths, None)
    rows = lab.load_lab_rows(con, paths["labevents"], paths["d_labitems"])
    thresholds, _ = lab.derive_thresholds(con)
    lab.window_labels(con)
    kept, _ = lab.select_targets(con, thresholds)
    cohort = lab.build_cohort(con, kept)
    lab.write_labels(con, thresholds, kept, work / "labels.parquet")
    n_ecg = int(con.execute("SELECT count(*) FROM ecg").fetchone()[0])
    con.close()
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    database.unlink(missing_ok=True)
    peak_kb = usage.ru_maxrss + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    queue.put(
        {
            "seconds": seconds,
            "cpu_seconds": usage.ru_utime + usage.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime,
            "peak_rss_mb": peak_kb / 1024.0,
            "rows_kept": rows["kept"],
            "ecg_records": n_ecg,
            "targets_kept": sum(len(v) for v in kept.values()),
            "cohort": cohort["cohort"],
        }
    )


def _record_task(root: Path, index: int) -> Any:
    """The generator's task for synthetic record ``index`` (varied rhythm and morphology, seeded)."""
    import datetime as dt

    import numpy as np

    from model_training.synth_waveforms import EcgParams, RecordTask

    rng = np.random.default_rng([7, index])
    params = EcgParams(
        rate_bpm=float(rng.uniform(45, 120)),
        qrs_gain=float(rng.uniform(0.6, 1.6)),
        t_gain=float(rng.uniform(0.5, 1.5)),
        t_width_ms=float(rng.uniform(30, 60)),
        qtc_ms=float(rng.uniform(380, 480)),
        pr_ms=float(rng.uniform(120, 200)),
        qrs_ms=float(rng.uniform(80, 120)),
        p_gain=float(rng.uniform(0.5, 1.5)),
        axis_deg=float(rng.uniform(-30, 90)),
        noise_mv=float(rng.uniform(0.005, 0.03)),
        wander_mv=float(rng.uniform(0.0, 0.1)),
        hrv=float(rng.uniform(0.0, 0.05)),
        nan_spans=(("limb", int(rng.integers(0, 4000)), 200),) if index % 10 == 0 else (),
    )
    return RecordTask(
        directory=str(root / f"p{index // 1000:04d}"),
        record_name=f"s{index:08d}",
        params=params,
        seed=(7, index),
        base_datetime=dt.datetime(2150, 1, 1, 8, 0) + dt.timedelta(hours=index),
    )


def _write_records(root: Path, n: int, threads: int) -> list[str]:
    """Write ``n`` synthetic WFDB records under ``root`` (reused when already there); their paths."""
    from model_training.synth_waveforms import write_record

    rel_paths = [f"p{i // 1000:04d}/s{i:08d}" for i in range(n)]
    marker = root / "records.json"
    if marker.is_file() and json.loads(marker.read_text()).get("ecgs") == n:
        return rel_paths
    started = time.perf_counter()
    tasks = [_record_task(root, i) for i in range(n)]
    with multiprocessing.get_context("spawn").Pool(max(1, threads)) as pool:
        pool.map(write_record, tasks, chunksize=16)
    print(f"# wrote {n} WFDB records in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    marker.write_text(json.dumps({"ecgs": n}))
    return rel_paths


def _generate_records(root: Path, n: int, threads: int, queue: Any) -> None:
    """Child process: write the WFDB records and send back their paths."""
    queue.put(_write_records(root, n, threads))


def _waveform_step(root: Path, rel_paths: list[str], work: Path, queue: Any) -> None:
    """Child process: convert every record with one worker (this process); report time, CPU and RSS."""
    import wfdb  # noqa: F401  (imported once per worker process, not per record: not timed)

    from model_training import waveforms

    work.mkdir(parents=True, exist_ok=True)
    npy, status = work / "ecg.npy", work / "ecg_status.npy"
    npy.unlink(missing_ok=True)
    status.unlink(missing_ok=True)
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    counts = waveforms.convert(root, rel_paths, npy, status, workers=1, progress=False)
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    npy.unlink()
    status.unlink()
    queue.put(
        {
            "seconds": seconds,
            "cpu_seconds": usage.ru_utime + usage.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime,
            "peak_rss_mb": usage.ru_maxrss / 1024.0,
            "done": counts["done"],
        }
    )


def _in_child(target: Any, *args: Any) -> Any:
    """Run ``target(*args, queue)`` in a fresh (spawned) process and return what it puts on the queue.

    Both steps run in children of this small parent: Linux carries a process's peak RSS across
    ``fork``+``exec``, so running the label step from a parent that had generated the input would
    report the generator's memory as the label step's.
    """
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=target, args=(*args, queue))
    child.start()
    result = None
    while result is None and (child.is_alive() or not queue.empty()):
        try:
            result = queue.get(timeout=1.0)
        except Empty:
            continue
    child.join()
    if result is None or child.exitcode != 0:
        raise RuntimeError(f"{target.__name__} failed with exit code {child.exitcode}")
    return result


def _generate(root: Path, rows: int, threads: int, queue: Any) -> None:
    """Child process: write the inputs and send back their paths."""
    queue.put(_write_inputs(root, rows, threads))


def main(argv: list[str] | None = None) -> int:
    """Generate the input (or reuse ``--workdir``), run the label step in a child, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rows", type=int, default=20_000_000, help="labevents rows to generate (default 20 M; 0 skips)"
    )
    parser.add_argument(
        "--ecgs", type=int, default=512, help="WFDB records for the waveform step (default 512; 0 skips)"
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep the generated input here (reused on rerun)"
    )
    parser.add_argument("--threads", type=int, default=2, help="DuckDB threads")
    parser.add_argument("--memory-limit", default="2GB", help="DuckDB memory limit")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ecglab-bench-") as scratch:
        root = args.workdir or Path(scratch)
        try:
            if args.rows > 0:
                paths = _in_child(_generate, root / "input", args.rows, args.threads)
                result = _in_child(_label_step, paths, root / "work", args.threads, args.memory_limit)
                _print_label_figures(args.rows, result)
            if args.ecgs > 0:
                rel_paths = _in_child(_generate_records, root / "ecg-input", args.ecgs, args.threads)
                wave = _in_child(_waveform_step, root / "ecg-input", rel_paths, root / "ecg-work")
                _print_waveform_figures(args.ecgs, wave)
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 1
    return 0


def _print_label_figures(rows: int, result: dict[str, Any]) -> None:
    """The label step's lines."""
    print(f"labevents_rows: {rows}")
    print(f"ecg_records: {result['ecg_records']}")
    print(f"label_step_s: {result['seconds']:.1f}")
    print(f"targets_kept: {result['targets_kept']}")
    print(f"cohort: {result['cohort']}")
    print(f"label_step_cpu_s: {result['cpu_seconds']:.1f}")
    print(f"labevents_rows_per_s: {rows / result['seconds']:.0f}")
    print(f"peak_rss_mb: {result['peak_rss_mb']:.0f}")


def _print_waveform_figures(ecgs: int, result: dict[str, Any]) -> None:
    """The waveform step's lines; the per-core rate is records per CPU second of the one worker."""
    per_core = ecgs / max(result["cpu_seconds"], 1e-9)
    print(f"waveform_ecgs: {ecgs}")
    print(f"waveform_failed: {ecgs - result['done']}")
    print(f"waveform_step_s: {result['seconds']:.2f}")
    print(f"waveform_step_cpu_s: {result['cpu_seconds']:.2f}")
    print(f"waveform_ecgs_per_s_per_core: {per_core:.1f}")
    print(f"waveform_peak_rss_mb: {result['peak_rss_mb']:.0f}")
    print(f"waveform_800k_on_16_cores_h: {MIMIC_ECGS / (per_core * FULL_SCALE_CORES) / 3600:.3f}")


if __name__ == "__main__":
    sys.exit(main())
