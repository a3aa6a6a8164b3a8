"""The subgroups performance is reported for: age bands and sex names, one definition for both sides.

``ecglab evaluate`` (test-fold fairness figures for the model card) and ``ecglab monitor`` (the
same figures on a site's own patients) group ECGs by these labels, so a model card's "60-79" and a
local report's "60-79" are the same people.
"""

from __future__ import annotations

import itertools
import math

AGE_BAND_EDGES: tuple[int, ...] = (18, 40, 60, 80)
"""Lower edges of the age bands, in years; the last band is open."""

SEX_NAMES: tuple[str, ...] = ("female", "male")
"""Names of the sex categories in the manifest's ``sex`` encoding (0 female, 1 male)."""


def age_band(age: float | None) -> str | None:
    """The band of ``age`` in years (``'<18'``, ``'18-39'``, ``'40-59'``, ``'60-79'``, ``'80+'``).

    ``None`` or a non-finite age gives ``None`` (unknown: left out of the age-band figures).
    """
    if age is None or not math.isfinite(age):
        return None
    if age < AGE_BAND_EDGES[0]:
        return f"<{AGE_BAND_EDGES[0]}"
    for low, high in itertools.pairwise(AGE_BAND_EDGES):
        if age < high:
            return f"{low}-{high - 1}"
    return f"{AGE_BAND_EDGES[-1]}+"


def sex_name(code: float | None) -> str | None:
    """``'female'``/``'male'`` for the encoded sex (0/1); ``None`` when missing or out of range."""
    if code is None or not math.isfinite(code):
        return None
    index = round(code)
    return SEX_NAMES[index] if 0 <= index < len(SEX_NAMES) else None
