"""Feedback durability: 1 000 concurrent posts with duplicates, a restart, and exactly the right rows.

CDS Hooks 2.0 §Feedback and cdshooks.md §6/§11: EHRs send feedback immediately or in batches and
re-send batches; the service stores each distinct item once (``dedup_key`` = card, outcome and the
outcome time in UTC) and must lose none when requests race or the service restarts. Each backend
(a SQLite file and PostgreSQL from :mod:`tests.pg`) gets 1 000 posts from 16 threads: 700 new
items one per post, plus 300 posts that re-send earlier items — the same instant written in another
time zone, and batches that repeat an item inside themselves. Then the app is rebuilt on the same
database (a restart), the count is checked again and a re-sent batch stores nothing. Feedback is
accepted only for issued cards, so the 700 cards are first recorded as issued (auth off: without
an issuer), as the hook pipeline would have.

``make soak`` repeats this against two gunicorn worker *processes* sharing one SQLite file, with a
real restart of ``ecglab serve`` in between.
"""

from __future__ import annotations

import concurrent.futures
import random
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from flask import Flask
from sqlalchemy import insert, select

from cds_service.app import create_app
from cds_service.db import Feedback, IssuedCard, init_db, make_engine
from cds_service.feedback import parse_feedback
from tests.figures import record_figure
from tests.onnx_fixtures import build_toy_model_dir
from tests.serve_process import ServeProcess
from tests.service_fixtures import FakeRuntime

pytest_plugins = ["tests.pg"]

FEEDBACK = "/cds-services/ecglab-order-sign/feedback"
DISTINCT = 700
POSTS = 1000
THREADS = 16
BASE_TIME = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
PLUS_0530 = timezone(timedelta(hours=5, minutes=30))


def item(index: int, *, zone: timezone = UTC) -> dict[str, Any]:
    """Feedback item ``index``: its own card; accepted (with a suggestion) or overridden; its own instant."""
    moment = (BASE_TIME + timedelta(seconds=index)).astimezone(zone)
    entry: dict[str, Any] = {
        "card": str(uuid.UUID(int=index + 1)),
        "outcome": "accepted" if index % 3 == 0 else "overridden",
        "outcomeTimestamp": moment.isoformat().replace("+00:00", "Z"),
    }
    if entry["outcome"] == "accepted":
        entry["acceptedSuggestions"] = [{"id": str(uuid.UUID(int=10_000 + index))}]
    else:
        entry["overrideReasons"] = [
            {"reason": {"code": "already-ordered", "system": "urn:x", "display": "Already ordered"}}
        ]
    return entry


def posts() -> list[dict[str, Any]]:
    """The 1 000 bodies, shuffled: 700 single new items, 300 re-sends (other zone, in-batch repeats)."""
    rng = random.Random(4711)
    bodies = [{"feedback": [item(i)]} for i in range(DISTINCT)]
    for n in range(POSTS - DISTINCT):
        first, second = rng.randrange(DISTINCT), rng.randrange(DISTINCT)
        if n % 3 == 0:
            bodies.append({"feedback": [item(first, zone=PLUS_0530)]})  # same instant, other zone
        elif n % 3 == 1:
            bodies.append({"feedback": [item(first), item(second), item(first)]})  # repeat inside a batch
        else:
            bodies.append({"feedback": [item(first)]})  # a plain re-send
    rng.shuffle(bodies)
    return bodies


def expected_keys() -> set[str]:
    """The dedup keys of the 700 distinct items: exactly the rows that must exist."""
    return {
        parsed.dedup_key(None) for i in range(DISTINCT) for parsed in parse_feedback({"feedback": [item(i)]})
    }


def issue_cards(url: str) -> None:
    """Record the cards of the :data:`DISTINCT` items as issued by order-sign with auth off."""
    engine = make_engine(url)
    init_db(engine)
    rows = [
        {
            "card_uuid": str(uuid.UUID(int=index + 1)),
            "suggestion_uuid": str(uuid.UUID(int=10_000 + index)),
            "service_id": "ecglab-order-sign",
            "hook_instance": f"hook-{index}",
            "lab_key": "ntprobnp",
            "topic_code": "ECGLABNTPROBNP",
            "indicator": "warning",
            "direction": "high",
            "horizon_min": 0,
            "probability": 0.9,
            "decision_threshold": 0.5,
            "model_version": "test",
            "issued_at": BASE_TIME,
            "issuer": None,
        }
        for index in range(DISTINCT)
    ]
    try:
        with engine.begin() as conn:
            conn.execute(insert(IssuedCard), rows)
    finally:
        engine.dispose()


def stored_keys(url: str) -> list[str]:
    """Every ``dedup_key`` in the feedback table of the database at ``url`` (duplicates kept)."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return [row.dedup_key for row in conn.execute(select(Feedback.dedup_key))]
    finally:
        engine.dispose()


def build(url: str) -> Flask:
    """A service on the database at ``url`` (auth off: this suite is about storage, not tokens)."""
    return create_app({"auth": False, "issuers": "", "database_url": url}, runtime=FakeRuntime())


def close(app: Flask) -> None:
    """Shut an app's pools and engine down, as a stopping worker would."""
    app.extensions["ecglab"].close()


def post_all(send: Any, bodies: list[dict[str, Any]]) -> list[Any]:
    """Send every body from :data:`THREADS` threads; the (status, json) answers in completion order."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=THREADS) as pool:
        return list(pool.map(send, bodies))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh SQLite file or an empty PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'feedback.sqlite3'}"
    else:
        yield request.getfixturevalue("pg_url")


def test_concurrent_feedback_with_duplicates_survives_a_restart_exactly(database_url: str) -> None:
    """§6: 1 000 racing posts (300 re-sends) → exactly 700 rows, each counted once; a restart loses and doubles none."""
    backend = database_url.split(":", 1)[0].split("+", 1)[0]
    bodies = posts()
    issue_cards(database_url)
    app = build(database_url)

    def send(body: dict[str, Any]) -> tuple[int, Any]:
        response = app.test_client().post(FEEDBACK, json=body)
        return response.status_code, response.get_json()

    try:
        answers = post_all(send, bodies)
    finally:
        close(app)
    assert {status for status, _ in answers} == {200}, [a for a in answers if a[0] != 200][:3]
    assert sum(body["stored"] for _, body in answers) == DISTINCT, (
        "each distinct item is reported stored once"
    )
    rows = stored_keys(database_url)
    assert len(rows) == DISTINCT and set(rows) == expected_keys()

    restarted = build(database_url)  # a new app on the same database, as after a restart
    try:
        assert sorted(stored_keys(database_url)) == sorted(rows)
        again = [restarted.test_client().post(FEEDBACK, json=body).get_json() for body in bodies[:100]]
    finally:
        close(restarted)
    assert sum(answer["stored"] for answer in again) == 0
    assert len(stored_keys(database_url)) == DISTINCT
    record_figure(
        f"feedback durability {backend}: posts / distinct rows / rows after restart",
        f"{POSTS} / {DISTINCT} / {len(rows)}",
    )


HOSTILE_FIELDS: dict[str, tuple[dict[str, Any], str]] = {
    "card longer than the column": ({"card": "c" * 300}, "card"),
    "NUL in a user comment": (
        {"overrideReason": {"userComment": "a\x00b", "reason": {"code": "x"}}},
        "userComment",
    ),
    "override display longer than the column": (
        {"overrideReason": {"reason": {"code": "x", "display": "d" * 600}}},
        "display",
    ),
    "lone surrogate in the reason code": ({"overrideReason": {"reason": {"code": "\ud800"}}}, "code"),
}


@pytest.mark.parametrize("case", list(HOSTILE_FIELDS))
def test_unstorable_feedback_text_is_a_400_naming_the_field(database_url: str, case: str) -> None:
    """§7: text a database cannot hold (PostgreSQL: NUL, VARCHAR lengths) is a 400 naming the field, never a 500."""
    changes, field_name = HOSTILE_FIELDS[case]
    base = {"card": str(uuid.uuid4()), "outcome": "overridden", "outcomeTimestamp": "2026-03-01T08:00:00Z"}
    app = build(database_url)
    try:
        response = app.test_client().post(FEEDBACK, json={"feedback": [{**base, **changes}]})
    finally:
        close(app)
    assert response.status_code == 400, response.get_json()
    assert field_name in response.get_json()["issue"][0]["details"]["text"]
    assert stored_keys(database_url) == []


@pytest.mark.soak
def test_feedback_from_two_gunicorn_processes_survives_a_restart(tmp_path: Path) -> None:
    """§6 under ``ecglab serve``: two worker processes share one SQLite file; after a restart, exactly 700 rows."""
    model_dir = tmp_path / "model"
    build_toy_model_dir(model_dir)
    url = f"sqlite:///{tmp_path / 'serve.sqlite3'}"
    bodies = posts()
    issue_cards(url)

    def sender(base_url: str) -> Any:
        local = threading.local()  # one keep-alive client per sending thread

        def send(body: dict[str, Any]) -> tuple[int, Any]:
            if not hasattr(local, "client"):
                local.client = httpx.Client(base_url=base_url, timeout=30.0)
            response = local.client.post(FEEDBACK, json=body)
            return response.status_code, response.json()

        return send

    with ServeProcess(tmp_path, model_dir, {"ECGLAB_DATABASE_URL": url}) as server:
        answers = post_all(sender(server.base_url), bodies)
    assert {status for status, _ in answers} == {200}
    assert sum(body["stored"] for _, body in answers) == DISTINCT
    with ServeProcess(tmp_path, model_dir, {"ECGLAB_DATABASE_URL": url}) as server:
        again = post_all(sender(server.base_url), bodies[:200])
    assert sum(body["stored"] for _, body in again) == 0
    rows = stored_keys(url)
    assert len(rows) == DISTINCT and set(rows) == expected_keys()
    record_figure(
        "feedback durability gunicorn+sqlite: posts / distinct rows after restart", f"{POSTS} / {len(rows)}"
    )
