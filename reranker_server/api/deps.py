"""Typed FastAPI dependencies: what a route may take from the app state."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ..engine.cascade import Engine
from ..engine.pool import InferencePool
from ..errors import NotReadyError
from ..settings import Settings


def _engine(request: Request) -> Engine:
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        raise NotReadyError("models are not loaded yet; retry shortly")
    return engine


def _pool(request: Request) -> InferencePool:
    return request.app.state.pool


def _settings(request: Request) -> Settings:
    return request.app.state.settings


EngineDep = Annotated[Engine, Depends(_engine)]
PoolDep = Annotated[InferencePool, Depends(_pool)]
SettingsDep = Annotated[Settings, Depends(_settings)]
