"""Command line: `reranker-server serve | download | make-test-models`.

Every setting is also a flag of the same name (`RERANKER_STAGE1_MODEL` = `--stage1-model`); flags
win over the environment. Logging is set up at the entry point (logs.configure_logging).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .errors import ModelLoadError
from .logs import configure_logging
from .settings import Settings

logger = logging.getLogger(__name__)

SECRET_SETTINGS = frozenset({"api_key"})


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        if name in SECRET_SETTINGS:
            continue  # visible in `ps`: use the environment or --api-key-file
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description or ''} [env RERANKER_{name.upper()}]"
        if field.annotation is bool:
            parser.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            parser.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=help_text)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the environment, overridden by the flags that were given."""
    overrides: dict[str, Any] = {
        name: getattr(args, name)
        for name in Settings.model_fields
        if getattr(args, name, None) is not None
    }
    return Settings(**overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reranker-server", description=__doc__, allow_abbrev=False
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="start the HTTP server", allow_abbrev=False)
    _add_setting_flags(serve)

    download = commands.add_parser(
        "download", help="fetch both models into the cache", allow_abbrev=False
    )
    _add_setting_flags(download)

    make = commands.add_parser(
        "make-test-models", help="write tiny random models for offline tests", allow_abbrev=False
    )
    make.add_argument("directory", type=Path)
    make.add_argument(
        "--full-size",
        action="store_true",
        help="real layer counts and widths (for benchmarks), random weights",
    )
    make.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="directory with a BERT tokenizer.json/vocab.txt to use instead of the "
        "generated small vocabulary",
    )
    make.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "make-test-models":
        configure_logging("info")
        return _make_test_models(args)
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"])
            print(f"reranker-server: invalid setting {where}: {error['msg']}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    if args.command == "download":
        return _download(settings)
    return _serve(settings)


def _serve(settings: Settings) -> int:
    """Run uvicorn; SIGTERM / SIGINT drain it (server.py: readiness 503 at once, requests in
    progress get `drain_timeout_s`, the rest a JSON 503), then exit 0."""
    import uvicorn

    from .app import create_app
    from .server import SHUTDOWN_GRACE_S, serve

    # uvicorn re-raises the signal that stopped it once it has shut down; with these no-op
    # handlers in place that ends the process with status 0 instead of "killed by SIGTERM".
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
    )
    return serve(config, app.service, settings.drain_timeout_s)


def _download(settings: Settings) -> int:
    from .model_store import stage1_files, stage2_path

    try:
        files = stage1_files(settings)
        print(f"stage 1: {settings.stage1_model} -> {files.directory}")
        path = stage2_path(settings)
        print(f"stage 2: {settings.stage2_model} -> {path}")
    except ModelLoadError as exc:
        print(f"reranker-server: {exc}", file=sys.stderr)
        return 1
    return 0


def _make_test_models(args: argparse.Namespace) -> int:
    from .model_generator import write_test_models

    paths = write_test_models(
        args.directory, full_size=args.full_size, tokenizer_dir=args.tokenizer, seed=args.seed
    )
    print(f"wrote test models under {args.directory}; point the server at them with:")
    print(f"  export RERANKER_STAGE1_MODEL={paths.stage1}")
    print(f"  export RERANKER_STAGE2_MODEL={paths.stage2}")
    return 0
