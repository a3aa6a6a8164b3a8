"""Model artifact: a damaged or mismatched model stops the service at start-up with one clear line.

The manifest is the contract between export and service (``fhir_mappings.manifest``): the ONNX
file's SHA-256, the ``fhir_mappings`` version the features were encoded with, the graph's inputs.
A service that started anyway would serve wrong probabilities (other mappings) or crash on every
call (an unreadable graph), so both ``ecglab serve --check`` — the master's preflight, which this
suite found checked only the manifest and the hash — and ``create_app`` (each gunicorn worker) must
refuse: exit status 2 and a message naming the file and the field at fault, never a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from cds_service.app import create_app
from cds_service.cli import main
from fhir_mappings.errors import ConfigError
from fhir_mappings.manifest import sha256_file
from tests.onnx_fixtures import build_toy_model_dir

ROOT = Path(__file__).resolve().parents[2]


def onnx_file(folder: Path) -> Path:
    """The model folder's ONNX file."""
    return next(folder.glob("*.onnx"))


def manifest_file(folder: Path) -> Path:
    """The model folder's manifest."""
    return next(folder.glob("*.manifest.json"))


def edit_manifest(folder: Path, change: Callable[[dict], None]) -> None:
    """Apply ``change`` to the manifest's JSON and write it back."""
    path = manifest_file(folder)
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def corrupt_onnx_keep_hash(folder: Path) -> None:
    """Garble the graph's protobuf and record the new hash: only ONNX Runtime can tell."""
    path = onnx_file(folder)
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32
    path.write_bytes(bytes(data))
    edit_manifest(folder, lambda m: m["onnx"].update(sha256=sha256_file(path)))


def corrupt_onnx(folder: Path) -> None:
    """Flip bytes in the ONNX file and leave the manifest's hash as exported."""
    path = onnx_file(folder)
    data = bytearray(path.read_bytes())
    data[-16:] = bytes(b ^ 0x5A for b in data[-16:])
    path.write_bytes(bytes(data))


def wrong_sha(folder: Path) -> None:
    """A manifest whose sha256 names another file."""
    edit_manifest(folder, lambda m: m["onnx"].update(sha256="0" * 64))


def other_mapping_version(folder: Path) -> None:
    """A manifest exported against another fhir_mappings version."""
    edit_manifest(folder, lambda m: m.update(mapping_version="0.9.0-other"))


def truncated_manifest(folder: Path) -> None:
    """A manifest cut off mid-write."""
    path = manifest_file(folder)
    path.write_text(path.read_text()[:200])


def bad_label_field(folder: Path) -> None:
    """A label whose direction is neither low nor high."""
    edit_manifest(folder, lambda m: m["labels"][1].update(direction="sideways"))


def missing_onnx(folder: Path) -> None:
    """The ONNX file the manifest names is gone."""
    onnx_file(folder).unlink()


def renamed_graph_input(folder: Path) -> None:
    """The manifest names an input the graph does not have."""
    edit_manifest(folder, lambda m: m["onnx"]["inputs"][0].update(name="signal"))


#: Damage → the words the one-line message must contain (the file, and the field where there is one).
DAMAGE: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "corrupted ONNX, manifest hash updated": (corrupt_onnx_keep_hash, (".onnx", "ONNX Runtime cannot load")),
    "corrupted ONNX": (corrupt_onnx, (".onnx", "sha256")),
    "wrong sha256 in the manifest": (wrong_sha, (".onnx", "sha256")),
    "manifest from another mapping version": (
        other_mapping_version,
        (".manifest.json", "fhir_mappings 0.9.0-other"),
    ),
    "truncated manifest": (truncated_manifest, (".manifest.json", "not readable JSON")),
    "invalid label field": (bad_label_field, (".manifest.json", "labels.1.direction")),
    "ONNX file missing": (missing_onnx, (".manifest.json", "onnx.file")),
    "graph input renamed": (renamed_graph_input, (".onnx", "signal")),
}


@pytest.fixture
def damaged(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Path, tuple[str, ...]]:
    """A toy model folder with the damage named by the test's ``case`` parameter applied."""
    folder = tmp_path / "models"
    build_toy_model_dir(folder)
    damage, words = DAMAGE[request.param]
    damage(folder)
    return folder, words


def serve_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, model_dir: Path) -> None:
    """The ``ECGLAB_*`` environment of an auth-off service on ``model_dir`` (nothing else inherited)."""
    for name in list(os.environ):
        if name.startswith("ECGLAB_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("ECGLAB_AUTH", "off")
    monkeypatch.setenv("ECGLAB_MODEL_DIR", str(model_dir))
    monkeypatch.setenv("ECGLAB_DATABASE_URL", f"sqlite:///{tmp_path / 'serve.sqlite3'}")


@pytest.mark.parametrize("damaged", list(DAMAGE), indirect=True)
def test_serve_check_refuses_a_damaged_model_with_one_line(
    damaged: tuple[Path, tuple[str, ...]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Manifest contract: ``ecglab serve --check`` exits 2 with one stderr line naming the file and field."""
    folder, words = damaged
    serve_env(monkeypatch, tmp_path, folder)
    assert main(["serve", "--check"]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ecglab serve: error:"), captured.err
    for word in words:
        assert word in lines[0], lines[0]
    assert "Traceback" not in captured.err and "configuration OK" not in captured.out


@pytest.mark.parametrize("damaged", list(DAMAGE), indirect=True)
def test_create_app_refuses_a_damaged_model(damaged: tuple[Path, tuple[str, ...]], tmp_path: Path) -> None:
    """Manifest contract: a gunicorn worker's ``create_app`` raises a ConfigError naming the file and field."""
    folder, words = damaged
    settings = {
        "auth": False,
        "issuers": "",
        "model_dir": str(folder),
        "database_url": f"sqlite:///{tmp_path / 'a.sqlite3'}",
    }
    with pytest.raises(ConfigError) as refused:
        create_app(settings)
    for word in words:
        assert word in str(refused.value)


def test_the_intact_model_passes_both_checks(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Control: the undamaged toy model passes ``--check`` and loads in ``create_app``."""
    folder = tmp_path / "models"
    build_toy_model_dir(folder, version="0.3.1")
    serve_env(monkeypatch, tmp_path, folder)
    assert main(["serve", "--check"]) == 0
    assert "configuration OK (model 0.3.1" in capsys.readouterr().out
    app = create_app(
        {
            "auth": False,
            "issuers": "",
            "model_dir": str(folder),
            "database_url": f"sqlite:///{tmp_path / 'b.sqlite3'}",
        }
    )
    assert app.extensions["ecglab"].runtime.version == "0.3.1"
    app.extensions["ecglab"].engine.dispose()


def test_the_real_command_exits_2(tmp_path: Path) -> None:
    """``ecglab serve --check`` as a process: exit status 2, the message on stderr, no traceback."""
    folder = tmp_path / "models"
    build_toy_model_dir(folder)
    other_mapping_version(folder)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECGLAB_")}
    env.update(
        ECGLAB_AUTH="off",
        ECGLAB_MODEL_DIR=str(folder),
        ECGLAB_DATABASE_URL=f"sqlite:///{tmp_path / 'c.sqlite3'}",
    )
    done = subprocess.run(
        [sys.executable, "-m", "cds_service.cli", "serve", "--check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "fhir_mappings 0.9.0-other" in done.stderr and ".manifest.json" in done.stderr
    assert "Traceback" not in done.stderr
