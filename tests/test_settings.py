"""Settings: environment, flags, validation, error lines, CLI help, the docs/settings.md table."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError

from reranker_server.cli import DOWNLOAD_SETTINGS, build_parser, settings_from_args
from reranker_server.settings import Settings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_match_the_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(__import__("os").environ):
        if key.startswith("RERANKER_"):
            monkeypatch.delenv(key)
    s = Settings()
    assert s.port == 5200 and s.candidates == 10
    assert s.stage1_model == "ms-marco-MiniLM-L-12-v2"
    assert s.stage2_model == "cross-encoder/ms-marco-MiniLM-L-6-v2"
    assert s.model_cache_dir == Path("hf_cache") and not s.trust_remote_code


def test_environment_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RERANKER_PORT", "6000")
    monkeypatch.setenv("RERANKER_CANDIDATES", "20")
    monkeypatch.setenv("RERANKER_STAGE2_ON_CPU", "true")
    args = build_parser().parse_args(["serve", "--candidates", "7", "--no-warmup"])
    s = settings_from_args(args)
    assert (s.port, s.candidates, s.stage2_on_cpu, s.warmup) == (6000, 7, True, False)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "CUDA:0"])
def test_device_accepts(device: str) -> None:
    assert Settings(device=device).device == device.lower()


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "tpu"])
def test_device_rejects(device: str) -> None:
    with pytest.raises(ValidationError):
        Settings(device=device)


def test_threads_never_oversubscribe() -> None:
    s = Settings(cpu_threads=2, workers=2)
    assert s.threads_per_worker() * s.workers <= s.total_threads()
    assert Settings(cpu_threads=2, workers=4).threads_per_worker() == 1


def test_every_setting_is_documented_in_the_settings_page() -> None:
    page = (ROOT / "docs" / "settings.md").read_text()
    missing = [n for n in Settings.model_fields if f"`RERANKER_{n.upper()}`" not in page]
    assert missing == []
    assert "(docs/settings.md)" in (ROOT / "README.md").read_text()  # linked from the README


def test_requirements_txt_matches_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = [
        line.strip()
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert listed == project["dependencies"]
    for spec_package in ("fastapi", "uvicorn", "flashrank", "onnxruntime", "tokenizers"):
        assert any(re.match(rf"{spec_package}\b", d) for d in listed)


def test_torch_is_an_extra_that_the_dev_install_includes() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_stack = ("torch", "transformers", "sentence-transformers")
    assert not [d for d in project["dependencies"] if re.match(rf"({'|'.join(torch_stack)})\b", d)]
    extra = project["optional-dependencies"]["torch"]
    for package in torch_stack:
        assert any(re.match(rf"{package}\b", d) for d in extra)
    assert "reranker-server[torch]" in project["optional-dependencies"]["dev"]


def test_ci_installs_the_pinned_cpu_torch_and_runs_the_readme_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    command = next(line.strip() for line in ci.splitlines() if line.startswith("python3 -m venv"))
    assert "pip install torch==2.13.0" in command
    assert f"    {command}\n" in readme


def test_secrets_stay_out_of_repr_and_errors() -> None:
    s = Settings(cache_url="redis://:hunter2@cache:6379/0", api_key="k3y-s3cret")
    assert "hunter2" not in repr(s) and "k3y-s3cret" not in repr(s)
    with pytest.raises(ValidationError) as info:
        Settings(cache_url="valkey://:hunter2@cache:6379/0")
    assert "hunter2" not in str(info.value)


def test_the_api_key_is_no_command_line_flag() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--api-key", "visible-in-ps"])
    assert build_parser().parse_args(["serve", "--api-key-file", "/run/secrets/k"])


def _invalid_value(name: str) -> str | None:
    """A value the setting refuses, by its type (None for free-form strings and paths)."""
    field = Settings.model_fields[name]
    text = str(field.annotation)
    if name in ("device", "cache_url"):
        return "tpu" if name == "device" else "valkey://cache"
    if field.annotation is bool:
        return "maybe"
    if "Literal" in text:
        return "nope"
    if field.annotation in (int, float):
        return "many"
    return None


INVALID = {n: v for n in Settings.model_fields if (v := _invalid_value(n)) is not None}


def test_the_invalid_values_cover_every_constrained_setting() -> None:
    assert len(INVALID) >= 35 and {"port", "candidates", "log_level", "warmup"} <= set(INVALID)


@pytest.mark.parametrize("name", sorted(INVALID))
def test_an_invalid_value_is_one_line_naming_variable_and_value(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(f"RERANKER_{name.upper()}", INVALID[name])
    with pytest.raises(SettingsError) as info:
        load_settings()
    (line,) = info.value.lines
    shown = "<hidden>" if name == "cache_url" else repr(INVALID[name])
    assert line.startswith(f"RERANKER_{name.upper()}={shown}: "), line
    assert "\n" not in line and "Value error" not in line and "pydantic" not in line


def test_a_flag_error_names_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RERANKER_CANDIDATES", "5")
    with pytest.raises(SettingsError) as info:
        load_settings({"candidates": "0"})
    assert info.value.lines == ["--candidates='0': Input should be greater than or equal to 1"]


def test_a_setting_the_caller_does_not_use_never_stops_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RERANKER_PORT", "abc")
    monkeypatch.setenv("RERANKER_CANDIDATES", "7")
    settings, notes = load_settings(unused={"port"})
    assert (settings.port, settings.candidates) == (5200, 7)
    assert notes == [
        "RERANKER_PORT='abc': Input should be a valid integer, unable to parse string as an "
        "integer; ignored (not used here)"
    ]
    monkeypatch.setenv("RERANKER_CANDIDATES", "x")
    with pytest.raises(SettingsError):
        load_settings(unused={"port"})


def _help(*argv: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_serve_help_shows_every_flag_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help("serve", capsys=capsys)
    assert "--candidates CANDIDATES Documents kept after stage 1" in text
    assert "Default: 10. [env RERANKER_CANDIDATES]" in text
    assert "Default: 5200. [env RERANKER_PORT]" in text
    assert "--warmup, --no-warmup Run one pair through each model at startup. Default: on." in text
    assert text.count("Default:") == len(Settings.model_fields) - 1  # not the API key


def test_download_help_lists_only_what_download_reads(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help("download", capsys=capsys)
    for flag in ("--stage1-model", "--stage2-model", "--model-cache-dir", "--offline"):
        assert flag in text
    for flag in ("--port", "--candidates", "--max-documents", "--cache-url"):
        assert flag not in text
    assert text.count("Default:") == len(DOWNLOAD_SETTINGS)


def test_help_speaks_of_the_product_only(capsys: pytest.CaptureFixture[str]) -> None:
    texts = [_help(capsys=capsys)] + [
        _help(command, capsys=capsys) for command in ("serve", "download", "make-test-models")
    ]
    for text in texts:
        for word in ("spec", "logs.configure_logging", "entry point"):
            assert word not in text.lower(), (word, text[:200])
