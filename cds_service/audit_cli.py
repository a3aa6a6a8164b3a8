"""``ecglab audit``: export or purge the hook audit trail (:mod:`cds_service.audit`).

Usage::

    ecglab audit export --since 2026-01-01 --format csv --out audit.csv
    ecglab audit export --since 2026-01-01T00:00Z --until 2026-02-01T00:00Z --format parquet --out jan.parquet
    ecglab audit purge --older-than-days 365

The database is ``--database-url``, else ``$ECGLAB_DATABASE_URL``, else the service's default.
Times are ISO 8601; a time without a zone is read as UTC. Exported rows hold the keyed patient
hash, never a patient id; JSON columns (predictions, cards, features, missing inputs) are exported
as JSON text. Parquet needs ``pyarrow`` (in the ``train`` extra), imported only when asked for.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fhir_mappings.errors import InputError

#: Rows per Parquet row group, so an export of any size runs in bounded memory.
PARQUET_CHUNK_ROWS = 10_000


def parse_cli_time(value: str, flag: str) -> datetime:
    """An ISO 8601 date or date-time from a command-line flag, as aware UTC (naive = UTC)."""
    text = value.strip()
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InputError(f"{flag}: {value!r} is not an ISO 8601 date or date-time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def default_database_url() -> str:
    """``$ECGLAB_DATABASE_URL`` (validated as the service does), else the service's default URL."""
    from cds_service.settings import Settings

    fields = {f.name: f for f in dataclasses.fields(Settings)}
    spec = fields["database_url"]
    raw = os.environ.get(spec.metadata["env"])
    if raw is not None:
        return str(spec.metadata["parser"](raw, spec.metadata["env"]))
    return str(spec.default)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``export`` and ``purge`` actions with their flags."""
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    export = actions.add_parser("export", help="write the audit rows of a time range to CSV or Parquet")
    export.add_argument(
        "--since", required=True, help="first creation time to export (ISO 8601, UTC if no zone)"
    )
    export.add_argument("--until", help="export rows created before this time (default: now)")
    export.add_argument(
        "--format", choices=("csv", "parquet"), default="csv", help="output format (default csv)"
    )
    export.add_argument("--out", type=Path, required=True, help="output file")
    export.add_argument(
        "--database-url", help="SQLAlchemy URL (default: $ECGLAB_DATABASE_URL or the service default)"
    )
    purge = actions.add_parser("purge", help="delete audit rows older than the retention period")
    purge.add_argument(
        "--older-than-days",
        type=float,
        required=True,
        help="delete rows created more than this many days ago",
    )
    purge.add_argument(
        "--database-url", help="SQLAlchemy URL (default: $ECGLAB_DATABASE_URL or the service default)"
    )


def run(args: argparse.Namespace) -> int:
    """Dispatch to the chosen action."""
    from cds_service.db import init_db, make_engine

    engine = make_engine(args.database_url or default_database_url())
    init_db(engine)
    if args.action == "purge":
        from cds_service.audit import purge_audit

        if not args.older_than_days > 0:
            raise InputError("--older-than-days must be positive")
        removed = purge_audit(engine, timedelta(days=args.older_than_days))
        print(f"purged {removed} audit row(s) older than {args.older_than_days:g} day(s)")
        return 0
    since = parse_cli_time(args.since, "--since")
    until = parse_cli_time(args.until, "--until") if args.until else None
    if until is not None and until <= since:
        raise InputError("--until must be later than --since")
    written = export_audit(engine, since, until, args.format, args.out)
    print(f"wrote {written} audit row(s) to {args.out}", file=sys.stderr)
    return 0


def export_audit(engine: Any, since: datetime, until: datetime | None, fmt: str, out: Path) -> int:
    """Write the rows of ``[since, until)`` to ``out`` as ``csv`` or ``parquet``; returns the row count."""
    from cds_service.audit import EXPORT_COLUMNS, export_rows, iter_audit

    if fmt == "parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ModuleNotFoundError:
            raise InputError(
                "--format parquet needs the pyarrow package (pip install pyarrow, or the 'train' extra); "
                "use --format csv otherwise"
            ) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = export_rows(iter_audit(engine, since, until))
    if fmt == "csv":
        count = 0
        with out.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(EXPORT_COLUMNS))
            writer.writeheader()
            for row in rows:
                writer.writerow({k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()})
                count += 1
        return count
    schema = pa.schema([(name, _arrow_type(pa, name)) for name in EXPORT_COLUMNS])
    count = 0
    with pq.ParquetWriter(out, schema) as writer:
        while chunk := list(itertools.islice(rows, PARQUET_CHUNK_ROWS)):
            writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
            count += len(chunk)
    return count


def _arrow_type(pa: Any, column: str) -> Any:
    """The Arrow type of an export column: times as UTC timestamps, JSON columns as text."""
    if column in ("created_at", "ecg_time"):
        return pa.timestamp("us", tz="UTC")
    if column == "id":
        return pa.int64()
    if column == "latency_ms":
        return pa.float64()
    return pa.string()
