"""``ecglab seed-fhir``: put demo patients on a FHIR R4 server, with an ECG in every carrier.

Usage::

    ecglab seed-fhir --fhir-url http://127.0.0.1:8091/fhir [--patients 6] [--from SYNTH_OUT] [--seed 0]

Each demo patient is one subject of a MIMIC-IV-layout data set (``--from``, as written by
``ecglab synth-mimic``; without it a small synthetic set is generated into a temporary folder):
its Patient (sex, a birth date giving the age at the ECG that training computes, US Core
race/ethnicity), ED vital signs around one of its ECGs, OMR biometrics, recent lab results, and
for some patients an active lab ServiceRequest. Times are shifted so that the ECG was taken a few
minutes ago (within the ECG maximum age of ``fhir_mappings``), keeping every other time relative
to it. The command prints one summary row per patient.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fhir_mappings.errors import InputError
from model_training.seed_fhir.server import seed
from model_training.seed_fhir.subjects import read_subjects

SYNTH_SUBJECTS = 30
"""Subjects generated when no ``--from`` data set is given."""


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The summary rows as an aligned text table."""
    if not rows:
        return "(no patients)"
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns), "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare ``ecglab seed-fhir`` flags."""
    parser.add_argument("--fhir-url", required=True, help="FHIR R4 base URL, e.g. http://127.0.0.1:8091/fhir")
    parser.add_argument("--patients", type=int, default=6, help="demo patients to write (default 6)")
    parser.add_argument(
        "--from",
        dest="source",
        type=Path,
        default=None,
        metavar="SYNTH_OUT",
        help="MIMIC-IV-layout folder (ecglab synth-mimic output); default: generate a small one",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed for subject choice and orders (default 0)"
    )


def run(args: argparse.Namespace) -> int:
    """Read or generate the source data, seed the server and print the summary table."""
    from fhir_mappings import load_mappings

    if args.patients < 1:
        raise InputError(f"--patients must be at least 1 (got {args.patients})")
    base_url = str(args.fhir_url).rstrip("/")
    if not base_url.startswith(("http://", "https://")):
        raise InputError(f"--fhir-url {args.fhir_url!r} must be an http(s) URL")
    mappings = load_mappings()
    if args.source is not None:
        if not Path(args.source).is_dir():
            raise InputError(f"{args.source}: --from folder not found")
        subjects = read_subjects(args.source, args.patients, args.seed, mappings)
    else:
        # Only this branch needs the generator (and pandas), so --from works without them.
        from model_training.synthetic import generate

        with tempfile.TemporaryDirectory(prefix="ecglab-seed-") as tmp:
            generate(Path(tmp) / "synth", max(SYNTH_SUBJECTS, args.patients), args.seed)
            subjects = read_subjects(Path(tmp) / "synth", args.patients, args.seed, mappings)
    rows = seed(base_url, subjects, mappings, seed_value=args.seed)
    print(format_table(rows))
    print(f"seed-fhir: {len(rows)} patients written to {base_url}")
    return 0
