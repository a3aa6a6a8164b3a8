"""The ``ecglab`` console command: one entry point, one subcommand per concern.

Subcommands are imported lazily so that ``ecglab serve`` works in the slim install without torch,
pandas or duckdb. Each subcommand module exposes two functions:

* ``add_arguments(parser: argparse.ArgumentParser) -> None`` declares its flags;
* ``run(args: argparse.Namespace) -> int`` does the work and returns the exit status.

A module raises :class:`fhir_mappings.errors.EcglabError` for bad input; the dispatcher turns it into
one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from cds_service import __version__
from fhir_mappings.errors import EcglabError


@dataclass(frozen=True)
class Subcommand:
    """A subcommand's name, the module implementing it and its one-line help."""

    name: str
    module: str
    help: str


SUBCOMMANDS: tuple[Subcommand, ...] = (
    Subcommand(
        "synth-mimic", "model_training.synthetic", "write a small synthetic data set in the MIMIC-IV layout"
    ),
    Subcommand(
        "preprocess",
        "model_training.preprocess",
        "build the training set (labels, features, waveforms) from MIMIC-IV",
    ),
    Subcommand("train", "model_training.train", "train the S4 ECG + metadata fusion model"),
    Subcommand(
        "evaluate",
        "model_training.evaluate",
        "evaluate a training run: AUROC with bootstrap CIs, calibration, reports",
    ),
    Subcommand("export", "model_training.export", "export a trained run to ONNX with its manifest"),
    Subcommand(
        "quantize", "model_training.quantize", "add an int8 variant of an exported model to its manifest"
    ),
    Subcommand(
        "score", "cds_service.score", "score a preprocessed data set or FHIR patients with an exported model"
    ),
    Subcommand(
        "seed-fhir",
        "model_training.seed_fhir.command",
        "seed a FHIR server with demo patients, vitals, ECGs, labs and orders",
    ),
    Subcommand(
        "ecg", "cds_service.ecg_inspect", "inspect an ECG file: what the service reads and the model sees"
    ),
    Subcommand("serve", "cds_service.serve", "run the CDS Hooks service under gunicorn"),
    Subcommand("demo", "cds_service.demo", "start FHIR server + service, fire hooks and show the cards"),
    Subcommand("audit", "cds_service.audit_cli", "export (CSV/Parquet) or purge the hook audit trail"),
    Subcommand(
        "monitor",
        "cds_service.monitor.command",
        "validate the deployed model locally: audit trail vs later lab results",
    ),
    Subcommand(
        "recalibrate",
        "cds_service.recalibrate",
        "write a new model version with calibration and thresholds fitted on local data",
    ),
)


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ecglab",
        description="ecglab: predict and forecast abnormal lab values from a 12-lead ECG and recommend lab tests.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'ecglab COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"ecglab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for command in SUBCOMMANDS:
        sub.add_parser(command.name, help=command.help, add_help=False)
    return parser


def _command_parser(command: Subcommand) -> argparse.ArgumentParser:
    module = importlib.import_module(command.module)
    parser = argparse.ArgumentParser(prog=f"ecglab {command.name}", description=command.help)
    module.add_arguments(parser)
    parser.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the subcommand and return its exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    by_name = {c.name: c for c in SUBCOMMANDS}
    if not args or args[0] not in by_name:
        top = _top_parser()
        if not args:
            top.print_help()
            return 2
        top.parse_args(args)  # prints --help/--version or an "invalid choice" error and exits
        return 2
    command = by_name[args[0]]
    try:
        parser = _command_parser(command)
    except ModuleNotFoundError as exc:
        print(
            f"ecglab {command.name}: error: this command needs the '{exc.name}' package; "
            "install the matching extra, e.g. pip install 'ecglab[train]'",
            file=sys.stderr,
        )
        return 2
    ns = parser.parse_args(args[1:])
    try:
        return int(ns._run(ns) or 0)
    except EcglabError as exc:
        print(f"ecglab {command.name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ecglab {command.name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
