"""docs/deployment.md as code: the `docker run` lines agree with the Dockerfile and the stop rule,
the program pass-through line runs through the real entrypoint, and the "Several machines" section's
Redis URLs are read by the settings, redis-py and the server's own Redis cache against a real
redis-server with a password and an ACL user (skipped where redis-server is not installed)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from reranker_server.engine.cache import RedisScoreCache
from reranker_server.settings import Settings
from tests.conftest import free_port
from tests.deploy_files import (
    DEPLOYMENT_DOC,
    ENTRYPOINT,
    KUBERNETES_DIR,
    ROOT,
    dockerfile_instructions,
    last_stage_env,
    load_yaml_documents,
    option_values,
    readme_commands,
    readme_section,
    stop_grace_s,
)

GRACE = str(stop_grace_s(Settings().drain_timeout_s))


def _docker_runs() -> list[list[str]]:
    runs = [argv for argv in readme_commands() if argv[:2] == ["docker", "run"]]
    assert runs, "docs/deployment.md's Docker section shows no `docker run`"
    return runs


def test_docker_runs_use_the_image_port_volume_and_stop_timeout() -> None:
    env = last_stage_env(dockerfile_instructions())
    built = {
        tag
        for argv in readme_commands()
        if argv[:2] == ["docker", "build"]
        for tag in option_values(argv, "-t")
    }
    gpus = set()
    for argv in _docker_runs():
        assert option_values(argv, "-p") == [f"{env['RERANKER_PORT']}:{env['RERANKER_PORT']}"]
        # A named volume (no host path): Docker creates it owned by the image's user.
        assert option_values(argv, "-v") == [f"hf_cache:{env['RERANKER_MODEL_CACHE_DIR']}"]
        assert option_values(argv, "--stop-timeout") == [GRACE]
        assert argv[-1] in built, f"runs an image docs/deployment.md does not build: {argv[-1]}"
        gpus.update(option_values(argv, "--gpus"))
    assert gpus == {"all", '"device=0"'}


def test_docs_use_one_container_name_and_stop_it_with_the_grace() -> None:
    names = set()
    for argv in readme_commands():
        if argv[:1] != ["docker"] or argv[1] in ("build", "compose"):
            continue
        if argv[1] == "run":
            names.update(option_values(argv, "--name"))
        else:
            names.add(argv[-1])  # docker logs / inspect / stop / rm NAME
        if argv[1] in ("stop", "restart"):
            assert option_values(argv, "-t") == [GRACE], argv
    assert names == {"reranker-server"}


def test_the_program_pass_through_line_runs() -> None:
    """`docker run --rm reranker-server python -c ...` from the docs, through the entrypoint."""
    section = readme_section("## Docker")
    (line,) = re.findall(r"`(docker run --rm reranker-server python [^`]+)`", section)
    argv = shlex.split(line)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        ["sh", str(ENTRYPOINT), *argv[4:]], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def _env_blocks(heading: str) -> list[str]:
    """`NAME=value` lines of the indented blocks of a section."""
    return [
        line.strip()
        for line in readme_section(heading).splitlines()
        if re.match(r"^\s{4,}RERANKER_\w+=", line)
    ]


def test_several_machines_redis_urls_are_read_as_written() -> None:
    lines = _env_blocks("## Several machines")
    urls = [line.split("=", 1)[1] for line in lines]
    assert {line.split("=", 1)[0] for line in lines} == {"RERANKER_CACHE_URL"}
    assert {httpx.URL(u).scheme for u in urls} == {"redis", "rediss"}
    for url in urls:
        assert Settings(cache_url=url).cache_url == url
        pool = redis.ConnectionPool.from_url(url)
        parsed = httpx.URL(url)
        assert pool.connection_kwargs["password"] == parsed.password
        assert pool.connection_kwargs["host"] == parsed.host
        assert pool.connection_kwargs["port"] == parsed.port
        if parsed.scheme == "rediss":
            assert issubclass(pool.connection_class, redis.SSLConnection)
        if parsed.username:
            assert pool.connection_kwargs["username"] == parsed.username


@pytest.fixture
def redis_with_password(tmp_path: Path) -> Iterator[int]:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (.ci/run installs it)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    process = subprocess.Popen(
        [
            "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(tmp_path), "--requirepass", "change-me",
            "--user", "reranker", "on", ">change-me", "~*", "+@all",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        client = redis.Redis(port=port, password="change-me", socket_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                assert time.monotonic() < deadline and process.poll() is None, "no redis-server"
                time.sleep(0.05)
        client.close()
        yield port
    finally:
        process.kill()
        process.wait(timeout=10)


def test_the_password_urls_reach_a_real_redis(redis_with_password: int) -> None:
    """The plain-TCP forms, host and port replaced by the test's redis-server: the server's cache
    stores and reads through them; a wrong password means no cache (never a failed request)."""
    plain = [u for u in (line.split("=", 1)[1] for line in _env_blocks("## Several machines"))]
    plain = [u for u in plain if u.startswith("redis://")]
    assert plain
    for documented in plain:
        url = str(httpx.URL(documented).copy_with(host="127.0.0.1", port=redis_with_password))
        cache = RedisScoreCache(url, ttl_s=60)
        cache.set_many({"pair": 0.5})
        assert cache.get_many(["pair"]) == [0.5]
        assert cache.stats()["available"] is True
        cache.close()
        wrong = url.replace("change-me", "wrong")
        cache = RedisScoreCache(wrong, ttl_s=60)
        assert cache.get_many(["pair"]) == [None]
        assert cache.stats()["available"] is False
        cache.close()


def test_the_adapter_command_names_the_values_file() -> None:
    for page in (DEPLOYMENT_DOC, KUBERNETES_DIR / "README.md"):
        lines = [line for line in page.read_text().splitlines() if "helm install" in line]
        assert lines, page
        for line in lines:
            argv = shlex.split(line.strip())
            (values,) = option_values(argv, "-f")
            (document,) = load_yaml_documents(ROOT / values)
            assert document["rules"]["custom"]
