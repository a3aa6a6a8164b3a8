"""The service's own database: clinician feedback, issued cards and the JWT replay cache.

SQLAlchemy 2 Core/ORM tables that run unchanged on a SQLite file (the default, one machine) and
on PostgreSQL (``postgresql+psycopg://``, several machines). Everything every worker must agree
on lives here rather than in process memory: a ``jti`` seen by one gunicorn worker must be refused
by all the others, and feedback must survive a restart.

Tables:

* ``ecglab_feedback``: one row per distinct feedback item. ``dedup_key`` (SHA-256 of issuer, card
  uuid, outcome and outcome timestamp) is unique, so an EHR that re-sends a batch changes nothing.
* ``ecglab_issued_card``: the uuid, service, issuer (JWT ``iss``; ``NULL`` with auth off), lab,
  probability and model version of every card we emitted, so feedback can be joined back to what
  the model said and accepted only from the issuer the card was issued to
  (:mod:`cds_service.feedback`). :func:`init_db` adds the ``issuer`` column to a table created by
  an older version; cards issued before that carry ``NULL``.
* ``ecglab_seen_token``: SHA-256 of ``iss`` + ``jti`` and the token's expiry; an insert that
  collides with an unexpired row is a replay.
* ``ecglab_prediction_cache``: predictions reused across hook calls
  (:mod:`cds_service.prediction_cache`): the SHA-256 of the key, the expiry (epoch seconds) and
  the value as JSON.

Idempotent inserts use the dialect's ``ON CONFLICT ... RETURNING`` (SQLite ≥ 3.35 and PostgreSQL),
one statement per call, so concurrent workers cannot race between a check and an insert; the rows
returned say what was written (``rowcount`` is not reliable across drivers: psycopg 3 reports -1).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    DateTime,
    Dialect,
    Engine,
    Float,
    Integer,
    String,
    Text,
    TypeDecorator,
    create_engine,
    delete,
    event,
    inspect,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import StaticPool

from fhir_mappings.errors import ConfigError

log = logging.getLogger(__name__)


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite stores naive text otherwise)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Store as naive UTC; refuse naive datetimes, whose zone would be guessed."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; attach a timezone")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Read back as an aware UTC datetime."""
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    """Declarative base of the service's tables."""


class Feedback(Base):
    """One clinician reaction to one card (CDS Hooks 2.0 §Feedback, plus Epic's variant)."""

    __tablename__ = "ecglab_feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    dedup_key: Mapped[str] = mapped_column(String(64), unique=True)
    service_id: Mapped[str] = mapped_column(String(128))
    card_uuid: Mapped[str] = mapped_column(String(256), index=True)
    outcome: Mapped[str] = mapped_column(String(16))
    outcome_timestamp: Mapped[datetime] = mapped_column(UtcDateTime())
    accepted_suggestions: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON list of ids
    override_system: Mapped[str | None] = mapped_column(String(512), nullable=True)
    override_code: Mapped[str | None] = mapped_column(String(256), nullable=True)
    override_display: Mapped[str | None] = mapped_column(String(512), nullable=True)
    user_comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    extension: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON object, vendor keys
    issuer: Mapped[str | None] = mapped_column(String(512), nullable=True)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime())


class IssuedCard(Base):
    """A card the service emitted: what the model said, so feedback can be analysed per lab."""

    __tablename__ = "ecglab_issued_card"

    card_uuid: Mapped[str] = mapped_column(String(64), primary_key=True)
    suggestion_uuid: Mapped[str] = mapped_column(String(64), index=True)
    service_id: Mapped[str] = mapped_column(String(128))
    hook_instance: Mapped[str] = mapped_column(String(256))
    lab_key: Mapped[str] = mapped_column(String(128))
    topic_code: Mapped[str] = mapped_column(String(100))
    indicator: Mapped[str] = mapped_column(String(16))
    direction: Mapped[str] = mapped_column(String(8))
    horizon_min: Mapped[int] = mapped_column(Integer)
    probability: Mapped[float] = mapped_column(Float)
    decision_threshold: Mapped[float] = mapped_column(Float)
    model_version: Mapped[str] = mapped_column(String(64))
    issued_at: Mapped[datetime] = mapped_column(UtcDateTime())
    issuer: Mapped[str | None] = mapped_column(String(512), nullable=True, default=None)


class SeenToken(Base):
    """A JWT already accepted: hashed ``iss``+``jti`` and its expiry (epoch seconds)."""

    __tablename__ = "ecglab_seen_token"

    token_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[float] = mapped_column(Float, index=True)


class CachedPredictionRow(Base):
    """A stored prediction (:mod:`cds_service.prediction_cache`): key hash, expiry and JSON value."""

    __tablename__ = "ecglab_prediction_cache"

    cache_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[float] = mapped_column(Float, index=True)
    payload: Mapped[str] = mapped_column(Text)


def make_engine(url: str) -> Engine:
    """An engine for ``url``: SQLite gets WAL + a busy timeout, PostgreSQL a pre-ping pool."""
    try:
        parsed = make_url(url)
    except SQLAlchemyError as exc:
        raise ConfigError(f"ECGLAB_DATABASE_URL: not a database URL ({exc})") from None
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:"):
            engine = create_engine(url, connect_args={"check_same_thread": False}, poolclass=StaticPool)
        else:
            Path(database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if parsed.get_backend_name() == "postgresql":
        return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)
    raise ConfigError("ECGLAB_DATABASE_URL: only sqlite and postgresql are supported")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """WAL journal and a busy timeout, so several gunicorn workers can share one SQLite file."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def init_db(engine: Engine, *, attempts: int = 3) -> None:
    """Create the tables that do not exist yet (idempotent; retried when workers race)."""
    import cds_service.audit  # noqa: F401  (defines the hook_audit table on Base)

    for attempt in range(1, attempts + 1):
        try:
            Base.metadata.create_all(engine)
            _add_missing_columns(engine)
            return
        except SQLAlchemyError:
            if attempt == attempts:
                raise
            time.sleep(0.2 * attempt)


#: Columns added after their table first shipped: (table, column) → the DDL type to add it with.
ADDED_COLUMNS = {("ecglab_issued_card", "issuer"): "VARCHAR(512)"}


def _add_missing_columns(engine: Engine) -> None:
    """``ALTER TABLE ... ADD COLUMN`` for each :data:`ADDED_COLUMNS` entry a table created earlier lacks.

    ``create_all`` creates missing tables but never changes existing ones; a racing worker that
    added the column first makes this fail once, and :func:`init_db` retries.
    """
    inspector = inspect(engine)
    for (table, column), ddl_type in ADDED_COLUMNS.items():
        if column not in {c["name"] for c in inspector.get_columns(table)}:
            with engine.begin() as conn:
                conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {ddl_type}"))
            log.info("added column %s.%s", table, column)


def ping(engine: Engine) -> bool:
    """Whether the database answers a trivial query (the health check)."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except SQLAlchemyError:
        return False


def _insert(engine: Engine, table: Any) -> Any:
    """The dialect's INSERT construct (both support ON CONFLICT and RETURNING)."""
    if engine.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def insert_ignoring_duplicates(engine: Engine, table: Any, rows: Sequence[dict[str, Any]], key: str) -> int:
    """Insert ``rows``; rows whose unique ``key`` already exists are skipped. Returns rows added.

    The rows are passed as parameters (SQLAlchemy's "insertmanyvalues": one INSERT with RETURNING
    for the batch), so the statement compiles once per table and is cached; rows inlined with
    ``.values(rows)`` were compiled afresh on every call (about 2 ms of each hook call's cards).
    """
    if not rows:
        return 0
    statement = _insert(engine, table).on_conflict_do_nothing(index_elements=[key]).returning(table.c[key])
    with engine.begin() as conn:
        return len(conn.execute(statement, list(rows)).all())


def remember_token(engine: Engine, token_key: str, expires_at: float, *, now: float | None = None) -> bool:
    """Record a verified token; ``False`` when an unexpired token with the same key was seen (replay)."""
    current = time.time() if now is None else now
    table = SeenToken.__table__
    statement = _insert(engine, table).values(token_key=token_key, expires_at=expires_at)
    statement = statement.on_conflict_do_update(
        index_elements=["token_key"],
        set_={"expires_at": expires_at},
        where=table.c.expires_at < current,
    ).returning(table.c.token_key)
    with engine.begin() as conn:
        return len(conn.execute(statement).all()) == 1


def purge_expired_tokens(engine: Engine, *, now: float | None = None) -> int:
    """Delete replay-cache rows whose token has expired; returns how many went."""
    current = time.time() if now is None else now
    with engine.begin() as conn:
        removed = conn.execute(
            delete(SeenToken).where(SeenToken.expires_at < current).returning(SeenToken.token_key)
        ).all()
    return len(removed)
