"""docker/k8s (issue 18, scale-out): the Kustomize base and its gpu overlay.

No cluster and no kustomize binary exist on the development machines, so each kustomization is
rendered by ``tests/k8s_render.py`` (the subset of kustomize the manifests use) and every
rendered object is validated, in strict mode (unknown fields are errors), against the Kubernetes
JSON schemas bundled by ``kubernetes-validate`` (offline), for the oldest Kubernetes version the
README names and the newest one the package knows. The ServiceMonitor is a Prometheus Operator
custom resource whose CRD schema is not available offline: its metadata and selector are
validated against the core ObjectMeta and LabelSelector schemas, and the fields its CRD requires
are checked explicitly. The rest are cross-object checks: selectors, ports, probes, the HPA and
PDB targets, every environment variable a real setting, the Secret key, the security context.
"""

from __future__ import annotations

import copy
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from jsonschema import Draft202012Validator
from jsonschema import ValidationError as SchemaError
from referencing import Registry, Resource

from cds_service.hook_audit import resolve_audit_key
from cds_service.issuers import load_issuers
from cds_service.settings import Settings, describe_settings
from tests.k8s_render import RenderError, render, split_image, strategic_merge

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "docker" / "k8s"
BASE = K8S / "base"
GPU = K8S / "overlays" / "gpu"
#: Oldest Kubernetes version the manifests are validated for (docker/k8s/README.md says so).
OLDEST_K8S = "1.29"
VERSIONS = (OLDEST_K8S, kubernetes_validate.latest_version())
#: Environment variables of the pod that are not ecglab settings, each with its reason.
NON_SETTING_ENV = {"ORT_INTRA_OP_NUM_THREADS": "bounds ONNX Runtime's thread pool to the CPU limit"}
SETTINGS = {env for env, _, _ in describe_settings()}
TREES = {"base": BASE, "gpu": GPU}


# -- helpers --------------------------------------------------------------------------------------


def rendered(tree: str) -> list[dict[str, Any]]:
    """The objects of one kustomization (``base`` or ``gpu``)."""
    return render(TREES[tree])


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The single object of ``kind`` (and ``name``)."""
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The service container of the Deployment."""
    containers = pod_spec(objects)["containers"]
    assert [c["name"] for c in containers] == ["ecglab"]
    return dict(containers[0])


def pod_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The Deployment's pod template spec."""
    return dict(one(objects, "Deployment")["spec"]["template"]["spec"])


def settings_data(objects: list[dict[str, Any]]) -> dict[str, str]:
    """The ConfigMap the container reads with envFrom."""
    names = [ref["configMapRef"]["name"] for ref in container(objects).get("envFrom", [])]
    assert len(names) == 1
    return dict(one(objects, "ConfigMap", names[0])["data"])


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a matchLabels selector (no matchExpressions here) selects ``labels``."""
    assert set(selector) == {"matchLabels"}, "selectors use matchLabels only"
    match = selector["matchLabels"]
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def container_port(objects: list[dict[str, Any]], port: int | str) -> int:
    """The container port a Service targetPort, probe or policy port (number or name) designates."""
    ports = container(objects)["ports"]
    matches = [p["containerPort"] for p in ports if port in (p["containerPort"], p.get("name"))]
    assert len(matches) == 1, f"port {port!r} names no container port of {ports}"
    return int(matches[0])


def dockerfile() -> str:
    """The text of docker/Dockerfile, which builds the image the Deployment runs."""
    return (ROOT / "docker" / "Dockerfile").read_text(encoding="utf-8")


def secret_example() -> dict[str, Any]:
    """The example database Secret (the one object of base/secret.example.yaml)."""
    documents = list(yaml.safe_load_all((BASE / "secret.example.yaml").read_text(encoding="utf-8")))
    assert len(documents) == 1
    return dict(documents[0])


def core_validator(definition: str) -> Draft202012Validator:
    """A validator for one core definition (e.g. the LabelSelector) of kubernetes-validate's schemas."""
    folder = f"kubernetes-json-schema/v{kubernetes_validate.latest_version()}-local-strict"
    definitions = kubernetes_validate.utils.schema_contents(
        f"{folder}/_definitions.json", kubernetes_validate.latest_version()
    )
    registry: Registry = Resource.from_contents(definitions) @ Registry()
    schema = {"$ref": f"{definitions['$id']}#/$defs/{definition}"}
    return Draft202012Validator(schema, registry=registry)


# -- the renderer itself ---------------------------------------------------------------------------


def test_strategic_merge_merges_lists_by_their_kubernetes_merge_key() -> None:
    base = {
        "spec": {
            "tolerations": [{"key": "a", "operator": "Exists"}],
            "nodeSelector": {"x": "1"},
            "containers": [
                {"name": "app", "env": [{"name": "A", "value": "1"}], "args": ["--a"]},
                {"name": "side", "image": "s"},
            ],
        }
    }
    patch = {
        "spec": {
            "tolerations": [{"key": "b", "operator": "Exists"}],
            "nodeSelector": {"y": "2"},
            "containers": [{"name": "app", "env": [{"name": "B", "value": "2"}], "args": ["--b"]}],
        }
    }
    merged = strategic_merge(base, patch)["spec"]
    assert merged["tolerations"] == [{"key": "b", "operator": "Exists"}]  # no merge key: replaced
    assert merged["nodeSelector"] == {"x": "1", "y": "2"}
    app, side = merged["containers"]
    assert [e["name"] for e in app["env"]] == ["A", "B"] and app["args"] == ["--b"]
    assert side == {"name": "side", "image": "s"}
    assert base["spec"]["nodeSelector"] == {"x": "1"}, "the original must not change"
    assert strategic_merge({"a": 1, "b": 2}, {"a": None}) == {"b": 2}


def test_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(RenderError, match="namePrefix"):
        render(tmp_path)
    with pytest.raises(RenderError, match="directive"):
        strategic_merge({"spec": {}}, {"spec": {"$patch": "delete"}})
    (tmp_path / "kustomization.yaml").write_text("resources: [a.yaml]\n")
    (tmp_path / "a.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {k: '1', k: '2'}\n"
    )
    with pytest.raises(RenderError, match="repeated"):
        render(tmp_path)


def test_image_names_split_like_kustomize() -> None:
    assert split_image("ecglab") == ("ecglab", "")
    assert split_image("registry.local:5000/team/ecglab:1.2") == ("registry.local:5000/team/ecglab", ":1.2")
    assert split_image("ecglab@sha256:abc") == ("ecglab", "@sha256:abc")


# -- schema validation ----------------------------------------------------------------------------


@pytest.mark.parametrize("tree", sorted(TREES))
@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_is_valid_against_the_kubernetes_schemas(tree: str, version: str) -> None:
    kinds = []
    for obj in rendered(tree):
        kinds.append(obj["kind"])
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: checked by test_service_monitor_matches_its_crd
        kubernetes_validate.validate(obj, version, strict=True)
    expected = {
        "ConfigMap",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceMonitor",
    }
    assert set(kinds) == expected


def test_the_schema_validation_catches_mistakes() -> None:
    """Strict validation is not vacuous: an unknown field and a wrongly typed value are refused."""
    deployment = one(rendered("base"), "Deployment")
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8080"
    for broken in (typo, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, OLDEST_K8S, strict=True)


@pytest.mark.parametrize("tree", sorted(TREES))
def test_service_monitor_matches_its_crd(tree: str) -> None:
    """The fields the ServiceMonitor CRD requires and types, checked explicitly (no offline CRD schema)."""
    objects = rendered(tree)
    monitor = one(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    core_validator("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta").validate(monitor["metadata"])
    spec = monitor["spec"]
    assert {"selector", "endpoints"} <= set(spec), (
        "the CRD requires spec.selector (older ones also endpoints)"
    )
    core_validator("io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector").validate(spec["selector"])
    with pytest.raises(SchemaError):
        core_validator("io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector").validate({"matchLabel": {}})
    duration = re.compile(r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")
    service = one(objects, "Service")
    assert spec["endpoints"], "at least one endpoint"
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "scheme", "interval", "scrapeTimeout"}
        assert endpoint["path"] == "/metrics" and endpoint["scheme"] in ("http", "https")
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}, (
            "port is a Service port name"
        )
        for key in ("interval", "scrapeTimeout"):
            assert duration.match(endpoint[key]), f"{key} {endpoint[key]!r} is not a Prometheus duration"


# -- cross-object consistency ---------------------------------------------------------------------


@pytest.mark.parametrize("tree", sorted(TREES))
def test_selectors_select_the_pods(tree: str) -> None:
    objects = rendered(tree)
    deployment = one(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"], pod_labels)
    assert selects({"matchLabels": one(objects, "Service")["spec"]["selector"]}, pod_labels)
    assert selects(one(objects, "PodDisruptionBudget")["spec"]["selector"], pod_labels)
    assert selects(one(objects, "NetworkPolicy")["spec"]["podSelector"], pod_labels)
    for constraint in pod_spec(objects)["topologySpreadConstraints"]:
        assert selects(constraint["labelSelector"], pod_labels)
    monitor = one(objects, "ServiceMonitor")
    assert selects(monitor["spec"]["selector"], one(objects, "Service")["metadata"]["labels"])


@pytest.mark.parametrize("tree", sorted(TREES))
def test_ports_agree_from_the_image_to_the_service_monitor(tree: str) -> None:
    objects = rendered(tree)
    settings = settings_data(objects)
    port = int(settings["ECGLAB_PORT"])
    assert settings["ECGLAB_HOST"] == "0.0.0.0", "gunicorn must listen on the pod's address"
    assert f"EXPOSE {port}" in dockerfile()
    for service_port in one(objects, "Service")["spec"]["ports"]:
        assert container_port(objects, service_port["targetPort"]) == port
    for rule in one(objects, "NetworkPolicy")["spec"]["ingress"]:
        assert [container_port(objects, p["port"]) for p in rule["ports"]] == [port]


@pytest.mark.parametrize("tree", sorted(TREES))
def test_probes_hit_healthz_on_the_service_port(tree: str) -> None:
    objects = rendered(tree)
    main = container(objects)
    port = int(settings_data(objects)["ECGLAB_PORT"])
    healthcheck = next(
        line for line in re.sub(r"\\\n", " ", dockerfile()).splitlines() if line.startswith("HEALTHCHECK")
    )
    assert "/healthz" in healthcheck, "the probes check what the image's HEALTHCHECK checks"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = main[probe]["httpGet"]
        assert get["path"] == "/healthz" and container_port(objects, get["port"]) == port
    # Liveness must be slower to give up than readiness: a database outage makes /healthz answer
    # 503, which should take pods out of the Service long before it restarts them.
    live, ready = main["livenessProbe"], main["readinessProbe"]
    assert (
        live["periodSeconds"] * live["failureThreshold"]
        > 3 * ready["periodSeconds"] * ready["failureThreshold"]
    )


@pytest.mark.parametrize("tree", sorted(TREES))
def test_autoscaler_and_disruption_budget_target_the_deployment(tree: str) -> None:
    objects = rendered(tree)
    deployment = one(objects, "Deployment")
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    hpa = one(objects, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        "Deployment",
        deployment["metadata"]["name"],
    )
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert "cpu" in container(objects)["resources"]["requests"], "CPU utilisation needs a CPU request"
    pdb = one(objects, "PodDisruptionBudget")["spec"]
    assert pdb["maxUnavailable"] < hpa["spec"]["minReplicas"], "a voluntary disruption leaves a pod serving"


@pytest.mark.parametrize("tree", sorted(TREES))
def test_every_environment_variable_is_a_real_setting(tree: str) -> None:
    objects = rendered(tree)
    settings = settings_data(objects)
    unknown = [name for name in settings if name not in SETTINGS]
    assert not unknown, f"ConfigMap keys that are no ecglab setting: {unknown}"
    env = container(objects)["env"]
    for variable in env:
        name = variable["name"]
        assert name in SETTINGS or name in NON_SETTING_ENV, f"{name} is no ecglab setting"
    assert "ECGLAB_DATABASE_URL" not in settings, "the database URL belongs in the Secret"
    assert len({v["name"] for v in env}) == len(env)


def test_the_settings_form_a_valid_service_configuration(tmp_path: Path) -> None:
    """The ConfigMap, the example Secret and the mounted issuers file pass the service's own checks."""
    objects = rendered("base")
    settings = settings_data(objects)
    issuers_path = Path(settings["ECGLAB_ISSUERS"])
    mounts = {m["mountPath"]: m["name"] for m in container(objects)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    volume = volumes[mounts[str(issuers_path.parent)]]
    issuers_map = one(objects, "ConfigMap", volume["configMap"]["name"])
    local = tmp_path / issuers_path.name
    local.write_text(issuers_map["data"][issuers_path.name], encoding="utf-8")
    assert load_issuers(local)
    environment = {
        **settings,
        "ECGLAB_ISSUERS": str(local),
        "ECGLAB_DATABASE_URL": secret_example()["stringData"]["url"],
        "ECGLAB_AUDIT_KEY": secret_example()["stringData"]["audit-key"],
    }
    parsed = Settings.from_env(environment)
    assert parsed.auth and parsed.metrics and parsed.database_url.startswith("postgresql+psycopg://")
    # Auth and audit on: the service refuses to start without the audit key, so the pod must get one.
    assert parsed.audit and resolve_audit_key(parsed)
    assert str(parsed.model_dir) in re.findall(r"ECGLAB_MODEL_DIR=(\S+)", dockerfile())


@pytest.mark.parametrize("env", ["ECGLAB_DATABASE_URL", "ECGLAB_AUDIT_KEY"])
def test_secrets_come_from_the_example_secret(env: str) -> None:
    objects = rendered("base")
    [entry] = [v for v in container(objects)["env"] if v["name"] == env]
    ref = entry["valueFrom"]["secretKeyRef"]
    secret = secret_example()
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == ref["name"]
    assert ref["key"] in secret["stringData"]
    kubernetes_validate.validate(secret, OLDEST_K8S, strict=True)
    assert not [o for o in objects if o["kind"] == "Secret"], (
        "no Secret (credential) is deployed from the repo"
    )
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text(encoding="utf-8"))
    assert "secret.example.yaml" not in kustomization["resources"]


def test_the_image_can_talk_to_postgresql() -> None:
    """The image installs the serve extra only: it must carry the driver the Secret's URL names."""
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    serve = re.search(r"^serve = \[(.*?)^\]", pyproject, re.S | re.M)
    assert serve is not None and re.search(r'"psycopg(\[binary\])?[>=]', serve.group(1))


@pytest.mark.parametrize("tree", sorted(TREES))
def test_pods_run_non_root_on_a_read_only_root_filesystem(tree: str) -> None:
    objects = rendered(tree)
    spec = pod_spec(objects)
    main = container(objects)
    uid = re.search(r"useradd [^\n]*--uid (\d+)", dockerfile())
    assert uid is not None and spec["securityContext"]["runAsUser"] == int(uid.group(1))
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["automountServiceAccountToken"] is False
    context = main["securityContext"]
    assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    # Every folder the service writes to is a mounted emptyDir: the metrics folder and /tmp
    # (gunicorn's heartbeat files; ecglab serve's metrics folder when ECGLAB_METRICS_DIR is empty).
    writable = {
        m["mountPath"]
        for m in main["volumeMounts"]
        if "emptyDir" in next(v for v in spec["volumes"] if v["name"] == m["name"])
    }
    for folder in (settings_data(objects)["ECGLAB_METRICS_DIR"], "/tmp"):
        assert any(folder == w or folder.startswith(w + "/") for w in writable), f"{folder} is not writable"


@pytest.mark.parametrize("tree", sorted(TREES))
def test_resources_are_set_and_bound_onnx_runtime_threads(tree: str) -> None:
    objects = rendered(tree)
    main = container(objects)
    requests, limits = main["resources"]["requests"], main["resources"]["limits"]
    assert requests["cpu"] == limits["cpu"] and requests["memory"] == limits["memory"], "Guaranteed QoS"
    [threads] = [v for v in main["env"] if v["name"] == "ORT_INTRA_OP_NUM_THREADS"]
    assert threads["valueFrom"]["resourceFieldRef"] == {
        "containerName": main["name"],
        "resource": "limits.cpu",
        "divisor": "1",
    }
    name, suffix = split_image(main["image"])
    assert name == "ecglab" and suffix.startswith(":") and suffix != ":latest", "a pinned image tag"


def test_gpu_overlay_adds_only_the_gpu_scheduling_and_cuda_provider() -> None:
    base, gpu = rendered("base"), rendered("gpu")
    assert "nvidia.com/gpu" not in container(base)["resources"]["limits"]
    assert "nodeSelector" not in pod_spec(base) and "tolerations" not in pod_spec(base)
    assert settings_data(base)["ECGLAB_ONNX_PROVIDERS"] == "CPUExecutionProvider"
    spec, main = pod_spec(gpu), container(gpu)
    assert main["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    providers = settings_data(gpu)["ECGLAB_ONNX_PROVIDERS"].split(",")
    assert providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    changed = {(o["kind"], o["metadata"]["name"]) for o in gpu if o not in base}
    assert changed == {("Deployment", "ecglab"), ("ConfigMap", "ecglab-settings")}


def test_network_policy_admits_prometheus_and_the_ingress_controller_only() -> None:
    policy = one(rendered("base"), "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    namespaces = []
    for rule in policy["ingress"]:
        assert rule.get("from"), "a rule without 'from' would admit every pod"
        for peer in rule["from"]:
            assert set(peer) == {"namespaceSelector"}
            namespaces.append(peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"])
    assert sorted(namespaces) == ["ingress-nginx", "monitoring"]


# -- documentation --------------------------------------------------------------------------------


def code_lines(path: Path) -> Iterator[str]:
    """The lines inside fenced code blocks of a Markdown file, continuation lines joined."""
    text = path.read_text(encoding="utf-8")
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        yield from re.sub(r"\\\n\s*", " ", block).splitlines()


def test_readme_names_the_apply_commands_and_the_secret() -> None:
    lines = list(code_lines(K8S / "README.md"))
    for tree in ("base", "overlays/gpu"):
        assert any(re.search(rf"kubectl (-n \S+ )?apply -k docker/k8s/{tree}$", line) for line in lines)
    ref = next(v for v in container(rendered("base"))["env"] if v["name"] == "ECGLAB_DATABASE_URL")
    secret = ref["valueFrom"]["secretKeyRef"]
    assert any(
        f"create secret generic {secret['name']}" in line and f"--from-literal={secret['key']}=" in line
        for line in lines
    )


def test_training_commands_parse_with_torchrun_and_ecglab_train() -> None:
    """Every torchrun line of TRAINING.md is accepted by torchrun's and ``ecglab train``'s parsers."""
    from torch.distributed.run import get_args_parser

    from cds_service.cli import SUBCOMMANDS, _command_parser

    train = _command_parser(next(c for c in SUBCOMMANDS if c.name == "train"))
    commands = [
        shlex.split(line.strip())
        for line in code_lines(K8S / "TRAINING.md")
        if line.strip().startswith("torchrun ")
    ]
    assert len(commands) >= 3
    assert any("--nnodes=2" in words for words in commands), "a multi-node example"
    for words in commands:
        launcher = get_args_parser().parse_args(words[1:])
        assert launcher.module and launcher.training_script == "cds_service.cli", words
        assert launcher.training_script_args[0] == "train", words
        train.parse_args(launcher.training_script_args[1:])
