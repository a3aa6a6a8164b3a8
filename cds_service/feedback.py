"""The feedback endpoint's logic: parse what the EHR reports about our cards and store it once.

CDS Hooks 2.0 §Feedback: ``{"feedback": [{card, outcome, acceptedSuggestions?, overrideReason?,
outcomeTimestamp}]}``. Parsing is lenient where real clients differ from the spec (cdshooks.md §6):

* Epic sends ``overrideReasons`` (plural), as an object or a list; Epic-built reasons arrive as
  ``com.epic.cdshooks.feedback.overrideReason.*`` extension keys instead of a Coding;
* the Sandbox sends a reason Coding without ``display``;
* unknown keys are ignored, vendor ``extension`` objects are kept verbatim.

What the spec requires stays required: ``card``, ``outcome`` (accepted/overridden) and an RFC 3339
``outcomeTimestamp``; a malformed item makes the whole batch a 400 naming the item and field, so a
client bug is visible instead of half-stored.

Storing is idempotent: each item's ``dedup_key`` (SHA-256 of card uuid, outcome and the
timestamp normalised to UTC) is unique in the table, so batched re-sends change nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine

from cds_service.db import Feedback, insert_ignoring_duplicates
from fhir_mappings.errors import EcglabError

log = logging.getLogger(__name__)

EPIC_REASON_PREFIX = "com.epic.cdshooks.feedback.overrideReason."
MAX_ITEMS = 500


class FeedbackError(EcglabError):
    """The feedback body is malformed; the message names the item and field."""


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

    @property
    def dedup_key(self) -> str:
        """SHA-256 of card uuid, outcome and UTC timestamp: equal for a re-sent report."""
        stamp = self.outcome_timestamp.astimezone(UTC).isoformat()
        return hashlib.sha256(f"{self.card_uuid}\x00{self.outcome}\x00{stamp}".encode()).hexdigest()


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


def _storable(value: str | None, where: str, column: str | None = None) -> str | None:
    """``value`` if the database can hold it in ``column``; FeedbackError naming ``where`` otherwise.

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
    limit = getattr(Feedback.__table__.c[column].type, "length", None) if column else None
    if limit is not None and len(value) > limit:
        raise FeedbackError(f"{where}: longer than {limit} characters")
    return value


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
        accepted_raw = entry.get("acceptedSuggestions") or []
        if not isinstance(accepted_raw, list):
            raise FeedbackError(f"{where}.acceptedSuggestions: must be a list")
        accepted = tuple(
            s["id"] for s in accepted_raw if isinstance(s, dict) and isinstance(s.get("id"), str) and s["id"]
        )
        if outcome == "accepted" and not accepted:
            raise FeedbackError(
                f"{where}.acceptedSuggestions: required (with ids) when the outcome is accepted"
            )
        system, code, display, comment, reason_ext = _override(entry)
        reason = f"{where}.overrideReason"
        system = _storable(system, f"{reason}.reason.system", "override_system")
        code = _storable(code, f"{reason}.reason.code", "override_code")
        display = _storable(display, f"{reason}.reason.display", "override_display")
        comment = _storable(comment, f"{reason}.userComment")
        extension: dict[str, Any] = {}
        if isinstance(entry.get("extension"), dict):
            extension.update(entry["extension"])
        if reason_ext:
            extension["overrideReason"] = reason_ext
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
    """Insert the items not stored before; returns how many were new."""
    received = now or datetime.now(UTC)
    rows = [
        {
            "dedup_key": item.dedup_key,
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
            "extension": json.dumps(item.extension, sort_keys=True) if item.extension else None,
            "issuer": issuer,
            "received_at": received,
        }
        for item in {i.dedup_key: i for i in items}.values()
    ]
    added = insert_ignoring_duplicates(engine, Feedback.__table__, rows, "dedup_key")
    log.info("feedback: %d item(s), %d new", len(items), added)
    return added
