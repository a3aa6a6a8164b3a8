"""The lab catalogue (``d_labitems`` rows and how each lab is measured) and the planted rules.

A planted rule makes a lab's value at the ECG a fixed function of visible drivers plus noise (see
the package docstring for the list); every other lab is noise. :func:`planted_targets` names the
target columns the rules determine, as ``ecglab preprocess`` names them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fhir_mappings.tasks import TASKS
from model_training.synthetic.constants import INDEX_ITEMIDS, URINE_CREATININE_ITEMID


@dataclass(frozen=True)
class LabItem:
    """One ``d_labitems`` row plus how this generator measures it.

    ``ref`` is the reference range written on most rows, ``ref_variants`` the ranges on a
    minority (so the per-label median is what the method needs). For noise labs the state value
    is ``centre + spread·N(0,1)`` (``log=False``) or ``centre·exp(spread·N(0,1))`` (``log=True``).
    ``panel`` groups labs drawn from one specimen; ``draw_prob`` is the chance the lab is run when
    its panel is drawn.
    """

    itemid: int
    label: str
    fluid: str
    category: str
    unit: str | None
    ref: tuple[float, float] | None
    ref_variants: tuple[tuple[float, float], ...] = ()
    decimals: int = 1
    panel: str = "chem"
    draw_prob: float = 1.0
    centre: float = 1.0
    spread: float = 0.1
    log: bool = False
    minimum: float = 0.0


@dataclass(frozen=True)
class PlantedRule:
    """A lab whose value at the ECG is a fixed function of visible drivers plus noise.

    ``score = (Σ w·driver + noise·ε) / ‖(w, noise)‖``; the value is ``centre + scale·score``
    (``log=False``) or ``centre·exp(scale·score)`` (``log=True``). A driver may be another rule's
    score (e.g. Hematocrit follows the hemoglobin score). ``directions`` are the planted classes;
    ``branch`` says whether the waveform, the metadata or both carry the signal.
    """

    label: str
    weights: dict[str, float]
    noise: float
    centre: float
    scale: float
    log: bool
    directions: tuple[str, ...]
    branch: str
    description: str


PLANTED_RULES: tuple[PlantedRule, ...] = (
    PlantedRule(
        "NTproBNP", {"z_volt": 0.6, "z_rate": 0.5, "z_age": 0.55}, 0.3,
        353.0 * float(np.exp(-1.6 * 0.524)), 1.6, True, ("high",), "both",
        "low QRS voltage + fast rate (waveform) + older age (metadata)",
    ),
    PlantedRule(
        "Potassium", {"z_k": 1.0}, 0.3, 4.2, 1.05, False, ("low", "high"), "waveform",
        "T-wave shape only: tall narrow (peaked) T = high, flat broad T = low",
    ),
    PlantedRule(
        "Hemoglobin", {"z_sex": 0.65, "z_age": -0.45, "z_weight": 0.5}, 0.3, 15.4, 2.1, False,
        ("low", "high"), "metadata", "male sex, younger age, higher weight (OMR) = higher",
    ),
    PlantedRule(
        "Hematocrit", {"Hemoglobin": 1.0}, 0.15, 46.5, 6.3, False, ("low", "high"), "metadata",
        "follows the hemoglobin score (sex, age, weight)",
    ),
    PlantedRule(
        "Creatinine", {"z_age": 0.5, "z_sex": 0.35, "z_qt": 0.65}, 0.3,
        1.2 * float(np.exp(-0.5 * 0.674)), 0.5, True, ("low", "high"), "both",
        "long QTc (waveform) + older age + male sex (metadata)",
    ),
    PlantedRule(
        "Urea Nitrogen", {"Creatinine": 0.9}, 0.35, 20.0 * float(np.exp(-0.45 * 0.6)), 0.45, True,
        ("high",), "both", "follows the creatinine score (QTc, age, sex)",
    ),
    PlantedRule(
        "White Blood Cells", {"z_inf": 1.0}, 0.3, 11.0 * float(np.exp(-0.5 * 0.95)), 0.5, True,
        ("low", "high"), "metadata", "inflammation seen in the ED vital signs (temperature, resp. rate)",
    ),
)  # fmt: skip


LABS: tuple[LabItem, ...] = (
    # chemistry panel
    LabItem(50983, "Sodium", "Blood", "Chemistry", "mEq/L", (133, 145), ((135, 145),), 0, "chem", 1.0, 139, 4.0),
    LabItem(50971, "Potassium", "Blood", "Chemistry", "mEq/L", (3.3, 5.1), ((3.5, 5.3), (3.4, 5.2)), 1, "chem", 1.0, minimum=1.8),
    LabItem(50902, "Chloride", "Blood", "Chemistry", "mEq/L", (96, 108), ((98, 107),), 0, "chem", 1.0, 102, 4.5),
    LabItem(50882, "Bicarbonate", "Blood", "Chemistry", "mEq/L", (22, 32), ((22, 29),), 0, "chem", 1.0, 25, 3.5),
    LabItem(50868, "Anion Gap", "Blood", "Chemistry", "mEq/L", (8, 20), ((10, 18),), 0, "chem", 1.0, 14, 3.5),
    LabItem(51006, "Urea Nitrogen", "Blood", "Chemistry", "mg/dL", (6, 20), ((7, 22),), 0, "chem", 1.0, minimum=2.0),
    LabItem(50912, "Creatinine", "Blood", "Chemistry", "mg/dL", (0.5, 1.2), ((0.4, 1.1),), 1, "chem", 1.0, minimum=0.2),
    LabItem(50931, "Glucose", "Blood", "Chemistry", "mg/dL", (70, 100), ((70, 105),), 0, "chem", 1.0, 118, 0.3, True),
    LabItem(50893, "Calcium, Total", "Blood", "Chemistry", "mg/dL", (8.4, 10.3), ((8.5, 10.5),), 1, "chem", 0.6, 9.2, 0.6),
    LabItem(50960, "Magnesium", "Blood", "Chemistry", "mg/dL", (1.6, 2.6), ((1.7, 2.4),), 1, "chem", 0.6, 2.0, 0.28),
    LabItem(50970, "Phosphate", "Blood", "Chemistry", "mg/dL", (2.7, 4.5), ((2.5, 4.5),), 1, "chem", 0.6, 3.5, 0.25, True),
    # complete blood count
    LabItem(51301, "White Blood Cells", "Blood", "Hematology", "K/uL", (4.0, 11.0), ((4.5, 11.0),), 1, "cbc", 1.0, minimum=0.5),
    LabItem(51222, "Hemoglobin", "Blood", "Hematology", "g/dL", (13.7, 17.5), ((11.2, 15.7), (12.0, 16.0)), 1, "cbc", 1.0, minimum=5.0),
    LabItem(51221, "Hematocrit", "Blood", "Hematology", "%", (40.0, 51.0), ((34.0, 45.0), (36.0, 48.0)), 1, "cbc", 1.0, minimum=15.0),
    LabItem(51265, "Platelet Count", "Blood", "Hematology", "K/uL", (150, 440), ((150, 400),), 0, "cbc", 1.0, 240, 0.35, True),
    LabItem(51133, "Absolute Lymphocyte Count", "Blood", "Hematology", "K/uL", (1.2, 3.7), (), 2, "cbc", 0.3, 1.6, 0.45, True),
    # coagulation
    LabItem(51237, "INR(PT)", "Blood", "Hematology", None, (0.9, 1.1), ((0.8, 1.2),), 1, "coag", 1.0, 1.15, 0.2, True),
    LabItem(51275, "PTT", "Blood", "Hematology", "sec", (25.0, 36.5), ((25.0, 35.0),), 1, "coag", 1.0, 31.0, 0.2, True),
    # cardiac
    LabItem(50963, "NTproBNP", "Blood", "Chemistry", "pg/mL", (0, 353), ((0, 450),), 0, "cardiac", 0.75, minimum=5.0),
    LabItem(51003, "Troponin T", "Blood", "Chemistry", "ng/mL", (0, 0.01), ((0, 0.03),), 2, "cardiac", 0.6, 0.02, 1.2, True),
    # miscellaneous chemistry, blood gas and coagulation add-ons
    LabItem(50862, "Albumin", "Blood", "Chemistry", "g/dL", (3.5, 5.2), ((3.4, 4.8),), 1, "misc", 0.4, 4.1, 0.55),
    LabItem(50889, "C-Reactive Protein", "Blood", "Chemistry", "mg/L", (0, 5.0), ((0, 10.0),), 1, "misc", 0.3, 6.0, 1.2, True),
    LabItem(50813, "Lactate", "Blood", "Blood Gas", "mmol/L", (0.5, 2.0), ((0.5, 2.2),), 1, "misc", 0.35, 1.6, 0.45, True),
    LabItem(51196, "D-Dimer", "Blood", "Hematology", "ng/mL FEU", (0, 500), ((0, 230),), 0, "misc", 0.15, 450, 0.9, True),
    # rows the method drops: another fluid under a blood label, and the serum indices H / I / L
    LabItem(URINE_CREATININE_ITEMID, "Creatinine", "Urine", "Chemistry", "mg/dL", None, (), 0, "urine", 1.0, 95, 0.5, True),
    LabItem(INDEX_ITEMIDS["H"], "H", "Blood", "Chemistry", None, None, (), 0, "chem", 0.2, 12, 0.9, True),
    LabItem(INDEX_ITEMIDS["I"], "I", "Blood", "Chemistry", None, None, (), 0, "chem", 0.2, 1.5, 0.8, True),
    LabItem(INDEX_ITEMIDS["L"], "L", "Blood", "Chemistry", None, None, (), 0, "chem", 0.2, 8, 0.9, True),
)  # fmt: skip


def planted_targets() -> list[str]:
    """Target column names (``{label}_{low|high}_{task}``) the planted rules determine."""
    return [f"{r.label}_{d}_{task}" for r in PLANTED_RULES for d in r.directions for task in TASKS]


def paper_thresholds(label: str) -> dict[str, float]:
    """The median reference range the method derives for a planted lab (the main range here)."""
    lab = next(x for x in LABS if x.label == label and x.fluid == "Blood")
    low, high = lab.ref if lab.ref is not None else (float("nan"), float("nan"))
    return {"low": float(low), "high": float(high)}
