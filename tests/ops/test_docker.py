"""docker/ (issue: demo, docker and README): no Docker daemon exists on the development machines,
so the compose file is validated against the Compose specification (the ``compose_spec`` parser)
and the Dockerfile against the rules the issue sets, statically.

The compose file is read as ``docker compose`` reads it: ``${VAR:-default}`` interpolated first
(:func:`_compose`), with an empty environment unless a test sets variables, then parsed. Issue 14
(browser exposure): every published port binds the host's loopback unless ``ECGLAB_BIND`` says
otherwise, and the service allows CORS for the CDS Hooks Sandbox's origin only.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from compose_spec import PyCompose

from cds_service.settings import Settings, describe_settings
from tests.generated_docs import dockerfile_header_in_file, dockerfile_settings_header

DOCKER = Path(__file__).resolve().parents[2] / "docker"
SANDBOX_ORIGIN = "https://sandbox.cds-hooks.org"
_VARIABLE = re.compile(r"\$(?:\$|\{(?P<name>\w+)(?:(?P<op>:?-)(?P<default>[^}]*))?\})")


def _interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's variable interpolation: ``${X}``, ``${X:-default}`` (unset or empty), ``${X-default}``
    (unset only) and ``$$``; a variable without a default must be set."""

    def substitute(match: re.Match[str]) -> str:
        name, op, default = match.group("name"), match.group("op"), match.group("default")
        if name is None:
            return "$"
        value = env.get(name)
        if (op == ":-" and not value) or (op == "-" and value is None):
            return default
        assert value is not None, f"compose.yml needs {name} set: give it a default"
        return value

    return _VARIABLE.sub(substitute, text)


def _compose_text(env: Mapping[str, str] | None = None) -> str:
    """``docker/compose.yml`` with its variables interpolated from ``env`` (empty by default)."""
    return _interpolate((DOCKER / "compose.yml").read_text(), env or {})


def _compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The interpolated compose file as a dict."""
    spec: dict[str, Any] = yaml.safe_load(_compose_text(env))
    return spec


def _published(spec: Mapping[str, Any]) -> dict[str, list[tuple[str, str, str]]]:
    """``(host ip, host port, container port)`` of every published port, per service (short syntax)."""
    ports: dict[str, list[tuple[str, str, str]]] = {}
    for name, service in spec["services"].items():
        for entry in service.get("ports", []):
            assert isinstance(entry, str), f"{name}: use the short 'IP:HOST:CONTAINER' port syntax"
            host_ip, host_port, container = entry.rsplit(":", 2)
            ports.setdefault(name, []).append((host_ip, host_port, container))
    return ports


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
    compose = PyCompose.from_yaml(_compose_text())
    assert sorted(compose.service_names()) == ["ecglab", "hapi", "seed"]


def test_compose_publishes_every_port_on_the_host_loopback_by_default() -> None:
    """Issue 14: auth is off and /metrics is served here, so nothing off the host may reach a port."""
    ports = _published(_compose())
    assert ports["ecglab"] == [("127.0.0.1", "8080", "8080")]
    assert ports["hapi"] == [("127.0.0.1", "8090", "8080")]
    assert set(ports) == {"ecglab", "hapi"}


def test_compose_binds_another_interface_only_when_told() -> None:
    """``ECGLAB_BIND`` moves both published ports; an empty value keeps the loopback default."""
    ports = _published(_compose({"ECGLAB_BIND": "0.0.0.0"}))
    assert {ip for entries in ports.values() for ip, _, _ in entries} == {"0.0.0.0"}
    PyCompose.from_yaml(_compose_text({"ECGLAB_BIND": "0.0.0.0"}))
    empty = _published(_compose({"ECGLAB_BIND": ""}))
    assert {ip for entries in empty.values() for ip, _, _ in entries} == {"127.0.0.1"}


def test_compose_service_allows_cors_for_the_sandbox_origin_only() -> None:
    """Issue 14: auth off forbids CORS '*'; the compose service names the Sandbox, and its settings load."""
    environment = _compose()["services"]["ecglab"]["environment"]
    settings = Settings.from_env({key: str(value) for key, value in environment.items()})
    assert settings.auth is False and settings.cors_origins == (SANDBOX_ORIGIN,)


def test_compose_runs_hapi_r4_and_a_one_shot_seed_job() -> None:
    spec = _compose()
    hapi = spec["services"]["hapi"]
    assert hapi["image"].startswith("hapiproject/hapi:") and not hapi["image"].endswith(":latest")
    assert hapi["environment"]["hapi.fhir.fhir_version"] == "R4"
    seed = spec["services"]["seed"]
    assert seed["restart"] == "no" and "--fhir-url" in seed["command"]
    assert seed["depends_on"]["hapi"]["condition"] == "service_healthy"
    service = spec["services"]["ecglab"]
    assert service["build"]["dockerfile"] == "docker/Dockerfile"
    assert "127.0.0.1:8080:8080" in service["ports"]


def test_compose_build_targets_exist_in_the_dockerfile() -> None:
    spec = _compose()
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
    spec = _compose()
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
