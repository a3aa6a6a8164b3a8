"""Lab-value targets from MIMIC-IV ``labevents``: filtering, thresholds, estimation and monitoring labels.

This is method §1.2 (which labs, which thresholds) and §2.4 (time windows), run in DuckDB so the
158 M-row ``labevents`` streams through bounded memory; only per-label summaries reach Python.

Steps, each recorded with its counts in ``dataset.json``:

1. **Rows** (:func:`load_lab_rows`): keep rows of subjects with an ECG. Drop, in this order,
   rows with no ``valuenum``, no ``charttime``, no ``d_labitems.label`` (unknown itemid), the label
   ``other``, ``ref_range_lower == ref_range_upper == 0``, the serum-index labels ``H``/``I``/``L``,
   rows with no ``fluid`` (their ``(label, fluid)`` group cannot be chosen, as in the reference
   code's groupby), and rows in a unit the harmonisation table (:data:`UNIT_RULES`) drops.
2. **Labs** (:func:`derive_thresholds`): per label keep the most frequent ``fluid`` (a tie goes to
   the alphabetically first fluid, as a sorted groupby's ``idxmax`` does), then labels with
   ≥ 200 rows. Thresholds are the median ``ref_range_lower`` and median ``ref_range_upper`` of
   those rows (NaN ignored; an even count averages the two middle values). A value is ``low`` if
   ``< lower``, ``high`` if ``> upper`` (``abnormal_rule="strict"``, the reference code; the paper's
   text writes ≤/≥, selectable as ``"inclusive"``), otherwise normal. Labels with one class only are
   dropped; every non-normal class that occurs becomes a target ``{label}_{low|high}``.
3. **Windows** (:func:`window_labels`): each lab row is joined to the ECGs of the same subject
   with ``charttime - ecg_time`` in [−60 min, +120 min] (an equi-join on subject and a 3-hour time
   bucket, then the exact range; no per-ECG Python loop).

   * ``est``: the measurement closest in absolute time within ±60 min (ties: the earlier one, then
     the lower value); 1 if its class is the target's class, else 0; NaN if none.
   * ``monH`` (H = 30, 60, 120 min): measurements in [ecg_time, ecg_time + H]; 1 if any has the
     target's class, else 0; both directions NaN when the window holds a low *and* a high value;
     NaN if none. Window ends are inclusive.
4. **Target filter** (:func:`select_targets`): per task, a target is kept only with ≥ 10
   positives and ≥ 10 negatives in fold 18 *and* in fold 19.
5. **Cohort** (:func:`build_cohort`): every ECG record with a ``strat_fold`` and at least one
   non-missing kept target; :func:`write_labels` writes the wide label table in cohort order.

Tables the caller provides in the DuckDB connection: ``ecg(rn, subject_id, study_id, ecg_time,
strat_fold, path)``, one row per ECG record, ``rn`` its position in ``record_list.csv``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fhir_mappings.tasks import TASK_WINDOW_MIN, TASKS
from model_training.mimic_tables import execute, read_csv_sql, sql_name, sql_string

logger = logging.getLogger(__name__)


HORIZON_MIN: dict[str, int] = {task: end for task, (_, end) in TASK_WINDOW_MIN.items() if task != "est"}
"""Forecast horizon of each monitoring task, minutes after the ECG (the end of its window in fhir_mappings)."""

EST_WINDOW_MIN: int = -TASK_WINDOW_MIN["est"][0]
"""Estimation window half-width, minutes either side of the ECG (fhir_mappings ``TASK_WINDOW_MIN``)."""

ABNORMAL_RULES: tuple[str, ...] = ("strict", "inclusive")
"""How a value is compared with its thresholds: ``<``/``>`` (reference code) or ``≤``/``≥`` (paper text)."""

MIN_MEASUREMENTS: int = 200
"""A lab needs at least this many rows (of its main fluid) to become a target."""

MIN_CLASS_COUNT: int = 10
"""A target needs this many positives and this many negatives in each evaluation fold."""

EVAL_FOLDS: tuple[int, ...] = (18, 19)
"""Validation and test folds of ``strat_fold`` (train = 0–17)."""

EXCLUDED_LABELS: tuple[str, ...] = ("other",)
"""``d_labitems.label`` values that are not a lab value."""

SERUM_INDEX_LABELS: tuple[str, ...] = ("H", "I", "L")
"""Haemolysis, icterus and lipaemia indices: specimen-quality flags, not patient values."""

DIRECTIONS: tuple[str, ...] = ("low", "high")
_CLASS_CODE: dict[str, int] = {"low": 1, "high": 2}

_BUCKET_S: int = 3 * 3600
"""Time bucket for the window join; the whole [−60, +120] min window spans at most two buckets."""


@dataclass(frozen=True)
class UnitRule:
    """How one label's units are harmonised before the fluid and count filters.

    ``drop_units`` rows are removed (a different scale in a minority of rows); every remaining
    row is then reported in ``unit``. Values are never rescaled: the reference code only relabels,
    and thresholds come from the same rows' reference ranges, so a relabel cannot move a class.
    """

    label: str
    unit: str
    drop_units: tuple[str, ...] = ()
    note: str = ""


UNIT_RULES: tuple[UnitRule, ...] = (
    UnitRule("pH", "units"),
    UnitRule("Specific Gravity", "", note="dimensionless"),
    UnitRule("MCHC", "g/dL"),
    UnitRule("Absolute Lymphocyte Count", "K/uL", ("#/uL",), "rows in #/uL dropped (minority, other scale)"),
    UnitRule("Protein/Creatinine Ratio", "mg/mg"),
    UnitRule(
        "D-Dimer", "ng/mL", ("ng/mL DDU",), "rows in ng/mL DDU dropped (D-dimer units, half the FEU value)"
    ),
    UnitRule("Thyroid Stimulating Hormone", "uIU/mL"),
    UnitRule("Cortisol", "ug/dL"),
    UnitRule("RDW-SD", "fL"),
    UnitRule("Albumin/Creatinine, Urine", "mg/g"),
    UnitRule("C-Reactive Protein", "mg/L"),
    UnitRule("eAG", "mg/dL"),
    UnitRule("Absolute CD3 Count", "#/uL"),
    UnitRule("Absolute CD4 Count", "#/uL"),
    UnitRule("Absolute CD8 Count", "#/uL"),
    UnitRule("CD4/CD8 Ratio", "ratio"),
    UnitRule("WBC Count", "K/uL"),
    UnitRule(
        "Prostate Specific Antigen",
        "ng/mL",
        note="the reference code relabels this 'mg/dL', which is no PSA unit; MIMIC reports ng/mL",
    ),
)
"""Unit harmonisation (method §1.2 step 3), as data.

Which labels and which dropped units follow the reference ``preprocessing.py``. What cannot be
known precisely: the *target* spelling for ``Absolute Lymphocyte Count`` (the reference drops
``#/uL`` but names no unit; MIMIC reports the rest in K/uL) and the PSA unit noted above. Units
only label ``thresholds.json``; they never change a value or a class.
"""

ROW_FILTERS: tuple[tuple[str, str], ...] = (
    ("valuenum_missing", "valuenum is empty (text-only result)"),
    ("charttime_missing", "charttime is empty"),
    ("label_missing", "itemid not in d_labitems or its label is empty"),
    ("label_other", "d_labitems label is 'other'"),
    ("zero_reference_range", "ref_range_lower == ref_range_upper == 0"),
    ("serum_index_label", "label is H, I or L (specimen quality index)"),
    ("fluid_missing", "d_labitems fluid is empty"),
    ("unit_dropped", "unit removed by the harmonisation table"),
)
"""Row-level drop reasons, in the order they are tested (a row counts under its first reason)."""


@dataclass
class LabThreshold:
    """One lab that passed the label-level filters, with its thresholds and class counts."""

    label: str
    fluid: str
    lower: float | None
    upper: float | None
    unit: str | None
    itemids: list[int]
    count: int
    class_counts: dict[str, int] = field(default_factory=dict)

    @property
    def directions(self) -> list[str]:
        """Non-normal classes that occur: the target directions of this lab."""
        return [d for d in DIRECTIONS if self.class_counts.get(d, 0) > 0]

    def to_json(self) -> dict[str, Any]:
        """The ``thresholds.json`` entry."""
        out = asdict(self)
        del out["label"]
        out["directions"] = self.directions
        return out


def target_name(label: str, direction: str, task: str) -> str:
    """Column name of a target: ``{label}_{low|high}_{task}`` (label verbatim from d_labitems)."""
    return f"{label}_{direction}_{task}"


def _median(histogram: list[tuple[float, int]]) -> float | None:
    """Median of values given as (value, count) pairs, NaN/None ignored, pandas semantics."""
    pairs = sorted((v, n) for v, n in histogram if v is not None and v == v)
    total = sum(n for _, n in pairs)
    if total == 0:
        return None
    wanted = [(total - 1) // 2, total // 2]
    found: list[float] = []
    seen = 0
    for value, n in pairs:
        while wanted and wanted[0] < seen + n:
            found.append(value)
            wanted.pop(0)
        seen += n
    return (found[0] + found[1]) / 2.0


def load_lab_rows(con: Any, labevents: Path, d_labitems: Path) -> dict[str, int]:
    """Stream ``labevents`` into table ``lab`` (subjects with an ECG only) with a drop reason per row.

    The reason is computed in the same streaming pass (joining the small ``items`` table costs
    next to nothing next to parsing the CSV), so the 158 M-row file is read once and never
    rewritten. Creates tables ``items(itemid, label, fluid)`` and ``lab(subject_id, itemid, charttime,
    valuenum, valueuom, lower, upper, reason)``; ``reason`` is NULL for kept rows, else the index
    into :data:`ROW_FILTERS`.

    Returns:
        ``rows_of_subjects_with_ecg`` plus one count per :data:`ROW_FILTERS` reason and ``kept``.
    """
    execute(
        con,
        f"CREATE OR REPLACE TABLE items AS SELECT itemid, label, fluid FROM {read_csv_sql(d_labitems, 'd_labitems')} "
        "QUALIFY row_number() OVER (PARTITION BY itemid) = 1",
        str(d_labitems),
    )
    dropped_units = " OR ".join(
        f"(i.label = {sql_string(rule.label)} AND l.valueuom = {sql_string(unit)})"
        for rule in UNIT_RULES
        for unit in rule.drop_units
    )
    excluded = ", ".join(sql_string(x) for x in EXCLUDED_LABELS)
    index_labels = ", ".join(sql_string(x) for x in SERUM_INDEX_LABELS)
    execute(
        con,
        f"""
        CREATE OR REPLACE TABLE lab AS
        SELECT l.subject_id, l.itemid, l.charttime, l.valuenum, l.valueuom,
               l.ref_range_lower AS lower, l.ref_range_upper AS upper,
               CASE
                 WHEN l.valuenum IS NULL OR isnan(l.valuenum) THEN 0
                 WHEN l.charttime IS NULL THEN 1
                 WHEN i.label IS NULL OR trim(i.label) = '' THEN 2
                 WHEN i.label IN ({excluded}) THEN 3
                 WHEN coalesce(l.ref_range_lower = 0 AND l.ref_range_upper = 0, false) THEN 4
                 WHEN i.label IN ({index_labels}) THEN 5
                 WHEN i.fluid IS NULL OR trim(i.fluid) = '' THEN 6
                 WHEN {dropped_units or "false"} THEN 7
               END::TINYINT AS reason
        FROM {read_csv_sql(labevents, "labevents")} AS l
        LEFT JOIN items AS i USING (itemid)
        WHERE l.subject_id IN (SELECT DISTINCT subject_id FROM ecg)
        """,
        str(labevents),
    )
    rows = dict(execute(con, "SELECT reason, count(*) FROM lab GROUP BY reason", "lab").fetchall())
    counts = {"rows_of_subjects_with_ecg": int(sum(rows.values()))}
    for index, (name, _) in enumerate(ROW_FILTERS):
        counts[name] = int(rows.get(index, 0))
    counts["kept"] = int(rows.get(None, 0))
    return counts


def derive_thresholds(con: Any, abnormal_rule: str = "strict") -> tuple[list[LabThreshold], dict[str, Any]]:
    """Choose each label's fluid, apply the ≥200 rule, derive median thresholds and classes (``abnormal_rule``).

    Creates table ``thr(label_id, label, fluid, lower, upper)`` holding the labs that passed,
    ``label_id`` being the position in the returned (label-sorted) list. Returns the passing labs,
    and a report of every label-level decision with counts.
    """
    groups = execute(
        con,
        """
        SELECT i.label, i.fluid, l.itemid, l.valueuom, count(*) AS n
        FROM lab AS l JOIN items AS i USING (itemid)
        WHERE l.reason IS NULL GROUP BY ALL
        """,
        "lab",
    ).fetchall()
    per_fluid: dict[str, dict[str, int]] = {}
    for label, fluid, _itemid, _unit, n in groups:
        per_fluid.setdefault(label, {}).setdefault(fluid, 0)
        per_fluid[label][fluid] += int(n)
    chosen: dict[str, str] = {}
    minority_rows = 0
    for label, fluids in per_fluid.items():
        best = max(sorted(fluids), key=lambda f: fluids[f])  # max keeps the first (alphabetical) of ties
        chosen[label] = best
        minority_rows += sum(n for f, n in fluids.items() if f != best)
    counts = {label: per_fluid[label][fluid] for label, fluid in chosen.items()}
    too_few = sorted(label for label, n in counts.items() if n < MIN_MEASUREMENTS)
    kept = sorted(label for label, n in counts.items() if n >= MIN_MEASUREMENTS)
    rules = {rule.label: rule for rule in UNIT_RULES}
    labs: dict[str, LabThreshold] = {}
    for label in kept:
        fluid = chosen[label]
        rows = [(itemid, unit, int(n)) for lab_, f, itemid, unit, n in groups if lab_ == label and f == fluid]
        units: dict[str | None, int] = {}
        for _, unit, n in rows:
            units[unit] = units.get(unit, 0) + n
        unit = rules[label].unit if label in rules else max(sorted(units, key=str), key=lambda u: units[u])
        labs[label] = LabThreshold(
            label=label,
            fluid=fluid,
            lower=None,
            upper=None,
            unit=unit,
            itemids=sorted({int(itemid) for itemid, _, _ in rows}),
            count=counts[label],
        )
    execute(con, "CREATE OR REPLACE TABLE chosen (label VARCHAR, fluid VARCHAR)", "chosen")
    if labs:
        values = ", ".join(f"({sql_string(t.label)}, {sql_string(t.fluid)})" for t in labs.values())
        execute(con, f"INSERT INTO chosen VALUES {values}", "chosen")
    for column, attr in (("lower", "lower"), ("upper", "upper")):
        hist: dict[str, list[tuple[float, int]]] = {}
        for label, value, n in execute(
            con,
            f"""
            SELECT i.label, l.{column}, count(*)
            FROM lab AS l JOIN items AS i USING (itemid) JOIN chosen AS c ON c.label = i.label AND c.fluid = i.fluid
            WHERE l.reason IS NULL GROUP BY ALL
            """,
            "lab",
        ).fetchall():
            hist.setdefault(label, []).append((value, int(n)))
        for label, threshold in labs.items():
            setattr(threshold, attr, _median(hist.get(label, [])))
    ordered = [labs[label] for label in kept]
    _create_thr(con, ordered)
    cls = class_sql(abnormal_rule)
    class_rows = execute(
        con,
        f"""
        SELECT t.label_id, count(*) FILTER (WHERE {cls} = 1), count(*) FILTER (WHERE {cls} = 0), count(*) FILTER (WHERE {cls} = 2)
        FROM lab AS l JOIN items AS i USING (itemid) JOIN thr AS t ON t.label = i.label AND t.fluid = i.fluid
        WHERE l.reason IS NULL GROUP BY ALL
        """,
        "lab",
    ).fetchall()
    for label_id, n_low, n_normal, n_high in class_rows:
        ordered[label_id].class_counts = {"low": int(n_low), "normal": int(n_normal), "high": int(n_high)}
    single = [t.label for t in ordered if sum(1 for n in t.class_counts.values() if n > 0) <= 1]
    final = [t for t in ordered if t.label not in single]
    _create_thr(con, final)
    report = {
        "labels_after_row_filters": len(per_fluid),
        "rows_not_in_main_fluid": minority_rows,
        "labels_fewer_than_200_rows": {label: counts[label] for label in too_few},
        "labels_single_class": single,
        "labels_kept": len(final),
        "candidate_targets": sum(len(t.directions) for t in final),
    }
    return final, report


def class_sql(abnormal_rule: str) -> str:
    """SQL class of a lab row ``l`` against its label's thresholds ``t``: 1 low, 2 high, 0 normal."""
    if abnormal_rule not in ABNORMAL_RULES:
        raise ValueError(f"abnormal_rule must be one of {ABNORMAL_RULES}, got {abnormal_rule!r}")
    low, high = ("<", ">") if abnormal_rule == "strict" else ("<=", ">=")
    return f"(CASE WHEN l.valuenum {low} t.lower THEN 1 WHEN l.valuenum {high} t.upper THEN 2 ELSE 0 END)"


def _create_thr(con: Any, labs: list[LabThreshold]) -> None:
    """(Re)create table ``thr`` from ``labs``; ``label_id`` is the list position."""
    execute(
        con,
        "CREATE OR REPLACE TABLE thr (label_id INTEGER, label VARCHAR, fluid VARCHAR, lower DOUBLE, upper DOUBLE)",
        "thr",
    )
    if not labs:
        return

    def num(x: float | None) -> str:
        return "NULL" if x is None else repr(float(x))

    values = ", ".join(
        f"({i}, {sql_string(t.label)}, {sql_string(t.fluid)}, {num(t.lower)}, {num(t.upper)})"
        for i, t in enumerate(labs)
    )
    execute(con, f"INSERT INTO thr VALUES {values}", "thr")


def window_labels(con: Any, abnormal_rule: str = "strict") -> int:
    """Create ``per_lab``: one row per (ECG, lab) with a measurement in [−60, +120] min (classes by ``abnormal_rule``).

    Columns: ``rn``, ``label_id``, ``est`` (class of the closest measurement within ±60 min or
    NULL), and per horizon H ``mH`` (any measurement in [0, H]), ``mH_low``, ``mH_high`` (any low /
    high one there).

    Returns:
        Number of (ECG, lab) rows.
    """
    before, after = EST_WINDOW_MIN * 60, max(HORIZON_MIN.values()) * 60
    monitor = ",\n".join(
        f"bool_or(d BETWEEN 0 AND {h * 60}) AS m{h}, "
        f"bool_or(d BETWEEN 0 AND {h * 60} AND cls = 1) AS m{h}_low, "
        f"bool_or(d BETWEEN 0 AND {h * 60} AND cls = 2) AS m{h}_high"
        for h in HORIZON_MIN.values()
    )
    execute(
        con,
        f"""
        CREATE OR REPLACE TABLE per_lab AS
        WITH k AS (
            SELECT l.subject_id, t.label_id, epoch(l.charttime) AS t, l.valuenum AS v,
                   {class_sql(abnormal_rule)}::TINYINT AS cls,
                   floor(epoch(l.charttime) / {_BUCKET_S})::BIGINT AS b
            FROM lab AS l JOIN items AS i USING (itemid) JOIN thr AS t ON t.label = i.label AND t.fluid = i.fluid
            WHERE l.reason IS NULL
        ),
        e AS (
            SELECT rn, subject_id, epoch(ecg_time) AS t0,
                   unnest(range(floor((epoch(ecg_time) - {before}) / {_BUCKET_S})::BIGINT,
                                floor((epoch(ecg_time) + {after}) / {_BUCKET_S})::BIGINT + 1)) AS b
            FROM ecg WHERE ecg_time IS NOT NULL
        ),
        pairs AS (
            SELECT e.rn, k.label_id, k.t - e.t0 AS d, k.t, k.v, k.cls
            FROM e JOIN k ON k.subject_id = e.subject_id AND k.b = e.b
            WHERE k.t - e.t0 BETWEEN -{before} AND {after}
        )
        SELECT rn, label_id,
               arg_min(cls, (abs(d), d, v)) FILTER (WHERE abs(d) <= {before}) AS est,
               {monitor}
        FROM pairs GROUP BY rn, label_id
        """,
        "lab/ecg window join",
    )
    return int(execute(con, "SELECT count(*) FROM per_lab", "per_lab").fetchone()[0])


def value_sql(task: str, direction: str) -> str:
    """SQL over a ``per_lab`` row giving the target value: 1.0, 0.0 or NULL (missing)."""
    code = _CLASS_CODE[direction]
    if task == "est":
        return f"(CASE WHEN est IS NULL THEN NULL WHEN est = {code} THEN 1.0 ELSE 0.0 END)"
    h = HORIZON_MIN[task]
    return (
        f"(CASE WHEN NOT m{h} OR (m{h}_low AND m{h}_high) THEN NULL "
        f"WHEN m{h}_{direction} THEN 1.0 ELSE 0.0 END)"
    )


def _present_sql(task: str) -> str:
    """SQL over a ``per_lab`` row: true when the task's targets of that lab are not missing."""
    if task == "est":
        return "est IS NOT NULL"
    h = HORIZON_MIN[task]
    return f"(m{h} AND NOT (m{h}_low AND m{h}_high))"


def select_targets(
    con: Any, labs: list[LabThreshold], min_count: int = MIN_CLASS_COUNT
) -> tuple[dict[str, list[tuple[int, str]]], dict[str, Any]]:
    """Per task, keep targets with ≥10 positives and ≥10 negatives in fold 18 and in fold 19.

    ``min_count`` replaces the 10 (the method's value is the default; smaller values only make
    sense for quick runs on a few hundred synthetic ECGs, whose evaluation folds are tiny).

    Returns task → kept (label_id, direction) in label order, and per task and candidate target its
    fold-18/19 counts and the decision.
    """
    candidates = [(i, d) for i, lab in enumerate(labs) for d in lab.directions]
    # The value of a target depends only on (task, direction) given its lab's per_lab row, so one
    # grouped aggregate over (label, fold) counts every candidate at once.
    combos = [(task, direction) for task in TASKS for direction in DIRECTIONS]
    counters = ", ".join(
        f"count(*) FILTER (WHERE {value_sql(task, direction)} = 1) AS {sql_name(f'p_{task}_{direction}')}, "
        f"count(*) FILTER (WHERE {value_sql(task, direction)} = 0) AS {sql_name(f'n_{task}_{direction}')}"
        for task, direction in combos
    )
    folds = ", ".join(str(f) for f in EVAL_FOLDS)
    cur = execute(
        con,
        f"SELECT p.label_id, e.strat_fold, {counters} FROM per_lab AS p JOIN ecg AS e USING (rn) "
        f"WHERE e.strat_fold IN ({folds}) GROUP BY ALL",
        "per_lab",
    )
    names = [d[0] for d in cur.description]
    by_fold: dict[tuple[int, int], dict[str, int]] = {}
    for row in cur.fetchall():
        record = dict(zip(names, row, strict=True))
        key = (int(record.pop("label_id")), int(record.pop("strat_fold")))
        by_fold[key] = {k: int(v) for k, v in record.items()}
    kept: dict[str, list[tuple[int, str]]] = {task: [] for task in TASKS}
    report: dict[str, Any] = {}
    for task in TASKS:
        task_report: dict[str, Any] = {}
        for label_id, direction in candidates:
            per_fold = {}
            ok = True
            for fold in EVAL_FOLDS:
                stats = by_fold.get((label_id, fold), {})
                pos, neg = stats.get(f"p_{task}_{direction}", 0), stats.get(f"n_{task}_{direction}", 0)
                per_fold[str(fold)] = {"pos": pos, "neg": neg}
                ok = ok and pos >= min_count and neg >= min_count
            if ok:
                kept[task].append((label_id, direction))
            task_report[target_name(labs[label_id].label, direction, task)] = {"kept": ok, "folds": per_fold}
        report[task] = task_report
    return kept, report


def build_cohort(con: Any, kept: dict[str, list[tuple[int, str]]]) -> dict[str, int]:
    """Create ``cohort``: ECG records with a ``strat_fold`` and ≥1 non-missing kept target, in ``rn`` order.

    Returns counts: records with any lab in the windows, with a kept target, and with a strat_fold too.
    """
    clauses = []
    for task in TASKS:
        ids = sorted({label_id for label_id, _ in kept[task]})
        if ids:
            clauses.append(f"(label_id IN ({', '.join(map(str, ids))}) AND {_present_sql(task)})")
    labelled = " OR ".join(clauses) or "false"
    execute(
        con,
        f"""
        CREATE OR REPLACE TABLE labelled AS SELECT DISTINCT rn FROM per_lab WHERE {labelled};
        CREATE OR REPLACE TABLE cohort AS
        SELECT e.rn, e.study_id, e.subject_id, e.ecg_time, e.strat_fold, e.path
        FROM ecg AS e WHERE e.strat_fold IS NOT NULL AND e.rn IN (SELECT rn FROM labelled)
        ORDER BY e.rn
        """,
        "per_lab",
    )

    def count(sql: str) -> int:
        return int(execute(con, sql, "cohort").fetchone()[0])

    return {
        "records_with_a_lab_in_window": count("SELECT count(DISTINCT rn) FROM per_lab"),
        "records_with_a_kept_target": count("SELECT count(*) FROM labelled"),
        "records_without_strat_fold": count(
            "SELECT count(*) FROM labelled JOIN ecg USING (rn) WHERE ecg.strat_fold IS NULL"
        ),
        "cohort": count("SELECT count(*) FROM cohort"),
    }


def write_labels(
    con: Any,
    labs: list[LabThreshold],
    kept: dict[str, list[tuple[int, str]]],
    path: Path,
    chunk_rows: int = 200_000,
) -> list[str]:
    """Write ``labels.parquet``: ``study_id`` + one float32 column per kept target, in cohort order.

    Columns are task-major (est, mon30, mon60, mon120), labels sorted, low before high. The wide
    table is assembled in numpy ``chunk_rows`` ECGs at a time from the long ``per_lab`` rows (one
    pass over each lab's rows per chunk, instead of one SQL ``CASE`` per target per row), so memory
    stays bounded at MIMIC scale (~800 k ECGs × hundreds of targets). Returns the target column names.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    targets = [(task, label_id, direction) for task in TASKS for label_id, direction in kept[task]]
    names = [target_name(labs[label_id].label, direction, task) for task, label_id, direction in targets]
    ids = sorted({label_id for _, label_id, _ in targets})
    monitor = ", ".join(f"p.m{h}, p.m{h}_low, p.m{h}_high" for h in HORIZON_MIN.values())
    execute(
        con,
        f"""
        CREATE OR REPLACE TABLE cohort_pos AS
        SELECT rn, study_id, (row_number() OVER (ORDER BY rn) - 1)::BIGINT AS pos FROM cohort;
        CREATE OR REPLACE TABLE label_rows AS
        SELECT c.pos, p.label_id, coalesce(p.est, -1)::TINYINT AS est, {monitor}
        FROM per_lab AS p JOIN cohort_pos AS c USING (rn)
        WHERE p.label_id IN ({", ".join(map(str, ids)) or "NULL"})
        ORDER BY c.pos, p.label_id;
        """,
        "labels",
    )
    n = int(execute(con, "SELECT count(*) FROM cohort_pos", "labels").fetchone()[0])
    schema = pa.schema([("study_id", pa.int64()), *((name, pa.float32()) for name in names)])
    with pq.ParquetWriter(path, schema, compression="zstd", compression_level=1) as writer:
        for start in range(0, max(n, 1), chunk_rows):
            stop = min(start + chunk_rows, n)
            study = execute(
                con,
                f"SELECT study_id FROM cohort_pos WHERE pos >= {start} AND pos < {stop} ORDER BY pos",
                "labels",
            ).fetchnumpy()["study_id"]
            rows = execute(
                con,
                f"SELECT * FROM label_rows WHERE pos >= {start} AND pos < {stop} ORDER BY label_id, pos",
                "labels",
            ).fetchnumpy()
            label_ids = np.asarray(rows["label_id"])
            bounds = {
                k: (int(np.searchsorted(label_ids, k, "left")), int(np.searchsorted(label_ids, k, "right")))
                for k in ids
            }
            columns = []
            for task, label_id, direction in targets:
                lo, hi = bounds[label_id]
                pos = np.asarray(rows["pos"][lo:hi]) - start
                column = np.full(stop - start, np.nan, dtype=np.float32)
                if task == "est":
                    est = np.asarray(rows["est"][lo:hi])
                    present = est >= 0
                    value = est == _CLASS_CODE[direction]
                else:
                    h = HORIZON_MIN[task]
                    low, high = np.asarray(rows[f"m{h}_low"][lo:hi]), np.asarray(rows[f"m{h}_high"][lo:hi])
                    present = np.asarray(rows[f"m{h}"][lo:hi]) & ~(low & high)
                    value = low if direction == "low" else high
                column[pos[present]] = value[present].astype(np.float32)
                columns.append(pa.array(column, pa.float32(), mask=np.isnan(column)))  # missing = null
            writer.write_table(pa.Table.from_arrays([pa.array(study, pa.int64()), *columns], schema=schema))
            if n == 0:
                break
    execute(con, "DROP TABLE label_rows", "labels")
    return names
