"""Where the MIMIC-IV source tables live, which columns we read from them, and how DuckDB reads them.

``ecglab preprocess`` reads eleven tables from four PhysioNet releases (method §2.1). This module
knows their layout, checks every file and column *before* any long step runs (so a typo fails in
a second with a message naming the file or column, not after an hour), and builds the DuckDB
``read_csv`` expressions that stream them. Only the columns listed here are read; DuckDB skips
the others without parsing them, which matters for the 158 M-row ``labevents``.

Layout under ``--mimic-root ROOT`` (the PhysioNet download layout)::

    ROOT/mimic-iv/3.1/hosp/{labevents,d_labitems,patients,admissions,omr}.csv.gz
    ROOT/mimic-iv-ed/2.2/ed/{edstays,vitalsign}.csv.gz
    ROOT/mimic-iv-ecg/1.0/record_list.csv   (+ files/pNNNN/pSUBJECT/sSTUDY/STUDY.{hea,dat})
    ROOT/mimic-iv-ecg-ext-icd-labels/1.0.1/records_w_diag_icd10.csv

Each table may be stored as ``name.csv.gz`` or ``name.csv``.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fhir_mappings.errors import InputError

HOSP_TABLES: tuple[str, ...] = ("labevents", "d_labitems", "patients", "admissions", "omr")
ED_TABLES: tuple[str, ...] = ("edstays", "vitalsign")

COLUMNS: dict[str, dict[str, str]] = {
    "labevents": {
        "subject_id": "BIGINT",
        "itemid": "BIGINT",
        "charttime": "TIMESTAMP",
        "valuenum": "DOUBLE",
        "valueuom": "VARCHAR",
        "ref_range_lower": "DOUBLE",
        "ref_range_upper": "DOUBLE",
    },
    "d_labitems": {"itemid": "BIGINT", "label": "VARCHAR", "fluid": "VARCHAR"},
    "patients": {
        "subject_id": "BIGINT",
        "gender": "VARCHAR",
        "anchor_age": "DOUBLE",
        "anchor_year": "DOUBLE",
    },
    "admissions": {"subject_id": "BIGINT", "race": "VARCHAR"},
    "omr": {"subject_id": "BIGINT", "chartdate": "DATE", "result_name": "VARCHAR", "result_value": "VARCHAR"},
    "edstays": {"subject_id": "BIGINT", "race": "VARCHAR"},
    "vitalsign": {
        "subject_id": "BIGINT",
        "charttime": "TIMESTAMP",
        "temperature": "DOUBLE",
        "heartrate": "DOUBLE",
        "resprate": "DOUBLE",
        "o2sat": "DOUBLE",
        "sbp": "DOUBLE",
        "dbp": "DOUBLE",
    },
    "record_list": {"subject_id": "BIGINT", "study_id": "BIGINT", "ecg_time": "TIMESTAMP", "path": "VARCHAR"},
    "records_w_diag_icd10": {"study_id": "BIGINT", "strat_fold": "DOUBLE"},
}
"""Columns read from each table and the DuckDB type each is parsed as (all others are ignored)."""

_VERSION = re.compile(r"^\d+(\.\d+)*$")


@dataclass(frozen=True)
class MimicSources:
    """The four source locations: hosp folder, ED folder, ECG release folder, ECG-ICD csv file."""

    hosp: Path
    ed: Path
    ecg: Path
    ecg_icd: Path

    @classmethod
    def from_root(cls, root: Path) -> MimicSources:
        """Sources in the PhysioNet layout under ``root`` (see the module docstring)."""
        return cls(
            hosp=root / "mimic-iv" / "3.1" / "hosp",
            ed=root / "mimic-iv-ed" / "2.2" / "ed",
            ecg=root / "mimic-iv-ecg" / "1.0",
            ecg_icd=root / "mimic-iv-ecg-ext-icd-labels" / "1.0.1" / "records_w_diag_icd10.csv",
        )

    def table(self, name: str) -> Path:
        """Path of table ``name`` (``.csv.gz`` preferred over ``.csv``).

        Raises:
            InputError: naming the folder or file when it does not exist.
        """
        if name == "records_w_diag_icd10":
            if not self.ecg_icd.is_file():
                raise InputError(f"MIMIC-IV-ECG-ICD file not found: {self.ecg_icd}")
            return self.ecg_icd
        folder = self.hosp if name in HOSP_TABLES else self.ed if name in ED_TABLES else self.ecg
        if not folder.is_dir():
            raise InputError(f"MIMIC folder not found: {folder} (needed for {name})")
        for suffix in (".csv.gz", ".csv"):
            path = folder / f"{name}{suffix}"
            if path.is_file():
                return path
        raise InputError(f"MIMIC table not found: {folder / (name + '.csv.gz')} (or .csv)")

    def check(self) -> dict[str, Path]:
        """Resolve every table and check its header has the columns we read.

        Returns:
            table name → path.

        Raises:
            InputError: naming the missing folder, file or column.
        """
        paths = {name: self.table(name) for name in COLUMNS}
        for name, path in paths.items():
            header = read_header(path)
            missing = [column for column in COLUMNS[name] if column not in header]
            if missing:
                raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
        return paths

    def versions(self) -> dict[str, str | None]:
        """Release version of each source, read from the folder names (``mimic-iv/3.1/hosp`` → 3.1)."""

        def version(path: Path) -> str | None:
            for part in reversed(path.resolve().parts):
                if _VERSION.match(part):
                    return part
            return None

        return {
            "mimic-iv": version(self.hosp),
            "mimic-iv-ed": version(self.ed),
            "mimic-iv-ecg": version(self.ecg),
            "mimic-iv-ecg-ext-icd-labels": version(self.ecg_icd.parent),
        }


def read_header(path: Path) -> list[str]:
    """Column names of a (possibly gzipped) CSV file.

    Raises:
        InputError: naming the file when it cannot be read or is empty.
    """
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8", newline="") as fh:
                line = fh.readline()
        else:
            with path.open("r", encoding="utf-8", newline="") as fh:
                line = fh.readline()
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise InputError(f"{path}: cannot read CSV header ({exc})") from exc
    if not line.strip():
        raise InputError(f"{path}: empty file, expected a CSV header")
    return [name.strip() for name in next(csv.reader(io.StringIO(line)))]


def sql_string(value: str | Path) -> str:
    """A SQL string literal for ``value`` (single quotes doubled)."""
    return "'" + str(value).replace("'", "''") + "'"


def sql_name(name: str) -> str:
    """A quoted SQL identifier for ``name`` (double quotes doubled)."""
    return '"' + name.replace('"', '""') + '"'


def read_csv_sql(path: Path, table: str) -> str:
    """DuckDB ``read_csv(...)`` expression for a source table with our column types.

    Every column is read as text unless listed in :data:`COLUMNS`, so a column we never use cannot
    fail type detection; the listed ones are parsed directly as their declared type.
    """
    types = ", ".join(f"{sql_string(col)}: {sql_string(kind)}" for col, kind in COLUMNS[table].items())
    return f"read_csv({sql_string(path)}, header = true, all_varchar = true, types = {{{types}}})"


def connect(database: Path | None, *, memory_limit: str, threads: int, temp_dir: Path | None) -> Any:
    """A DuckDB connection with bounded memory, a thread cap and a spill folder.

    ``database`` ``None`` opens an in-memory database (small inputs); a path keeps large
    intermediate tables on disk so the working set can exceed ``memory_limit``.
    """
    import duckdb

    con = duckdb.connect(str(database) if database is not None else ":memory:")
    con.execute(f"SET memory_limit = {sql_string(memory_limit)}")
    con.execute(f"SET threads = {int(threads)}")
    con.execute("SET preserve_insertion_order = true")
    if temp_dir is not None:
        con.execute(f"SET temp_directory = {sql_string(temp_dir)}")
    return con


def execute(con: Any, sql: str, source: str) -> Any:
    """Run ``sql``; a parse or conversion error in a source file becomes an :class:`InputError`.

    Args:
        con: DuckDB connection.
        sql: the statement.
        source: the file(s) the statement reads, named in the error message.
    """
    import duckdb

    try:
        return con.execute(sql)
    except (duckdb.ConversionException, duckdb.InvalidInputException) as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(first[:3]) if first else type(exc).__name__
        raise InputError(f"{source}: cannot parse ({detail})") from exc
