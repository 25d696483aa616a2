"""Dependencies shared by the routers: the objects the lifespan put on app.state."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.errors import UnavailableError
from app.process.runtime import Runtime
from app.service import DetectionService


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


# The dependencies are async on purpose: FastAPI runs a plain `def` dependency on a worker
# thread, a thread hop per request (and a GIL hand-over each way) for a dictionary lookup.
async def runtime_dependency(request: Request) -> Runtime:
    return get_runtime(request)


def service_of(runtime: Runtime) -> DetectionService:
    """The runtime's (default model's) service, or the 503 that says why there is none yet."""
    return runtime.service_for(None)


def inference_service_of(runtime: Runtime) -> DetectionService:
    """The service, for a route that runs the model: refused while draining (the requests
    accepted before the drain still finish; new ones go to another replica). The door of
    every inference route, the pure-ASGI /v1/detect (app/api/v1/detect_asgi.py) included."""
    if runtime.draining:
        raise UnavailableError(
            "the server is shutting down (draining); retry on another replica",
            headers={"Retry-After": "1"},
        )
    return service_of(runtime)


async def get_service(request: Request) -> DetectionService:
    return service_of(get_runtime(request))


async def get_inference_service(request: Request) -> DetectionService:
    return inference_service_of(get_runtime(request))


def intake_of(runtime: Runtime) -> Runtime:
    """The door of a route that runs the model its body names: refused while draining; with
    one model, also while it loads (before the body is read), as `inference_service_of`. The
    route then asks `runtime.inference_service(name)`."""
    if runtime.router is None:
        inference_service_of(runtime)
    elif runtime.draining:
        raise UnavailableError(
            "the server is shutting down (draining); retry on another replica",
            headers={"Retry-After": "1"},
        )
    return runtime


async def get_intake(request: Request) -> Runtime:
    return intake_of(get_runtime(request))


RuntimeDep = Annotated[Runtime, Depends(runtime_dependency)]
IntakeDep = Annotated[Runtime, Depends(get_intake)]
ServiceDep = Annotated[DetectionService, Depends(get_service)]
InferenceServiceDep = Annotated[DetectionService, Depends(get_inference_service)]
