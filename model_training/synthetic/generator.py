"""``ecglab synth-mimic OUT``: argument checks, the order of the draws, and the files written.

The draws share one ``numpy`` generator, so their order here is part of the output: moving a call
changes every file after it.
"""

from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fhir_mappings.errors import InputError
from model_training.synthetic.catalogue import planted_targets
from model_training.synthetic.constants import (
    ADMISSIONS_COLUMNS,
    D_LABITEMS_COLUMNS,
    ECG_DIR,
    ED_DIR,
    EDSTAYS_COLUMNS,
    GROUND_TRUTH,
    HOSP_DIR,
    ICD_DIR,
    LABEVENTS_COLUMNS,
    MACHINE_MEASUREMENTS_COLUMNS,
    MIN_SUBJECTS,
    OMR_COLUMNS,
    OWNED_ENTRIES,
    PATIENTS_COLUMNS,
    RECORD_LIST_COLUMNS,
    RECORDS_W_DIAG_COLUMNS,
    VITALSIGN_COLUMNS,
)
from model_training.synthetic.ecg import draw_ecg_tables, draw_records_w_diag, write_waveforms
from model_training.synthetic.formats import write_csv
from model_training.synthetic.ground_truth import write_ground_truth
from model_training.synthetic.labs import draw_labevents, draw_planted_states
from model_training.synthetic.omr import draw_omr
from model_training.synthetic.population import draw_dates_of_death, draw_ecgs, draw_encounters, draw_subjects
from model_training.synthetic.vitals import draw_vitalsign


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`generate` wrote: counts, planted targets, wall time and bytes on disk."""

    out: Path
    seed: int
    subjects: int
    ecgs: int
    lab_rows: int
    vital_rows: int
    omr_rows: int
    planted_targets: tuple[str, ...]
    seconds: float
    bytes_written: int


def generate(
    out: Path,
    subjects: int,
    seed: int,
    *,
    workers: int = 2,
    force: bool = False,
    progress: bool = False,
) -> SynthSummary:
    """Write a synthetic MIMIC-IV / -ED / -ECG / -ECG-ext-ICD data set under ``out``.

    ``out`` must be absent or empty unless ``force`` is set, in which case only the entries this
    command owns (:data:`OWNED_ENTRIES`) are removed first. ``workers`` processes write the WFDB
    records (the slow part); the result does not depend on it.
    """
    started = time.perf_counter()
    out = Path(out)
    _check_args(out, subjects, seed, workers, force)
    rng = np.random.default_rng(seed)

    subj = draw_subjects(rng, subjects)
    ecg = draw_ecgs(rng, subj)
    admissions, edstays = draw_encounters(rng, subj, ecg)
    subj["dod"] = draw_dates_of_death(rng, subj, ecg)
    scores, states = draw_planted_states(rng, ecg)
    labevents, d_labitems = draw_labevents(rng, ecg, states)
    vitals = draw_vitalsign(rng, ecg)
    omr = draw_omr(rng, subj, ecg)
    record_list, machine = draw_ecg_tables(rng, ecg)
    records_w_diag = draw_records_w_diag(rng, subj, ecg, states)

    write_csv(subj, out / HOSP_DIR / "patients.csv.gz", PATIENTS_COLUMNS)
    write_csv(admissions, out / HOSP_DIR / "admissions.csv.gz", ADMISSIONS_COLUMNS)
    write_csv(d_labitems, out / HOSP_DIR / "d_labitems.csv.gz", D_LABITEMS_COLUMNS)
    write_csv(labevents, out / HOSP_DIR / "labevents.csv.gz", LABEVENTS_COLUMNS)
    write_csv(omr, out / HOSP_DIR / "omr.csv.gz", OMR_COLUMNS)
    write_csv(edstays, out / ED_DIR / "edstays.csv.gz", EDSTAYS_COLUMNS)
    write_csv(vitals, out / ED_DIR / "vitalsign.csv.gz", VITALSIGN_COLUMNS)
    write_csv(record_list, out / ECG_DIR / "record_list.csv", RECORD_LIST_COLUMNS)
    write_csv(machine, out / ECG_DIR / "machine_measurements.csv", MACHINE_MEASUREMENTS_COLUMNS)
    write_csv(records_w_diag, out / ICD_DIR / "records_w_diag_icd10.csv", RECORDS_W_DIAG_COLUMNS)
    write_ground_truth(out / GROUND_TRUTH, seed, subjects, ecg, scores, states)
    write_waveforms(out / ECG_DIR, ecg, seed, workers, progress)

    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return SynthSummary(
        out=out,
        seed=seed,
        subjects=subjects,
        ecgs=len(ecg),
        lab_rows=len(labevents),
        vital_rows=len(vitals),
        omr_rows=len(omr),
        planted_targets=tuple(planted_targets()),
        seconds=time.perf_counter() - started,
        bytes_written=size,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare ``ecglab synth-mimic`` flags."""
    parser.add_argument("out", type=Path, metavar="OUT", help="output folder (created; must be empty)")
    parser.add_argument("--subjects", type=int, default=2000, help="number of patients (>= 20; default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed = identical files)")
    parser.add_argument("--workers", type=int, default=2, help="processes writing WFDB records (default 2)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace a previous synthetic data set in OUT (removes only the folders this command writes)",
    )


def run(args: argparse.Namespace) -> int:
    """Generate the data set and print a one-line summary."""
    summary = generate(
        args.out, args.subjects, args.seed, workers=args.workers, force=args.force, progress=True
    )
    print(
        f"synth-mimic: {summary.subjects} subjects, {summary.ecgs} ECGs, {summary.lab_rows} lab rows, "
        f"{len(summary.planted_targets)} planted targets -> {summary.out} "
        f"({summary.bytes_written / 1e6:.0f} MB, {summary.seconds:.1f} s)"
    )
    return 0


def _check_args(out: Path, subjects: int, seed: int, workers: int, force: bool) -> None:
    """Validate the arguments (errors name the flag) and prepare ``out``.

    Below :data:`MIN_SUBJECTS` the validation/test folds would hold one or two patients, so no
    target could pass the method's per-fold filter. A non-empty ``out`` is refused so a typo cannot
    mix two data sets; ``force`` deletes only :data:`OWNED_ENTRIES`, never unrelated files.
    """
    if subjects < MIN_SUBJECTS:
        raise InputError(f"--subjects must be at least {MIN_SUBJECTS} (got {subjects})")
    if seed < 0:
        raise InputError(f"--seed must be a non-negative integer (got {seed})")
    if workers < 1:
        raise InputError(f"--workers must be at least 1 (got {workers})")
    if out.exists() and not out.is_dir():
        raise InputError(f"OUT {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise InputError(
                f"OUT {out} exists and is not empty; pass --force to replace a previous data set"
            )
        for name in OWNED_ENTRIES:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
