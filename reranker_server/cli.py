"""reranker-server: self-hosted reranking (FlashRank on the CPU, a cross-encoder on the GPU).

Every setting is an environment variable RERANKER_<NAME> and a flag of the same name
(RERANKER_STAGE1_MODEL = --stage1-model); flags win over the environment.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from .errors import ModelLoadError
from .logs import configure_logging
from .settings import Settings, SettingsError, load_settings

logger = logging.getLogger(__name__)

SECRET_SETTINGS = frozenset({"api_key"})  # no flag: it would show in `ps`
# What `download` reads; its help lists only these, and other settings never stop it.
DOWNLOAD_SETTINGS = (
    "stage1_model",
    "stage2_model",
    "stage1_kind",
    "stage2_kind",
    "stage2_onnx_file",
    "trust_remote_code",
    "cascades",
    "model_cache_dir",
    "offline",
    "flashrank_base_url",
    "hub_endpoint",
    "download_timeout_s",
    "log_level",
    "log_format",
)
# make-test-models builds the models with torch (the [torch] extra); onnx is in the base install.
GENERATOR_MODULES = ("torch", "transformers", "sentence_transformers", "onnx")
DEMO_DIR = Path("demo-models")


def _default_text(name: str) -> str:
    named = {
        "flashrank_base_url": "FlashRank's Hugging Face bucket",
        "hub_endpoint": "huggingface.co",
    }
    default = Settings.model_fields[name].default
    if name in named:
        return named[name]
    if default is None:
        return "unset"
    if isinstance(default, bool):
        return "on" if default else "off"
    return str(default)


def _add_setting_flags(parser: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    for name in names:
        field = Settings.model_fields[name]
        flag = "--" + name.replace("_", "-")
        help_text = (
            f"{field.description or ''} Default: {_default_text(name)}. "
            f"[env RERANKER_{name.upper()}]"
        ).replace("%", "%%")
        if field.annotation is bool:
            parser.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            parser.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=help_text)


def flags_given(args: argparse.Namespace) -> dict[str, Any]:
    """The setting flags that were given on the command line."""
    return {
        name: getattr(args, name)
        for name in Settings.model_fields
        if getattr(args, name, None) is not None
    }


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the environment, overridden by the flags that were given."""
    return Settings(**flags_given(args))


def _add_check_command(commands: Any, settings: tuple[str, ...]) -> None:
    check = commands.add_parser(
        "check",
        help="validate the settings and the cascades file, print the plan, load nothing",
        description="Validate the settings and every cascade (kinds, local model files, hub ids, "
        "devices, extras) without loading or downloading a model, and print what runs where, "
        "one line per cascade. Exit 0, or 2 with the error on one line.",
        allow_abbrev=False,
    )
    _add_setting_flags(check, settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reranker-server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="start the HTTP server (port 5200)",
        description="Load both models, then serve POST /rerank and the other routes.",
        allow_abbrev=False,
    )
    server_settings = tuple(n for n in Settings.model_fields if n not in SECRET_SETTINGS)
    _add_setting_flags(serve, server_settings)

    _add_check_command(commands, server_settings)
    download = commands.add_parser(
        "download",
        help="fetch the models (every cascade's) into the model cache, then exit",
        description="Fetch the models of every cascade into the model cache (for a later "
        "offline start) and print where they went.",
        allow_abbrev=False,
    )
    _add_setting_flags(download, DOWNLOAD_SETTINGS)

    make = commands.add_parser(
        "make-test-models",
        help="write small random-weight models for trying the API offline",
        description="Write a FlashRank model and a cross-encoder with random weights (no "
        "download): they answer like the real ones but rank at random. For trying the API "
        "and for tests, not for ranking.",
        allow_abbrev=False,
    )
    make.add_argument(
        "directory",
        type=Path,
        nargs="?",
        default=DEMO_DIR,
        help=f"where to write them (a new or empty directory). Default: {DEMO_DIR}",
    )
    make.add_argument(
        "--full-size",
        action="store_true",
        help="the real models' layer counts and widths (for benchmarks), random weights",
    )
    make.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="directory with a BERT tokenizer.json and vocab.txt to use instead of the small "
        "generated vocabulary",
    )
    make.add_argument("--seed", type=int, default=0, help="random seed. Default: 0")
    make.add_argument(
        "--onnx",
        action="store_true",
        help="also export the stage-2 model to ONNX (hub layout: onnx/model.onnx and int8 "
        "variants) for the onnx-cross-encoder runner",
    )
    make.add_argument(
        "--matrix",
        action="store_true",
        help="also write the coverage matrix (one tiny model per supported architecture, "
        "FlashRank layouts, ONNX exports) under DIR/matrix",
    )
    quantize = commands.add_parser(
        "quantize",
        help="turn a cross-encoder into an int8 ONNX model for CPU stage 2 (no torch to serve it)",
        description="Export a sentence-transformers cross-encoder to ONNX (eager attention) and "
        "quantize it to int8 with ONNX Runtime (dynamic quantization), named for this CPU "
        "(onnx/model_qint8_avx512_vnni.onnx, ...), with its tokenizer files: OUT serves as an "
        "onnx-cross-encoder stage on the CPU. Prints its parity against the fp32 model. Needs "
        "the torch extra; serving OUT does not.",
        allow_abbrev=False,
    )
    quantize.add_argument("model", help="a local directory or hub id of a CrossEncoder")
    quantize.add_argument("out", type=Path, help="where to write it (a new or empty directory)")
    quantize.add_argument(
        "--parity-queries",
        type=int,
        default=10,
        help="generated queries (50 passages each) the parity check scores. Default: 10",
    )
    quantize.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let the model's repository run its own Python code while loading",
    )
    evaluate = commands.add_parser(
        "eval",
        help="measure quality and cost per candidates depth on labelled data",
        allow_abbrev=False,
    )
    from .evaluation.command import add_arguments

    add_arguments(evaluate)
    # the in-process server's settings
    _add_setting_flags(
        evaluate, tuple(n for n in Settings.model_fields if n not in SECRET_SETTINGS)
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "make-test-models":
        configure_logging("info", "text")
        return _make_test_models(args)
    if args.command == "quantize":
        configure_logging("warning", "text")
        return _quantize(args)
    serving = args.command in ("serve", "eval", "check")  # eval can serve in-process
    unused = () if serving else set(Settings.model_fields) - set(DOWNLOAD_SETTINGS)
    try:
        settings, notes = load_settings(flags_given(args), unused=unused)
    except SettingsError as exc:
        for line in exc.lines:
            print(f"reranker-server: invalid setting {line}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"reranker-server: {note}", file=sys.stderr)
    configure_logging(settings.log_level, settings.log_format)
    if args.command == "download":
        return _download(settings)
    if args.command == "eval":
        return _eval(args, settings)
    if args.command == "check":
        return _check(settings)
    return _serve(settings)


def _serve(settings: Settings) -> int:
    """Run uvicorn; SIGTERM / SIGINT drain it (server.py: readiness 503 at once, requests in
    progress get `drain_timeout_s`, the rest a JSON 503), then exit 0."""
    import uvicorn

    from .app import create_app
    from .server import SHUTDOWN_GRACE_S, serve, uvicorn_options

    # uvicorn re-raises the signal that stopped it once it has shut down; with these no-op
    # handlers in place that ends the process with status 0 instead of "killed by SIGTERM".
    try:  # before any model loads: a port in use stops here, in one line
        sock = bind_port(settings.host, settings.port)
    except OSError as exc:
        print(
            f"reranker-server: port {settings.port} on {settings.host} is in use or can't be "
            f"bound ({exc.strerror or exc}); fix: stop what holds it, or choose another port "
            "with --port or RERANKER_PORT",
            file=sys.stderr,
        )
        return 2
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, lambda *_: None)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # uvicorn's lines go through our handler (JSON or text)
        access_log=False,  # the app logs each request itself (api/telemetry.py)
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,  # after the drain: answers being written
        **uvicorn_options(settings),  # connection limits (server.py)
    )
    return serve(config, app.service, settings.drain_timeout_s, sockets=[sock])


def bind_port(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), not yet listening (uvicorn listens once the models are
    loaded, so connections are refused, not queued, meanwhile). Raises OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _download(settings: Settings) -> int:
    """Fetch every cascade's models (`RERANKER_CASCADES`, else the stage settings') into the
    cache, each by its kind, whether or not this host runs it."""
    from .cascade_file import read_cascades
    from .model_store import ModelStore
    from .preflight import plan_stage

    store = ModelStore.from_settings(settings)
    try:
        for cascade in read_cascades(settings):
            prefix = f"cascade {cascade.name} " if settings.cascades is not None else ""
            for number, _spec in cascade.stages():
                stage = plan_stage(cascade, number, store, lambda _policy: True)  # as if here
                where = stage.kind.fetch(stage.spec, store)
                shown = where if where is not None else f"(kind {stage.kind.name}: no files)"
                print(f"{prefix}stage {stage.stage}: {stage.spec.model} -> {shown}")
    except ModelLoadError as exc:
        print(f"reranker-server: {exc}", file=sys.stderr)
        return 1
    return 0


def _check(settings: Settings) -> int:
    """Validate the settings and every cascade without loading a model (nothing is downloaded
    and the hub is not asked); print the plan, one line per cascade. 0, or 2 and the error."""
    from dataclasses import replace

    from .cascade_file import read_cascades
    from .devices import detect_accelerator
    from .model_store import ModelStore
    from .preflight import describe, plan_cascades

    gpus: dict[str, bool] = {}

    def has_gpu(policy: str) -> bool:
        device = settings.device if policy in ("auto", "cpu") else policy
        if device not in gpus:
            try:
                gpus[device] = detect_accelerator(device, settings.gpu_memory_limit_mb) is not None
            except ModelLoadError:  # a GPU named without torch: not on this host
                gpus[device] = False
        return gpus[device]

    store = replace(ModelStore.from_settings(settings), offline=True)  # cached listings only
    try:
        plans = plan_cascades(read_cascades(settings), store, has_gpu)
    except ModelLoadError as exc:
        print(f"reranker-server: {exc}", file=sys.stderr)
        return 2
    for line in describe(plans):
        print(line)
    print(f"reranker-server check: settings and {len(plans)} cascade(s) OK")
    return 0


def _eval(args: argparse.Namespace, settings: Settings) -> int:
    from .evaluation.command import run

    if args.log_level is None:  # the in-process server's request lines would drown the progress
        logging.getLogger("reranker_server").setLevel(logging.WARNING)
    return run(args, settings)


def _make_test_models(args: argparse.Namespace) -> int:
    if _missing_generator_modules("make-test-models"):
        return 1
    from .model_generator import GeneratorError, write_matrix, write_test_models

    try:
        paths = write_test_models(
            args.directory,
            full_size=args.full_size,
            tokenizer_dir=args.tokenizer,
            seed=args.seed,
            onnx=args.onnx,
        )
        written = write_matrix(args.directory / "matrix", seed=args.seed) if args.matrix else None
    except GeneratorError as exc:
        print(f"reranker-server: {exc}", file=sys.stderr)
        return 1
    print(
        f"wrote random-weight models (for trying the API, not for ranking) under {args.directory}"
    )
    if paths.onnx is not None:
        print(f"  ONNX export of the stage-2 model (kind onnx-cross-encoder): {paths.onnx}")
    if written is not None:
        print(f"  coverage matrix ({len(written)} models) under {args.directory / 'matrix'}")
    print("start the server on them with:")
    print(
        f"  RERANKER_STAGE1_MODEL={paths.stage1} RERANKER_STAGE2_MODEL={paths.stage2} "
        "reranker-server serve"
    )
    return 0


def _missing_generator_modules(command: str) -> bool:
    """Print one line naming the fix when the torch extra (or onnx) is missing."""
    missing = [name for name in GENERATOR_MODULES if find_spec(name) is None]
    if not missing:
        return False
    # torch on its own first: sentence-transformers would otherwise pull a CUDA build
    fixes = ["pip install onnx"] if "onnx" in missing else []
    if any(name != "onnx" for name in missing):
        fixes.insert(0, "pip install torch==2.13.0 && pip install 'reranker-server[torch]'")
    print(
        f"reranker-server: {command} needs {', '.join(missing)} (not installed); "
        f"fix: {' && '.join(fixes)}",
        file=sys.stderr,
    )
    return True


def _quantize(args: argparse.Namespace) -> int:
    if _missing_generator_modules("quantize"):
        return 1
    if args.parity_queries < 1:
        print("reranker-server: --parity-queries must be at least 1", file=sys.stderr)
        return 2
    from transformers.utils import logging as transformers_logging

    from .quantize import QuantizeError, quantize

    transformers_logging.disable_progress_bar()  # "Loading weights" for a local file
    try:
        result = quantize(
            args.model,
            args.out,
            parity_queries=args.parity_queries,
            trust_remote_code=args.trust_remote_code,
        )
    except QuantizeError as exc:
        print(f"reranker-server: {exc}", file=sys.stderr)
        return 1
    first = result.parity[0]
    print(f"wrote {result.directory} (int8 file for this CPU: {result.int8_file})")
    print(
        f"parity against the fp32 model, {first.queries} generated queries x {first.documents} "
        "passages:"
    )
    for parity in result.parity:
        print(
            f"  {parity.file}: same top-10 order {parity.same_top10_order}/{parity.queries}, "
            f"top-10 in common {parity.top10_overlap:.0%}, max score difference "
            f"{parity.max_abs_diff:.1e}"
        )
    gap = first.smallest_top10_gap
    print(f"  (smallest gap between neighbouring top-11 fp32 scores: {gap:.1e})")
    print("serve it as stage 2 on the CPU (kind onnx-cross-encoder, no torch needed):")
    print(f"  RERANKER_STAGE2_MODEL={result.directory} reranker-server serve")
    return 0


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True
