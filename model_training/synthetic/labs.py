"""Planted lab states and ``labevents``: draws before, inside and after each ECG's windows.

Every draw inside the estimation and monitoring windows measures the lab's state at the ECG (1.5 %
analytic noise); draws outside them measure a drifted state. The dirty rows the method drops (NaN
``valuenum``, 0/0 reference ranges, unit variants, serum index labels, urine creatinine) are
written here too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from model_training.synthetic.catalogue import LABS, PLANTED_RULES, LabItem, PlantedRule
from model_training.synthetic.constants import D_LABITEMS_COLUMNS
from model_training.synthetic.formats import fmt_times, minutes, num_text, provider_ids, unique_ids

_PLANTED_LABELS = {rule.label for rule in PLANTED_RULES}

_PANELS = ("chem", "cbc", "coag", "cardiac", "misc", "urine")
_PANEL_PROB = {"chem": 0.92, "cbc": 0.9, "coag": 0.4, "cardiac": 0.85, "misc": 0.8, "urine": 0.0}


@dataclass(frozen=True)
class _Slot:
    """A lab-draw time slot relative to ``ecg_time`` (minutes); ``inside`` = within the windows."""

    name: str
    lo: int
    hi: int
    prob: float
    inside: bool


_SLOTS: tuple[_Slot, ...] = (
    _Slot("pre", -200, -130, 0.35, False),
    _Slot("est_before", -55, -10, 0.45, True),
    _Slot("at", 3, 27, 0.85, True),
    _Slot("mid", 33, 58, 0.35, True),
    _Slot("late", 65, 118, 0.5, True),
    _Slot("post", 150, 240, 0.4, False),
)


def _rule_score(rule: PlantedRule, drivers: dict[str, np.ndarray], eps: np.ndarray) -> np.ndarray:
    """The rule's standardised score: weighted drivers plus noise, divided by the weights' norm."""
    weights = np.array([*rule.weights.values(), rule.noise])
    total = sum(w * drivers[name] for name, w in rule.weights.items()) + rule.noise * eps
    return total / np.linalg.norm(weights)


def _rule_value(rule: PlantedRule, score: np.ndarray) -> np.ndarray:
    """Map a score to the lab's value (linear or log-normal around ``centre``)."""
    return rule.centre * np.exp(rule.scale * score) if rule.log else rule.centre + rule.scale * score


def draw_planted_states(
    rng: np.random.Generator, ecg: pd.DataFrame
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per-ECG scores of the planted rules and the true value of every lab at the ECG."""
    n = len(ecg)
    drivers = {
        name: ecg[name].to_numpy()
        for name in ("z_volt", "z_rate", "z_k", "z_qt", "z_inf", "z_age", "z_sex", "z_weight")
    }
    scores: dict[str, np.ndarray] = {}
    states: dict[str, np.ndarray] = {}
    for rule in PLANTED_RULES:
        score = _rule_score(rule, {**drivers, **scores}, rng.standard_normal(n))
        scores[rule.label] = score
        lab = next(x for x in LABS if x.label == rule.label and x.fluid == "Blood")
        states[rule.label] = np.maximum(_rule_value(rule, score), lab.minimum)
    for lab in LABS:
        if lab.label in _PLANTED_LABELS and lab.fluid == "Blood":
            continue
        z = rng.standard_normal(n)
        value = lab.centre * np.exp(lab.spread * z) if lab.log else lab.centre + lab.spread * z
        states[_state_key(lab)] = np.maximum(value, lab.minimum)
    return scores, states


def _state_key(lab: LabItem) -> str:
    """Key of a lab's state: its label, qualified by fluid when it is not blood."""
    return lab.label if lab.fluid == "Blood" else f"{lab.label} ({lab.fluid})"


def _drifted(lab: LabItem, state: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A value away from the ECG: correlated with the state but re-drawn (r = 0.4)."""
    rule = next((r for r in PLANTED_RULES if r.label == lab.label and lab.fluid == "Blood"), None)
    z = rng.standard_normal(state.size)
    if rule is not None:
        base = np.log(state / rule.centre) / rule.scale if rule.log else (state - rule.centre) / rule.scale
        return _rule_value(rule, 0.4 * base + 0.92 * z)
    if lab.log:
        return state**0.4 * lab.centre**0.6 * np.exp(0.92 * lab.spread * z)
    return 0.4 * state + 0.6 * lab.centre + 0.92 * lab.spread * z


def draw_labevents(
    rng: np.random.Generator, ecg: pd.DataFrame, states: dict[str, np.ndarray]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Lab draws before, inside and after each ECG's windows, with the dirty rows the method drops."""
    n = len(ecg)
    t = ecg["ecg_time"].to_numpy()
    kind = ecg["kind"].to_numpy()
    slot_scale = np.where(kind == "outpatient", 0.5, 1.0)
    parts: list[dict[str, np.ndarray]] = []
    # one distinct specimen id per (slot, panel, ECG), drawn together so none repeats
    specimens = unique_ids(rng, 10_000_000, 100_000_000, len(_SLOTS) * len(_PANELS) * n)
    specimens = specimens.reshape(len(_SLOTS), len(_PANELS), n)
    for s_index, slot in enumerate(_SLOTS):
        present = rng.random(n) < slot.prob * slot_scale
        offset = rng.integers(slot.lo, slot.hi + 1, n)
        when = t + offset.astype("timedelta64[m]")
        for p_index, panel in enumerate(_PANELS):
            p = 0.12 if (panel == "urine" and slot.name == "at") else _PANEL_PROB[panel]
            drawn = present & (rng.random(n) < p)
            specimen = specimens[s_index, p_index]
            store = when + minutes(rng.uniform(15, 150, n))
            for lab in (x for x in LABS if x.panel == panel):
                take = drawn & (rng.random(n) < lab.draw_prob)
                if not take.any():
                    continue
                state = states[_state_key(lab)]
                inside_value = state * (1.0 + 0.015 * rng.standard_normal(n))
                value = inside_value if slot.inside else _drifted(lab, state, rng)
                rows = np.flatnonzero(take)
                parts.append(
                    {
                        "ecg_row": rows,
                        "itemid": np.full(rows.size, lab.itemid),
                        "charttime": when[rows],
                        "storetime": store[rows],
                        "specimen_id": specimen[rows],
                        "raw": np.maximum(value[rows], lab.minimum),
                    }
                )
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    lab_by_id = {lab.itemid: lab for lab in LABS}
    m = cols["ecg_row"].size
    itemids = cols["itemid"]

    valuenum = np.empty(m)
    value = np.empty(m, dtype=object)
    unit = np.empty(m, dtype=object)
    lower = np.full(m, np.nan)
    upper = np.full(m, np.nan)
    u = rng.random(m)
    for itemid, lab in lab_by_id.items():
        sel = itemids == itemid
        if not sel.any():
            continue
        v = np.round(cols["raw"][sel], lab.decimals)
        valuenum[sel] = v
        value[sel] = num_text(v, lab.decimals)
        unit[sel] = lab.unit if lab.unit is not None else ""
        if lab.ref is not None:
            refs = np.array((lab.ref, *lab.ref_variants), dtype=float)
            pick = np.where(u[sel] < 0.85, 0, 1 + (u[sel] * 1000).astype(int) % max(len(lab.ref_variants), 1))
            pick = np.minimum(pick, len(refs) - 1)
            lower[sel], upper[sel] = refs[pick, 0], refs[pick, 1]

    dirty = rng.random(m)
    # NaN valuenum: failed measurements on every lab, "<0.01" troponins
    failed = dirty < 0.012
    valuenum[failed] = np.nan
    value[failed] = "UNABLE TO REPORT"
    trop = (itemids == 51003) & (valuenum < 0.01)
    valuenum[trop] = np.nan
    value[trop] = "<0.01"
    # de-identified text value with a numeric valuenum (as MIMIC does for some glucose rows)
    value[(itemids == 50931) & (dirty > 0.8)] = "___"
    # reference ranges recorded as 0/0 (no usable range)
    zero_ref = (dirty > 0.5) & (dirty < 0.512) & ~np.isnan(lower)
    lower[zero_ref] = 0.0
    upper[zero_ref] = 0.0
    # unit variants the method names: D-Dimer in ng/mL DDU, lymphocytes in #/uL
    ddu = (itemids == 51196) & (u > 0.9)
    unit[ddu] = "ng/mL DDU"
    valuenum[ddu] = np.round(valuenum[ddu] / 2.0)
    value[ddu] = num_text(valuenum[ddu], 0)
    per_ul = (itemids == 51133) & (u > 0.94)
    unit[per_ul] = "#/uL"
    valuenum[per_ul] = np.round(valuenum[per_ul] * 1000.0)
    value[per_ul] = num_text(valuenum[per_ul], 0)
    lower[per_ul] *= 1000.0
    upper[per_ul] *= 1000.0

    has_ref = ~np.isnan(lower) & ~((lower == 0) & (upper == 0))
    abnormal = has_ref & ~np.isnan(valuenum) & ((valuenum < lower) | (valuenum > upper))
    e = cols["ecg_row"]
    ed_like = kind[e] == "ed"
    hadm = ecg["hadm_id"].to_numpy()[e]
    comments = np.where(
        (itemids == 50931) & (dirty > 0.8), "IF FASTING, 70-100 NORMAL, >125 PROVISIONAL DIABETES.", ""
    )
    labs = pd.DataFrame(
        {
            "subject_id": ecg["subject_id"].to_numpy()[e],
            "hadm_id": pd.array(np.where(hadm > 0, hadm, -1), dtype="Int64"),
            "specimen_id": cols["specimen_id"],
            "itemid": itemids,
            "order_provider_id": provider_ids(rng, m, 0.35),
            "charttime_raw": cols["charttime"],
            "storetime": fmt_times(cols["storetime"]),
            "value": value,
            "valuenum": valuenum,
            "valueuom": unit,
            "ref_range_lower": lower,
            "ref_range_upper": upper,
            "flag": np.where(abnormal, "abnormal", ""),
            "priority": np.where(ed_like, "STAT", "ROUTINE"),
            "comments": comments,
        }
    )
    labs.loc[labs["hadm_id"] == -1, "hadm_id"] = pd.NA
    labs = labs.sort_values(["subject_id", "charttime_raw", "specimen_id", "itemid"], kind="stable")
    labs["charttime"] = fmt_times(labs["charttime_raw"].to_numpy())
    labs = labs.drop(columns="charttime_raw").reset_index(drop=True)
    labs.insert(0, "labevent_id", np.arange(1, len(labs) + 1))

    items = pd.DataFrame(
        [(lab.itemid, lab.label, lab.fluid, lab.category) for lab in LABS], columns=list(D_LABITEMS_COLUMNS)
    ).sort_values("itemid")
    return labs, items.reset_index(drop=True)
