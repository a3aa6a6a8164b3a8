"""The service-only install (issue 16): what ``docker/Dockerfile`` installs is enough to serve.

The image copies ``pyproject.toml``, ``README.md``, ``cds_service``, ``fhir_mappings`` and
``models`` and runs ``pip install '.[serve]'``. This test does the same into a virtual environment
of its own, with no torch and no training code: it checks that ``torch`` and ``model_training``
cannot be imported and that the installed package ships no ``model_training``, runs
``ecglab serve --check``, then starts ``ecglab serve`` (gunicorn) on a free loopback port with
``ECGLAB_AUTH=off`` and posts one ``patient-view`` whose full prefetch carries a real DICOM ECG.
So the ``serve`` extra cannot drift from what the service imports.

The environment is cached in ``.venv-service/<key>/`` (git-ignored), ``<key>`` a hash of
``pyproject.toml`` and the Python version: the first run downloads the ``serve`` extra (with the
pip cache, and ``/opt/wheels`` as extra links when that folder exists); later runs only build the
current code into a wheel and reinstall it with ``--no-index``. A pip that cannot reach an index
on the first run fails this test: it never skips.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service_fixtures import PATIENT_ID, clinical_record, hook_request, iso, prefetch_from

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".venv-service"
IMAGE_FILES = ("pyproject.toml", "README.md")
IMAGE_FOLDERS = ("cds_service", "fhir_mappings", "models")
"""What the Dockerfile copies before ``pip install '.[serve]'`` (model_training is not among them)."""
WHEELS = Path("/opt/wheels")
REAL_ECG = ROOT / "tests" / "data" / "ecg" / "guangxi_teaching_sinus_rhythm.dcm"
PIP = ["--disable-pip-version-check", "--progress-bar", "off"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def _key() -> str:
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes())
    digest.update(f"{sys.version_info.major}.{sys.version_info.minor}".encode())
    return digest.hexdigest()[:16]


def _run(args: list[str | Path], *, cwd: Path, env: dict[str, str], timeout: float = 900) -> str:
    """Run a command; fail the test with its output when it exits non-zero."""
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(map(str, args))} failed ({done.returncode}):\n{output[-6000:]}"
    return output


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without Python, virtualenv or ecglab settings, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ECGLAB_", "PYTHON", "PROMETHEUS_")) and k != "VIRTUAL_ENV"
    }
    env.update(extra)
    return env


def _image_copy(target: Path) -> Path:
    """The files the Dockerfile copies, in ``target`` (caches and build leftovers left out)."""
    target.mkdir(parents=True)
    for name in IMAGE_FILES:
        shutil.copy2(ROOT / name, target / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in IMAGE_FOLDERS:
        shutil.copytree(ROOT / name, target / name, ignore=ignore)
    return target


def _build_wheel(source: Path, out: Path, env: dict[str, str]) -> Path:
    """The project's wheel built from ``source``.

    Offline with this interpreter's setuptools and wheel when it has them (the dev environment
    does); otherwise pip fetches the build backend into an isolated environment, as in the image.
    """
    offline = all(importlib.util.find_spec(name) for name in ("setuptools", "wheel"))
    isolation = ["--no-build-isolation", "--no-index"] if offline else []
    _run(
        [sys.executable, "-m", "pip", "wheel", *PIP, "--no-deps", *isolation, "-w", out, source],
        cwd=source,
        env=env,
    )
    (wheel,) = out.glob("ecglab-*.whl")
    return wheel


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One builder of the cached environment at a time (parallel test runs)."""
    CACHE.mkdir(exist_ok=True)
    with (CACHE / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def service_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, float]]:
    """(venv, image copy, seconds spent building or refreshing it) with the current code installed."""
    work = tmp_path_factory.mktemp("service-install")
    image = _image_copy(work / "image")
    env = _clean_env()
    wheel = _build_wheel(image, work / "dist", env)
    started = time.monotonic()
    with _locked():
        venv = CACHE / _key()
        python = venv / "bin" / "python"
        stamp = venv / ".installed"
        for stale in CACHE.iterdir():
            if stale.is_dir() and stale != venv and re.fullmatch(r"[0-9a-f]{16}", stale.name):
                shutil.rmtree(stale)
        if not stamp.exists():
            shutil.rmtree(venv, ignore_errors=True)
            base = getattr(sys, "_base_executable", sys.executable)
            _run([base, "-m", "venv", venv], cwd=work, env=env)
            links = ["--find-links", str(WHEELS)] if WHEELS.is_dir() else []
            _run([python, "-m", "pip", "install", *PIP, *links, f"{wheel}[serve]"], cwd=work, env=env)
            stamp.write_text(json.dumps({"built": datetime.now(UTC).isoformat(), "pyproject_key": venv.name}))
        else:
            _run(
                [python, "-m", "pip", "uninstall", "--disable-pip-version-check", "-y", "ecglab"],
                cwd=work,
                env=env,
            )
            _run([python, "-m", "pip", "install", *PIP, "--no-index", f"{wheel}[serve]"], cwd=work, env=env)
        yield venv, image, time.monotonic() - started


PROBE = """
import importlib, importlib.metadata as metadata, json
found = {}
for name in ("cds_service.app", "cds_service.inference", "cds_service.ecg_inspect", "torch", "model_training"):
    try:
        importlib.import_module(name)
        found[name] = True
    except ImportError:
        found[name] = False
print(json.dumps({
    "imports": found,
    "top_level": sorted({str(f).split("/", 1)[0] for f in metadata.files("ecglab")}),
    "distributions": sorted(d.metadata["Name"].lower() for d in metadata.distributions()),
}))
"""
"""Run by the service environment's python: what imports, what ecglab installed, what is installed."""


def test_no_torch_and_no_training_code_in_the_service_install(service_venv: tuple[Path, Path, float]) -> None:
    """The Dockerfile's checks: the service imports; torch and model_training do not; no training code shipped."""
    venv, image, seconds = service_venv
    work = image.parent  # not the repository: its model_training/ must not be importable by accident
    facts = json.loads(
        _run([venv / "bin" / "python", "-c", PROBE], cwd=work, env=_clean_env()).splitlines()[-1]
    )
    assert facts["imports"] == {
        "cds_service.app": True,
        "cds_service.inference": True,
        "cds_service.ecg_inspect": True,
        "torch": False,
        "model_training": False,
    }
    assert {"cds_service", "fhir_mappings"} <= set(facts["top_level"])
    assert not any(name.startswith("model_training") for name in facts["top_level"]), facts["top_level"]
    installed = set(facts["distributions"])
    assert "torch" not in installed and {"onnxruntime-gpu", "flask", "gunicorn", "pydicom"} <= installed
    print(f"service-only install ready in {seconds:.1f} s")  # the build time, shown with -s


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _real_ecg_prefetch() -> dict[str, Any]:
    """A full prefetch whose one ECG is the real GE DICOM file, inline in a DocumentReference."""
    record = clinical_record()
    document = {
        "resourceType": "DocumentReference",
        "id": "ecg-dicom-1",
        "status": "current",
        "type": {"coding": [{"system": "http://loinc.org", "code": "11524-6"}]},
        "subject": {"reference": f"Patient/{PATIENT_ID}"},
        "date": iso(datetime.now(UTC) - timedelta(minutes=10)),
        "content": [
            {
                "attachment": {
                    "contentType": "application/dicom",
                    "data": base64.b64encode(REAL_ECG.read_bytes()).decode(),
                }
            }
        ],
    }
    record.update(ecgObservations=[], ecgMedia=[], ecgDocuments=[document])
    return prefetch_from(record)


def test_serve_check_and_one_hook_against_the_bundled_model(
    service_venv: tuple[Path, Path, float], tmp_path: Path
) -> None:
    """``ecglab serve --check``, then gunicorn serving a patient-view with a real ECG: 200 with cards JSON."""
    venv, image, _ = service_venv
    port = _free_port()
    env = _clean_env(
        ECGLAB_AUTH="off",
        ECGLAB_MODEL_DIR=str(image / "models"),
        ECGLAB_DATABASE_URL=f"sqlite:///{tmp_path / 'service.sqlite3'}",
        ECGLAB_HOST="127.0.0.1",
        ECGLAB_PORT=str(port),
        ECGLAB_WORKERS="1",
        ECGLAB_ONNX_PROVIDERS="CPUExecutionProvider",
    )
    ecglab = venv / "bin" / "ecglab"
    checked = _run([ecglab, "serve", "--check"], cwd=tmp_path, env=env, timeout=180)
    assert "configuration OK" in checked and "auth OFF" in checked, checked
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log_file:
        server = subprocess.Popen(
            [str(ecglab), "serve"], cwd=tmp_path, env=env, stdout=log_file, stderr=log_file
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"ecglab serve exited:\n{log_path.read_text()[-6000:]}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"no /healthz within 120 s:\n{log_path.read_text()[-6000:]}"
            time.sleep(0.5)
        body = hook_request("patient-view", prefetch=_real_ecg_prefetch())
        response = httpx.post(f"{base}/cds-services/ecglab-patient-view", json=body, timeout=30)
        assert response.status_code == 200, response.text[:2000]
        cards = response.json()["cards"]
        assert isinstance(cards, list) and all("summary" in card and "uuid" in card for card in cards)
        metrics = httpx.get(f"{base}/metrics", timeout=10).text
        outcomes = re.findall(r'ecglab_hook_outcomes_total\{[^}]*outcome="(\w+)"[^}]*\} 1\.0', metrics)
        assert outcomes in (["cards"], ["no_cards"]), (outcomes, log_path.read_text()[-4000:])
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
