"""Typed FastAPI dependencies: the one thing a route may take from the app, the service."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ..service import RerankService


def _service(request: Request) -> RerankService:
    return request.app.state.service


ServiceDep = Annotated[RerankService, Depends(_service)]
