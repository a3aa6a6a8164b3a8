"""Test support for the card-preview page (``/demo``): a demo app, a live server, headless Chromium.

* :func:`demo_world` — four FHIR patients behind :class:`tests.service_fixtures.MockFhir` and a model
  double (:class:`PerEcgRuntime`) that answers per patient: cards in all three indicator colours,
  no cards, a model failure (HTTP 500), and a patient without an ECG;
* :func:`build_demo_app` — the real service (``create_app``, auth off, the demo FHIR server
  allowed) with the page's blueprint registered on it, exactly as demo mode does;
* :class:`LiveServer` — that app on a free loopback port in a thread (werkzeug, request logging
  off so no patient id reaches the test log);
* :func:`chrome` — a headless Chromium driven by Selenium through Debian's chromedriver. Skipped
  with the install commands when it is missing::

      apt-get install -y chromium chromium-driver     # as root: /usr/bin/chromium, /usr/bin/chromedriver
      .venv/bin/pip install selenium                  # Selenium 4 (4.51 tested)

  ``ECGLAB_CHROMIUM`` / ``ECGLAB_CHROMEDRIVER`` point elsewhere. Selenium never downloads a
  browser or driver here: both paths are given explicitly.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask import Flask
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from cds_service.inference import TargetPrediction
from tests.service_fixtures import MockFhir, ecg_observation, vital

DEMO_FHIR = "https://fhir.demo.example.org/r4"
"""The FHIR base of the test world (served by MockFhir; never resolved)."""

#: Cards in three colours under this indicator map: potassium (critical lab) → critical,
#: NT-proBNP (warning lab, p ≥ 0.9) → warning, CK (info lab) → info.
INDICATOR_MAP = "critical>=0.8:critical;warning>=0.9:warning;*>=0:info"

INSTALL_HINT = (
    "install the browser and driver as root with 'apt-get install -y chromium chromium-driver' "
    "and Selenium with '.venv/bin/pip install selenium'"
)

CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1440,1000",
)


# -- the test world ---------------------------------------------------------------------------------------


@dataclass
class PerEcgRuntime:
    """Model double answering per ECG reference: a list of predictions, or an exception to raise."""

    answers: dict[str, list[TargetPrediction] | BaseException]
    version: str = "1.0.0-demo-test"
    trained_on_synthetic: bool = True
    provider: str = "FakeProvider"
    manifest: Any = None
    seen: list[str] = field(default_factory=list)

    def predict(self, inputs: Any) -> list[TargetPrediction]:
        reference = inputs.ecg.reference
        self.seen.append(reference)
        answer = self.answers.get(reference, [])
        if isinstance(answer, BaseException):
            raise answer
        return list(answer)


@dataclass
class DemoWorld:
    """The resources of the fake FHIR server and the model's answers, with the patients' ids."""

    resources: list[dict[str, Any]]
    runtime: PerEcgRuntime
    cards_patient: str = "pat-ada"
    quiet_patient: str = "pat-ben"
    failing_patient: str = "pat-cyd"
    no_ecg_patient: str = "pat-dee"


def finding(
    lab_key: str,
    probability: float,
    *,
    value_threshold: float,
    task: str = "est",
    direction: str = "high",
    threshold: float = 0.5,
    auroc: float = 0.81,
) -> TargetPrediction:
    """A model output for a lab of the mappings, with a clinically plausible value threshold."""
    from fhir_mappings import load_mappings

    lab = load_mappings().lab(lab_key)
    assert lab is not None, lab_key
    horizon = {"est": 0, "mon30": 30, "mon60": 60, "mon120": 120}[task]
    return TargetPrediction(
        target=f"{lab.mimic_label}_{direction}_{task}",
        lab_key=lab.key,
        label=lab.mimic_label,
        direction=direction,
        task=task,
        horizon_min=horizon,
        probability=probability,
        decision_threshold=threshold,
        value_threshold=value_threshold,
        unit=lab.unit,
        auroc=auroc,
    )


US_CORE_RACE = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"
CDC_RACE = "urn:oid:2.16.840.1.113883.6.238"


def _patient(
    pid: str, given: str, family: str, gender: str, born: str, race: str | None = None
) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Patient",
        "id": pid,
        "name": [{"given": [given], "family": family}],
        "gender": gender,
        "birthDate": born,
    }
    if race is not None:  # a CDC race code, e.g. 2106-3 White
        resource["extension"] = [
            {
                "url": US_CORE_RACE,
                "extension": [{"url": "ombCategory", "valueCoding": {"system": CDC_RACE, "code": race}}],
            }
        ]
    return resource


#: Per-lead scale of the synthetic beat (aVR is the mirror image of the others, as on a real ECG).
LEAD_GAIN = {"I": 0.7, "II": 1.0, "III": 0.4, "aVR": -0.85, "aVL": 0.25, "aVF": 0.7,
             "V1": -0.5, "V2": 0.3, "V3": 0.8, "V4": 1.3, "V5": 1.1, "V6": 0.8}  # fmt: skip


def beating_ecg_observation(
    pid: str, *, recorded_at: datetime, rid: str, bpm: float = 96.0
) -> dict[str, Any]:
    """A 12-lead ECG Observation at 500 Hz whose beats have P, QRS and T waves (µV samples).

    The service then resamples it (500 → 100 Hz) exactly as a device recording, and the page's
    plot shows something a reader recognises as an ECG.
    """
    observation = ecg_observation(pid, recorded_at=recorded_at, rid=rid)
    t = np.arange(5000) / 500.0
    phase = np.mod(t, 60.0 / bpm) - 0.3  # the R peak 0.3 s into each beat
    waves = (
        (0.12, -0.16, 0.022),
        (-0.08, -0.025, 0.008),
        (1.1, 0.0, 0.009),
        (-0.22, 0.025, 0.009),
        (0.28, 0.22, 0.04),
    )
    beat = sum(a * np.exp(-((phase - at) ** 2) / (2 * w**2)) for a, at, w in waves)
    wander = 0.04 * np.sin(2 * np.pi * 0.25 * t)
    from fhir_mappings import load_mappings

    lead_of = {load_mappings().ecg.mdc_lead_codes[lead].code: lead for lead in LEAD_GAIN}
    for component in observation["component"]:
        lead = lead_of[component["code"]["coding"][0]["code"]]
        microvolts = 1000 * (LEAD_GAIN[lead] * beat + wander)
        component["valueSampledData"]["period"] = 2
        component["valueSampledData"]["data"] = " ".join(str(int(v)) for v in microvolts)
    return observation


def demo_world(now: datetime | None = None) -> DemoWorld:
    """Four patients; Ada's chart has every vital sign, an ECG 10 minutes old and three findings."""
    moment = now or datetime.now(UTC)
    taken = moment - timedelta(minutes=10)
    ada, ben, cyd, dee = "pat-ada", "pat-ben", "pat-cyd", "pat-dee"
    resources: list[dict[str, Any]] = [
        _patient(ada, "Ada", "Quinn", "female", "1951-06-02", race="2106-3"),
        _patient(ben, "Ben", "Ortiz", "male", "1978-11-20"),
        _patient(cyd, "Cyd", "Park", "male", "1966-01-09"),
        _patient(dee, "Dee", "Novak", "female", "1990-04-30"),
        vital("8867-4", 112, "/min", taken + timedelta(minutes=2), "hr-ada", ada),
        vital("9279-1", 22, "/min", taken, "rr-ada", ada),
        vital("59408-5", 93, "%", taken, "spo2-ada", ada),
        vital("8310-5", 37.9, "Cel", taken, "temp-ada", ada),
        vital("8480-6", 96, "mm[Hg]", taken, "sbp-ada", ada),
        vital("8462-4", 58, "mm[Hg]", taken, "dbp-ada", ada),
        vital("29463-7", 64.0, "kg", taken - timedelta(days=3), "wt-ada", ada),
        vital("8302-2", 165.0, "cm", taken - timedelta(days=3), "ht-ada", ada),
        beating_ecg_observation(ada, recorded_at=taken, rid="ecg-ada"),
        vital("8867-4", 71, "/min", taken, "hr-ben", ben),
        ecg_observation(ben, recorded_at=taken, rid="ecg-ben"),
        ecg_observation(cyd, recorded_at=taken, rid="ecg-cyd"),
        vital("8867-4", 64, "/min", taken, "hr-dee", dee),
    ]
    runtime = PerEcgRuntime(
        {
            "Observation/ecg-ada": [
                finding("potassium", 0.86, value_threshold=5.0, threshold=0.4, auroc=0.78),
                finding("ntprobnp", 0.93, value_threshold=353.0, task="mon30", auroc=0.87),
                finding("ck", 0.71, value_threshold=200.0, auroc=0.72),
            ],
            "Observation/ecg-ben": [finding("sodium", 0.1, value_threshold=135.0, direction="low")],
            "Observation/ecg-cyd": RuntimeError("model exploded"),
        }
    )
    return DemoWorld(resources=resources, runtime=runtime)


def build_demo_app(
    tmp_path: Path,
    world: DemoWorld,
    *,
    fhir: MockFhir | None = None,
    service_base: str | None = None,
    **blueprint_options: Any,
) -> tuple[Flask, MockFhir]:
    """The real service in demo configuration, with the ``/demo`` blueprint on the same FHIR mock."""
    from cds_service.app import create_app
    from cds_service.demo_page import create_demo_blueprint

    mock = fhir or MockFhir(world.resources)
    app = create_app(
        {
            "auth": False,
            "dev_fhir_servers": DEMO_FHIR,
            "public_url": "http://127.0.0.1:8092",
            "database_url": f"sqlite:///{tmp_path / 'demo-page.sqlite3'}",
            "indicator_map": INDICATOR_MAP,
            "budget_ms": 10_000,
            "fhir_timeout_ms": 5_000,
            "metrics": False,
            "record_cards": False,
        },
        runtime=world.runtime,
    )
    app.extensions["ecglab"].pipeline.deps.fhir_transport = mock.transport
    options = {"fhir_transport": mock.transport, **blueprint_options}
    app.register_blueprint(create_demo_blueprint(DEMO_FHIR, service_base, **options))
    return app, mock


def dispose_app(app: Flask) -> None:
    """Stop the thread pools and the database engine of an app from :func:`build_demo_app`."""
    app.extensions["ecglab"].close()


# -- live server -------------------------------------------------------------------------------------------


class _SilentHandler(WSGIRequestHandler):
    """Request lines carry patient ids (``/demo/api/patients/<id>/inputs``): never log them."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        return None


@dataclass
class LiveServer:
    """An app served on a free loopback port by a background thread."""

    app: Flask
    server: BaseWSGIServer
    thread: threading.Thread

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    @classmethod
    def start(cls, app: Flask) -> LiveServer:
        server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=_SilentHandler)
        thread = threading.Thread(target=server.serve_forever, name="demo-live-server", daemon=True)
        thread.start()
        return cls(app, server, thread)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


# -- headless Chromium -------------------------------------------------------------------------------------


def _executable(env: str, default: str) -> str | None:
    path = os.environ.get(env, default)
    return path if Path(path).is_file() and os.access(path, os.X_OK) else shutil.which(Path(path).name)


@pytest.fixture(scope="module")
def chrome(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A headless Chromium WebDriver (fresh profile), or a skip naming what to install."""
    if importlib.util.find_spec("selenium") is None:
        pytest.skip(f"selenium is not installed: {INSTALL_HINT}")
    browser = _executable("ECGLAB_CHROMIUM", "/usr/bin/chromium")
    driver_path = _executable("ECGLAB_CHROMEDRIVER", "/usr/bin/chromedriver")
    if browser is None or driver_path is None:
        pytest.skip(f"chromium or chromedriver not found: {INSTALL_HINT}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(15)
    try:
        yield driver
    finally:
        driver.quit()
