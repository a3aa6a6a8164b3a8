"""``ecglab monitor``: measure the deployed model on the site's own patients.

Usage::

    ECGLAB_AUDIT_KEY=… ecglab monitor --fhir-url https://fhir.example.org/R4 --since 2026-01-01 --out monitor/2026-01

1. Read the audited hook calls of ``[--since, --until)`` for the model in ``--model`` (its ONNX
   SHA-256) from the audit table (``--database-url``, default the service's database).
2. Read every result of the audited targets' labs from the FHIR server for the ECG times ± the
   longest window (:mod:`cds_service.monitor.fhir_results`), keyed by the HMAC of the patient, and
   derive each (call, target) outcome with the training rule (:mod:`cds_service.monitor.outcomes`).
3. Write to ``--out``: ``report.json`` (per target and subgroup: realised AUROC, PPV and
   sensitivity at the deployed threshold, calibration, alert rate; input drift; feedback per lab;
   Prometheus gauges), ``report.html`` with plots, ``outcomes.csv`` (one row per call and target,
   no identifiers: the input of ``ecglab recalibrate``) and ``distribution.json`` (this period's
   input distribution, usable as a later run's ``--reference``).

The audit key (``$ECGLAB_AUDIT_KEY`` or ``--audit-key-file``) must be the service's: without it
no result can be matched to a call. The FHIR token comes from ``$ECGLAB_FHIR_TOKEN`` or ``--token``.
Patient ids are never logged, printed or written.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fhir_mappings.errors import InputError

#: How far before/after an ECG a result can decide an outcome (est: -60 min; mon120: +120 min).
LOOK_BEFORE = timedelta(minutes=60)
LOOK_AFTER = timedelta(minutes=120)
OUTCOME_COLUMNS = (
    "audit_id",
    "target",
    "lab_key",
    "task",
    "probability",
    "threshold",
    "outcome",
    "sex",
    "age_band",
    "mode",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The monitor's flags."""
    parser.add_argument("--fhir-url", required=True, help="FHIR R4 base URL to read lab results from")
    parser.add_argument(
        "--since", required=True, help="first audited call to include (ISO 8601, UTC if no zone)"
    )
    parser.add_argument("--until", help="include calls before this time (default: now)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument(
        "--database-url",
        help="SQLAlchemy URL of the audit table (default: $ECGLAB_DATABASE_URL or the service default)",
    )
    parser.add_argument(
        "--model",
        type=Path,
        help="deployed model folder or manifest (default: $ECGLAB_MODEL_DIR or the bundled model)",
    )
    parser.add_argument("--token", help="bearer token for --fhir-url (default: $ECGLAB_FHIR_TOKEN)")
    parser.add_argument(
        "--audit-key-file",
        type=Path,
        help="file holding the service's audit key (default: $ECGLAB_AUDIT_KEY)",
    )
    parser.add_argument(
        "--reference", type=Path, help="reference input distribution (a monitor distribution.json) for drift"
    )
    parser.add_argument(
        "--bootstrap", type=int, default=500, help="bootstrap resamples for AUROC CIs (default 500)"
    )
    parser.add_argument(
        "--min-class",
        type=int,
        default=10,
        help="outcomes of each class a target needs to enter the macro AUROC (default 10)",
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per FHIR request (default 30)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _audit_key(path: Path | None) -> bytes:
    """The audit key from ``--audit-key-file`` or ``$ECGLAB_AUDIT_KEY``."""
    from cds_service.audit import load_audit_key

    if path is not None:
        try:
            return load_audit_key(path.read_bytes(), f"--audit-key-file {path}")
        except OSError as exc:
            raise InputError(f"--audit-key-file {path}: cannot be read ({exc.strerror})") from None
    raw = os.environ.get("ECGLAB_AUDIT_KEY")
    if raw is None:
        raise InputError("the service's audit key is needed: set ECGLAB_AUDIT_KEY or pass --audit-key-file")
    return load_audit_key(raw)


def _model_dir(path: Path | None) -> Path:
    """``--model``, else ``$ECGLAB_MODEL_DIR``, else the service's default model folder."""
    if path is not None:
        return path
    from cds_service.settings import Settings

    spec = {f.name: f for f in dataclasses.fields(Settings)}["model_dir"]
    raw = os.environ.get(spec.metadata["env"])
    if raw:
        return Path(spec.metadata["parser"](raw, spec.metadata["env"]))
    return Path(str(spec.default))


def run(args: argparse.Namespace) -> int:
    """Run the monitor; see the module docstring."""
    from cds_service.audit_cli import default_database_url, parse_cli_time

    now = datetime.now(UTC)
    since = parse_cli_time(args.since, "--since")
    until = parse_cli_time(args.until, "--until") if args.until else now
    if until <= since:
        raise InputError("--until must be later than --since")
    if args.bootstrap < 0 or args.min_class < 1 or args.timeout <= 0:
        raise InputError("--bootstrap must be >= 0, --min-class >= 1 and --timeout > 0")
    report = monitor(
        fhir_url=args.fhir_url,
        since=since,
        until=until,
        out=args.out,
        database_url=args.database_url or default_database_url(),
        model=_model_dir(args.model),
        key=_audit_key(args.audit_key_file),
        token=args.token or os.environ.get("ECGLAB_FHIR_TOKEN") or None,
        reference=args.reference,
        n_boot=args.bootstrap,
        min_class=args.min_class,
        seed=args.seed,
        timeout_s=args.timeout,
        progress=not args.no_progress,
        now=now,
    )
    summary = report["summary"]
    print(
        f"monitor: {summary['n_calls']} call(s), {summary['n_predictions']} prediction(s), "
        f"{summary['n_targets_evaluable']} evaluable target(s); report in {args.out / 'report.json'}",
        file=sys.stderr,
    )
    return 0


def monitor(
    *,
    fhir_url: str,
    since: datetime,
    until: datetime,
    out: Path,
    database_url: str,
    model: Path,
    key: bytes,
    token: str | None = None,
    reference: Path | None = None,
    n_boot: int = 500,
    min_class: int = 10,
    seed: int = 0,
    timeout_s: float = 30.0,
    progress: bool = True,
    now: datetime | None = None,
    transport: Any = None,
) -> dict[str, Any]:
    """The whole run as a function (the CLI and the tests call it); returns the report written."""
    from cds_service.audit import count_audit, iter_audit
    from cds_service.db import init_db, make_engine
    from cds_service.monitor.drift import distribution, load_reference, psi_table
    from cds_service.monitor.feedback_stats import card_labs, feedback_by_lab
    from cds_service.monitor.fhir_results import fetch_lab_results
    from cds_service.monitor.html_report import render_report_html
    from cds_service.monitor.outcomes import (
        LabResult,
        ResultIndex,
        join_outcomes,
        lab_thresholds,
        target_rules,
    )
    from cds_service.monitor.progress import Progress
    from cds_service.monitor.report import build_report, write_json
    from fhir_mappings import load_mappings
    from fhir_mappings.manifest import find_manifest, load_manifest

    as_of = now or datetime.now(UTC)
    manifest = load_manifest(find_manifest(model), verify_file=False)
    mappings = load_mappings()
    engine = make_engine(database_url)
    init_db(engine)
    total = count_audit(engine, since, until)
    records = []
    with Progress(total, "audited calls", enabled=progress) as bar:
        for record in iter_audit(engine, since, until, model_sha256=manifest.onnx.sha256):
            records.append(record)
            bar.update()
    counts: dict[str, Any] = {
        "audited_calls": len(records),
        "calls_of_other_models": total - len(records),
        "live_calls": sum(1 for r in records if r.mode == "live"),
        "shadow_calls": sum(1 for r in records if r.mode == "shadow"),
    }
    rules = target_rules(manifest)
    thresholds = lab_thresholds(manifest, mappings)
    lab_keys = sorted({rules[t].lab_key for r in records for t in r.predictions if t in rules})
    labs = [spec for spec in (mappings.lab(k) for k in lab_keys) if spec is not None]
    ecg_times = [r.ecg_time for r in records if r.ecg_time is not None]
    results: list[LabResult] = []
    if ecg_times and labs:
        start, end = min(ecg_times) - LOOK_BEFORE, min(max(ecg_times) + LOOK_AFTER, as_of)
        with Progress(None, "lab results read", enabled=progress) as bar:
            results, stats = fetch_lab_results(
                fhir_url,
                labs,
                start,
                end,
                key,
                token=token,
                timeout_s=timeout_s,
                transport=transport,
                units={
                    k: {lab.unit for lab in manifest.labels if lab.lab_key == k and lab.unit}
                    for k in lab_keys
                },
                on_page=lambda _lab, n: bar.update(n),
            )
        counts.update(lab_results_read=stats.read, lab_results_used=stats.used, fhir_pages=stats.pages)
        counts.update({f"lab_results_skipped_{reason}": n for reason, n in sorted(stats.skipped.items())})
    sex_feature = next((c for c in manifest.metadata.categorical if c.key == "sex"), None)
    rows = join_outcomes(
        records,
        ResultIndex(results),
        rules,
        thresholds,
        sex_feature.categories if sex_feature else [],
        as_of=as_of,
        counts=counts,
    )
    counts["predictions_with_outcome"] = sum(1 for r in rows if r.outcome is not None)
    categorical = {c.key for c in manifest.metadata.categorical}
    columns: dict[str, list[float | None]] = {}
    for record in records:
        for feature in record.features:
            columns.setdefault(feature, [])
    for record in records:
        for feature, values in columns.items():
            values.append(record.features.get(feature))
    current = distribution(columns, categorical)
    ref, ref_source = load_reference(manifest, reference)
    drift = {"reference": ref_source, "features": psi_table(ref, columns) if ref is not None else {}}
    uuid_labs, card_counts = card_labs(records)
    parts = urlsplit(fhir_url)
    report = build_report(
        rows,
        period={"since": since.isoformat(), "until": until.isoformat()},
        model={"name": manifest.name, "version": manifest.version, "sha256": manifest.onnx.sha256},
        counts=counts,
        drift=drift,
        feedback=feedback_by_lab(engine, uuid_labs, card_counts),
        fhir_server=f"{parts.scheme}://{parts.netloc}",
        n_boot=n_boot,
        seed=seed,
        min_class=min_class,
        now=as_of,
    )
    out.mkdir(parents=True, exist_ok=True)
    _write_outcomes(out / "outcomes.csv", rows)
    write_json(out / "distribution.json", current)
    (out / "report.html").write_text(render_report_html(report), encoding="utf-8")
    write_json(out / "report.json", report)  # last: its presence marks a complete run
    return report


def _write_outcomes(path: Path, rows: Any) -> None:
    """``outcomes.csv``: one row per (call, target); empty outcome = not observed."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(OUTCOME_COLUMNS)
        for row in rows:
            writer.writerow(
                [
                    row.audit_id,
                    row.target,
                    row.lab_key,
                    row.task,
                    repr(row.probability),
                    repr(row.threshold),
                    "" if row.outcome is None else row.outcome,
                    row.sex or "",
                    row.age_band or "",
                    row.mode,
                ]
            )
