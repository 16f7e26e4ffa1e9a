"""docker-compose.yml: valid by the Compose Specification, and in agreement with
docs/deployment.md and the Dockerfile (the same image, port, cache volume and container name)."""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonschema
import pytest

from reranker_server.cli import build_parser
from tests.deploy_files import (
    COMPOSE_FILE,
    COMPOSE_SCHEMA,
    ROOT,
    dockerfile_instructions,
    last_stage_env,
    load_yaml_documents,
    option_values,
    readme_commands,
    stage_chain,
)

SERVERS = ("reranker-server", "reranker-server-gpu")


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
        lambda doc: doc["services"]["redis"].update(profiles="redis"),
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


def _readme_docker_runs() -> list[list[str]]:
    runs = [argv for argv in readme_commands() if argv[:2] == ["docker", "run"]]
    assert runs, "docs/deployment.md's Docker section shows no `docker run`"
    return runs


def test_readme_uses_one_container_name() -> None:
    names = set()
    for argv in readme_commands():
        if argv[:1] != ["docker"] or argv[1] in ("build", "compose"):
            continue
        if argv[1] == "run":
            names.update(option_values(argv, "--name"))
        else:
            names.add(argv[-1])  # docker logs / inspect / stop / rm NAME
    assert names == {"reranker-server"}


def test_readme_runs_use_the_dockerfile_port_and_cache() -> None:
    env = last_stage_env(dockerfile_instructions())
    built = {
        tag
        for argv in readme_commands()
        if argv[:2] == ["docker", "build"]
        for tag in option_values(argv, "-t")
    }
    gpus = set()
    for argv in _readme_docker_runs():
        if "download" in argv:
            continue  # `docker run --rm ... download` (no server, no port)
        assert option_values(argv, "-p") == [f"{env['RERANKER_PORT']}:{env['RERANKER_PORT']}"]
        assert option_values(argv, "-v") == [f"$(pwd)/hf_cache:{env['RERANKER_MODEL_CACHE_DIR']}"]
        assert argv[-1] in built, f"runs an image docs/deployment.md does not build: {argv[-1]}"
        gpus.update(option_values(argv, "--gpus"))
    assert gpus == {"all", '"device=0"'}


@pytest.mark.parametrize("service", SERVERS)
def test_servers_agree_with_the_readme_and_dockerfile(
    compose: dict[str, Any], service: str
) -> None:
    env = last_stage_env(dockerfile_instructions())
    spec = compose["services"][service]
    cpu_run = next(argv for argv in _readme_docker_runs() if "--gpus" not in argv)
    assert spec["ports"] == option_values(cpu_run, "-p")
    (readme_volume,) = option_values(cpu_run, "-v")
    assert spec["volumes"] == [readme_volume.replace("$(pwd)/", "./")]
    assert spec["volumes"][0].endswith(":" + env["HF_HOME"])
    assert (ROOT / spec["build"]["context"] / "Dockerfile").is_file()
    # The image's own command (`reranker-server serve`) runs; an override must parse as one.
    if "command" in spec:
        assert build_parser().parse_args(spec["command"]).command == "serve"
    # Variables are passed through by name (unset ones stay unset in the container).
    assert "RERANKER_CACHE_URL" in spec["environment"]
    assert all("=" not in item for item in spec["environment"])


def test_cpu_server_is_the_readme_container(compose: dict[str, Any]) -> None:
    spec = compose["services"]["reranker-server"]
    assert "profiles" not in spec  # `docker compose up` starts it
    cpu_run = next(argv for argv in _readme_docker_runs() if "--gpus" not in argv)
    assert [spec["container_name"]] == option_values(cpu_run, "--name")
    assert spec["image"] == cpu_run[-1]
    assert "args" not in spec["build"]  # the Dockerfile's default VARIANT: the CPU image


def test_gpu_profile_builds_the_cuda_image_and_reserves_gpus(compose: dict[str, Any]) -> None:
    spec = compose["services"]["reranker-server-gpu"]
    assert spec["profiles"] == ["gpu"]
    variant = spec["build"]["args"]["VARIANT"]
    assert "torch-cuda" in stage_chain(dockerfile_instructions(), variant)
    gpu_run = next(argv for argv in _readme_docker_runs() if "--gpus" in argv)
    assert spec["image"] == gpu_run[-1]
    (device,) = spec["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert device["capabilities"] == ["gpu"]


def test_redis_profile_matches_the_cache_url_in_the_readme(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert redis["profiles"] == ["redis"]
    assert "ports" not in redis  # reachable by the server only
    urls = [
        word.split("=", 1)[1]
        for argv in readme_commands()
        for word in argv
        if word.startswith("RERANKER_CACHE_URL=")
    ]
    assert urls == ["redis://redis:6379/0"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_readme_compose_commands_name_real_services_and_profiles(compose: dict[str, Any]) -> None:
    services = set(compose["services"])
    profiles = {p for spec in compose["services"].values() for p in spec.get("profiles", [])}
    seen = 0
    for argv in readme_commands():
        if "compose" not in argv:
            continue
        seen += 1
        words = argv[argv.index("compose") + 1 :]
        assert set(option_values(words, "--profile")) <= profiles
        if "up" in words:
            named = [w for w in words[words.index("up") + 1 :] if not w.startswith("-")]
            assert set(named) <= services
    assert seen >= 3
