"""The one message for a framework that is not installed."""

from __future__ import annotations


def missing_extra(package: str, extra: str) -> ImportError:
    """An ImportError that says which extra to install."""
    return ImportError(
        f"{package} is not installed; install it with: pip install 'reranker-server[{extra}]'"
    )
