"""MIMIC value formats, random identifiers and the deterministic CSV writer of the generator.

MIMIC writes times as ``YYYY-MM-DD HH:MM:SS`` (whole minutes here), numbers as fixed-decimal text
and provider ids as ``P`` + five characters; gzip files get ``mtime=0`` so the same seed gives
byte-identical output.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd


def write_csv(df: pd.DataFrame, path: Path, columns: Sequence[str]) -> None:
    """Write ``df[columns]`` as CSV (gzip with mtime 0 when the name ends in .gz)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    df.loc[:, list(columns)].to_csv(buffer, index=False, lineterminator="\n")
    data = buffer.getvalue().encode("utf-8")
    if path.suffix == ".gz":
        data = gzip.compress(data, compresslevel=6, mtime=0)
    path.write_bytes(data)


def fmt_times(values: np.ndarray, unit: Literal["s", "D"] = "s") -> np.ndarray:
    """Format datetime64 values like MIMIC (``YYYY-MM-DD HH:MM:SS`` or a date); NaT becomes ''."""
    minutes = np.asarray(values, dtype="datetime64[m]")
    if minutes.size == 0:
        return np.array([], dtype=object)
    iso = np.datetime_as_string(minutes.astype(np.dtype(f"datetime64[{unit}]")), unit=unit)
    return np.where(np.isnat(minutes), "", np.char.replace(iso, "T", " ")).astype(object)


def num_text(values: np.ndarray, decimals: int) -> np.ndarray:
    """Format numbers as MIMIC's text ``value`` column (fixed decimals)."""
    return np.char.mod(f"%.{decimals}f", np.asarray(values, dtype=float)).astype(object)


def strip_zero(text: np.ndarray) -> np.ndarray:
    """Drop a trailing ``.0`` (OMR writes whole heights and weights without decimals)."""
    return np.array([t[:-2] if t.endswith(".0") else t for t in text], dtype=object)


def unique_ids(rng: np.random.Generator, lo: int, hi: int, n: int) -> np.ndarray:
    """``n`` distinct random integers in ``[lo, hi)``."""
    return lo + rng.choice(hi - lo, size=n, replace=False).astype(np.int64)


def minutes(values: np.ndarray) -> np.ndarray:
    """Whole minutes as ``timedelta64[m]`` (MIMIC times carry no seconds)."""
    return np.asarray(np.rint(values), dtype=np.int64).astype("timedelta64[m]")


def provider_ids(rng: np.random.Generator, n: int, present: float) -> np.ndarray:
    """Anonymous provider ids like MIMIC's ``P`` + 5 alphanumerics, some missing."""
    alphabet = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))
    pool = np.array(["P" + "".join(alphabet[rng.integers(0, 36, 5)]) for _ in range(400)])
    ids = pool[rng.integers(0, pool.size, n)]
    return np.where(rng.random(n) < present, ids, "").astype(object)
