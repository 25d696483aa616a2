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


def get_inference_service(request: Request) -> DetectionService:
    """The service, for a route that runs the model: refused while draining (the requests
    accepted before the drain still finish; new ones go to another replica)."""
    if get_runtime(request).draining:
        raise UnavailableError(
            "the server is shutting down (draining); retry on another replica",
            headers={"Retry-After": "1"},
        )
    return get_service(request)


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
ServiceDep = Annotated[DetectionService, Depends(get_service)]
InferenceServiceDep = Annotated[DetectionService, Depends(get_inference_service)]
