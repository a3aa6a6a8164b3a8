"""``ecglab serve`` (gunicorn) as a subprocess on a free loopback port, for end-to-end runs.

The load test and the feedback-durability soak start the service exactly as production does (the
``ecglab serve`` command, gthread workers) with auth off, a SQLite database in the test's folder
and the CPU provider, and talk to it over HTTP. :class:`ServeProcess` owns that subprocess: it
waits for ``/healthz``, keeps the server's output in a log file the tests scan, and stops it
(SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from tests.fhir_servers import wait_until_answering

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 60.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServeProcess:
    """``ecglab serve`` in a subprocess on a free loopback port; stderr goes to ``log_path``.

    ``env`` adds ``ECGLAB_*`` settings to auth off, the folder's SQLite database, the CPU
    provider and the prediction cache off. Use as a context manager: it waits for ``/healthz`` and stops the server (SIGTERM,
    then SIGKILL) on exit.
    """

    def __init__(self, folder: Path, model_dir: Path, env: Mapping[str, str] | None = None) -> None:
        self.folder = folder
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = folder / f"serve-{self.port}.log"
        self.environment = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("ECGLAB_", "PROMETHEUS_"))},
            "ECGLAB_AUTH": "off",
            "ECGLAB_HOST": "127.0.0.1",
            "ECGLAB_PORT": str(self.port),
            "ECGLAB_MODEL_DIR": str(model_dir),
            "ECGLAB_DATABASE_URL": f"sqlite:///{folder / 'serve.sqlite3'}",
            "ECGLAB_ONNX_PROVIDERS": "CPUExecutionProvider",
            "ECGLAB_WORKERS": "2",
            "ECGLAB_LOG_LEVEL": "DEBUG",
            "ECGLAB_PREDICTION_CACHE_S": "0",  # every call runs the model: the load figures are its
            **(env or {}),
        }
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServeProcess:
        command = [sys.executable, "-m", "cds_service.cli", "serve"]
        with self.log_path.open("wb") as sink:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=self.environment, stdout=sink, stderr=subprocess.STDOUT
            )
        self.startup_s = self._wait_ready()
        return self

    def _wait_ready(self) -> float:
        """Poll ``/healthz`` until it answers 200; fail with the log tail if the server dies or stalls."""
        assert self.process is not None
        try:
            return wait_until_answering(
                self.process, f"{self.base_url}/healthz", self.log_path, "ecglab serve", START_TIMEOUT_S
            )
        except RuntimeError as exc:
            self.stop()
            pytest.fail(str(exc))

    def stop(self) -> None:
        """Stop gunicorn gracefully; kill it if it does not go."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        """Everything the server wrote to stdout and stderr so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")
