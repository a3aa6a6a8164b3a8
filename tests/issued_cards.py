"""Issued cards recorded straight into an app's database, for feedback tests.

Feedback is accepted only for cards the service issued (to the caller's issuer, for the caller's
service). Tests that need many cards, or a card of a chosen issuer and service, record them with
:func:`issue_card` exactly as the hook pipeline does instead of calling a hook each time; the
binding itself is pinned through real hook calls in ``security/test_security_feedback.py``.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from flask import Flask
from sqlalchemy import insert

from cds_service.db import IssuedCard


def issue_card(app: Flask, *, service_id: str, issuer: str | None, card_uuid: str | None = None) -> str:
    """Record an issued card in ``app``'s database as the hook pipeline does; returns its uuid."""
    card = card_uuid or str(uuid.uuid4())
    row = {
        "card_uuid": card,
        "suggestion_uuid": str(uuid.uuid4()),
        "service_id": service_id,
        "hook_instance": str(uuid.uuid4()),
        "lab_key": "ntprobnp",
        "topic_code": "ECGLABNTPROBNP",
        "indicator": "warning",
        "direction": "high",
        "horizon_min": 0,
        "probability": 0.9,
        "decision_threshold": 0.5,
        "model_version": "9.9.9-test",
        "issued_at": datetime.now(UTC),
        "issuer": issuer,
    }
    with app.extensions["ecglab"].engine.begin() as conn:
        conn.execute(insert(IssuedCard).values(row))
    return card
