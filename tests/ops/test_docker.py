"""docker/ (issue: demo, docker and README): no Docker daemon exists on the development machines,
so the compose file is validated against the Compose specification (the ``compose_spec`` parser)
and the Dockerfile against the rules the issue sets, statically."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from compose_spec import PyCompose

from cds_service.settings import describe_settings
from tests.generated_docs import dockerfile_header_in_file, dockerfile_settings_header

DOCKER = Path(__file__).resolve().parents[2] / "docker"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of the Dockerfile, continuation lines joined."""
    text = (DOCKER / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)
    result = []
    for line in joined.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        word, _, rest = stripped.partition(" ")
        result.append((word.upper(), rest.strip()))
    return result


def _stage(name: str) -> list[tuple[str, str]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current = None
    for word, rest in _instructions():
        if word == "FROM":
            current = rest.split(" AS ")[-1].strip() if " AS " in rest else rest
            stages[current] = []
        elif current is not None:
            stages[current].append((word, rest))
    return stages[name]


def test_compose_file_is_valid_compose_spec() -> None:
    compose = PyCompose.from_yaml((DOCKER / "compose.yml").read_text())
    assert sorted(compose.service_names()) == ["ecglab", "hapi", "seed"]


def test_compose_runs_hapi_r4_and_a_one_shot_seed_job() -> None:
    spec = yaml.safe_load((DOCKER / "compose.yml").read_text())
    hapi = spec["services"]["hapi"]
    assert hapi["image"].startswith("hapiproject/hapi:") and not hapi["image"].endswith(":latest")
    assert hapi["environment"]["hapi.fhir.fhir_version"] == "R4"
    seed = spec["services"]["seed"]
    assert seed["restart"] == "no" and "--fhir-url" in seed["command"]
    assert seed["depends_on"]["hapi"]["condition"] == "service_healthy"
    service = spec["services"]["ecglab"]
    assert service["build"]["dockerfile"] == "docker/Dockerfile"
    assert "8080:8080" in service["ports"]


def test_compose_build_targets_exist_in_the_dockerfile() -> None:
    spec = yaml.safe_load((DOCKER / "compose.yml").read_text())
    froms = [rest for word, rest in _instructions() if word == "FROM"]
    stages = {f.split(" AS ")[-1] for f in froms if " AS " in f}
    for service in spec["services"].values():
        if "build" in service:
            assert service["build"]["target"] in stages


def test_dockerfile_base_is_cuda_runtime_with_pinned_tag() -> None:
    base = next(rest for word, rest in _instructions() if word == "FROM")
    image = base.split()[0]
    assert image.startswith("nvidia/cuda:") and "runtime" in image and "latest" not in image


def test_dockerfile_installs_the_serve_extra_and_never_torch() -> None:
    runs = " ".join(rest for word, rest in _stage("base") if word == "RUN")
    assert "'.[serve]'" in runs
    assert "torch" not in runs.replace('! python -c "import torch"', "")


def test_dockerfile_runs_non_root_with_exec_form_entrypoint_and_healthcheck() -> None:
    base = _stage("base")
    words = [w for w, _ in base]
    user = [rest for w, rest in base if w == "USER"]
    assert user and user[-1] not in {"root", "0"}
    assert words.index("USER") < words.index("ENTRYPOINT")
    entry = next(rest for w, rest in base if w == "ENTRYPOINT")
    assert json.loads(entry) == ["ecglab", "serve"]  # exec form: signals reach gunicorn
    health = next(rest for w, rest in base if w == "HEALTHCHECK")
    assert "/healthz" in health and "CMD [" in health


def test_dockerfile_lint_rules() -> None:
    """Common lint rules (hadolint's most important ones, checked here without Docker)."""
    for word, rest in _instructions():
        assert word != "ADD" or not re.match(r"https?://", rest), "use curl/COPY, not ADD <url>"
        assert word != "MAINTAINER"
        if word == "RUN" and "apt-get install" in rest:
            assert "--no-install-recommends" in rest and "rm -rf /var/lib/apt/lists" in rest
            assert "apt-get update" in rest  # update and install in one layer
        if word == "RUN" and "pip install" in rest:
            assert "PIP_NO_CACHE_DIR" in (DOCKER / "Dockerfile").read_text() or "--no-cache-dir" in rest
        if word in {"CMD", "ENTRYPOINT"}:
            assert rest.startswith("["), f"{word} must use the exec form"
        if word == "WORKDIR":
            assert rest.startswith("/"), "WORKDIR must be absolute"
        if word == "COPY":
            assert ".." not in shlex.split(rest)[0]


def test_dockerfile_header_lists_every_setting() -> None:
    """The image's header comment is generated from the settings: every variable, default and meaning."""
    assert dockerfile_header_in_file() == dockerfile_settings_header(), (
        "run: python -m tests.ops.test_readme --write"
    )


@pytest.mark.parametrize("service", ["ecglab"])
def test_compose_service_settings_are_real_settings(service: str) -> None:
    spec = yaml.safe_load((DOCKER / "compose.yml").read_text())
    known = {env for env, _, _ in describe_settings()}
    unknown = [k for k in spec["services"][service]["environment"] if k not in known]
    assert not unknown


def test_service_stage_copies_no_training_code() -> None:
    """Issue 13: the service image holds no ``model_training/`` (and its build proves torch is absent)."""
    base = _stage("base")
    copied = [shlex.split(rest)[0] for word, rest in base if word == "COPY"]
    assert "cds_service" in copied and "fhir_mappings" in copied
    assert not any(src.startswith("model_training") for src in copied), copied
    checks = " ".join(rest for word, rest in base if word == "RUN")
    assert '! python -c "import model_training"' in checks
    assert '! python -c "import torch"' in checks
    seed = _stage("seed")
    assert any(word == "COPY" and rest.startswith("model_training") for word, rest in seed)
