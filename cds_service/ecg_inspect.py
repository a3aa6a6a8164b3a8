"""``ecglab ecg inspect``: what the service makes of an ECG file, for integrators checking exports.

Usage::

    ecglab ecg inspect ECG.xml                     # human-readable summary
    ecglab ecg inspect ECG.scp --json              # the same as one JSON object
    ecglab ecg inspect ECG.dcm --npy in.npy --png in.png

The file goes through exactly the service's path for an ECG attachment
(:mod:`cds_service.ecg.select`): :func:`cds_service.ecg.readers.read_file` with the service's
read limits from ``fhir_mappings/ecg.yaml`` (format detected from the content),
:func:`cds_service.ecg.canonical.to_model_leads` with the same lead aliases and minimum duration,
then :func:`cds_service.ecg.prepare.prepare_ecg` as the model runtime calls it. The report names
the detected format, device and software when the file states them, the leads as the file names
them, sampling rate, duration, units, the limb leads derived from I and II, quality warnings, and
what the model reads: ``--npy`` writes that float32 (1000, 12) array in mV at 100 Hz, columns in
``model_leads`` order (the bundled manifest's lead order); ``--png`` draws it on ECG paper like
the ``/demo`` page (matplotlib, from the ``train`` extra, imported only for ``--png``).

Exit status: 0 when the service would use the ECG; 1 when it would refuse it, with one line
``rejected: <reason>: <message>`` on stdout (reason as in
:data:`cds_service.ecg.record.REASONS`) and no file written; 2 for a path that cannot be read or
an output that cannot be written. The FHIR-level rules (the ECG's age, its patient, the
resource's status) concern resources, not files, and are not applied here.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import io
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cds_service.ecg.canonical import LeadPlan, plan_leads, to_model_leads
from cds_service.ecg.prepare import prepare_ecg
from cds_service.ecg.readers import read_file
from cds_service.ecg.record import EcgRecording, EcgRejected
from cds_service.ecg.select import lead_aliases, read_limits
from fhir_mappings.errors import ConfigError, InputError
from fhir_mappings.signal_spec import CLIP_MV, MODEL_LEADS, TARGET_FS, TARGET_SAMPLES

__all__ = ["Inspection", "add_arguments", "inspect_file", "render_png", "report", "run", "text_report"]

MODEL_SECONDS: float = TARGET_SAMPLES / TARGET_FS
"""Seconds of signal in the model input (10 s)."""

STRIP_MV: float = 2.0
"""Vertical room per lead in the PNG, in mV (traces may cross into the next strip, as on paper)."""
MM_PER_S: float = 25.0
MM_PER_MV: float = 10.0
PAPER, MINOR_GRID, MAJOR_GRID, TRACE = "#fff7f7", "#f8d9d9", "#efb1b1", "#1b1f24"
"""The ``/demo`` page's ECG paper colours (``cds_service/static/demo/ecg-plot.js``)."""


@dataclass(frozen=True)
class Inspection:
    """One file as the service reads it: the recording as stored, the lead plan and the model input."""

    path: Path
    size: int
    recording: EcgRecording
    plan: LeadPlan
    model_recording: EcgRecording
    model_input: npt.NDArray[np.float32]
    model_leads: tuple[str, ...]
    model: Mapping[str, str] | None
    model_notes: tuple[str, ...] = ()


def _model_facts() -> tuple[dict[str, str] | None, list[str]]:
    """The served model's name and version, and a note when its lead order is not the service's.

    The model folder is ``$ECGLAB_MODEL_DIR`` (parsed as the service parses it) or the bundled
    ``models/``. The model input's columns are always :data:`MODEL_LEADS`, the order every export
    writes into its manifest; without a manifest the report still names that order.
    """
    from cds_service.settings import Settings, default_model_dir
    from fhir_mappings.manifest import ManifestError, find_manifest, load_manifest

    spec = {f.name: f for f in dataclasses.fields(Settings)}["model_dir"]
    raw = os.environ.get(spec.metadata["env"])
    model_dir = Path(spec.metadata["parser"](raw, spec.metadata["env"])) if raw else default_model_dir()
    try:
        manifest = load_manifest(find_manifest(model_dir), verify_file=False)
    except ManifestError:
        return None, []
    notes = []
    if tuple(manifest.ecg.lead_order) != MODEL_LEADS:
        notes.append(
            f"the model manifest lists leads {', '.join(manifest.ecg.lead_order)}, but the service builds"
            f" {', '.join(MODEL_LEADS)}"
        )
    return {"name": manifest.name, "version": manifest.version}, notes


def _read_bytes(path: Path, limit: int) -> tuple[bytes, int]:
    """At most ``limit + 1`` bytes of ``path`` and its size.

    Raises:
        InputError: the path does not exist or cannot be read (names the file).
        EcgRejected: ``attachment_too_large`` past the service's attachment limit.
    """
    try:
        with path.open("rb") as handle:
            data = handle.read(limit + 1)
            size = os.fstat(handle.fileno()).st_size
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read it ({exc.strerror or type(exc).__name__})") from None
    if len(data) > limit:
        raise EcgRejected("attachment_too_large", f"ECG file is {max(size, len(data))} bytes, over {limit}")
    return data, len(data)


def inspect_file(path: Path, mappings: Any = None) -> Inspection:
    """Read ``path`` the way the service reads an ECG attachment and prepare the model input.

    Args:
        path: the ECG file.
        mappings: loaded ``fhir_mappings`` (default: :func:`fhir_mappings.load_mappings`).

    Raises:
        InputError: the file cannot be read.
        EcgRejected: the service would refuse the ECG; ``reason`` says why.
    """
    if mappings is None:
        from fhir_mappings import load_mappings

        mappings = load_mappings()
    ecg = mappings.ecg
    limits = read_limits(ecg)
    aliases = lead_aliases(ecg)
    data, size = _read_bytes(path, limits.max_bytes)
    try:
        recording = read_file(data, limits)
        plan = plan_leads(recording.lead_names, aliases)
        model_recording = to_model_leads(recording, aliases, min_duration_s=float(ecg.min_duration_s))
        prepared = prepare_ecg(model_recording.signal, model_recording.fs, model_recording.lead_names)
    except EcgRejected:
        raise
    except Exception as exc:  # as cds_service.ecg.select: a decoding bug rejects the ECG
        raise EcgRejected("unreadable", f"decoding failed ({type(exc).__name__})") from exc
    model, notes = _model_facts()
    return Inspection(
        path, size, recording, plan, model_recording, prepared, MODEL_LEADS, model, tuple(notes)
    )


def _quality_warnings(inspection: Inspection) -> list[str]:
    """What the reader noted, inverted leads, and what preparation does to the signal."""
    recording, plan = inspection.recording, inspection.plan
    notes = list(recording.warnings)
    for index, sign in enumerate(plan.signs):
        if sign < 0:
            stored = recording.lead_names[plan.columns[index]]
            notes.append(f"{MODEL_LEADS[index]} is taken inverted from {stored!r}")
    signal = inspection.model_recording.signal
    for index, lead in enumerate(inspection.model_recording.lead_names):
        column = signal[:, index]
        missing = int(np.count_nonzero(~np.isfinite(column)))
        if missing:
            notes.append(f"{lead}: {missing} missing sample(s) interpolated")
        clipped = int(np.count_nonzero(np.abs(column[np.isfinite(column)]) > CLIP_MV))
        if clipped:
            share = clipped / len(column)
            notes.append(f"{lead}: {clipped} sample(s) ({share:.1%}) beyond ±{CLIP_MV:g} mV are clipped")
    duration = recording.duration_s
    if duration > MODEL_SECONDS + 1e-9:
        notes.append(f"only the first {MODEL_SECONDS:g} s of the {duration:.2f} s recording are read")
    elif duration < MODEL_SECONDS - 1e-9:
        notes.append(
            f"the {duration:.2f} s recording is padded to {MODEL_SECONDS:g} s by repeating its last sample"
        )
    return notes + list(inspection.model_notes)


def report(inspection: Inspection) -> dict[str, Any]:
    """The inspection as a JSON-ready dict (the ``--json`` output)."""
    recording, plan = inspection.recording, inspection.plan
    sources = {
        lead: "derived from I and II"
        if lead in plan.derived
        else ("-" if sign < 0 else "") + recording.lead_names[column]
        for lead, column, sign in zip(MODEL_LEADS, plan.columns, plan.signs, strict=True)
    }
    return {
        "file": str(inspection.path),
        "bytes": inspection.size,
        "format": recording.source_format,
        "device": recording.device,
        "software": recording.software,
        "recorded_at": recording.recorded_at.isoformat() if recording.recorded_at else None,
        "stored_leads": list(recording.lead_names),
        "units": list(recording.source_units),
        "fs": float(recording.fs),
        "samples": int(recording.signal.shape[0]),
        "duration_s": round(recording.duration_s, 4),
        "derived_leads": list(plan.derived),
        "lead_sources": sources,
        "warnings": _quality_warnings(inspection),
        "model_leads": list(inspection.model_leads),
        "model_input": {
            "shape": list(inspection.model_input.shape),
            "dtype": str(inspection.model_input.dtype),
            "fs": float(TARGET_FS),
            "units": "mV",
            "clip_mv": float(CLIP_MV),
        },
        "model": dict(inspection.model) if inspection.model else None,
    }


def _units_text(units: Sequence[str], leads: Sequence[str]) -> str:
    """One unit when every lead shares it, else ``lead unit`` pairs."""
    if not units:
        return "not stated (read as mV)"
    if len(set(units)) == 1:
        return units[0] if units[0] == "mV" else f"{units[0]} (converted to mV)"
    return (
        ", ".join(f"{lead} {unit}" for lead, unit in zip(leads, units, strict=False)) + " (converted to mV)"
    )


def text_report(facts: Mapping[str, Any]) -> str:
    """The human-readable form of :func:`report`'s dict."""
    derived = facts["derived_leads"]
    model = facts["model"]
    shape = "×".join(str(n) for n in facts["model_input"]["shape"])
    rows = [
        ("file", f"{facts['file']} ({facts['bytes']} bytes)"),
        ("format", facts["format"]),
        ("device", facts["device"] or "not stated"),
        ("software", facts["software"] or "not stated"),
        ("recorded at", facts["recorded_at"] or "not stated"),
        ("stored leads", f"{', '.join(facts['stored_leads'])} ({len(facts['stored_leads'])})"),
        ("units", _units_text(facts["units"], facts["stored_leads"])),
        ("sampling rate", f"{facts['fs']:g} Hz"),
        ("duration", f"{facts['duration_s']:.2f} s ({facts['samples']} samples per lead)"),
        ("derived leads", f"{', '.join(derived)} (from I and II)" if derived else "none"),
        (
            "model input",
            f"{shape} {facts['model_input']['dtype']}, mV at {facts['model_input']['fs']:g} Hz,"
            f" clipped to ±{facts['model_input']['clip_mv']:g} mV before resampling",
        ),
        ("model leads", ", ".join(facts["model_leads"])),
        ("model", f"{model['name']} {model['version']}" if model else "no manifest found"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name.ljust(width)}  {value}" for name, value in rows]
    warnings = facts["warnings"]
    lines.append(f"{'warnings'.ljust(width)}  {'none' if not warnings else ''}".rstrip())
    lines += [f"  - {warning}" for warning in warnings]
    return "\n".join(lines)


def render_png(signal: npt.NDArray[np.float32], leads: Sequence[str], title: str) -> bytes:
    """The model input drawn on ECG paper as PNG bytes: one 10 s strip per lead, 10 mm/mV, 25 mm/s.

    The layout follows the ``/demo`` page's canvas (major grid 0.2 s × 0.5 mV, minor grid 0.04 s
    × 0.1 mV, lead names on the left, seconds below). Uses matplotlib's object API with the Agg
    canvas, so no global backend is switched.

    Raises:
        ConfigError: matplotlib is not installed.
    """
    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError(_NO_MATPLOTLIB)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_samples, n_leads = signal.shape
    width_mm = n_samples / TARGET_FS * MM_PER_S
    strip_mm = STRIP_MV * MM_PER_MV
    height_mm = strip_mm * n_leads
    margin_left, margin_bottom, margin_top = 14.0, 8.0, 10.0
    figure = Figure(
        figsize=((width_mm + margin_left + 4) / 25.4, (height_mm + margin_bottom + margin_top) / 25.4),
        dpi=100,
    )
    FigureCanvasAgg(figure)
    axes = figure.add_axes(
        (
            margin_left / (width_mm + margin_left + 4),
            margin_bottom / (height_mm + margin_bottom + margin_top),
            width_mm / (width_mm + margin_left + 4),
            height_mm / (height_mm + margin_bottom + margin_top),
        )
    )
    axes.set_facecolor(PAPER)
    axes.set_xlim(0, width_mm)
    axes.set_ylim(0, height_mm)
    axes.set_xticks(np.arange(0.0, width_mm + 0.1, 0.2 * MM_PER_S))
    axes.set_xticks(np.arange(0.0, width_mm + 0.1, 0.04 * MM_PER_S), minor=True)
    axes.set_yticks(np.arange(0.0, height_mm + 0.1, 0.5 * MM_PER_MV))
    axes.set_yticks(np.arange(0.0, height_mm + 0.1, 0.1 * MM_PER_MV), minor=True)
    axes.grid(which="minor", color=MINOR_GRID, linewidth=0.4)
    axes.grid(which="major", color=MAJOR_GRID, linewidth=0.8)
    axes.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
    for spine in axes.spines.values():
        spine.set_visible(False)
    time_mm = np.arange(n_samples) / TARGET_FS * MM_PER_S
    for index, lead in enumerate(leads):
        mid = height_mm - (index + 0.5) * strip_mm
        axes.plot(time_mm, mid + signal[:, index] * MM_PER_MV, color=TRACE, linewidth=0.7, clip_on=False)
        axes.text(-2.0, mid, lead, ha="right", va="center", fontsize=8, fontweight="bold", color="#333")
    for second in range(int(n_samples / TARGET_FS) + 1):
        axes.text(second * MM_PER_S, -2.0, f"{second} s", ha="center", va="top", fontsize=7, color="#666")
    figure.suptitle(title, fontsize=8, x=0.01, ha="left")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", facecolor="white")
    return buffer.getvalue()


_NO_MATPLOTLIB = (
    "--png needs matplotlib, which is not installed; install it (pip install matplotlib, or the"
    " 'train' extra: pip install 'ecglab[train]') or leave out --png"
)


def _write(path: Path, content: bytes) -> None:
    """Write ``content`` to ``path`` exactly (no suffix added); InputError naming the path on failure."""
    try:
        path.write_bytes(content)
    except OSError as exc:
        raise InputError(f"{path}: cannot write it ({exc.strerror or type(exc).__name__})") from None


def _npy_bytes(array: npt.NDArray[np.float32]) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``inspect`` action and its flags; the epilog repeats ``inspect``'s help for the reference."""
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    inspect = actions.add_parser(
        "inspect",
        help="read an ECG file as the service would and show what the model reads",
        description="Read an ECG file exactly as the service reads an ECG attachment and report the "
        "detected format, device, stored leads, rate, duration, units, derived leads, quality "
        "warnings and the model input. Exit 1 with 'rejected: <reason>: <message>' when the "
        "service would refuse the file.",
    )
    inspect.add_argument("file", type=Path, metavar="FILE", help="the ECG file (any supported format)")
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    inspect.add_argument(
        "--npy",
        type=Path,
        metavar="OUT.npy",
        help="write the float32 (1000, 12) model input (mV, 100 Hz, model_leads order)",
    )
    inspect.add_argument(
        "--png", type=Path, metavar="OUT.png", help="plot the model input on ECG paper (needs matplotlib)"
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = inspect.format_help()


def run(args: argparse.Namespace) -> int:
    """Inspect ``args.file``; 0 usable, 1 rejected (one line on stdout), InputError for bad paths."""
    if args.action != "inspect":  # argparse allows only the declared actions
        raise InputError(f"unknown action {args.action!r}")
    if args.png is not None and importlib.util.find_spec("matplotlib") is None:
        raise ConfigError(_NO_MATPLOTLIB)
    try:
        inspection = inspect_file(args.file)
    except EcgRejected as exc:
        message = " ".join(str(exc).split())
        print(f"rejected: {exc.reason}: {message}")
        return 1
    facts = report(inspection)
    outputs: list[tuple[Path, bytes]] = []
    if args.npy is not None:
        outputs.append((args.npy, _npy_bytes(inspection.model_input)))
    if args.png is not None:
        title = (
            f"{inspection.path.name}: {facts['format']}, as the model reads it"
            f" ({len(inspection.model_leads)} leads, mV, {TARGET_FS:g} Hz)"
        )
        outputs.append((args.png, render_png(inspection.model_input, inspection.model_leads, title)))
    for path, content in outputs:
        _write(path, content)
    if args.json:
        print(json.dumps(facts, indent=2, ensure_ascii=False))
    else:
        print(text_report(facts))
    sys.stdout.flush()
    return 0
