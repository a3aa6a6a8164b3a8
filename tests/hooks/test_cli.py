"""The ``ecglab`` console command: subcommand listing, version, errors, the torch-free service, and
``score --fhir-url`` reading patients through the hooks' data path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cds_service import __version__
from cds_service.cli import SUBCOMMANDS, main

REPO = Path(__file__).resolve().parents[2]


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    """``ecglab --help`` lists each subcommand the issues name."""
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in (
        "synth-mimic",
        "preprocess",
        "train",
        "evaluate",
        "export",
        "score",
        "seed-fhir",
        "serve",
        "demo",
    ):
        assert name in out


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"ecglab {__version__}"


def test_unknown_command_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_every_subcommand_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    """Each subcommand module exists and declares its flags (``add_arguments``/``run``)."""
    for command in SUBCOMMANDS:
        with pytest.raises(SystemExit) as exc:
            main([command.name, "--help"])
        assert exc.value.code == 0, command.name
        assert f"ecglab {command.name}" in capsys.readouterr().out


def test_console_script_runs_from_venv() -> None:
    exe = Path(sys.executable).parent / "ecglab"
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "serve" in result.stdout


_BLOCK_HEAVY = """
import importlib, pkgutil, sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'torch', 'pandas', 'duckdb', 'sklearn', 'matplotlib'}:
            raise ImportError('blocked in the serve install: ' + name)
sys.meta_path.insert(0, _Block())
import cds_service
for mod in pkgutil.walk_packages(cds_service.__path__, 'cds_service.'):
    if mod.name in {'cds_service.seed', 'cds_service.demo', 'cds_service.score'}:
        continue  # demo/seeding/batch scoring tools may use the training extra
    importlib.import_module(mod.name)
print('ok')
"""


def test_service_imports_without_torch_or_training_extras() -> None:
    """The service must import and run without torch (issue: extras; the serve install is slim)."""
    result = subprocess.run(
        [sys.executable, "-c", _BLOCK_HEAVY], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


def test_score_fhir_reads_patients_through_the_hooks_data_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``ecglab score --fhir-url`` sends exactly the hooks' bound prefetch queries and scores the patient."""
    import json
    from datetime import UTC, datetime, timedelta

    import httpx

    from cds_service import fhir_client
    from cds_service.prefetch import build_queries
    from fhir_mappings import load_mappings
    from tests.onnx_fixtures import build_toy_model_dir
    from tests.service_fixtures import EHR_FHIR, PATIENT_ID, MockFhir, clinical_record

    fhir = MockFhir([r for rs in clinical_record().values() for r in rs])

    class MockedClient(fhir_client.FhirClient):
        """The real client, talking to the in-memory FHIR server."""

        def __init__(self, base_url: str, access_token: str | None = None, **kw: object) -> None:
            super().__init__(base_url, access_token, transport=fhir.transport, timeout=10.0)

    monkeypatch.setattr(fhir_client, "FhirClient", MockedClient)
    build_toy_model_dir(tmp_path / "model")
    out = tmp_path / "scores.json"
    before = datetime.now(UTC).replace(microsecond=0)
    argv = ["score", "--model", str(tmp_path / "model"), "--fhir-url", EHR_FHIR, "--patient", PATIENT_ID]
    assert main([*argv, "--providers", "CPUExecutionProvider", "--out", str(out)]) == 0
    after = datetime.now(UTC).replace(microsecond=0)
    scores = json.loads(out.read_text())
    assert set(scores) == {PATIENT_ID} and "error" not in scores[PATIENT_ID]
    assert "patient #1:" in capsys.readouterr().out
    sent = sorted(str(r.url) for r in fhir.requests)
    candidates = [
        sorted(
            f"{EHR_FHIR}/Patient/{PATIENT_ID}"
            if q.read
            else str(httpx.URL(f"{EHR_FHIR}/{q.resource_type}", params=q.bind(PATIENT_ID, now)))
            for q in build_queries(load_mappings())
        )
        for now in (before + timedelta(seconds=s) for s in range(int((after - before).total_seconds()) + 1))
    ]
    assert sent in candidates
