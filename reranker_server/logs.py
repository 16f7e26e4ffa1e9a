"""Logging: `configure_logging` (called by the entry points) and its formats, JSON lines or text.

A record may carry structured fields in `extra={"fields": {...}}` (the request log does); JSON puts
them at the top level of the line, text appends them as `key=value`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, the record's fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The usual text line, then `key=value` for each structured field."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        if not isinstance(fields, dict) or not fields:
            return text
        pairs = " ".join(
            f"{key}={json.dumps(value, default=str, ensure_ascii=False)}"
            if not isinstance(value, (int, float))
            else f"{key}={value}"
            for key, value in fields.items()
            if value is not None
        )
        return f"{text} {pairs}"


def configure_logging(level: str, log_format: str = "text") -> None:
    """Log lines on stderr, JSON or plain text, unless the host program already configured
    logging (then its handlers decide the format). JSON mode also keeps other lines out of the
    log: no progress bars, Python warnings as log records."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
        root.addHandler(handler)
    logging.getLogger("reranker_server").setLevel(level.upper())
    if log_format == "json":
        disable_progress_bars()
        logging.captureWarnings(True)


def disable_progress_bars() -> None:
    """No tqdm bars (transformers draws "Loading weights" bars when stage 2 loads): through the
    environment, read when huggingface_hub / transformers / tqdm are imported, and through their
    switches when they already are."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars as hub_disable

        hub_disable()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
