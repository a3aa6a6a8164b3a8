"""Load: hook calls with a full prefetch against ``ecglab serve`` (gunicorn) on loopback, zero errors.

cdshooks.md §0.4 and §11 plan for a 500 ms p95. The service runs as it does in production: the
``ecglab serve`` command in a subprocess (gunicorn, gthread workers, the toy ONNX model, a SQLite
database in the test's folder, auth off), and a thread pool of httpx clients fires hook calls whose
prefetch carries everything (a 10 s 12-lead ECG, vitals): parsing, inference and card building, no
FHIR traffic. Every call must answer 200 with cards (no error, no budget overrun), and the
throughput and the p50/p95/p99 latencies go to the run's figures.

``make test`` runs a short version (300 calls, 8 at a time); ``make soak`` the full one (5 000
calls, 16 at a time). Both are bounded in time. The server's stderr is kept and scanned: no
traceback, no worker restart, and no token or patient id in any line (cdshooks.md §0.8).
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.figures import record_figure
from tests.onnx_fixtures import build_toy_model_dir
from tests.serve_process import ServeProcess
from tests.service_fixtures import FHIR_TOKEN, PATIENT_ID, clinical_record, hook_request, prefetch_from

HOOK_PATH = "/cds-services/ecglab-patient-view"
#: A client JWT sent along although auth is off: the server must not log it either.
CLIENT_JWT = "eyJhbGciOiJFUzM4NCIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJsb2FkLXRlc3QifQ.c2lnbmF0dXJlLW5vdC1jaGVja2Vk"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy ONNX model with every target positive (so every call builds cards)."""
    folder = tmp_path_factory.mktemp("load-model")
    build_toy_model_dir(folder, decision_threshold=0.0)
    return folder


def request_template() -> bytes:
    """The JSON body of a patient-view call with full prefetch; its hookInstance is a placeholder."""
    body = hook_request(
        "patient-view",
        prefetch=prefetch_from(clinical_record()),
        fhir_server="https://fhir.example.org/r4",
        token=FHIR_TOKEN,
    )
    body["hookInstance"] = "HOOK-INSTANCE"
    return json.dumps(body).encode()


def fire(base_url: str, calls: int, concurrency: int, time_limit_s: float) -> dict[str, Any]:
    """Send ``calls`` hook calls, ``concurrency`` at a time, stopping early at ``time_limit_s``.

    Returns the latencies of the answered calls (seconds), the errors (status or exception, with
    what the server said), the wall time, and the number of calls actually sent.
    """
    template = request_template()
    local = threading.local()
    deadline = time.monotonic() + time_limit_s
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {CLIENT_JWT}"}

    def one(_: int) -> tuple[float, str | None] | None:
        if time.monotonic() > deadline:
            return None
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = httpx.Client(base_url=base_url, timeout=30.0)
        body = template.replace(b"HOOK-INSTANCE", str(uuid.uuid4()).encode())
        started = time.perf_counter()
        try:
            response = client.post(HOOK_PATH, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return time.perf_counter() - started, f"{type(exc).__name__}: {exc}"
        elapsed = time.perf_counter() - started
        if response.status_code != 200:
            return elapsed, f"HTTP {response.status_code}: {response.text[:200]}"
        if not response.json().get("cards"):
            return elapsed, "200 without cards (budget exceeded or no ECG)"
        return elapsed, None

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(one, range(calls)))
    wall = time.perf_counter() - started
    done = [r for r in results if r is not None]
    return {
        "latencies": np.array([elapsed for elapsed, _ in done]),
        "errors": [error for _, error in done if error is not None],
        "wall_s": wall,
        "sent": len(done),
    }


def assert_clean_server_log(text: str, workers: int) -> None:
    """No traceback, no worker restart, no credential or patient id in the server's output."""
    assert "Traceback" not in text, text[text.find("Traceback") - 500 :][:3000]
    assert text.count("Booting worker") == workers, "a worker died and was restarted"
    for secret in (FHIR_TOKEN, CLIENT_JWT, CLIENT_JWT.split(".")[2], PATIENT_ID):
        assert secret not in text, f"the server log contains {secret[:12]}…"


def run_load(
    model_dir: Path,
    folder: Path,
    calls: int,
    concurrency: int,
    time_limit_s: float,
    label: str,
    expect_cards: bool = True,
) -> None:
    """Start the server, fire the calls, check zero errors and the log, record the figures."""
    with ServeProcess(folder, model_dir) as server:
        fire(server.base_url, concurrency * 2, concurrency, 60.0)  # warm-up: sessions, connections
        result = fire(server.base_url, calls, concurrency, time_limit_s)
        metrics = httpx.get(f"{server.base_url}/metrics", timeout=5.0).text
    latencies, errors = result["latencies"], result["errors"]
    assert result["sent"] == calls, f"only {result['sent']} of {calls} calls fit in {time_limit_s:.0f} s"
    assert errors == [], f"{len(errors)} errors, first: {errors[:3]}"
    if expect_cards:
        assert 'outcome="cards"' in metrics
    assert_clean_server_log(server.log(), workers=2)
    p50, p95, p99 = (1000 * np.percentile(latencies, q) for q in (50, 95, 99))
    record_figure(f"load {label}: calls / concurrency / errors", f"{calls} / {concurrency} / {len(errors)}")
    record_figure(f"load {label}: throughput", calls / result["wall_s"], "calls/s")
    record_figure(f"load {label}: latency p50 / p95 / p99", f"{p50:.0f} / {p95:.0f} / {p99:.0f} ms")
    record_figure(f"load {label}: server start-up", server.startup_s, "s")


def test_short_load_has_no_errors(model_dir: Path, tmp_path: Path) -> None:
    """§0.4: 300 full-prefetch hook calls, 8 at a time, against gunicorn: every one 200 with cards."""
    run_load(model_dir, tmp_path, calls=300, concurrency=8, time_limit_s=120.0, label="short (make test)")


@pytest.mark.soak
def test_soak_load_has_no_errors(model_dir: Path, tmp_path: Path) -> None:
    """§0.4: 5 000 full-prefetch hook calls, 16 at a time, against gunicorn: zero errors; throughput and p50/p95/p99."""
    run_load(model_dir, tmp_path, calls=5000, concurrency=16, time_limit_s=540.0, label="soak")


@pytest.mark.soak
def test_soak_load_with_the_bundled_model_has_no_errors(tmp_path: Path) -> None:
    """The same 5 000 calls at concurrency 16 through the real bundled model (111 targets, paper size)."""
    bundled = Path(__file__).resolve().parents[2] / "models"
    run_load(bundled, tmp_path, calls=5000, concurrency=16, time_limit_s=540.0, label="soak, bundled model",
             expect_cards=False)  # fmt: skip
