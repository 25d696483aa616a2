"""Dependencies shared by the routers: the objects the lifespan put on app.state."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.errors import ModelLoadFailedError, UnavailableError
from app.runtime import Runtime
from app.service import DetectionService


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def get_service(request: Request) -> DetectionService:
    runtime = get_runtime(request)
    failure = runtime.failure
    if failure is not None:
        raise ModelLoadFailedError(failure)
    if runtime.service is None:
        raise UnavailableError(
            "the model is still loading; poll /readyz", headers={"Retry-After": "2"}
        )
    return runtime.service


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
ServiceDep = Annotated[DetectionService, Depends(get_service)]
