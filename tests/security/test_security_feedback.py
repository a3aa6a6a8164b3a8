"""Feedback bound to issued cards, size-capped, de-duplicated per issuer (issue 14, "Feedback").

Cards come from real hook calls where the binding is the point (a card issued through
``POST /cds-services/{id}`` to one issuer), and feedback goes through
``POST /cds-services/{id}/feedback`` with real signed JWTs. The refusals checked here:

* an unknown card uuid, a card issued to another issuer, a card of another service: 422 with an
  OperationOutcome (``not-found``), one and the same answer for all three, nothing stored — also
  when only one item of a batch is foreign;
* a user comment, vendor extensions or accepted suggestions beyond their caps: 400 ``too-long``
  naming the field, nothing stored.

Cards of a chosen issuer and service are recorded directly with :func:`tests.issued_cards.issue_card`,
as the hook pipeline does.
"""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import create_engine, func, select, text

from cds_service.db import Feedback, IssuedCard
from cds_service.feedback import (
    MAX_ACCEPTED,
    MAX_COMMENT_CHARS,
    MAX_EXTENSION_BYTES,
    MAX_SUGGESTION_ID_CHARS,
    parse_feedback,
)
from tests.issued_cards import issue_card
from tests.service_fixtures import (
    EHR_ISS,
    JKU_ISS,
    JKU_URL,
    PUBLIC_URL,
    FakeRuntime,
    ServiceEnv,
    clinical_record,
    hook_request,
    mint,
    prediction,
    prefetch_from,
)

PATIENT_VIEW = "ecglab-patient-view"
ORDER_SIGN = "ecglab-order-sign"


def hook_path(service_id: str) -> str:
    """The hook endpoint path of a service."""
    return f"/cds-services/{service_id}"


def feedback_path(service_id: str) -> str:
    """The feedback endpoint path of a service."""
    return f"/cds-services/{service_id}/feedback"


def card_from_hook(app: Flask, env: ServiceEnv, *, iss: str = EHR_ISS, service_id: str = PATIENT_VIEW) -> str:
    """Call a hook as ``iss`` (static key, or the jku issuer's RSA key) and return the uuid of the card it issued."""
    hook = {"ecglab-patient-view": "patient-view", "ecglab-order-sign": "order-sign"}[service_id]
    response = app.test_client().post(
        hook_path(service_id),
        json=hook_request(hook, prefetch=prefetch_from(clinical_record())),
        headers=bearer(env, hook_path(service_id), iss),
    )
    assert response.status_code == 200, response.get_json()
    return str(response.get_json()["cards"][0]["uuid"])


def bearer(env: ServiceEnv, path: str, iss: str) -> dict[str, str]:
    """A valid token of ``iss`` (EHR_ISS: static EC key; JKU_ISS: RSA key through its jku) for ``path``."""
    if iss == JKU_ISS:
        token = mint(env.keys["rsa"], iss=JKU_ISS, aud=PUBLIC_URL + path, jku=JKU_URL)
        return {"Authorization": f"Bearer {token}"}
    return env.bearer(path, iss=iss)


def item(card: str, **changes: Any) -> dict[str, Any]:
    """An overridden feedback item for ``card``; ``changes`` add or replace fields."""
    entry: dict[str, Any] = {
        "card": card,
        "outcome": "overridden",
        "outcomeTimestamp": "2026-03-01T08:00:00Z",
    }
    entry.update(changes)
    return entry


def post_feedback(
    app: Flask,
    env: ServiceEnv | None,
    items: list[dict[str, Any]],
    *,
    iss: str = EHR_ISS,
    service_id: str = PATIENT_VIEW,
) -> Any:
    """POST ``items`` to a service's feedback endpoint, signed by ``iss`` (no token when ``env`` is None)."""
    path = feedback_path(service_id)
    headers = bearer(env, path, iss) if env is not None else {}
    return app.test_client().post(path, json={"feedback": items}, headers=headers)


def stored(app: Flask) -> list[Any]:
    """Every stored feedback row."""
    with app.extensions["ecglab"].engine.connect() as conn:
        return list(conn.execute(select(Feedback).order_by(Feedback.id)))


def positive_app(make_app: Any, **settings: Any) -> Flask:
    """An app whose model flags NT-proBNP, so every hook call issues one card."""
    return make_app(runtime=FakeRuntime([prediction("ntprobnp", 0.95)]), **settings)


def assert_unbound(response: Any, index: int = 0) -> None:
    """The one refusal for feedback on a card the caller may not report on: 422 not-found naming the item."""
    assert response.status_code == 422, response.get_json()
    assert response.mimetype == "application/fhir+json"
    body = response.get_json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] == "not-found"
    assert body["issue"][0]["details"]["text"] == (
        f"feedback[{index}].card: no card with this uuid was issued by this service to the caller"
    )


# -- binding to issued cards ------------------------------------------------------------------------------------


def test_feedback_on_a_card_issued_to_the_caller_is_stored(make_app, service_env: ServiceEnv) -> None:
    """The normal path: a card issued by a hook call of EHR_ISS gets EHR_ISS's feedback, stored once."""
    app = positive_app(make_app)
    card = card_from_hook(app, service_env)
    with app.extensions["ecglab"].engine.connect() as conn:
        recorded = conn.execute(select(IssuedCard.issuer).where(IssuedCard.card_uuid == card)).scalar_one()
    assert recorded == EHR_ISS, "the hook pipeline records the issuer of every card"
    response = post_feedback(app, service_env, [item(card)])
    assert response.status_code == 200 and response.get_json() == {"received": 1, "stored": 1}
    [row] = stored(app)
    assert (row.card_uuid, row.issuer, row.service_id) == (card, EHR_ISS, PATIENT_VIEW)


def test_unknown_card_is_refused(make_app, service_env: ServiceEnv) -> None:
    """A card uuid the service never issued: 422, nothing stored."""
    app = positive_app(make_app)
    assert_unbound(post_feedback(app, service_env, [item(str(uuid.uuid4()))]))
    assert stored(app) == []


def test_card_issued_to_another_issuer_is_refused(make_app, service_env: ServiceEnv) -> None:
    """EHR B cannot report on (or pollute the analysis of) a card issued to EHR A, though B's token is valid."""
    app = positive_app(make_app)
    card = card_from_hook(app, service_env, iss=EHR_ISS)
    assert_unbound(post_feedback(app, service_env, [item(card)], iss=JKU_ISS))
    assert stored(app) == []
    theirs = card_from_hook(app, service_env, iss=JKU_ISS)  # control: JKU_ISS may report on its own card
    assert post_feedback(app, service_env, [item(theirs)], iss=JKU_ISS).get_json()["stored"] == 1


def test_card_of_another_service_is_refused(make_app, service_env: ServiceEnv) -> None:
    """Feedback on a patient-view card sent to order-sign's feedback endpoint: 422."""
    app = positive_app(make_app)
    card = card_from_hook(app, service_env, service_id=PATIENT_VIEW)
    assert_unbound(post_feedback(app, service_env, [item(card)], service_id=ORDER_SIGN))
    assert stored(app) == []


def test_the_three_refusals_are_indistinguishable(make_app, service_env: ServiceEnv) -> None:
    """Unknown, other issuer and other service get byte-identical answers: no oracle for card uuids."""
    app = positive_app(make_app)
    theirs = issue_card(app, service_id=PATIENT_VIEW, issuer=JKU_ISS)
    other_service = issue_card(app, service_id=ORDER_SIGN, issuer=EHR_ISS)
    answers = [
        post_feedback(app, service_env, [item(card)]).get_data()
        for card in (str(uuid.uuid4()), theirs, other_service)
    ]
    assert answers[0] == answers[1] == answers[2]


def test_one_foreign_item_refuses_the_whole_batch(make_app, service_env: ServiceEnv) -> None:
    """A batch of the caller's own card and a foreign one: 422 naming item 1; the good item is not stored either."""
    app = positive_app(make_app)
    mine = issue_card(app, service_id=PATIENT_VIEW, issuer=EHR_ISS)
    theirs = issue_card(app, service_id=PATIENT_VIEW, issuer=JKU_ISS)
    assert_unbound(post_feedback(app, service_env, [item(mine), item(theirs)]), index=1)
    assert stored(app) == []


def test_with_auth_off_only_cards_issued_with_auth_off_take_feedback(make_app) -> None:
    """Auth off: a card issued without an issuer takes feedback; a card issued to an EHR does not."""
    app = positive_app(make_app, auth=False, issuers="")
    response = app.test_client().post(
        hook_path(PATIENT_VIEW), json=hook_request("patient-view", prefetch=prefetch_from(clinical_record()))
    )
    card = response.get_json()["cards"][0]["uuid"]
    assert post_feedback(app, None, [item(card)]).get_json() == {"received": 1, "stored": 1}
    ehr_card = issue_card(app, service_id=PATIENT_VIEW, issuer=EHR_ISS)
    assert_unbound(post_feedback(app, None, [item(ehr_card)]))


def test_refusal_is_logged_with_its_reason(
    make_app, service_env: ServiceEnv, caplog: pytest.LogCaptureFixture
) -> None:
    """The answer does not say which of the three it was; the log does (with iss, not the card uuid)."""
    app = positive_app(make_app)
    theirs = issue_card(app, service_id=PATIENT_VIEW, issuer=JKU_ISS)
    with caplog.at_level("INFO"):
        post_feedback(app, service_env, [item(theirs)])
    assert "names a card issued to another issuer (iss=https://ehr.example.org)" in caplog.text


# -- size caps -------------------------------------------------------------------------------------------------

EPIC_DISPLAY = "com.epic.cdshooks.feedback.overrideReason.reasonDisplay"

OVERSIZED: dict[str, tuple[dict[str, Any], str]] = {
    "user comment": (
        {"overrideReason": {"reason": {"code": "x"}, "userComment": "c" * (MAX_COMMENT_CHARS + 1)}},
        "feedback[0].overrideReason.userComment: longer than 4000 characters",
    ),
    "vendor extension": (
        {"extension": {"org.example.note": "e" * MAX_EXTENSION_BYTES}},
        f"feedback[0].extension: larger than {MAX_EXTENSION_BYTES} bytes",
    ),
    "Epic reason extension": (
        {"overrideReasons": [{"extension": {EPIC_DISPLAY: "d" * 500, "x": ["y" * 100] * 200}}]},
        f"feedback[0].extension: larger than {MAX_EXTENSION_BYTES} bytes",
    ),
    "many accepted suggestions": (
        {"outcome": "accepted", "acceptedSuggestions": [{"id": str(n)} for n in range(MAX_ACCEPTED + 1)]},
        f"feedback[0].acceptedSuggestions: more than {MAX_ACCEPTED} suggestions",
    ),
    "long suggestion id": (
        {"outcome": "accepted", "acceptedSuggestions": [{"id": "s" * (MAX_SUGGESTION_ID_CHARS + 1)}]},
        f"feedback[0].acceptedSuggestions[0].id: longer than {MAX_SUGGESTION_ID_CHARS} characters",
    ),
}


@pytest.mark.parametrize("case", list(OVERSIZED))
def test_oversized_free_text_and_extensions_are_a_400(make_app, service_env: ServiceEnv, case: str) -> None:
    """Free text, extensions and suggestion lists beyond their caps: 400 too-long naming the field, nothing stored."""
    app = positive_app(make_app)
    card = issue_card(app, service_id=PATIENT_VIEW, issuer=EHR_ISS)
    changes, message = OVERSIZED[case]
    response = post_feedback(app, service_env, [item(card, **changes)])
    assert response.status_code == 400, response.get_json()
    issue = response.get_json()["issue"][0]
    assert (issue["code"], issue["details"]["text"]) == ("too-long", message)
    assert stored(app) == []


def test_text_at_the_caps_is_stored(make_app, service_env: ServiceEnv) -> None:
    """Control: exactly at each cap the item is accepted and kept verbatim."""
    app = positive_app(make_app)
    card = issue_card(app, service_id=PATIENT_VIEW, issuer=EHR_ISS)
    comment = "c" * MAX_COMMENT_CHARS
    accepted = [{"id": "s" * MAX_SUGGESTION_ID_CHARS}] + [{"id": str(n)} for n in range(MAX_ACCEPTED - 1)]
    entry = item(
        card,
        outcome="accepted",
        acceptedSuggestions=accepted,
        overrideReason={"reason": {"code": "x"}, "userComment": comment},
        extension={"org.example.note": "e" * (MAX_EXTENSION_BYTES - 40)},
    )
    assert post_feedback(app, service_env, [entry]).get_json() == {"received": 1, "stored": 1}
    [row] = stored(app)
    assert row.user_comment == comment and len(row.extension.encode()) <= MAX_EXTENSION_BYTES


# -- de-duplication --------------------------------------------------------------------------------------------


def test_dedup_key_includes_the_issuer(make_app, service_env: ServiceEnv) -> None:
    """The stored key is SHA-256 of issuer, card, outcome and UTC time: another issuer's report never collides."""
    app = positive_app(make_app)
    card = issue_card(app, service_id=PATIENT_VIEW, issuer=EHR_ISS)
    entry = item(card)
    assert post_feedback(app, service_env, [entry]).get_json()["stored"] == 1
    assert (
        post_feedback(app, service_env, [entry, entry]).get_json()["stored"] == 0
    )  # re-sends still collapse
    [row] = stored(app)
    expected = hashlib.sha256(f"{EHR_ISS}\x00{card}\x00overridden\x002026-03-01T08:00:00+00:00".encode())
    assert row.dedup_key == expected.hexdigest()
    [parsed] = parse_feedback({"feedback": [entry]})
    assert len({parsed.dedup_key(EHR_ISS), parsed.dedup_key(JKU_ISS), parsed.dedup_key(None)}) == 3


# -- schema upgrade ----------------------------------------------------------------------------------------------


def test_an_issued_card_table_without_issuer_is_upgraded(
    make_app, service_env: ServiceEnv, tmp_path: Path
) -> None:
    """A database made before issuers were recorded gets the column at start-up; its old cards take no EHR's feedback."""
    url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    old = create_engine(url)
    with old.begin() as conn:
        conn.execute(
            text(
                "CREATE TABLE ecglab_issued_card (card_uuid VARCHAR(64) PRIMARY KEY, suggestion_uuid VARCHAR(64),"
                " service_id VARCHAR(128), hook_instance VARCHAR(256), lab_key VARCHAR(128),"
                " topic_code VARCHAR(100), indicator VARCHAR(16), direction VARCHAR(8), horizon_min INTEGER,"
                " probability FLOAT, decision_threshold FLOAT, model_version VARCHAR(64), issued_at DATETIME)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO ecglab_issued_card VALUES ('old-card', 's', :service, 'h', 'ntprobnp', 'T',"
                " 'info', 'high', 0, 0.9, 0.5, '1', '2026-01-01 00:00:00')"
            ),
            {"service": PATIENT_VIEW},
        )
    old.dispose()
    app = positive_app(make_app, database_url=url)
    with app.extensions["ecglab"].engine.connect() as conn:
        assert (
            conn.execute(select(IssuedCard.issuer).where(IssuedCard.card_uuid == "old-card")).scalar_one()
            is None
        )
        assert conn.execute(select(func.count()).select_from(IssuedCard)).scalar_one() == 1
    assert_unbound(post_feedback(app, service_env, [item("old-card")]))
    card = card_from_hook(app, service_env)
    assert post_feedback(app, service_env, [item(card)]).get_json()["stored"] == 1
