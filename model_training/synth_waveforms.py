"""Synthetic 12-lead ECG waveforms for the fake MIMIC-IV-ECG data set (``ecglab synth-mimic``).

What this models, and why
-------------------------
The fake data set must carry *learnable* waveform signal (the planted lab rules in
:mod:`model_training.synthetic` depend on heart rate, QRS voltage, T-wave shape and QT length) while
looking like a real diagnostic ECG to every reader in the pipeline. So each record is built from a
small physiological model rather than from noise:

* **A cardiac dipole.** One beat is a sum of Gaussian waves (P, septal q, R, S, T) in time, each with
  a 3-D direction in body coordinates (x = patient's left, y = inferior, z = anterior). The T wave is
  asymmetric (slower upstroke than downstroke), as in real ECGs.
* **A beat train.** R peaks follow the heart rate with a little beat-to-beat variability; the QT
  interval follows Bazett's relation ``QT = QTc * sqrt(RR)``.
* **Lead projection.** Lead I is the dipole's x component and lead II its projection on the 60° axis.
  The other limb leads are then derived *exactly* from I and II (Einthoven and Goldberger):
  ``III = II - I``, ``aVR = -(I + II) / 2``, ``aVL = I - II / 2``, ``aVF = II - I / 2``. The derivation
  is done on the quantised integer samples so the identities survive the WFDB round trip to within
  half an ADC unit. V1-V6 are projections on transverse-plane directions with proximity gains, which
  gives the usual rS in V1, transition around V3-V4 and qR in V5-V6.
* **Artefacts.** Baseline wander (two slow sinusoids) and white noise are added to I, II and each
  precordial lead before derivation, and optional NaN spans mimic the dropouts present in some real
  MIMIC-IV-ECG records (stored as the WFDB invalid sample -32768).

Storage follows MIMIC-IV-ECG 1.0: 12 leads in the stored order ``I, II, III, aVR, aVF, aVL, V1..V6``
(aVF before aVL), 500 Hz, 10 s = 5000 samples, WFDB format 16, units mV, ADC gain 1000 (1 µV per
unit, as the project brief specifies), baseline 0, and the ECG's date and time as the header's base
date/time. Records are written with :func:`wfdb.wrsamp`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Lead order as MIMIC-IV-ECG stores it (note aVF before aVL).
STORED_LEADS: tuple[str, ...] = ("I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6")
#: Sampling frequency in Hz.
FS: int = 500
#: Samples per record (10 s).
N_SAMPLES: int = 5000
#: ADC units per mV (1 µV resolution).
ADC_GAIN: float = 1000.0
#: WFDB format-16 value that marks an invalid (NaN) sample.
WFDB_INVALID: int = -32768

_LIMB = ("I", "II", "III", "aVR", "aVF", "aVL")
_CHEST = ("V1", "V2", "V3", "V4", "V5", "V6")
# Transverse-plane angle of each precordial electrode, measured from the patient's left (+x)
# towards anterior (+z), and a proximity gain (V2-V4 sit closest to the heart).
_CHEST_ANGLES_DEG = np.array([120.0, 95.0, 75.0, 55.0, 30.0, 5.0])
_CHEST_GAINS = np.array([1.6, 2.4, 2.4, 2.2, 1.7, 1.3])
# Template support around each R peak, in seconds.
_PRE_S = 0.45
_POST_S = 0.80


@dataclass(frozen=True)
class EcgParams:
    """Per-record physiological parameters of one synthetic ECG.

    ``qrs_gain`` scales the QRS voltage (1.0 = typical), ``t_gain`` the T-wave amplitude and
    ``t_width_ms`` the T wave's downstroke SD (narrow + tall = "peaked"). ``qtc_ms`` is the
    rate-corrected QT (Bazett). ``lead_gains`` are per-precordial-electrode placement factors.
    ``nan_spans`` lists ``(group, start_sample, length)`` with group ``"limb"`` (all six limb leads,
    so the Einthoven/Goldberger identities keep holding) or a precordial lead name.
    """

    rate_bpm: float
    qrs_gain: float
    t_gain: float
    t_width_ms: float
    qtc_ms: float
    pr_ms: float
    qrs_ms: float
    p_gain: float
    axis_deg: float
    noise_mv: float
    wander_mv: float
    hrv: float
    lead_gains: tuple[float, float, float, float, float, float] = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    nan_spans: tuple[tuple[str, int, int], ...] = ()


@dataclass(frozen=True)
class RecordTask:
    """Everything a worker process needs to synthesise and write one WFDB record."""

    directory: str
    record_name: str
    params: EcgParams
    seed: tuple[int, int]
    base_datetime: dt.datetime


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _gauss(t: np.ndarray, centre: float, sd: float) -> np.ndarray:
    return np.exp(-0.5 * ((t - centre) / sd) ** 2)


def beat_template(params: EcgParams) -> tuple[np.ndarray, int]:
    """Return one beat's dipole ``(L, 3)`` in mV around its R peak and the R-peak sample index.

    Wave timings are relative to the R peak: QRS onset is ``qrs_ms / 2`` before it, the P wave
    starts about ``pr_ms`` before QRS onset (PR is measured onset to onset; P lasts ~100 ms), and
    the T wave ends ``QT`` after QRS onset, with ``QT = QTc * sqrt(RR)``.
    """
    n_pre = int(_PRE_S * FS)
    t = (np.arange(n_pre + int(_POST_S * FS)) - n_pre) / FS * 1000.0  # ms relative to R
    rr_ms = 60000.0 / params.rate_bpm
    qt_ms = params.qtc_ms * np.sqrt(rr_ms / 1000.0)
    qrs_on = -params.qrs_ms / 2.0
    axis = np.deg2rad(params.axis_deg)

    r_dir = _unit(np.array([np.cos(axis), np.sin(axis), -0.2]))
    q_dir = _unit(np.array([-0.5, 0.2, 0.85]))
    s_dir = _unit(np.array([-0.5, -0.5, -0.7]))
    p_dir = _unit(np.array([0.57, 0.82, 0.1]))
    t_axis = axis - np.deg2rad(15.0)
    t_dir = _unit(np.array([np.cos(t_axis), np.sin(t_axis), 0.45]))

    g = params.qrs_gain
    dipole = np.zeros((t.size, 3))
    dipole += np.outer(_gauss(t, 0.0, params.qrs_ms / 7.0), 1.35 * g * r_dir)
    dipole += np.outer(_gauss(t, -0.33 * params.qrs_ms, params.qrs_ms / 10.0), 0.18 * g * q_dir)
    dipole += np.outer(_gauss(t, 0.30 * params.qrs_ms, params.qrs_ms / 9.0), 0.45 * g * s_dir)
    p_centre = qrs_on - params.pr_ms + 50.0
    dipole += np.outer(_gauss(t, p_centre, 20.0), 0.16 * params.p_gain * p_dir)
    sd_down = params.t_width_ms
    sd_up = 1.5 * params.t_width_ms
    t_centre = qrs_on + qt_ms - 2.5 * sd_down
    t_shape = np.where(t < t_centre, _gauss(t, t_centre, sd_up), _gauss(t, t_centre, sd_down))
    dipole += np.outer(t_shape, 0.32 * params.t_gain * t_dir)
    return dipole, n_pre


def _r_peaks(params: EcgParams, rng: np.random.Generator) -> np.ndarray:
    """R-peak sample positions covering the record (and a beat either side), with mild HRV."""
    rr = 60.0 / params.rate_bpm * FS
    start = -rng.uniform(0.0, rr)
    count = int(N_SAMPLES / rr) + 4
    intervals = rr * (1.0 + params.hrv * rng.standard_normal(count))
    return np.rint(start + np.concatenate([[0.0], np.cumsum(intervals)])).astype(np.int64)


def _wander(rng: np.random.Generator, amplitude: float, n_series: int) -> np.ndarray:
    """Baseline wander: two slow sinusoids per series, ``(N_SAMPLES, n_series)`` mV."""
    t = np.arange(N_SAMPLES) / FS
    freqs = rng.uniform(0.05, 0.45, size=(2, n_series))
    phases = rng.uniform(0.0, 2 * np.pi, size=(2, n_series))
    amps = amplitude * rng.uniform(0.3, 1.0, size=(2, n_series))
    return (
        amps[:, None, :] * np.sin(2 * np.pi * freqs[:, None, :] * t[None, :, None] + phases[:, None, :])
    ).sum(0)


def synthesize_digital(params: EcgParams, rng: np.random.Generator) -> np.ndarray:
    """Synthesise one record as integer ADC samples ``(N_SAMPLES, 12)`` in :data:`STORED_LEADS` order.

    Lead I, lead II and V1-V6 are quantised first; III, aVR, aVL and aVF are derived from the
    quantised I and II, so ``III == II - I`` exactly and the Goldberger leads are exact to within
    half an ADC unit. NaN spans are written as :data:`WFDB_INVALID`.
    """
    template, r_index = beat_template(params)
    dipole = np.zeros((N_SAMPLES, 3))
    for peak in _r_peaks(params, rng):
        lo = peak - r_index
        a, b = max(lo, 0), min(lo + template.shape[0], N_SAMPLES)
        if a < b:
            dipole[a:b] += template[a - lo : b - lo]

    ang = np.deg2rad(_CHEST_ANGLES_DEG)
    chest_dirs = np.stack([np.cos(ang), np.full(6, 0.1), np.sin(ang)], axis=1)
    chest_gain = _CHEST_GAINS * np.asarray(params.lead_gains)
    chest = dipole @ chest_dirs.T * chest_gain  # (N, 6)
    lead_i = dipole[:, 0]
    lead_ii = 0.5 * dipole[:, 0] + np.sqrt(3.0) / 2.0 * dipole[:, 1]

    independent = np.column_stack([lead_i, lead_ii, chest])  # (N, 8): I, II, V1..V6
    independent += _wander(rng, params.wander_mv, 8)
    independent += params.noise_mv * rng.standard_normal(independent.shape)
    digital = np.rint(independent * ADC_GAIN).astype(np.int64)

    i_q, ii_q = digital[:, 0], digital[:, 1]
    derived = {
        "I": i_q,
        "II": ii_q,
        "III": ii_q - i_q,
        "aVR": np.rint(-(i_q + ii_q) / 2.0).astype(np.int64),
        "aVF": np.rint(ii_q - i_q / 2.0).astype(np.int64),
        "aVL": np.rint(i_q - ii_q / 2.0).astype(np.int64),
    }
    for k, name in enumerate(_CHEST):
        derived[name] = digital[:, 2 + k]
    out = np.column_stack([derived[name] for name in STORED_LEADS])
    out = np.clip(out, WFDB_INVALID + 1, 32767)
    for group, start, length in params.nan_spans:
        cols = [STORED_LEADS.index(n) for n in (_LIMB if group == "limb" else (group,))]
        out[start : start + length, cols] = WFDB_INVALID
    return out.astype(np.int16)


def write_record(task: RecordTask) -> str:
    """Synthesise and write one WFDB record (``.hea`` + ``.dat``); return its record name.

    Top-level so a :mod:`multiprocessing` pool can pickle it. The generator is seeded from
    ``task.seed`` alone, so the bytes do not depend on which worker writes the record.
    """
    import wfdb  # imported here: only the writer processes need it

    rng = np.random.default_rng(list(task.seed))
    digital = synthesize_digital(task.params, rng)
    Path(task.directory).mkdir(parents=True, exist_ok=True)
    wfdb.wrsamp(
        task.record_name,
        fs=FS,
        units=["mV"] * len(STORED_LEADS),
        sig_name=list(STORED_LEADS),
        d_signal=digital,
        fmt=["16"] * len(STORED_LEADS),
        adc_gain=[ADC_GAIN] * len(STORED_LEADS),
        baseline=[0] * len(STORED_LEADS),
        base_time=task.base_datetime.time(),
        base_date=task.base_datetime.date(),
        write_dir=task.directory,
    )
    return task.record_name
