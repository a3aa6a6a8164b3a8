"""``ecglab serve`` start-up: the gunicorn master checks the model without opening ONNX Runtime
itself, so forked workers never inherit a half-copied runtime (they used to abort on shutdown)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.onnx_fixtures import build_toy_model_dir

REPO = Path(__file__).resolve().parents[2]

_PREFLIGHT = """
import sys
from cds_service.serve import preflight
from cds_service.settings import Settings
settings = Settings.from_env({"ECGLAB_AUTH": "off", "ECGLAB_MODEL_DIR": sys.argv[1],
                              "ECGLAB_DATABASE_URL": "sqlite:///" + sys.argv[2]})
print(preflight(settings))
print("onnxruntime loaded in master:", "onnxruntime" in sys.modules)
"""


def test_preflight_checks_the_model_in_a_child_process(tmp_path: Path) -> None:
    build_toy_model_dir(tmp_path / "model", version="1.2.3")
    result = subprocess.run(
        [sys.executable, "-c", _PREFLIGHT, str(tmp_path / "model"), str(tmp_path / "db.sqlite3")],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "1.2.3"
    assert lines[1] == "onnxruntime loaded in master: False"
