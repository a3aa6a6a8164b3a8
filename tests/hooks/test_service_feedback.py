"""The feedback endpoint (cdshooks.md §6): spec, Sandbox and Epic shapes, idempotent, durable.

Feedback is accepted only for cards the service issued to the caller, so :func:`send` first
records the body's cards as issued by the order-select service to the test issuer
(:func:`tests.issued_cards.issue_card`; the binding itself is pinned in
``security/test_security_feedback.py``).

Every storage test runs twice: on the default SQLite file and on PostgreSQL (a throw-away
embedded cluster from ``tests/pg.py``), the two backends ``ECGLAB_DATABASE_URL`` supports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from cds_service.db import Feedback, IssuedCard
from tests.issued_cards import issue_card
from tests.service_fixtures import (
    EHR_ISS,
    ServiceEnv,
    load_sample,
)

pytest_plugins = ["tests.pg"]

FEEDBACK = "/cds-services/ecglab-order-select/feedback"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each storage test runs on a SQLite file and on an embedded PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'feedback.sqlite3'}"
    return str(request.getfixturevalue("pg_url"))


def send(app: Any, env: ServiceEnv, body: Any) -> Any:
    """POST a feedback body with a valid token, its cards first recorded as issued to the token's issuer."""
    entries = body.get("feedback") if isinstance(body, dict) else None
    cards = {e.get("card") for e in entries or [] if isinstance(e, dict) and isinstance(e.get("card"), str)}
    with app.extensions["ecglab"].engine.connect() as conn:
        known = set(conn.execute(select(IssuedCard.card_uuid)).scalars())
    for card in cards - known:
        issue_card(app, service_id="ecglab-order-select", issuer=EHR_ISS, card_uuid=card)
    return app.test_client().post(FEEDBACK, json=body, headers=env.bearer(FEEDBACK))


def rows(app: Any) -> list[Feedback]:
    """Every stored feedback row, in insertion order."""
    engine = app.extensions["ecglab"].engine
    with engine.connect() as conn:
        return list(conn.execute(select(Feedback).order_by(Feedback.id)))


def count(app: Any) -> int:
    """How many feedback rows are stored."""
    with app.extensions["ecglab"].engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(Feedback)).scalar_one())


SPEC_AND_SANDBOX = [
    ("spec/feedback.accepted.json", None),
    ("spec/feedback.overridden-no-reason.json", None),
    ("spec/feedback.overridden-with-reason.json", None),
    ("clients/sandbox.feedback.json", "accepted"),
    ("clients/sandbox.feedback.json", "overridden"),
]


@pytest.mark.parametrize(("name", "part"), SPEC_AND_SANDBOX)
def test_spec_and_sandbox_feedback_is_stored(
    make_app, service_env: ServiceEnv, database_url: str, name: str, part: str | None
) -> None:
    """§6: {card, outcome, acceptedSuggestions, overrideReason, outcomeTimestamp} items are stored."""
    body = load_sample(name)
    body = body[part] if part else body
    app = make_app(database_url=database_url)
    response = send(app, service_env, body)
    assert response.status_code == 200
    assert response.get_json() == {"received": 1, "stored": 1}
    [row] = rows(app)
    item = body["feedback"][0]
    assert (row.card_uuid, row.outcome, row.service_id) == (
        item["card"],
        item["outcome"],
        "ecglab-order-select",
    )
    if item["outcome"] == "accepted":
        assert json.loads(row.accepted_suggestions or "[]") == [s["id"] for s in item["acceptedSuggestions"]]
    if "overrideReason" in item:
        assert row.override_code == item["overrideReason"]["reason"]["code"]


EPIC_VARIANTS = {
    "overridden_with_reason": ("contraindicated", "bad", "User Entered Free Text"),
    "overridden_with_extension": ("45", "Does not meet criteria", "User Entered Free Text"),
    "accepted": (None, None, None),
}


@pytest.mark.parametrize("variant", list(EPIC_VARIANTS))
def test_epic_override_reasons_variants_are_stored(
    make_app, service_env: ServiceEnv, database_url: str, variant: str
) -> None:
    """§6 Epic: 'overrideReasons' (plural) with a Coding, or Epic extension keys instead of a Coding."""
    app = make_app(database_url=database_url)
    assert (
        send(app, service_env, load_sample("clients/epic.feedback.variants.json")[variant]).status_code == 200
    )
    [row] = rows(app)
    assert (row.override_code, row.override_display, row.user_comment) == EPIC_VARIANTS[variant]
    if variant == "overridden_with_extension":
        assert "com.epic.cdshooks.feedback.overrideReason.reasonTitle" in (row.extension or "")


def test_repeated_feedback_is_stored_once(make_app, service_env: ServiceEnv, database_url: str) -> None:
    """§6: the same card may be reported several times (batches, re-sends) → one row."""
    body = load_sample("spec/feedback.accepted.json")
    app = make_app(database_url=database_url)
    assert send(app, service_env, body).get_json()["stored"] == 1
    assert send(app, service_env, body).get_json()["stored"] == 0
    doubled = {"feedback": body["feedback"] * 2}
    assert send(app, service_env, doubled).get_json() == {"received": 2, "stored": 0}
    assert count(app) == 1


def test_same_instant_in_another_time_zone_is_a_duplicate(make_app, service_env: ServiceEnv) -> None:
    """Idempotency keys normalise outcomeTimestamp to UTC: 10:05Z and 12:05+02:00 are one report."""
    body = load_sample("spec/feedback.accepted.json")
    shifted = json.loads(json.dumps(body))
    shifted["feedback"][0]["outcomeTimestamp"] = "2021-12-11T12:05:31+02:00"
    app = make_app()
    send(app, service_env, body)
    assert send(app, service_env, shifted).get_json()["stored"] == 0


def test_feedback_survives_a_restart(make_app, service_env: ServiceEnv, database_url: str) -> None:
    """Nothing is lost on restart: a new app on the same database sees the rows and still deduplicates."""
    body = load_sample("spec/feedback.overridden-with-reason.json")
    first = make_app(database_url=database_url)
    assert send(first, service_env, body).get_json()["stored"] == 1
    first.extensions["ecglab"].engine.dispose()
    restarted = make_app(database_url=database_url)
    assert count(restarted) == 1
    assert send(restarted, service_env, body).get_json()["stored"] == 0


def _item(**changes: Any) -> dict[str, Any]:
    """A one-item feedback body; keys set to ``None`` are left out."""
    item: dict[str, Any] = {
        "card": "c-1",
        "outcome": "overridden",
        "outcomeTimestamp": "2026-01-01T00:00:00Z",
    }
    item.update(changes)
    return {"feedback": [{k: v for k, v in item.items() if v is not None}]}


BAD_FEEDBACK = {
    "no feedback list": ({"items": []}, "feedback"),
    "empty list": ({"feedback": []}, "empty"),
    "missing card": (_item(card=None), "feedback[0].card"),
    "unknown outcome": (_item(outcome="ignored"), "feedback[0].outcome"),
    "missing timestamp": (_item(outcomeTimestamp=None), "feedback[0].outcomeTimestamp"),
    "bad timestamp": (_item(outcomeTimestamp="yesterday"), "feedback[0].outcomeTimestamp"),
    "timestamp without zone": (_item(outcomeTimestamp="2026-01-01T00:00:00"), "feedback[0].outcomeTimestamp"),
    "accepted without suggestions": (_item(outcome="accepted"), "feedback[0].acceptedSuggestions"),
}


@pytest.mark.parametrize("case", list(BAD_FEEDBACK))
def test_malformed_feedback_is_400_naming_the_field(make_app, service_env: ServiceEnv, case: str) -> None:
    """What the spec requires stays required: a 400 OperationOutcome names the item and field; nothing is stored."""
    body, field = BAD_FEEDBACK[case]
    app = make_app()
    response = send(app, service_env, body)
    assert response.status_code == 400
    assert response.get_json()["resourceType"] == "OperationOutcome"
    assert field in response.get_json()["issue"][0]["details"]["text"]
    assert count(app) == 0


def test_feedback_body_that_is_not_json_is_400(make_app, service_env: ServiceEnv) -> None:
    """§7: a body that is not JSON is a 400 with an OperationOutcome."""
    response = (
        make_app()
        .test_client()
        .post(
            FEEDBACK, data=b"feedback!", content_type="application/json", headers=service_env.bearer(FEEDBACK)
        )
    )
    assert response.status_code == 400
    assert response.get_json()["resourceType"] == "OperationOutcome"


def test_feedback_needs_a_jwt(make_app) -> None:
    """§0.5: feedback is authenticated like every other call."""
    response = make_app().test_client().post(FEEDBACK, json=load_sample("spec/feedback.accepted.json"))
    assert response.status_code == 401
