"""Resolve, download and verify model files. No model is loaded here.

Layout of the cache directory (`model_cache_dir`):

    flashrank/<name>/          FlashRank's own layout, plus `.complete` once fully unpacked
    hub/models--org--name/     the Hugging Face hub cache (HF_HOME=<cache dir> uses the same)

Downloads go to a temporary directory inside the cache and are renamed into place, and a marker
file says "complete": a half-finished download is never mistaken for a model.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .errors import ModelLoadError
from .settings import Settings

logger = logging.getLogger(__name__)

COMPLETE_MARKER = ".complete"
FLASHRANK_REQUIRED = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
HUB_PATTERNS = ["*.json", "*.txt", "*.safetensors", "*.model"]
MAX_UNPACKED_BYTES = 4 * 2**30  # FlashRank's largest pairwise archive unpacks to well under 1 GB
HUB_IGNORE = ["onnx/*", "openvino/*", "*/onnx/*", "*/openvino/*"]
DEFAULT_HUB = "https://huggingface.co"


def download_fixes(stage: int, *, offline: bool = False) -> str:
    """What to do when a model is not there and can't be downloaded, on one line."""
    mirror = "RERANKER_FLASHRANK_BASE_URL" if stage == 1 else "RERANKER_HUB_ENDPOINT"
    return (
        ("fix: " if offline else f"fix: a mirror ({mirror}), ")
        + "`reranker-server download` where there is internet (then copy the cache), a local "
        f"directory (RERANKER_STAGE{stage}_MODEL), or demo models (`reranker-server "
        "make-test-models`)"
    )


def unwritable_cache(directory: Path) -> ModelLoadError:
    """The cache directory can't be written by this process: name the uid and the fix."""
    uid = os.getuid()
    return ModelLoadError(
        f"model cache {directory} is not writable by uid {uid}; fix: give uid {uid} write access "
        f'(e.g. `chown -R {uid} <the cache>`; Docker: `docker run --user "$(id -u):$(id -g)"`),'
        " or set RERANKER_MODEL_CACHE_DIR to a writable directory"
    )


def _blocking_directory(path: Path) -> Path:
    """The nearest existing directory at or above `path` (the one that refused a write)."""
    for candidate in (path, *path.parents):
        if candidate.is_dir():
            return candidate
    return path


def _permission_error(exc: BaseException) -> PermissionError | None:
    """A PermissionError behind `exc` (itself, or in its cause/context chain), if any."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return None
        if isinstance(seen, PermissionError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _reason(exc: BaseException, url: str) -> str:
    """A few words for why a download failed (never the nested urllib3 text)."""
    import requests

    host = urlsplit(url).hostname or url
    if isinstance(exc, requests.Timeout):
        return f"{host} timed out"
    if isinstance(exc, requests.ConnectionError):
        return f"can't reach {host}"
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return f"HTTP {exc.response.status_code} from {host}"
    if isinstance(exc, zipfile.BadZipFile):
        return "not a zip archive"
    text = str(exc)
    return text if text and len(text) <= 80 and "\n" not in text else type(exc).__name__


@dataclass(frozen=True)
class FlashRankFiles:
    """A FlashRank model directory and the ONNX file in it."""

    directory: Path
    onnx_file: Path


def flashrank_model_files() -> dict[str, str]:
    """FlashRank's known pairwise models: name -> ONNX file name (from FlashRank itself)."""
    from flashrank.Config import listwise_rankers, model_file_map

    return {k: v for k, v in model_file_map.items() if k not in listwise_rankers}


def _find_onnx(directory: Path) -> Path | None:
    known = flashrank_model_files().get(directory.name)
    if known and (directory / known).is_file():
        return directory / known
    candidates = sorted(directory.glob("*.onnx"), key=lambda p: (not p.stem.endswith("_Q"), p.name))
    return candidates[0] if candidates else None


def _flashrank_files(directory: Path) -> FlashRankFiles:
    missing = [name for name in FLASHRANK_REQUIRED if not (directory / name).is_file()]
    onnx_file = _find_onnx(directory)
    if missing or onnx_file is None:
        what = ", ".join(missing + ([] if onnx_file else ["*.onnx"]))
        raise ModelLoadError(
            f"stage-1 model directory {directory} is incomplete (missing {what}); fix: point "
            "RERANKER_STAGE1_MODEL at a FlashRank model directory or delete it to download again"
        )
    return FlashRankFiles(directory=directory, onnx_file=onnx_file)


def resolve_stage1(
    name: str, cache_dir: Path, *, offline: bool, timeout_s: float, base_url: str = ""
) -> FlashRankFiles:
    """A local FlashRank directory, or a FlashRank model name fetched into the cache."""
    local = Path(name).expanduser()
    if local.is_dir():
        return _flashrank_files(local)
    known = flashrank_model_files()
    if name not in known:
        raise ModelLoadError(
            f"stage-1 model '{name}' is neither a directory nor a FlashRank model name; fix: use "
            f"one of {', '.join(sorted(known))} or a local directory in FlashRank's layout"
        )
    target = cache_dir / "flashrank" / name
    if (target / COMPLETE_MARKER).is_file():
        return _flashrank_files(target)
    if offline:
        raise ModelLoadError(
            f"stage-1 model '{name}' is not in the cache ({target}) and offline mode is on; "
            + download_fixes(1, offline=True)
        )
    _download_flashrank(f"{base_url.rstrip('/')}/{name}.zip", name, target, timeout_s)
    return _flashrank_files(target)


def _download_flashrank(url: str, name: str, target: Path, timeout_s: float) -> None:
    import requests
    from tqdm import tqdm

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        work = tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-")
    except PermissionError:
        raise unwritable_cache(_blocking_directory(target.parent)) from None
    logger.info("downloading stage-1 model %s into %s", name, target)
    with work as tmp:
        archive = Path(tmp) / f"{name}.zip"
        try:
            with requests.get(url, stream=True, timeout=timeout_s) as response:
                response.raise_for_status()
                total = int(response.headers.get("content-length", 0))
                with (
                    archive.open("wb") as out,
                    tqdm(
                        desc=name, total=total, unit="iB", unit_scale=True, unit_divisor=1024
                    ) as bar,
                ):
                    for chunk in response.iter_content(chunk_size=1 << 16):
                        bar.update(out.write(chunk))
            if total and archive.stat().st_size != total:
                raise OSError(f"got {archive.stat().st_size} of {total} bytes")
            with zipfile.ZipFile(archive) as zipped:
                if zipped.testzip() is not None:
                    raise OSError("corrupt archive")
                unpacked_size = sum(info.file_size for info in zipped.infolist())
                if unpacked_size > MAX_UNPACKED_BYTES:
                    raise OSError(f"archive unpacks to {unpacked_size} bytes (a zip bomb?)")
                zipped.extractall(tmp)
        except (OSError, requests.RequestException, zipfile.BadZipFile) as exc:
            if isinstance(exc, PermissionError):
                raise unwritable_cache(_blocking_directory(Path(tmp))) from None
            raise ModelLoadError(
                f"stage-1 model '{name}' could not be downloaded ({_reason(exc, url)}); "
                + download_fixes(1)
            ) from None
        unpacked = Path(tmp) / name
        _flashrank_files(unpacked)  # verify before it becomes visible
        (unpacked / COMPLETE_MARKER).write_text("ok\n", encoding="utf-8")
        try:
            unpacked.rename(target)
        except OSError:
            if not (target / COMPLETE_MARKER).is_file():
                shutil.rmtree(target, ignore_errors=True)  # a stale, incomplete copy
                unpacked.rename(target)
            # else: another replica on the same volume finished first; keep its copy


def resolve_stage2(
    name: str,
    cache_dir: Path,
    *,
    offline: bool,
    timeout_s: float,
    endpoint: str | None = None,
    trust_remote_code: bool = False,
) -> str:
    """A local cross-encoder directory, or a hub id fetched into the cache."""
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelLoadError(
                f"stage-2 model directory {local} has no config.json; fix: point "
                "RERANKER_STAGE2_MODEL at a cross-encoder saved by sentence-transformers"
            )
        return str(local)
    from huggingface_hub import snapshot_download

    hub_cache = cache_dir / "hub"
    try:
        path = snapshot_download(
            name,
            cache_dir=hub_cache,
            local_files_only=offline,
            # a repository's own Python code only when the settings trust it
            allow_patterns=HUB_PATTERNS + (["*.py"] if trust_remote_code else []),
            ignore_patterns=HUB_IGNORE,
            etag_timeout=timeout_s,
            endpoint=endpoint,
        )
    except Exception as exc:  # the hub client raises many types; all mean "not available"
        denied = _permission_error(exc)
        if denied is not None:
            where = Path(denied.filename) if denied.filename else hub_cache
            raise unwritable_cache(_blocking_directory(where)) from None
        if offline:
            raise ModelLoadError(
                f"stage-2 model '{name}' is not in the cache ({hub_cache}) and offline mode is "
                "on; " + download_fixes(2, offline=True)
            ) from None
        raise ModelLoadError(
            f"stage-2 model '{name}' could not be downloaded ({_hub_reason(exc, endpoint)}); "
            + download_fixes(2)
        ) from None
    return str(path)


def _hub_reason(exc: Exception, endpoint: str | None) -> str:
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    host = urlsplit(endpoint or DEFAULT_HUB).hostname
    if isinstance(exc, GatedRepoError):
        return f"gated on {host}: it needs a token"
    if isinstance(exc, RepositoryNotFoundError):
        return f"no such model on {host}; check the name"
    if isinstance(exc, LocalEntryNotFoundError):  # the hub could not be reached
        return f"can't reach {host}"
    return f"{type(exc).__name__} from {host}"


def stage1_files(settings: Settings, model: str | None = None) -> FlashRankFiles:
    """A FlashRank model (default: the stage-1 model the settings name), fetched if needed."""
    return resolve_stage1(
        model or settings.stage1_model,
        settings.model_cache_dir,
        offline=settings.offline,
        timeout_s=settings.download_timeout_s,
        base_url=settings.flashrank_base_url,
    )


def stage2_path(settings: Settings, model: str | None = None) -> str:
    """A cross-encoder directory (default: the stage-2 model the settings name), fetched if
    needed."""
    return resolve_stage2(
        model or settings.stage2_model,
        settings.model_cache_dir,
        offline=settings.offline,
        timeout_s=settings.download_timeout_s,
        endpoint=settings.hub_endpoint,
        trust_remote_code=settings.trust_remote_code,
    )
