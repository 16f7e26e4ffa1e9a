"""Writing a directory of files all at once (`make-test-models`, `quantize`): into a temporary
directory beside the target, readable by all, then renamed into place by the caller, so a
failure half-way leaves no half-written target."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged(target: Path, error: type[Exception]) -> Iterator[Path]:
    """A new directory beside `target` to write into, removed on exit unless it was renamed.
    `error`: raised, in one line naming the fix, when nothing can be written there."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    except OSError as exc:
        raise error(
            f"can't write under {target.parent} ({exc.strerror}); fix: name a directory you "
            "can write to"
        ) from None
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def make_readable(root: Path) -> None:
    """Directories 0755 and files 0644 (some writers, safetensors among them, create 0600)."""
    root.chmod(0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
