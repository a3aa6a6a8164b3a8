"""The feedback endpoint's logic: parse what the EHR reports about our cards and store it once.

CDS Hooks 2.0 §Feedback: ``{"feedback": [{card, outcome, acceptedSuggestions?, overrideReason?,
outcomeTimestamp}]}``. Parsing is lenient where real clients differ from the spec (cdshooks.md §6):

* Epic sends ``overrideReasons`` (plural), as an object or a list; Epic-built reasons arrive as
  ``com.epic.cdshooks.feedback.overrideReason.*`` extension keys instead of a Coding;
* the Sandbox sends a reason Coding without ``display``;
* unknown keys are ignored, vendor ``extension`` objects are kept verbatim.

What the spec requires stays required: ``card``, ``outcome`` (accepted/overridden) and an RFC 3339
``outcomeTimestamp``; a malformed item makes the whole batch a 400 naming the item and field, so a
client bug is visible instead of half-stored. What the caller controls is bounded: a free-text
``userComment`` of at most :data:`MAX_COMMENT_CHARS` characters, vendor extensions of at most
:data:`MAX_EXTENSION_BYTES` bytes as stored JSON, at most :data:`MAX_ACCEPTED` accepted suggestion
ids of at most :data:`MAX_SUGGESTION_ID_CHARS` characters; beyond, the batch is a 400
(``too-long``) naming the field.

Feedback is bound to the cards the service issued (``ecglab_issued_card``, written when a hook
answers): every item must name a card that this service (the ``{id}`` of the URL) issued to this
caller (the JWT ``iss``; with auth off, cards issued with auth off). An unknown card uuid, a card
issued to another issuer and a card of another service all get the same answer: **422
Unprocessable Entity** with an OperationOutcome (issue ``not-found``) naming the item, and nothing
of the batch is stored. 422 because the request is well-formed and authenticated but refers to
something the caller may not report on (FHIR servers answer 422 for references that do not
resolve); one answer for all three so that a caller cannot learn whether a card uuid exists for
another EHR or service. The log says which of the three it was. With ``ECGLAB_RECORD_CARDS`` off
no card is recorded, so all feedback is refused this way.

Storing is idempotent: each item's :meth:`FeedbackItem.dedup_key` (SHA-256 of issuer, card uuid,
outcome and the timestamp normalised to UTC) is unique in the table, so batched re-sends change
nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, select

from cds_service.db import Feedback, IssuedCard, insert_ignoring_duplicates
from cds_service.observability import log_safe
from fhir_mappings.errors import EcglabError

log = logging.getLogger(__name__)

EPIC_REASON_PREFIX = "com.epic.cdshooks.feedback.overrideReason."
MAX_ITEMS = 500
MAX_COMMENT_CHARS = 4000
MAX_EXTENSION_BYTES = 16 * 1024
MAX_ACCEPTED = 16
MAX_SUGGESTION_ID_CHARS = 256


class FeedbackError(EcglabError):
    """The feedback is refused; the message names the item and field.

    ``status`` and ``issue_code`` are the HTTP status and OperationOutcome issue code to answer
    with: 400 ``invalid`` for a malformed body, 400 ``too-long`` beyond a size cap.
    """

    def __init__(self, message: str, *, status: int = 400, issue_code: str = "invalid") -> None:
        super().__init__(message)
        self.status = status
        self.issue_code = issue_code


class UnboundFeedback(FeedbackError):
    """An item names a card this service did not issue to the caller: 422 ``not-found`` (module docstring)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=422, issue_code="not-found")


@dataclass(frozen=True)
class FeedbackItem:
    """One parsed feedback item, ready to store."""

    card_uuid: str
    outcome: str
    outcome_timestamp: datetime
    accepted_suggestions: tuple[str, ...]
    override_system: str | None
    override_code: str | None
    override_display: str | None
    user_comment: str | None
    extension: Mapping[str, Any] | None

    def dedup_key(self, issuer: str | None) -> str:
        """SHA-256 of issuer, card uuid, outcome and UTC timestamp: equal for a re-sent report."""
        stamp = self.outcome_timestamp.astimezone(UTC).isoformat()
        text = f"{issuer or ''}\x00{self.card_uuid}\x00{self.outcome}\x00{stamp}"
        return hashlib.sha256(text.encode()).hexdigest()


def _parse_timestamp(value: Any, where: str) -> datetime:
    """An RFC 3339 ``outcomeTimestamp`` with a zone; FeedbackError naming the item otherwise."""
    if not isinstance(value, str) or not value:
        raise FeedbackError(f"{where}.outcomeTimestamp: required RFC 3339 date-time")
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise FeedbackError(
            f"{where}.outcomeTimestamp: {value[:40]!r} is not an RFC 3339 date-time"
        ) from None
    if moment.tzinfo is None:
        raise FeedbackError(f"{where}.outcomeTimestamp: needs a time zone (e.g. 'Z')")
    try:
        moment.astimezone(UTC)  # stored and de-duplicated in UTC
    except OverflowError:
        raise FeedbackError(f"{where}.outcomeTimestamp: {value[:40]!r} has no UTC equivalent") from None
    return moment


def _text(value: Any) -> str | None:
    """A stripped non-empty string, else ``None``."""
    return value.strip() if isinstance(value, str) and value.strip() else None


def _storable(
    value: str | None, where: str, column: str | None = None, *, limit: int | None = None
) -> str | None:
    """``value`` if the database can hold it in ``column`` (or within ``limit``); FeedbackError otherwise.

    Both backends refuse text that is not valid Unicode (lone surrogates), PostgreSQL refuses NUL
    characters and enforces ``VARCHAR`` lengths; refusing here makes those a 400, not a 500.
    """
    if value is None:
        return None
    if "\x00" in value:
        raise FeedbackError(f"{where}: contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise FeedbackError(f"{where}: is not valid Unicode text") from None
    if column is not None:
        limit = getattr(Feedback.__table__.c[column].type, "length", None)
    if limit is not None and len(value) > limit:
        raise FeedbackError(f"{where}: longer than {limit} characters", issue_code="too-long")
    return value


def _accepted_ids(value: Any, where: str) -> tuple[str, ...]:
    """The ids of ``acceptedSuggestions`` (items without a string id are skipped), count and length capped."""
    if not isinstance(value, list):
        raise FeedbackError(f"{where}: must be a list")
    if len(value) > MAX_ACCEPTED:
        raise FeedbackError(f"{where}: more than {MAX_ACCEPTED} suggestions", issue_code="too-long")
    ids = []
    for index, suggestion in enumerate(value):
        if isinstance(suggestion, dict) and isinstance(suggestion.get("id"), str) and suggestion["id"]:
            checked = _storable(suggestion["id"], f"{where}[{index}].id", limit=MAX_SUGGESTION_ID_CHARS)
            ids.append(str(checked))
    return tuple(ids)


def _extension_json(extension: Mapping[str, Any], where: str) -> str | None:
    """The stored JSON of an item's vendor extensions, or ``None``; FeedbackError beyond the size cap."""
    if not extension:
        return None
    try:
        text = json.dumps(extension, sort_keys=True)
    except (TypeError, ValueError, RecursionError):
        raise FeedbackError(f"{where}: cannot be stored as JSON") from None
    if len(text.encode("utf-8")) > MAX_EXTENSION_BYTES:
        raise FeedbackError(f"{where}: larger than {MAX_EXTENSION_BYTES} bytes", issue_code="too-long")
    return text


def _override(
    item: Mapping[str, Any],
) -> tuple[str | None, str | None, str | None, str | None, dict[str, Any]]:
    """(system, code, display, userComment, vendor extension) from ``overrideReason`` or Epic's ``overrideReasons``."""
    raw = item.get("overrideReason", item.get("overrideReasons"))
    if isinstance(raw, list):
        raw = raw[0] if raw else None
    if not isinstance(raw, dict):
        return None, None, None, None, {}
    reason_raw, extension_raw = raw.get("reason"), raw.get("extension")
    reason: dict[str, Any] = reason_raw if isinstance(reason_raw, dict) else {}
    extension: dict[str, Any] = extension_raw if isinstance(extension_raw, dict) else {}
    system, code, display = (
        _text(reason.get("system")),
        _text(reason.get("code")),
        _text(reason.get("display")),
    )
    if code is None:
        code = _text(extension.get(EPIC_REASON_PREFIX + "reasonCategory"))
        if code is not None:
            system = system or "urn:com.epic.cdshooks.feedback.overrideReason"
    if display is None:
        display = _text(extension.get(EPIC_REASON_PREFIX + "reasonDisplay")) or _text(
            extension.get(EPIC_REASON_PREFIX + "reasonTitle")
        )
    return system, code, display, _text(raw.get("userComment")), extension


def parse_feedback(body: Any) -> list[FeedbackItem]:
    """Validate a feedback request body; :class:`FeedbackError` names the first problem."""
    if not isinstance(body, dict) or not isinstance(body.get("feedback"), list):
        raise FeedbackError("body must be an object with a 'feedback' list")
    entries = body["feedback"]
    if not entries:
        raise FeedbackError("feedback: the list is empty")
    if len(entries) > MAX_ITEMS:
        raise FeedbackError(f"feedback: more than {MAX_ITEMS} items in one request")
    items: list[FeedbackItem] = []
    for index, entry in enumerate(entries):
        where = f"feedback[{index}]"
        if not isinstance(entry, dict):
            raise FeedbackError(f"{where}: must be an object")
        card = _storable(_text(entry.get("card")), f"{where}.card", "card_uuid")
        if card is None:
            raise FeedbackError(f"{where}.card: required card uuid")
        outcome = entry.get("outcome")
        if outcome not in ("accepted", "overridden"):
            raise FeedbackError(f"{where}.outcome: must be 'accepted' or 'overridden'")
        stamp = _parse_timestamp(entry.get("outcomeTimestamp"), where)
        accepted = _accepted_ids(entry.get("acceptedSuggestions") or [], f"{where}.acceptedSuggestions")
        if outcome == "accepted" and not accepted:
            raise FeedbackError(
                f"{where}.acceptedSuggestions: required (with ids) when the outcome is accepted"
            )
        system, code, display, comment, reason_ext = _override(entry)
        reason = f"{where}.overrideReason"
        system = _storable(system, f"{reason}.reason.system", "override_system")
        code = _storable(code, f"{reason}.reason.code", "override_code")
        display = _storable(display, f"{reason}.reason.display", "override_display")
        comment = _storable(comment, f"{reason}.userComment", limit=MAX_COMMENT_CHARS)
        extension: dict[str, Any] = {}
        if isinstance(entry.get("extension"), dict):
            extension.update(entry["extension"])
        if reason_ext:
            extension["overrideReason"] = reason_ext
        _extension_json(extension, f"{where}.extension")
        items.append(
            FeedbackItem(card, outcome, stamp, accepted, system, code, display, comment, extension or None)
        )
    return items


def store_feedback(
    engine: Engine,
    service_id: str,
    items: list[FeedbackItem],
    *,
    issuer: str | None,
    now: datetime | None = None,
) -> int:
    """Insert the items not stored before; returns how many were new.

    Raises :class:`UnboundFeedback` (nothing stored) when an item names a card that ``service_id``
    did not issue to ``issuer``.
    """
    _check_bound(engine, service_id, items, issuer)
    received = now or datetime.now(UTC)
    unique = {item.dedup_key(issuer): item for item in items}
    rows = [
        {
            "dedup_key": key,
            "service_id": service_id,
            "card_uuid": item.card_uuid,
            "outcome": item.outcome,
            "outcome_timestamp": item.outcome_timestamp,
            "accepted_suggestions": json.dumps(list(item.accepted_suggestions))
            if item.accepted_suggestions
            else None,
            "override_system": item.override_system,
            "override_code": item.override_code,
            "override_display": item.override_display,
            "user_comment": item.user_comment,
            "extension": _extension_json(item.extension or {}, "extension"),
            "issuer": issuer,
            "received_at": received,
        }
        for key, item in unique.items()
    ]
    added = insert_ignoring_duplicates(engine, Feedback.__table__, rows, "dedup_key")
    log.info("feedback: %d item(s), %d new", len(items), added)
    return added


def _check_bound(engine: Engine, service_id: str, items: list[FeedbackItem], issuer: str | None) -> None:
    """UnboundFeedback unless every item's card was issued by ``service_id`` to ``issuer`` (module docstring)."""
    wanted = {item.card_uuid for item in items}
    table = IssuedCard.__table__
    query = select(table.c.card_uuid, table.c.service_id, table.c.issuer).where(table.c.card_uuid.in_(wanted))
    with engine.connect() as conn:
        issued = {row.card_uuid: row for row in conn.execute(query)}
    for index, item in enumerate(items):
        card = issued.get(item.card_uuid)
        if card is not None and card.service_id == service_id and card.issuer == issuer:
            continue
        why = (
            "an unknown card"
            if card is None
            else "a card of another service"
            if card.service_id != service_id
            else "a card issued to another issuer"
        )
        log.warning("feedback refused: item %d names %s (iss=%s)", index, why, log_safe(issuer))
        raise UnboundFeedback(
            f"feedback[{index}].card: no card with this uuid was issued by this service to the caller"
        )
