"""Per-ECG metadata features from MIMIC-IV: demographics, ED vital signs and OMR biometrics (method §2.3).

Raw values are stored (``metadata.parquet``, NaN = missing); imputation happens in training with
training-fold medians. Keys, sources, unit factors, plausibility limits and windows come from
``fhir_mappings`` (:func:`fhir_mappings.load_mappings`), the contract the service reads too, so a
feature means the same on both sides.

* **sex**: ``patients.gender`` matched against the mapping's ``mimic_values`` (``M`` → 1), any
  other value → the default category (female, 0).
* **race**: the first entry per subject over ``admissions`` then ``edstays`` (file order), mapped
  by keyword in the mapping's rule order: contains WHITE → white, else BLACK, else HISPANIC, else
  ASIAN, else other (codes: index in the category list, asian 0 … white 4). The test runs on the
  upper-cased text, so "HISPANIC/LATINO - WHITE" is white, as in the reference code.
  *Deviation:* an empty race cell is skipped (the next entry is used) instead of crashing the
  keyword test; a subject with no entry is missing.
* **age**: the age at the ECG, ``anchor_age + (year of ecg_time − anchor_year)`` (MIMIC's
  ``anchor_age`` is the age in the shifted ``anchor_year``), kept only within the mapping's
  plausibility limits. *Deviation (issue 15, train/serve parity):* the reference code uses
  ``anchor_age`` itself; the service computes the age at the ECG from ``Patient.birthDate``
  (:func:`cds_service.features.completed_years`), so training now does the same. A missing
  ``anchor_year`` leaves ``anchor_age`` unshifted.
* **vital signs** (ED ``vitalsign``): per variable, the closest value within the window (±30 min)
  of ``ecg_time`` that is present and plausible (implausible values are blanked *before*
  choosing, as the reference code does; ties: the earlier, then the lower value).
* **biometrics** (hosp ``omr``): BMI, weight (lb × 0.453592 → kg) and height (in × 2.54 → cm),
  the closest plausible value within ±30 days. ``chartdate`` is a date; it is compared as that
  day's 00:00 with the ECG timestamp (as ``pandas.to_datetime`` does in the reference code), so an
  entry dated 30 days after the ECG day counts while one dated exactly 30 days before counts only
  for an ECG taken at midnight. Ties: the earlier date, then the lower value. The accepted
  ``result_name`` values are the mapping's (e.g. ``Weight (Lbs)`` and ``Weight``; the reference
  code reads only the first spelling).
* **BMI from weight and height** (*deviation*, as the service does, see
  :func:`cds_service.features.extract_metadata`): when no plausible BMI is within its window but
  the chosen weight and height are, BMI = weight / (height/100)², kept if plausible.

Plausibility limits are strict: a value below ``min`` or above ``max`` is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv

from fhir_mappings.errors import ConfigError, InputError
from model_training.mimic_tables import COLUMNS, execute, read_csv_sql, sql_name, sql_string

METADATA_COLUMNS: tuple[str, ...] = (
    "sex", "race", "age", "temperature", "heart_rate", "resp_rate", "spo2", "sbp", "dbp", "bmi", "weight", "height",
)  # fmt: skip
"""Columns of ``metadata.parquet`` after ``study_id``: the brief's feature keys in model order."""


@dataclass(frozen=True)
class Feature:
    """A continuous feature read from ``vitalsign`` or ``omr``, with conversion, limits and window.

    ``column`` is the ``vitalsign`` column; for ``omr`` features ``result_names`` lists the
    ``result_name`` values and ``factor`` converts ``result_value`` to the canonical unit. The
    window is ``[ecg_time - before_s, ecg_time + after_s]``, inclusive.
    """

    key: str
    table: str
    column: str
    result_names: tuple[str, ...]
    factor: float
    minimum: float | None
    maximum: float | None
    before_s: int
    after_s: int


@dataclass(frozen=True)
class MetadataSpec:
    """Everything the metadata step needs from the mapping contract."""

    features: tuple[Feature, ...]
    male_values: tuple[str, ...]
    male_code: int
    female_code: int
    race_keywords: tuple[tuple[str, int], ...]
    race_default: int
    age_limits: tuple[float | None, float | None] = (None, None)


def spec_from_mappings(mappings: Any = None) -> MetadataSpec:
    """Build the metadata spec from ``fhir_mappings`` (default: :func:`load_mappings`).

    Raises:
        ConfigError: when the mapping names a feature, table or column this step cannot read.
    """
    if mappings is None:
        from fhir_mappings import load_mappings

        mappings = load_mappings()
    keys = [f.key for f in mappings.features]
    if tuple(keys) != METADATA_COLUMNS:
        raise ConfigError(
            f"fhir_mappings features {keys} differ from the metadata columns {list(METADATA_COLUMNS)}"
        )
    features = []
    for f in mappings.features:
        if f.kind != "continuous" or f.key == "age":
            continue
        table = f.mimic.table.split("/")[-1]
        if table not in ("vitalsign", "omr"):
            raise ConfigError(
                f"fhir_mappings feature {f.key!r}: MIMIC table {f.mimic.table!r} is not ed/vitalsign or hosp/omr"
            )
        if f.mimic.column not in COLUMNS[table]:
            raise ConfigError(
                f"fhir_mappings feature {f.key!r}: column {f.mimic.column!r} is not read from {table}"
            )
        if f.window is None:
            raise ConfigError(f"fhir_mappings feature {f.key!r} has no window")
        limits = f.plausible
        features.append(
            Feature(
                key=f.key,
                table=table,
                column=f.mimic.column,
                result_names=tuple(f.mimic.result_names),
                factor=float(f.mimic.factor),
                minimum=None if limits is None else limits.min,
                maximum=None if limits is None else limits.max,
                before_s=int(f.window.before_min) * 60,
                after_s=int(f.window.after_min) * 60,
            )
        )
    sex = mappings.feature("sex")
    race = mappings.feature("race")
    age = mappings.feature("age").plausible
    male = next(r for r in sex.category_rules if r.category == "male")
    return MetadataSpec(
        features=tuple(features),
        male_values=tuple(male.mimic_values),
        male_code=sex.categories.index("male"),
        female_code=sex.categories.index(sex.default_category or "female"),
        race_keywords=tuple(
            (keyword, race.categories.index(rule.category))
            for rule in race.category_rules
            for keyword in rule.keywords
        ),
        race_default=race.categories.index(race.default_category or "other"),
        age_limits=(None, None) if age is None else (age.min, age.max),
    )


def _plausible_sql(expr: str, feature: Feature) -> str:
    """SQL: ``expr`` when present and within the feature's limits, else NULL."""
    return _within_sql(expr, feature.minimum, feature.maximum)


def _within_sql(expr: str, minimum: float | None, maximum: float | None) -> str:
    """SQL: ``expr`` when present and within [minimum, maximum] (either may be open), else NULL."""
    bad = [f"isnan({expr})"]
    if minimum is not None:
        bad.append(f"{expr} < {minimum!r}")
    if maximum is not None:
        bad.append(f"{expr} > {maximum!r}")
    return f"(CASE WHEN {' OR '.join(bad)} THEN NULL ELSE {expr} END)"


def age_sql(spec: MetadataSpec) -> str:
    """SQL over ``ecg AS e``: the age at the ECG, ``anchor_age + (year(ecg_time) − anchor_year)``, if plausible."""
    age = "(e.anchor_age + coalesce(year(e.ecg_time) - e.anchor_year, 0))::DOUBLE"
    return _within_sql(age, *spec.age_limits)


def bmi_sql(spec: MetadataSpec) -> str:
    """SQL over ``omr_closest AS o``: the charted BMI, else weight / (height/100)² when plausible."""
    by_key = {f.key: f for f in spec.features if f.table == "omr"}
    if not {"bmi", "weight", "height"} <= set(by_key):
        return "o.bmi" if "bmi" in by_key else "NULL"
    computed = _plausible_sql("(o.weight / ((o.height / 100.0) * (o.height / 100.0)))", by_key["bmi"])
    return f"coalesce(o.bmi, CASE WHEN o.height > 0 THEN {computed} END)"


def race_sql(column: str, spec: MetadataSpec) -> str:
    """SQL mapping a race text column to its code: first matching keyword in rule order, else the default."""
    whens = " ".join(
        f"WHEN upper({column}) LIKE {sql_string('%' + keyword + '%')} THEN {code}"
        for keyword, code in spec.race_keywords
    )
    return f"(CASE {whens} ELSE {spec.race_default} END)"


def _read_race(path: Path, source: int) -> pa.Table:
    """``subject_id, race`` of one table in file order, with ``source`` and row position columns."""
    try:
        table = pacsv.read_csv(
            path,
            convert_options=pacsv.ConvertOptions(
                include_columns=["subject_id", "race"],
                column_types={"subject_id": pa.int64(), "race": pa.string()},
            ),
        )
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{path}: cannot read subject_id/race ({str(exc).splitlines()[0]})") from exc
    n = table.num_rows
    return table.append_column("src", pa.array([source] * n, pa.int8())).append_column(
        "pos", pa.array(range(n), pa.int64())
    )


def build_metadata(
    con: Any, tables: dict[str, Path], path: Path, spec: MetadataSpec | None = None
) -> dict[str, Any]:
    """Write ``metadata.parquet`` (study_id + :data:`METADATA_COLUMNS`) for table ``cohort``, in its order.

    Needs tables ``cohort(rn, study_id, subject_id, ecg_time, ...)`` and ``ecg(rn, ecg_time, gender,
    anchor_age, anchor_year, ...)`` in ``con``; ``spec`` defaults to :func:`spec_from_mappings`.

    Returns:
        Counts: non-missing values per feature and the source rows used.
    """
    spec = spec or spec_from_mappings()
    admissions = _read_race(tables["admissions"], 0)
    edstays = _read_race(tables["edstays"], 1)
    con.register("race_admissions", admissions)
    con.register("race_edstays", edstays)
    execute(
        con,
        f"""
        CREATE OR REPLACE TABLE race AS
        SELECT subject_id, arg_min({race_sql("race", spec)}, (src, pos)) AS race
        FROM (SELECT * FROM race_admissions UNION ALL SELECT * FROM race_edstays)
        WHERE race IS NOT NULL AND trim(race) <> ''
          AND subject_id IN (SELECT subject_id FROM cohort)
        GROUP BY subject_id
        """,
        f"{tables['admissions']}, {tables['edstays']}",
    )
    con.unregister("race_admissions")
    con.unregister("race_edstays")

    cohort_times = "(SELECT rn, subject_id, epoch(ecg_time) AS t0 FROM cohort WHERE ecg_time IS NOT NULL)"
    vitals = [f for f in spec.features if f.table == "vitalsign"]
    cleaned = ", ".join(f"{_plausible_sql(sql_name(f.column), f)} AS {sql_name(f.key)}" for f in vitals)
    execute(
        con,
        f"""
        CREATE OR REPLACE TABLE vit AS
        SELECT subject_id, epoch(charttime) AS t, {cleaned}
        FROM {read_csv_sql(tables["vitalsign"], "vitalsign")}
        WHERE charttime IS NOT NULL AND subject_id IN (SELECT subject_id FROM cohort)
        """,
        str(tables["vitalsign"]),
    )
    closest_vitals = ", ".join(
        f"arg_min(v.{sql_name(f.key)}, (abs(v.t - c.t0), v.t, v.{sql_name(f.key)})) "
        f"FILTER (WHERE v.{sql_name(f.key)} IS NOT NULL AND v.t - c.t0 BETWEEN -{f.before_s} AND {f.after_s}) "
        f"AS {sql_name(f.key)}"
        for f in vitals
    )
    execute(
        con,
        f"""
        CREATE OR REPLACE TABLE vit_closest AS
        SELECT c.rn, {closest_vitals}
        FROM {cohort_times} AS c
        JOIN vit AS v ON v.subject_id = c.subject_id
         AND v.t - c.t0 BETWEEN -{max(f.before_s for f in vitals)} AND {max(f.after_s for f in vitals)}
        GROUP BY c.rn
        """,
        str(tables["vitalsign"]),
    )

    biometrics = [f for f in spec.features if f.table == "omr"]
    cases = " ".join(
        f"WHEN result_name IN ({', '.join(sql_string(n) for n in f.result_names)}) THEN {sql_string(f.key)}"
        for f in biometrics
    )
    plausible = " ".join(
        f"WHEN key = {sql_string(f.key)} THEN {_plausible_sql('raw * ' + repr(f.factor), f)}"
        for f in biometrics
    )
    execute(
        con,
        f"""
        CREATE OR REPLACE TABLE omr_rows AS
        SELECT subject_id, t, key, v FROM (
            SELECT subject_id, t, key, CASE {plausible} END AS v
            FROM (
                SELECT subject_id, epoch(chartdate::TIMESTAMP) AS t, CASE {cases} END AS key,
                       TRY_CAST(result_value AS DOUBLE) AS raw
                FROM {read_csv_sql(tables["omr"], "omr")}
                WHERE chartdate IS NOT NULL AND subject_id IN (SELECT subject_id FROM cohort)
            )
            WHERE key IS NOT NULL AND raw IS NOT NULL
        ) WHERE v IS NOT NULL
        """,
        str(tables["omr"]),
    )
    closest_omr = ", ".join(
        f"arg_min(o.v, (abs(o.t - c.t0), o.t, o.v)) "
        f"FILTER (WHERE o.key = {sql_string(f.key)} AND o.t - c.t0 BETWEEN -{f.before_s} AND {f.after_s}) "
        f"AS {sql_name(f.key)}"
        for f in biometrics
    )
    execute(
        con,
        f"""
        CREATE OR REPLACE TABLE omr_closest AS
        SELECT c.rn, {closest_omr}
        FROM {cohort_times} AS c
        JOIN omr_rows AS o ON o.subject_id = c.subject_id
         AND o.t - c.t0 BETWEEN -{max(f.before_s for f in biometrics)} AND {max(f.after_s for f in biometrics)}
        GROUP BY c.rn
        """,
        str(tables["omr"]),
    )

    male = ", ".join(sql_string(v.upper()) for v in spec.male_values) or "NULL"
    columns = [
        f"CASE WHEN upper(e.gender) IN ({male}) THEN {spec.male_code} ELSE {spec.female_code} END::DOUBLE AS sex",
        "r.race::DOUBLE AS race",
        f"{age_sql(spec)} AS age",
        *(f"v.{sql_name(f.key)}::DOUBLE AS {sql_name(f.key)}" for f in vitals),
        *(
            f"{bmi_sql(spec) if f.key == 'bmi' else 'o.' + sql_name(f.key)}::DOUBLE AS {sql_name(f.key)}"
            for f in biometrics
        ),
    ]
    execute(
        con,
        f"""
        COPY (
            SELECT c.study_id, {", ".join(columns)}
            FROM cohort AS c
            JOIN ecg AS e ON e.rn = c.rn
            LEFT JOIN race AS r ON r.subject_id = c.subject_id
            LEFT JOIN vit_closest AS v ON v.rn = c.rn
            LEFT JOIN omr_closest AS o ON o.rn = c.rn
            ORDER BY c.rn
        ) TO {sql_string(path)} (FORMAT parquet)
        """,
        "metadata",
    )
    present = execute(
        con,
        "SELECT "
        + ", ".join(f"count({sql_name(k)})" for k in METADATA_COLUMNS)
        + f" FROM read_parquet({sql_string(path)})",
        str(path),
    ).fetchone()
    return {
        "non_missing": dict(zip(METADATA_COLUMNS, (int(x) for x in present), strict=True)),
        "vitalsign_rows_of_cohort_subjects": int(
            execute(con, "SELECT count(*) FROM vit", "vit").fetchone()[0]
        ),
        "omr_rows_used": int(execute(con, "SELECT count(*) FROM omr_rows", "omr").fetchone()[0]),
    }
