"""deploy/kubernetes/: a kustomize base and two overlays (cpu, cuda). Each overlay is rendered
(tests/deploy_files.kustomize, compared with `kubectl kustomize` where kubectl is installed) and
every rendered manifest is validated against the Kubernetes schemas (kubernetes-validate ships
them, so this runs offline); the manifests agree with each other, the Dockerfile, the CLI, the
server's real health and metrics endpoints, and the prometheus-adapter rule the HPA needs."""

from __future__ import annotations

import copy
import shutil
import subprocess
from collections.abc import Callable
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml

from reranker_server.app import create_app
from reranker_server.cli import build_parser
from reranker_server.server import SHUTDOWN_GRACE_S
from reranker_server.settings import Settings
from tests.conftest import running
from tests.deploy_files import (
    KUBERNETES_DIR,
    OVERLAYS,
    ROOT,
    STOP_MARGIN_S,
    build_args,
    dockerfile_instructions,
    kubernetes_manifests,
    kustomize,
    last_stage_env,
    load_yaml_documents,
    pod_containers,
    stop_grace_s,
)

# Settings that other branches add (the shared result cache); checked once they are in Settings.
SETTINGS_FROM_OTHER_WORK = {"RERANKER_CACHE_URL"}
ADAPTER_VALUES = KUBERNETES_DIR / "prometheus-adapter" / "values.yaml"


def rendered(overlay: str) -> list[dict[str, Any]]:
    return kustomize(KUBERNETES_DIR / "overlays" / overlay)


def _find(documents: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in documents if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def _deployment(overlay: str) -> dict[str, Any]:
    return _find(rendered(overlay), "Deployment", "reranker-server")


def _container(deployment: dict[str, Any], name: str = "server") -> dict[str, Any]:
    pod = deployment["spec"]["template"]["spec"]
    (container,) = [
        c for c in pod["containers"] + pod.get("initContainers", []) if c["name"] == name
    ]
    return container


def _overlay_image(overlay: str) -> str:
    (spec,) = load_yaml_documents(KUBERNETES_DIR / "overlays" / overlay / "kustomization.yaml")
    (image,) = spec["images"]
    return f"{image['newName']}:{image['newTag']}"


def _key(document: dict[str, Any]) -> tuple[str, str]:
    return document["kind"], document["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_manifests_are_valid_kubernetes(overlay: str) -> None:
    documents = rendered(overlay)
    assert documents
    for document in documents:
        # strict: unknown fields (a misspelt probe, say) are errors too
        kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_renderer_is_kustomize(overlay: str) -> None:
    """The test renderer and kustomize itself give the same manifests."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl: the test renderer alone (its subset rejects unknown fields)")
    result = subprocess.run(
        [kubectl, "kustomize", str(KUBERNETES_DIR / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    theirs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert sorted(theirs, key=_key) == sorted(rendered(overlay), key=_key)


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
    broken = copy.deepcopy(_deployment("cpu"))
    mistake(_container(broken))
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


def test_every_part_is_there() -> None:
    for overlay in OVERLAYS:
        kinds = {_key(d) for d in rendered(overlay)}
        assert kinds == {
            ("ConfigMap", "reranker-server"),
            ("Deployment", "reranker-server"),
            ("Service", "reranker-server"),
            ("HorizontalPodAutoscaler", "reranker-server"),
            ("PodDisruptionBudget", "reranker-server"),
            ("Deployment", "redis"),
            ("Service", "redis"),
        }
    assert (KUBERNETES_DIR / "README.md").is_file()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_image_is_named_once_with_a_version(overlay: str) -> None:
    """The overlay's `images:` entry is the one place for name and tag; no `:latest`."""
    image = _overlay_image(overlay)
    deployment = _deployment(overlay)
    server, init = _container(deployment), _container(deployment, "download-models")
    assert server["image"] == init["image"] == image
    for container in pod_containers(rendered(overlay)):
        name, _, tag = container["image"].rpartition(":")
        assert name and tag and tag != "latest", container["image"]
        assert (
            container["imagePullPolicy"] == "IfNotPresent"
            if "imagePullPolicy" in container
            else True
        )
    # The base names only the placeholder that the overlays replace.
    base = [
        c["image"]
        for c in pod_containers([d for p in kubernetes_manifests() for d in load_yaml_documents(p)])
    ]
    assert set(base) == {"reranker-server", "redis:7-alpine"}
    registry = image.split("/")[0]
    mentions = [
        str(path.relative_to(KUBERNETES_DIR))
        for path in KUBERNETES_DIR.rglob("*.yaml")
        if registry in path.read_text(encoding="utf-8")
    ]
    assert sorted(mentions) == [f"overlays/{o}/kustomization.yaml" for o in OVERLAYS]


def test_probes_answer_on_a_live_server(make_settings: Callable[..., Settings]) -> None:
    probes = {}
    for overlay in OVERLAYS:
        server = _container(_deployment(overlay))
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            get = server[probe]["httpGet"]
            assert get["port"] == "http"
            probes[(overlay, probe)] = get["path"]
    assert probes[("cpu", "livenessProbe")] == "/health/live"
    assert probes[("cpu", "readinessProbe")] == "/health/ready"
    with running(create_app(make_settings())) as url:
        for path in set(probes.values()):
            response = httpx.get(url + path, timeout=10)
            assert response.status_code == 200, (path, response.text)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_deployment_matches_the_image_and_cli(overlay: str) -> None:
    instructions = dockerfile_instructions()
    image_env = last_stage_env(instructions)
    deployment = _deployment(overlay)
    pod = deployment["spec"]["template"]["spec"]
    server, init = _container(deployment), _container(deployment, "download-models")

    # The commands are the CLI's: `serve` after `download`, same image.
    assert build_parser().parse_args(server["args"]).command == "serve"
    assert build_parser().parse_args(init["args"]).command == "download"

    # The image's port, user and cache directory.
    (port,) = server["ports"]
    assert port == {"name": "http", "containerPort": int(image_env["RERANKER_PORT"])}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(build_args(instructions)["APP_UID"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    for container in (server, init):
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        # The model cache: each pod's own (any cluster, no storage class), filled by the init
        # container before the server starts.
        cache = volumes[mounts[image_env["RERANKER_MODEL_CACHE_DIR"]]]
        assert set(cache) == {"name", "emptyDir"} and cache["emptyDir"]["sizeLimit"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert "emptyDir" in volumes[mounts["/tmp"]]

    # Requests and limits; inference threads = the CPU limit; one GPU on the CUDA overlay.
    resources = server["resources"]
    assert set(resources["requests"]) >= {"cpu", "memory"}
    assert set(resources["limits"]) >= {"cpu", "memory"}
    env = {e["name"]: e["value"] for e in server["env"]}
    assert env["RERANKER_CPU_THREADS"] == resources["limits"]["cpu"]
    assert env["RERANKER_OFFLINE"] == "true"  # the init container downloaded the models
    assert resources["limits"].get("nvidia.com/gpu") == (1 if overlay == "cuda" else None)

    # The stop rule (docs/deployment.md, "Stopping"): the preStop pause + the drain + the margin.
    pause = server["lifecycle"]["preStop"]["exec"]["command"]
    assert pause[0] == "sleep"
    drain = Settings(drain_timeout_s=env["RERANKER_DRAIN_TIMEOUT_S"]).drain_timeout_s
    assert drain == Settings().drain_timeout_s
    assert drain >= Settings().request_timeout_s  # a full queue finishes (each by its deadline)
    assert STOP_MARGIN_S > SHUTDOWN_GRACE_S
    assert pod["terminationGracePeriodSeconds"] == stop_grace_s(drain, pause_s=int(pause[1]))


def test_cuda_overlay_differs_only_where_it_must() -> None:
    cpu, gpu = copy.deepcopy(_deployment("cpu")), copy.deepcopy(_deployment("cuda"))
    gpu_pod = gpu["spec"]["template"]["spec"]
    assert gpu_pod.pop("tolerations") == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    del _container(gpu)["resources"]["limits"]["nvidia.com/gpu"]
    for deployment in (cpu, gpu):
        for name in ("server", "download-models"):
            del _container(deployment, name)["image"]
    assert cpu == gpu
    others = [d for d in rendered("cuda") if _key(d) != ("Deployment", "reranker-server")]
    assert others == [d for d in rendered("cpu") if _key(d) != ("Deployment", "reranker-server")]


def test_service_hpa_and_pdb_select_the_server_pods() -> None:
    documents = rendered("cpu")
    deployment = _find(documents, "Deployment", "reranker-server")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    service = _find(documents, "Service", "reranker-server")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == _container(deployment)["ports"][0]["name"]

    hpa = _find(documents, "HorizontalPodAutoscaler", "reranker-server")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]

    pdb = _find(documents, "PodDisruptionBudget", "reranker-server")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]  # drains can proceed


def test_hpa_scales_on_the_queue_depth_the_server_exports(
    make_settings: Callable[..., Settings],
) -> None:
    """The HPA's Pods metric is a gauge of the server's /metrics, served to the HPA by the
    prometheus-adapter rule in deploy/kubernetes/prometheus-adapter/values.yaml, from pods that
    Prometheus scrapes (the pod's prometheus.io annotations: the server's port and path)."""
    documents = rendered("cpu")
    hpa = _find(documents, "HorizontalPodAutoscaler", "reranker-server")
    (pods_metric,) = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    name = pods_metric["metric"]["name"]
    assert pods_metric["target"]["type"] == "AverageValue"

    (values,) = load_yaml_documents(ADAPTER_VALUES)
    (rule,) = values["rules"]["custom"]
    assert rule["seriesQuery"].startswith(name + "{")
    assert rule["name"]["as"] == name
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }

    deployment = _find(documents, "Deployment", "reranker-server")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert (
        int(annotations["prometheus.io/port"])
        == _container(deployment)["ports"][0]["containerPort"]
    )
    with running(create_app(make_settings())) as url:
        metrics = httpx.get(url + annotations["prometheus.io/path"], timeout=10)
    assert metrics.status_code == 200
    assert f"# TYPE {name} gauge" in metrics.text


def test_redis_is_where_the_cache_url_points() -> None:
    documents = rendered("cpu")
    config = _find(documents, "ConfigMap", "reranker-server")
    url = httpx.URL(config["data"]["RERANKER_CACHE_URL"])
    service = _find(documents, "Service", "redis")
    assert url.scheme == "redis"
    assert url.host == service["metadata"]["name"]
    assert url.port == service["spec"]["ports"][0]["port"]
    redis = _find(documents, "Deployment", "redis")
    assert (
        service["spec"]["selector"].items()
        <= redis["spec"]["template"]["metadata"]["labels"].items()
    )


def test_settings_named_in_manifests_exist() -> None:
    """A misspelt RERANKER_* name would be silently ignored by the server."""
    known = {f"RERANKER_{name.upper()}" for name in Settings.model_fields}
    for overlay in OVERLAYS:
        documents = rendered(overlay)
        named = set(_find(documents, "ConfigMap", "reranker-server")["data"])
        deployment = _find(documents, "Deployment", "reranker-server")
        named.update(e["name"] for e in _container(deployment)["env"])
        assert named - known - SETTINGS_FROM_OTHER_WORK == set()


def test_readme_commands_render() -> None:
    """The `kubectl ... -k DIR` lines of deploy/kubernetes/README.md name overlays that render."""
    readme = (KUBERNETES_DIR / "README.md").read_text(encoding="utf-8")
    targets = []
    for line in readme.splitlines():
        words = line.split()
        if words[:1] == ["kubectl"] and "-k" in words:
            targets.append(words[words.index("-k") + 1])
    assert targets
    for target in targets:
        assert (ROOT / target / "kustomization.yaml").is_file(), target
        assert kustomize(ROOT / target)
