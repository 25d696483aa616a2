"""Dependencies shared by the routers: the objects the lifespan put on app.state."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.errors import UnavailableError
from app.runtime import Runtime
from app.service import DetectionService


# async on purpose: FastAPI runs a plain `def` dependency on a worker thread, a thread hop per
# request (and a GIL hand-over each way) for a dictionary lookup.
async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def get_service(request: Request) -> DetectionService:
    runtime: Runtime = request.app.state.runtime
    if runtime.service is None:
        raise UnavailableError(
            "the model is still loading; poll /readyz", headers={"Retry-After": "2"}
        )
    return runtime.service


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
ServiceDep = Annotated[DetectionService, Depends(get_service)]
