"""deploy/kubernetes/: every manifest valid by the Kubernetes schemas (kubernetes-validate ships
them, so this runs offline), and the manifests agree with each other, the Dockerfile, the CLI and
the server's real health endpoints."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest

from reranker_server.app import create_app
from reranker_server.cli import build_parser
from reranker_server.server import SHUTDOWN_GRACE_S
from reranker_server.settings import Settings
from tests.conftest import running
from tests.deploy_files import (
    KUBERNETES_DIR,
    build_args,
    dockerfile_instructions,
    kubernetes_manifests,
    last_stage_env,
    load_yaml_documents,
)

# Settings that other branches add (the shared result cache); checked once they are in Settings.
SETTINGS_FROM_OTHER_WORK = {"RERANKER_CACHE_URL"}


def _all_documents() -> list[dict[str, Any]]:
    return [doc for path in kubernetes_manifests() for doc in load_yaml_documents(path)]


def _find(kind: str, name: str, path: Path | None = None) -> dict[str, Any]:
    docs = load_yaml_documents(path) if path else _all_documents()
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


CPU_DEPLOYMENT = KUBERNETES_DIR / "deployment.yaml"
GPU_DEPLOYMENT = KUBERNETES_DIR / "gpu" / "deployment.yaml"


def _server_deployments() -> dict[str, dict[str, Any]]:
    return {
        "cpu": _find("Deployment", "reranker-server", CPU_DEPLOYMENT),
        "cuda": _find("Deployment", "reranker-server", GPU_DEPLOYMENT),
    }


def _container(deployment: dict[str, Any], name: str = "server") -> dict[str, Any]:
    pod = deployment["spec"]["template"]["spec"]
    containers = pod["containers"] + pod.get("initContainers", [])
    (container,) = [c for c in containers if c["name"] == name]
    return container


@pytest.mark.parametrize(
    "path", kubernetes_manifests(), ids=lambda p: str(p.relative_to(KUBERNETES_DIR))
)
def test_manifest_is_valid_kubernetes(path: Path) -> None:
    documents = load_yaml_documents(path)
    assert documents, f"{path} holds no manifest"
    for document in documents:
        # strict: unknown fields (a misspelt probe, say) are errors too
        kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize(
    "mistake",
    [
        lambda c: c.update(livenesProbe=c.pop("livenessProbe")),
        lambda c: c["ports"][0].update(containerPort="5200"),
        lambda c: c["resources"]["limits"].update(cpu=["2"]),
    ],
    ids=["misspelt-field", "port-as-string", "limit-as-list"],
)
def test_the_validator_catches_mistakes(mistake: Callable[[dict[str, Any]], None]) -> None:
    broken = copy.deepcopy(_server_deployments()["cpu"])
    mistake(_container(broken))
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


def test_every_part_is_there() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in _all_documents()}
    assert {
        ("ConfigMap", "reranker-server"),
        ("PersistentVolumeClaim", "reranker-models"),
        ("Deployment", "reranker-server"),
        ("Service", "reranker-server"),
        ("HorizontalPodAutoscaler", "reranker-server"),
        ("PodDisruptionBudget", "reranker-server"),
        ("Deployment", "redis"),
        ("Service", "redis"),
    } <= kinds
    assert (KUBERNETES_DIR / "README.md").is_file()


def test_probes_answer_on_a_live_server(make_settings: Callable[..., Settings]) -> None:
    probes = {}
    for variant, deployment in _server_deployments().items():
        server = _container(deployment)
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            get = server[probe]["httpGet"]
            assert get["port"] == "http"
            probes[(variant, probe)] = get["path"]
    assert probes[("cpu", "livenessProbe")] == "/health/live"
    assert probes[("cpu", "readinessProbe")] == "/health/ready"
    with running(create_app(make_settings())) as url:
        for path in set(probes.values()):
            response = httpx.get(url + path, timeout=10)
            assert response.status_code == 200, (path, response.text)


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_server_deployment_matches_the_image_and_cli(variant: str) -> None:
    instructions = dockerfile_instructions()
    image_env = last_stage_env(instructions)
    deployment = _server_deployments()[variant]
    pod = deployment["spec"]["template"]["spec"]
    server, init = _container(deployment), _container(deployment, "download-models")

    # The commands are the CLI's: `serve` after `download`, same image.
    assert build_parser().parse_args(server["args"]).command == "serve"
    assert build_parser().parse_args(init["args"]).command == "download"
    assert server["image"] == init["image"]
    assert server["image"].endswith(":cuda" if variant == "cuda" else ":latest")

    # The image's port, user and cache directory.
    (port,) = server["ports"]
    assert port == {"name": "http", "containerPort": int(image_env["RERANKER_PORT"])}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(build_args(instructions)["APP_UID"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    for container in (server, init):
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        cache = volumes[mounts[image_env["RERANKER_MODEL_CACHE_DIR"]]]
        assert cache["persistentVolumeClaim"]["claimName"] == "reranker-models"
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert "emptyDir" in volumes[mounts["/tmp"]]

    # Requests and limits; inference threads = the CPU limit; one GPU on the GPU variant.
    resources = server["resources"]
    assert set(resources["requests"]) >= {"cpu", "memory"}
    assert set(resources["limits"]) >= {"cpu", "memory"}
    env = {e["name"]: e["value"] for e in server["env"]}
    assert env["RERANKER_CPU_THREADS"] == resources["limits"]["cpu"]
    assert env["RERANKER_OFFLINE"] == "true"  # the init container downloaded the models
    assert resources["limits"].get("nvidia.com/gpu") == (1 if variant == "cuda" else None)

    # The preStop pause, the drain and the close after it fit in the grace period.
    pause = server["lifecycle"]["preStop"]["exec"]["command"]
    assert pause[0] == "sleep"
    drain = Settings(drain_timeout_s=env["RERANKER_DRAIN_TIMEOUT_S"]).drain_timeout_s
    assert drain >= Settings().request_timeout_s  # a full queue finishes (each by its deadline)
    assert pod["terminationGracePeriodSeconds"] >= int(pause[1]) + drain + SHUTDOWN_GRACE_S + 5


def test_gpu_deployment_differs_only_where_it_must() -> None:
    deployments = _server_deployments()
    cpu, gpu = copy.deepcopy(deployments["cpu"]), copy.deepcopy(deployments["cuda"])
    gpu_pod = gpu["spec"]["template"]["spec"]
    assert gpu_pod.pop("tolerations") == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    del _container(gpu)["resources"]["limits"]["nvidia.com/gpu"]
    for deployment in (cpu, gpu):
        for name in ("server", "download-models"):
            del _container(deployment, name)["image"]
    assert cpu == gpu


def test_service_hpa_and_pdb_select_the_server_pods() -> None:
    deployment = _server_deployments()["cpu"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    service = _find("Service", "reranker-server")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == _container(deployment)["ports"][0]["name"]

    hpa = _find("HorizontalPodAutoscaler", "reranker-server")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]

    pdb = _find("PodDisruptionBudget", "reranker-server")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]  # drains can proceed


def test_redis_is_where_the_cache_url_points() -> None:
    config = _find("ConfigMap", "reranker-server")
    url = httpx.URL(config["data"]["RERANKER_CACHE_URL"])
    service = _find("Service", "redis")
    assert url.scheme == "redis"
    assert url.host == service["metadata"]["name"]
    assert url.port == service["spec"]["ports"][0]["port"]
    redis = _find("Deployment", "redis")
    assert (
        service["spec"]["selector"].items()
        <= redis["spec"]["template"]["metadata"]["labels"].items()
    )


def test_settings_named_in_manifests_exist() -> None:
    """A misspelt RERANKER_* name would be silently ignored by the server."""
    known = {f"RERANKER_{name.upper()}" for name in Settings.model_fields}
    named = set(_find("ConfigMap", "reranker-server")["data"])
    for deployment in _server_deployments().values():
        named.update(e["name"] for e in _container(deployment)["env"])
    assert named - known - SETTINGS_FROM_OTHER_WORK == set()
