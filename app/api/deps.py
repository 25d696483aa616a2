"""Dependencies shared by the routers: the objects the lifespan put on app.state."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.errors import UnavailableError
from app.runtime import Runtime
from app.service import DetectionService


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


# The dependencies are async on purpose: FastAPI runs a plain `def` dependency on a worker
# thread, a thread hop per request (and a GIL hand-over each way) for a dictionary lookup.
async def runtime_dependency(request: Request) -> Runtime:
    return get_runtime(request)


async def get_service(request: Request) -> DetectionService:
    """The default model's service (the only one, with one model)."""
    return get_runtime(request).service_for(None)


async def get_inference_service(request: Request) -> DetectionService:
    """The service, for a route that runs the model: refused while draining (the requests
    accepted before the drain still finish; new ones go to another replica)."""
    if get_runtime(request).draining:
        raise UnavailableError(
            "the server is shutting down (draining); retry on another replica",
            headers={"Retry-After": "1"},
        )
    return await get_service(request)


async def get_intake(request: Request) -> Runtime:
    """For a route that runs the model a request names in its body: refused while draining;
    with one model, also while it loads (before the body is read). The route then asks
    `runtime.service_for(name)`."""
    runtime = get_runtime(request)
    if runtime.draining:
        raise UnavailableError(
            "the server is shutting down (draining); retry on another replica",
            headers={"Retry-After": "1"},
        )
    if runtime.router is None:
        runtime.service_for(None)
    return runtime


RuntimeDep = Annotated[Runtime, Depends(runtime_dependency)]
IntakeDep = Annotated[Runtime, Depends(get_intake)]
ServiceDep = Annotated[DetectionService, Depends(get_service)]
InferenceServiceDep = Annotated[DetectionService, Depends(get_inference_service)]
