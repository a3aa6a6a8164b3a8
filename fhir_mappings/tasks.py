"""The model's four tasks, their horizons and validity windows: the one list training, export and the service share.

``est`` is the estimation task (the lab value within ±60 min of the ECG); ``monN`` is monitoring
over the next N minutes (method §2.4). A target's column name ends in ``_{task}``.

Every target is anchored to the ECG's time, not to the time a prediction is asked for: the label
of ``est`` is the measurement closest to the ECG within [ECG − 60 min, ECG + 60 min], the label of
``monN`` is "at least one abnormal value in [ECG, ECG + N min]" (already abnormal at the ECG
counts). :data:`TASK_WINDOW_MIN` declares those windows once; the labelling step
(:mod:`model_training.labels`) builds its windows from them, and the service states a claim only
while its window has not fully passed. The default ECG age limit (``ecg.yaml``
``max_age_minutes``) is :data:`MAX_WINDOW_END_MIN`, the end of the longest window: an older ECG
can only support claims about the past.
"""

from __future__ import annotations

from datetime import timedelta

TASKS: tuple[str, ...] = ("est", "mon30", "mon60", "mon120")
"""Task suffixes in the order the model's output vector concatenates them (method §1.2 step 8)."""

TASK_HORIZON_MIN: dict[str, int] = {"est": 0, "mon30": 30, "mon60": 60, "mon120": 120}
"""Forecast horizon of each task in minutes (0 = now)."""

TASK_WINDOW_MIN: dict[str, tuple[int, int]] = {
    "est": (-60, 60),
    "mon30": (0, 30),
    "mon60": (0, 60),
    "mon120": (0, 120),
}
"""Validity window of each task's label, (start, end) in minutes relative to the ECG time; both ends inclusive."""

MAX_WINDOW_END_MIN: int = max(end for _, end in TASK_WINDOW_MIN.values())
"""End of the longest validity window (120 min): the default ECG age limit."""


def task_window(task: str) -> tuple[timedelta, timedelta]:
    """``(start, end)`` of ``task``'s validity window as offsets from the ECG time.

    A claim of that task is about the patient between ``ecg_time + start`` and ``ecg_time + end``;
    once ``now`` is past ``ecg_time + end`` the claim describes the past.

    Raises:
        KeyError: for a name that is not one of :data:`TASKS`.
    """
    start, end = TASK_WINDOW_MIN[task]
    return timedelta(minutes=start), timedelta(minutes=end)
