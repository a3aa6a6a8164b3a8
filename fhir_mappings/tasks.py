"""The model's four tasks and their horizons: the one list training, export and the service share.

``est`` is the estimation task (the lab value within ±60 min of the ECG); ``monN`` is monitoring
over the next N minutes (method §2.4). A target's column name ends in ``_{task}``.
"""

from __future__ import annotations

TASKS: tuple[str, ...] = ("est", "mon30", "mon60", "mon120")
"""Task suffixes in the order the model's output vector concatenates them (method §1.2 step 8)."""

TASK_HORIZON_MIN: dict[str, int] = {"est": 0, "mon30": 30, "mon60": 60, "mon120": 120}
"""Forecast horizon of each task in minutes (0 = now)."""
