"""Clinician feedback per lab: how often cards were accepted, and why they were overridden.

Cards are tied to labs through the audit trail (every audited call lists the uuid, lab and
horizon of each card it returned); feedback rows (``ecglab_feedback``, :mod:`cds_service.feedback`)
name the card uuid. Only cards the EHR actually received (``live`` mode) can get feedback; shadow
cards are counted separately. Override reasons are counted by their display text, else their code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import Engine, select

from cds_service.audit import AuditRecord
from cds_service.db import Feedback

_IN_CHUNK = 500


def card_labs(records: Iterable[AuditRecord]) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """(live card uuid → lab, per lab: live and shadow card counts) from audited calls."""
    labs: dict[str, str] = {}
    counts: dict[str, dict[str, int]] = {}
    for record in records:
        for card in record.cards:
            entry = counts.setdefault(card.lab, {"live_cards": 0, "shadow_cards": 0})
            entry[f"{record.mode}_cards"] += 1
            if record.mode == "live":
                labs[card.uuid] = card.lab
    return labs, counts


def feedback_by_lab(
    engine: Engine, labs: Mapping[str, str], card_counts: Mapping[str, Mapping[str, int]]
) -> dict[str, Any]:
    """Per lab: cards, feedback items, acceptances, overrides, acceptance rate and override reasons."""
    out: dict[str, dict[str, Any]] = {
        lab: {
            "live_cards": counts.get("live_cards", 0),
            "shadow_cards": counts.get("shadow_cards", 0),
            "feedback": 0,
            "accepted": 0,
            "overridden": 0,
            "acceptance_rate": None,
            "override_reasons": {},
        }
        for lab, counts in card_counts.items()
    }
    uuids = list(labs)
    table = Feedback.__table__
    for start in range(0, len(uuids), _IN_CHUNK):
        chunk = uuids[start : start + _IN_CHUNK]
        query = select(
            table.c.card_uuid, table.c.outcome, table.c.override_code, table.c.override_display
        ).where(table.c.card_uuid.in_(chunk))
        with engine.connect() as conn:
            rows = conn.execute(query).all()
        for row in rows:
            entry = out[labs[row.card_uuid]]
            entry["feedback"] += 1
            if row.outcome == "accepted":
                entry["accepted"] += 1
            else:
                entry["overridden"] += 1
                reason = row.override_display or row.override_code or "(no reason given)"
                entry["override_reasons"][reason] = entry["override_reasons"].get(reason, 0) + 1
    for entry in out.values():
        decided = entry["accepted"] + entry["overridden"]
        entry["acceptance_rate"] = entry["accepted"] / decided if decided else None
    return out
