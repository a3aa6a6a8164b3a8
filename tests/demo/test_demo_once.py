"""``ecglab demo --once`` end to end (issue: make demo): a real FHIR server (sekmet), seeding, the
service under gunicorn with the bundled model, hooks fired, cards printed, everything stopped."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fhir_mappings.manifest import find_manifest

REPO = Path(__file__).resolve().parents[2]
SEKMET = REPO / ".venv-fhir" / "bin" / "sekmet"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _frees_up(port: int, within_s: float = 10.0) -> bool:
    """Whether ``port`` on loopback can be bound within ``within_s`` seconds."""
    deadline = time.monotonic() + within_s
    while True:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return True
            except OSError:
                if time.monotonic() >= deadline:
                    return False
        time.sleep(0.2)


@pytest.mark.skipif(
    not SEKMET.exists(), reason="sekmet-fhir is not installed in .venv-fhir (run make install)"
)
def test_demo_once_shows_cards_from_the_bundled_model_and_stops_everything(tmp_path: Path) -> None:
    find_manifest(REPO / "models")  # the bundled model must be there: the demo serves it
    fhir_port, port = _free_port(), _free_port()
    command = [sys.executable, "-m", "cds_service.cli", "demo", "--once", "--dir", str(tmp_path / "demo"),
               "--fhir-port", str(fhir_port), "--port", str(port), "--patients", "6", "--sekmet", str(SEKMET)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECGLAB_")}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for step in (
        "Starting the FHIR R4 server",
        "Seeding demo patients",
        "Starting the CDS Hooks service",
        "Firing",
    ):
        assert step in out
    assert "Patient" in out and "Indicator" in out and "not for clinical use" in out
    # --once stopped what it started: both ports are free again (the kernel may take a moment to
    # release a listening socket of a process that has just been reaped)
    for p in (fhir_port, port):
        assert _frees_up(p), f"port {p} still in use 10 s after the demo returned"
