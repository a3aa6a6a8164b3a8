"""The ``ecglab`` console command: subcommand listing, version, errors, and the torch-free service."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cds_service import __version__
from cds_service.cli import SUBCOMMANDS, main

REPO = Path(__file__).resolve().parents[1]


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
