"""deploy/kubernetes and docker-compose.yml, checked without a cluster or a Docker engine.

Each overlay is built with `kubectl kustomize` and validated against the Kubernetes schemas
(kubernetes-validate, strict). Every probe path, port and environment variable the manifests name is taken
from the manifests and checked against the app itself: the Settings class, and a real server started with
the ConfigMap's settings. The compose file is parsed by docker-compose.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml
from pydantic import SecretStr

from config import Settings
from scripts.local_server import ROOT
from tests.conftest import ServerProcess
from tests.test_deployment_files import dockerfile_env, dockerfile_instructions

KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("single", "scaled")
KUBERNETES_VERSION = "1.32.0"  # the oldest minor still supported upstream when this was written
SETTINGS = {name.upper() for name in Settings.model_fields}
# Settings whose values are credentials: typed SecretStr in Settings, and the URLs that carry a password.
SECRET_SETTINGS = {
    name.upper()
    for name, field in Settings.model_fields.items()
    if SecretStr in (field.annotation, *typing.get_args(field.annotation))
    or any(SecretStr in typing.get_args(arg) for arg in typing.get_args(field.annotation))
} | {"DATABASE_URL", "REDIS_URL"}
# Environment the image itself reads besides Settings (Dockerfile ENV names that are not settings).
IMAGE_VARIABLES = set(dockerfile_env())

Manifest = dict[str, Any]


def kubectl() -> str:
    found = shutil.which("kubectl")
    assert found, "kubectl is missing: `make system-deps` installs Debian's kubernetes-client"
    return found


def build(overlay: str) -> list[Manifest]:
    """`kubectl kustomize` of one overlay, offline, as a list of resources."""
    result = subprocess.run(
        [kubectl(), "kustomize", str(KUBERNETES / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return [document for document in yaml.safe_load_all(result.stdout) if document]


def one(manifests: list[Manifest], kind: str) -> Manifest:
    (found,) = [manifest for manifest in manifests if manifest["kind"] == kind]
    return found


def container(manifests: list[Manifest]) -> Manifest:
    (found,) = one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
    return dict(found)


def config_map(manifests: list[Manifest]) -> dict[str, str]:
    return dict(one(manifests, "ConfigMap")["data"])


def env_names(manifests: list[Manifest]) -> set[str]:
    """Every environment variable the pod gets: the ConfigMap's keys and the container's own `env`."""
    return set(config_map(manifests)) | {entry["name"] for entry in container(manifests).get("env", [])}


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[Manifest]]:
    return request.param, build(request.param)


def test_each_overlay_validates_against_the_kubernetes_schemas(overlay: tuple[str, list[Manifest]]) -> None:
    _, manifests = overlay
    kinds = sorted(manifest["kind"] for manifest in manifests)
    for manifest in manifests:
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
    assert {"ConfigMap", "Deployment", "Ingress", "Service", "ServiceAccount"} <= set(kinds)


def test_every_variable_is_a_setting_and_every_secret_comes_from_a_secret(
    overlay: tuple[str, list[Manifest]],
) -> None:
    name, manifests = overlay
    assert env_names(manifests) <= SETTINGS | IMAGE_VARIABLES
    assert not set(config_map(manifests)) & SECRET_SETTINGS  # never a credential in a ConfigMap
    from_secrets = {
        entry["name"]: entry["valueFrom"]["secretKeyRef"]
        for entry in container(manifests).get("env", [])
        if "secretKeyRef" in entry.get("valueFrom", {})
    }
    assert set(from_secrets) <= SECRET_SETTINGS
    assert {"ADMIN_TOKEN", "METRICS_TOKEN", "OPENAI_API_KEY", "API_KEYS"} <= set(from_secrets)
    assert all(reference["key"] == variable for variable, reference in from_secrets.items())
    plain = [entry["name"] for entry in container(manifests).get("env", []) if "value" in entry]
    assert not set(plain) & SECRET_SETTINGS
    if name == "scaled":  # the shared stores are required there: a pod without them would split the service
        assert from_secrets["REDIS_URL"].get("optional") is not True
        assert from_secrets["DATABASE_URL"].get("optional") is not True
    else:
        assert "REDIS_URL" not in from_secrets and "DATABASE_URL" not in from_secrets


def test_the_pod_runs_as_the_image_does(overlay: tuple[str, list[Manifest]]) -> None:
    _, manifests = overlay
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    (user,) = [arguments for instruction, arguments in dockerfile_instructions() if instruction == "USER"][-1:]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}" == user
    security = container(manifests)["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    mounts = {mount["mountPath"]: mount["name"] for mount in container(manifests)["volumeMounts"]}
    assert config_map(manifests)["CACHE_DIR"] == dockerfile_env()["CACHE_DIR"] in mounts  # the one writable path
    assert "/tmp" in mounts  # tempfile's directory (the metrics files with WORKERS>1)
    volumes = {volume["name"] for volume in pod["volumes"]}
    assert set(mounts.values()) <= volumes


def test_ports_agree_everywhere(overlay: tuple[str, list[Manifest]]) -> None:
    _, manifests = overlay
    (port,) = container(manifests)["ports"]
    exposed = [arguments for instruction, arguments in dockerfile_instructions() if instruction == "EXPOSE"]
    assert str(port["containerPort"]) == config_map(manifests)["PORT"] == dockerfile_env()["PORT"] == exposed[0]
    annotations = one(manifests, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port["containerPort"])
    service = one(manifests, "Service")
    assert [entry["targetPort"] for entry in service["spec"]["ports"]] == [port["name"]]
    labels = one(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    backend = one(manifests, "Ingress")["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] in {entry["name"] for entry in service["spec"]["ports"]}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container(manifests)[probe]["httpGet"]["port"] == port["name"]


def test_the_grace_period_covers_the_servers_own_drain(overlay: tuple[str, list[Manifest]]) -> None:
    _, manifests = overlay
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    pre_stop = container(manifests)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = int(
        config_map(manifests).get(
            "GRACEFUL_SHUTDOWN_SECONDS", Settings.model_fields["graceful_shutdown_seconds"].default
        )
    )
    # preStop, then the server's drain, then its services' shutdown (the question log's last batch) with room.
    assert pod["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + drain + 10


def test_resources_and_scaling(overlay: tuple[str, list[Manifest]]) -> None:
    name, manifests = overlay
    resources = container(manifests)["resources"]
    assert set(resources) == {"requests", "limits"}
    assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])
    deployment = one(manifests, "Deployment")
    if name == "single":
        assert deployment["spec"]["replicas"] == 1
        assert deployment["spec"]["strategy"]["type"] == "Recreate"  # one pod at a time holds the volume
        claim = one(manifests, "PersistentVolumeClaim")
        cache = next(
            volume for volume in deployment["spec"]["template"]["spec"]["volumes"] if volume["name"] == "cache"
        )
        assert cache["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert not [manifest for manifest in manifests if manifest["kind"] == "HorizontalPodAutoscaler"]
    else:
        autoscaler = one(manifests, "HorizontalPodAutoscaler")
        assert autoscaler["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
        assert autoscaler["spec"]["minReplicas"] >= 2
        (metric,) = autoscaler["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu"
        budget = one(manifests, "PodDisruptionBudget")
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
        # EMBEDDING_WORKERS x EMBEDDING_THREADS = the CPU limit: the model is sized to the pod, not the node.
        settings = config_map(manifests)
        workers, threads = int(settings["EMBEDDING_WORKERS"]), int(settings["EMBEDDING_THREADS"])
        assert workers * threads == int(resources["limits"]["cpu"])


@pytest.fixture(scope="module")
def configured_server(start_server: Callable[..., ServerProcess]) -> tuple[ServerProcess, list[Manifest]]:
    """A real server with the scaled overlay's ConfigMap (its address and cache directory made local)."""
    manifests = build("scaled")
    settings = {key: value for key, value in config_map(manifests).items() if key not in {"HOST", "PORT", "CACHE_DIR"}}
    return start_server(**settings, HOST="127.0.0.1"), manifests


def test_the_configmap_starts_a_server_whose_probe_paths_answer(
    configured_server: tuple[ServerProcess, list[Manifest]],
) -> None:
    server, manifests = configured_server
    probes = {
        container(manifests)[probe]["httpGet"]["path"] for probe in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert probes == {"/health", "/health-status"}
    for path in probes:
        assert httpx.get(f"{server.base_url}{path}", timeout=10).status_code == 200
    scrape = one(manifests, "Deployment")["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"]
    metrics = httpx.get(f"{server.base_url}{scrape}", timeout=10)
    assert metrics.status_code == 200 and "http_requests_total" in metrics.text


# --- docker-compose.yml ------------------------------------------------------------------------------------------


def compose_config() -> dict[str, Any]:
    """docker-compose.yml as docker-compose resolves it (schema-checked, variables interpolated, anchors merged)."""
    compose = shutil.which("docker-compose")
    assert compose, "docker-compose is missing: `make system-deps` installs Debian's docker-compose"
    result = subprocess.run(
        [compose, "-f", str(ROOT / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin"},  # no ADMIN_TOKEN etc. from the caller: the file's defaults
    )
    assert result.returncode == 0, result.stderr
    parsed = yaml.safe_load(result.stdout)
    assert isinstance(parsed, dict)
    return parsed


IMAGE_REFERENCE = re.compile(r"^[a-z0-9./-]+:v?[0-9][0-9a-z.-]*(-alpine)?$")


def test_compose_runs_two_replicas_behind_a_proxy_with_the_monitoring() -> None:
    services = compose_config()["services"]
    replicas = {name: service for name, service in services.items() if service.get("build")}
    assert set(replicas) == {"app1", "app2"}
    assert {"proxy", "redis", "postgres", "prometheus", "grafana"} <= set(services)
    for service in replicas.values():
        assert Path(service["build"]["context"]) == ROOT and (ROOT / "Dockerfile").exists()
        assert set(service["environment"]) <= SETTINGS
        assert service["read_only"] is True and service["tmpfs"] == ["/tmp"]
        (cache,) = service["volumes"]
        assert cache.split(":")[1] == dockerfile_env()["CACHE_DIR"]
        assert service["environment"]["REDIS_URL"].startswith("redis://redis:")
        assert "@postgres:5432/" in service["environment"]["DATABASE_URL"]
    # The proxy's fixed address is the one the replicas trust.
    proxy = services["proxy"]
    address = proxy["networks"]["default"]["ipv4_address"]
    assert all(service["environment"]["TRUSTED_PROXIES"] == f"{address}/32" for service in replicas.values())
    # Other images pinned to a version (no `latest`), each file they mount present in the repository.
    for name, service in services.items():
        if name not in replicas:
            assert IMAGE_REFERENCE.match(service["image"]), service["image"]
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("/"):
                assert Path(source).exists(), source


def test_compose_proxy_and_prometheus_point_at_the_replicas() -> None:
    nginx = (ROOT / "deploy" / "compose" / "nginx.conf").read_text()
    upstream = re.findall(r"server (app\d):(\d+);", nginx)
    assert upstream == [("app1", dockerfile_env()["PORT"]), ("app2", dockerfile_env()["PORT"])]
    assert "location = /ws/ask" in nginx and 'proxy_set_header Connection "upgrade";' in nginx
    assert "proxy_buffering off;" in nginx
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = {
        target
        for job in prometheus["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    }
    assert {f"app1:{dockerfile_env()['PORT']}", f"app2:{dockerfile_env()['PORT']}"} <= targets
