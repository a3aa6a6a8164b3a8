"""What the model's ECG input is: lead order, sampling rate, length and amplitude limits.

Both the training pipeline (the waveform memmap) and the service (one ECG per hook call) build
exactly this input, so the constants live here, in the contract, and nowhere else.
"""

from __future__ import annotations

MODEL_LEADS: tuple[str, ...] = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6", "III", "aVR", "aVL", "aVF")
"""The model's lead order (reference code ``channel_stoi_default``; method §2.2)."""

TARGET_FS: int = 100
"""Sampling rate of the stored and model-ready signal, Hz."""

TARGET_SECONDS: float = 10.0
"""Length of the stored signal, seconds."""

TARGET_SAMPLES: int = int(TARGET_FS * TARGET_SECONDS)
"""Samples per lead of the stored signal (1000)."""

MIN_DURATION_S: float = 2.5
"""Shortest accepted recording: one model input window (250 samples at 100 Hz)."""

CLIP_MV: float = 3.0
"""Amplitude limit in mV; larger excursions are clipped (reference ``clip_amp=3``)."""

MIN_FS: float = 50.0
"""Lowest accepted sampling rate, Hz (12-lead ECG devices record at 250–1000 Hz or more)."""

MAX_FS: float = 20_000.0
"""Highest accepted sampling rate, Hz."""
