"""Resolve, download and verify model files. No model is loaded here.

Layout of the cache directory (`model_cache_dir`):

    flashrank/<name>/          FlashRank's own layout, plus `.complete` once fully unpacked
    hub/models--org--name/     the Hugging Face hub cache (HF_HOME=<cache dir> uses the same)

Downloads go to a temporary directory inside the cache and are renamed into place, and a marker
file says "complete": a half-finished download is never mistaken for a model. Hub downloads take
what the runner kind needs (`hub_patterns`): tokenizer, config and template files (`*.jinja`: a
chat template changes the scores), then the weights (`*.safetensors`, else `pytorch_model*.bin`)
or the one ONNX file the CPU should run (`choose_onnx_file`), and are checked once they are in.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import platform
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Sequence
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
MAX_UNPACKED_BYTES = 4 * 2**30  # FlashRank's largest pairwise archive unpacks to well under 1 GB
# What every runner kind needs from a hub repository: configs, tokenizer files (vocab.txt,
# merges.txt, sentencepiece *.model, *.tiktoken) and templates (chat_template.jinja).
HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
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


ONNX_HUB_IGNORE = ["openvino/*", "*/openvino/*"]
# ONNX files a hub export may hold, by the CPU they are quantized for (sentence-transformers /
# optimum names), best first; then CPU-neutral int8 files (transformers.js names).
ONNX_BY_CPU_FLAG = (
    ("avx512_vnni", "model_qint8_avx512_vnni"),
    ("avx512bw", "model_qint8_avx512"),
    ("avx2", "model_quint8_avx2"),
)
ONNX_ARM64 = "model_qint8_arm64"
ONNX_GENERIC_INT8 = ("model_int8", "model_quantized", "model_uint8")
ONNX_FP32 = "model"


@dataclass(frozen=True)
class FlashRankFiles:
    """A FlashRank model directory and the ONNX file in it."""

    directory: Path
    onnx_file: Path


def flashrank_model_files() -> dict[str, str]:
    """FlashRank's known pairwise models: name -> ONNX file name (from FlashRank itself)."""
    from flashrank.Config import listwise_rankers, model_file_map

    return {k: v for k, v in model_file_map.items() if k not in listwise_rankers}


def listwise_flashrank_models() -> set[str]:
    """FlashRank's listwise (LLM) rerankers: names it knows that this server does not run."""
    from flashrank.Config import listwise_rankers

    return set(listwise_rankers)


@dataclass(frozen=True)
class CpuFeatures:
    """What decides which quantized ONNX file runs best: the architecture and the x86 flags."""

    arm64: bool
    flags: frozenset[str]


def cpu_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuFeatures:
    """This machine's CPU (no flags where /proc/cpuinfo can't be read)."""
    flags: set[str] = set()
    try:
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() in ("flags", "features"):
                flags.update(value.split())
                break
    except OSError:
        pass
    arm64 = platform.machine().lower() in ("aarch64", "arm64")
    return CpuFeatures(arm64=arm64, flags=frozenset(flags))


def onnx_preference(cpu: CpuFeatures) -> list[str]:
    """ONNX file stems in the order `auto` tries them on this CPU: int8 first, fp32 last."""
    stems = [ONNX_ARM64] if cpu.arm64 else [s for flag, s in ONNX_BY_CPU_FLAG if flag in cpu.flags]
    return [*stems, *ONNX_GENERIC_INT8, ONNX_FP32]


def onnx_files_in(names: Iterable[str]) -> list[str]:
    """The ONNX files among repository paths: at the top or in `onnx/`."""
    return sorted(
        n for n in names if n.endswith(".onnx") and (n.count("/") == 0 or n.startswith("onnx/"))
    )


def choose_onnx_file(
    names: Iterable[str], requested: str = "auto", cpu: CpuFeatures | None = None
) -> str | None:
    """Which ONNX file (a repository path) to run.

    `auto`: the int8 file quantized for this CPU, else a CPU-neutral int8 one, else `model.onnx`
    (in `onnx/` or at the top), else the only ONNX file there is. `fp32`: `model.onnx`. Anything
    else names a file, as a path in the repository or a name in `onnx/`. None: no such file.
    """
    files = onnx_files_in(names)
    if requested not in ("auto", "fp32"):
        wanted = requested if requested.endswith(".onnx") else f"{requested}.onnx"
        for path in (wanted, f"onnx/{wanted}"):
            if path in files:
                return path
        return None
    stems = onnx_preference(cpu or cpu_features()) if requested == "auto" else [ONNX_FP32]
    for stem in stems:
        for path in (f"onnx/{stem}.onnx", f"{stem}.onnx"):
            if path in files:
                return path
    return files[0] if requested == "auto" and len(files) == 1 else None


def _found(directory: Path, limit: int = 12) -> str:
    """The files in a directory (and its onnx/ folder), for error messages."""
    names = sorted(
        str(p.relative_to(directory))
        for p in [*directory.glob("*"), *directory.glob("onnx/*")]
        if p.is_file() and not p.name.startswith(".")
    )
    shown = ", ".join(names[:limit]) + (
        f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    )
    return shown or "nothing"


def _find_onnx(directory: Path) -> Path | None:
    known = flashrank_model_files().get(directory.name)
    if known and (directory / known).is_file():
        return directory / known
    candidates = sorted(directory.glob("*.onnx"), key=lambda p: (not p.stem.endswith("_Q"), p.name))
    if candidates:
        return candidates[0]
    # a hub export (onnx/model.onnx and quantized variants): the file this CPU runs best
    chosen = choose_onnx_file(str(p.relative_to(directory)) for p in directory.glob("onnx/*.onnx"))
    return directory / chosen if chosen else None


def _flashrank_files(directory: Path) -> FlashRankFiles:
    onnx_file = _find_onnx(directory)
    hub_layout = onnx_file is not None and onnx_file.parent.name == "onnx"
    # a hub export's tokenizer.json carries its special tokens; FlashRank's layout lists them
    required = ("config.json", "tokenizer.json") if hub_layout else FLASHRANK_REQUIRED
    missing = [name for name in required if not (directory / name).is_file()]
    if missing or onnx_file is None:
        what = ", ".join(missing + ([] if onnx_file else ["*.onnx or onnx/*.onnx"]))
        raise ModelLoadError(
            f"stage-1 model directory {directory} is incomplete (missing {what}; found: "
            f"{_found(directory)}); fix: point RERANKER_STAGE1_MODEL at a FlashRank model "
            "directory or delete it to download again"
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
    if name in listwise_flashrank_models():
        raise ModelLoadError(
            f"stage-1 model '{name}' is a FlashRank listwise model (an LLM that reorders a whole "
            f"list), not supported here; fix: use a pairwise model: {', '.join(sorted(known))}"
        )
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


def weight_files(names: Iterable[str]) -> list[str]:
    """The torch weights among repository paths: safetensors when there are any, else
    `pytorch_model*.bin` (older repositories ship only those)."""
    names = list(names)
    safetensors = [n for n in names if n.endswith(".safetensors") and "/" not in n]
    if safetensors:
        return sorted(safetensors)
    return sorted(n for n in names if fnmatch.fnmatch(n, "pytorch_model*.bin") and "/" not in n)


def torch_weight_patterns(
    names: Sequence[str], *, trust_remote_code: bool = False
) -> tuple[list[str], list[str]]:
    """(allow, ignore) patterns for a torch model (sentence-transformers layout) from a
    repository holding `names`: configs, tokenizer and templates, then its weights."""
    allow = list(HUB_PATTERNS)
    weights = weight_files(names)  # [] when the listing is unknown: allow either format
    if not weights or weights[0].endswith(".safetensors"):
        allow.append("*.safetensors")  # every shard, and modules in subfolders
    if not weights or weights[0].endswith(".bin"):
        allow.append("*pytorch_model*.bin")  # only when there are no safetensors
    if trust_remote_code:
        allow.append("*.py")  # a repository's own Python code only when the settings trust it
    return allow, list(HUB_IGNORE)


def onnx_patterns(
    names: Sequence[str], *, onnx_file: str = "auto", cpu: CpuFeatures | None = None
) -> tuple[list[str], list[str]]:
    """(allow, ignore) patterns for an ONNX export: configs, tokenizer and templates, then the
    one ONNX file this CPU runs (and its external weights, for models over 2 GB)."""
    allow = list(HUB_PATTERNS)
    chosen = choose_onnx_file(names, onnx_file, cpu)
    if chosen:
        allow += [chosen, f"{chosen}_data", f"{chosen}.data"]
    return allow, list(ONNX_HUB_IGNORE)


def listing_of(directory: Path) -> list[str]:
    """A directory's files and those in its onnx/ folder, as repository paths."""
    return [
        str(p.relative_to(directory)) for p in [*directory.glob("*"), *directory.glob("onnx/*")]
    ]


def check_torch_dir(directory: Path, what: str) -> None:
    """Raise ModelLoadError unless `directory` holds a torch model: config.json and weights.
    `what` names the model and kind in the message."""
    names = listing_of(directory)
    missing = [] if (directory / "config.json").is_file() else ["config.json"]
    if not weight_files(names):
        missing.append("*.safetensors or pytorch_model.bin")
    fix = "point the model at a cross-encoder saved by sentence-transformers"
    if not weight_files(names) and onnx_files_in(names):
        fix = (
            "it holds ONNX files only: leave the kind out (it is inferred) or set it to "
            '"onnx-cross-encoder" (RERANKER_STAGE2_KIND; a cascades file: stage2.kind)'
        )
    if missing:
        raise ModelLoadError(
            f"model directory {directory} has no {', '.join(missing)} for {what} "
            f"(found: {_found(directory)}); fix: {fix}"
        )


def check_onnx_dir(
    directory: Path, what: str, *, onnx_file: str = "auto", cpu: CpuFeatures | None = None
) -> None:
    """Raise ModelLoadError unless `directory` holds an ONNX export: tokenizer.json and the
    ONNX file `onnx_file` picks."""
    missing = [] if (directory / "tokenizer.json").is_file() else ["tokenizer.json"]
    if choose_onnx_file(listing_of(directory), onnx_file, cpu) is None:
        wanted = "model.onnx" if onnx_file in ("auto", "fp32") else onnx_file
        missing.append(f"{wanted} (onnx_file={onnx_file})")
    if missing:
        raise ModelLoadError(
            f"model directory {directory} has no {', '.join(missing)} for {what} "
            f"(found: {_found(directory)}); fix: point the model at a directory or hub "
            "repository with onnx/*.onnx (or model.onnx) and tokenizer.json, or set onnx_file "
            "(RERANKER_STAGE2_ONNX_FILE; a cascades file: stage2.onnx_file) to one of the files "
            "found"
        )


# A hub id: `name` or `org/name`, letters, digits, `-`, `_`, `.` (huggingface_hub's rule).
HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


def is_hub_id(name: str) -> bool:
    """Whether `name` is a well-formed hub id (the hub is not asked)."""
    return (
        bool(HUB_ID.match(name))
        and ".." not in name
        and "--" not in name
        and (not name.endswith((".", "-")))
    )


def check_model_name(name: str, what: str) -> Path | None:
    """A local directory `name` names (None: a hub id). Raise ModelLoadError when it is
    neither: a path that does not exist, or a malformed hub id."""
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise ModelLoadError(f"{what} {name!r} is a file, not a model directory")
    pathlike = name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or "\\" in name
    if pathlike or not is_hub_id(name):
        raise ModelLoadError(
            f"{what} {name!r} is neither a directory nor a hub id (org/name); fix: the path "
            "of a model directory, or a hub id such as cross-encoder/ms-marco-MiniLM-L-6-v2"
        )
    return None


def resolve_hub_model(
    name: str,
    store: ModelStore,
    *,
    what: str,
    patterns: Callable[[Sequence[str]], tuple[list[str], list[str]]],
    check: Callable[[Path], None],
) -> Path:
    """A local model directory, or a hub id fetched into the cache (`patterns` says which files
    from its listing), checked by `check` before it is used."""
    local = check_model_name(name, what)
    if local is not None:
        check(local)
        return local
    from huggingface_hub import snapshot_download

    hub_cache = store.cache_dir / "hub"
    endpoint, offline = store.hub_endpoint, store.offline
    try:
        names = hub_listing(name, hub_cache, offline=offline, endpoint=endpoint)
        allow, ignore = patterns(names)
        path = snapshot_download(
            name,
            cache_dir=hub_cache,
            local_files_only=offline,
            allow_patterns=allow,
            ignore_patterns=ignore,
            etag_timeout=store.timeout_s,
            endpoint=endpoint,
        )
    except Exception as exc:  # the hub client raises many types; all mean "not available"
        denied = _permission_error(exc)
        if denied is not None:
            where = Path(denied.filename) if denied.filename else hub_cache
            raise unwritable_cache(_blocking_directory(where)) from None
        if offline:
            raise ModelLoadError(
                f"{what} '{name}' is not in the cache ({hub_cache}) and offline mode is "
                "on; " + download_fixes(2, offline=True)
            ) from None
        raise ModelLoadError(
            f"{what} '{name}' could not be downloaded ({_hub_reason(exc, endpoint)}); "
            + download_fixes(2)
        ) from None
    check(Path(path))  # verify before it is used
    return Path(path)


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


def model_files(
    name: str, cache_dir: Path, *, offline: bool, endpoint: str | None = None
) -> list[str]:
    """The files a model holds (paths relative to it): a local directory's, or a hub repository's
    listing (runners/registry.py infers a runner kind from it when none is given)."""
    local = Path(name).expanduser()
    if local.is_dir():
        return sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    return hub_listing(name, cache_dir / "hub", offline=offline, endpoint=endpoint)


def hub_listing(name: str, hub_cache: Path, *, offline: bool, endpoint: str | None) -> list[str]:
    """The repository's files: from the hub, or offline from the listing cached at download
    (so offline the same files are expected as were downloaded); [] where neither is known."""
    if not offline:
        from huggingface_hub import HfApi

        return list(HfApi(endpoint=endpoint).list_repo_files(name))
    try:
        from huggingface_hub import get_cached_repo_tree
    except ImportError:  # older huggingface-hub: no listing cache, no completeness check either
        return []
    try:
        return [entry.path for entry in get_cached_repo_tree(name, cache_dir=hub_cache)]
    except Exception:  # not downloaded yet: snapshot_download says so below
        return []


@dataclass(frozen=True)
class ModelStore:
    """Where models come from and go: the process-wide download settings."""

    cache_dir: Path = Path("./hf_cache")
    offline: bool = False
    timeout_s: float = 60.0
    flashrank_base_url: str = ""
    hub_endpoint: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelStore:
        return cls(
            cache_dir=settings.model_cache_dir,
            offline=settings.offline,
            timeout_s=settings.download_timeout_s,
            flashrank_base_url=settings.flashrank_base_url,
            hub_endpoint=settings.hub_endpoint,
        )


def flashrank_files(name: str, store: ModelStore) -> FlashRankFiles:
    """A FlashRank model (a name or directory), fetched from FlashRank's host if needed."""
    return resolve_stage1(
        name,
        store.cache_dir,
        offline=store.offline,
        timeout_s=store.timeout_s,
        base_url=store.flashrank_base_url,
    )
