"""GET /v1/models and /v1/models/{name}: the models this server serves, with their state."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.http.deps import RuntimeDep
from app.api.v1.protocol import BucketCard, ErrorResponse, ModelCard, ModelList
from app.errors import UnknownModelError
from app.process.runtime import Runtime
from app.service import DetectionService

router = APIRouter(tags=["models"])


@router.get(
    "/v1/models",
    response_model=ModelList,
    summary="The served models: name, state, backend, device, dtype and labels",
    responses={503: {"model": ErrorResponse, "description": "The model is still loading."}},
)
async def list_models(runtime: RuntimeDep) -> ModelList:
    if runtime.router is None:  # one model: 503 until it is loaded
        return ModelList(models=[_card(runtime.service_for(None), default=True)])
    return ModelList(models=[_model_card(runtime, name) for name in sorted(runtime.router.models)])


@router.get(
    "/v1/models/{name}",
    response_model=ModelCard,
    summary="One model: its state (loading, ready, failed with the reason, unloaded)",
    responses={
        404: {"model": ErrorResponse, "description": "Unknown model: the message names the known."},
        503: {"model": ErrorResponse, "description": "The model is still loading."},
    },
)
async def get_model(name: str, runtime: RuntimeDep) -> ModelCard:
    if runtime.router is None:
        return _card(runtime.service_for(name), default=True)
    if name not in runtime.router.models:
        raise UnknownModelError(f"unknown model {name!r}; the models are: {runtime.router.known()}")
    return _model_card(runtime, name)


def _model_card(runtime: Runtime, name: str) -> ModelCard:
    router = runtime.router
    assert router is not None
    state, reason = router.state(name)
    model = router.models[name]
    default = name == router.default_name
    if state == "ready" and model.service is not None:
        return _card(model.service, default=default)
    return ModelCard(name=name, state=state, reason=reason, default=default)  # type: ignore[arg-type]


def _card(service: DetectionService, *, default: bool) -> ModelCard:
    info = service.info
    return ModelCard(
        name=info.name,
        default=default,
        backend=info.backend,
        device=info.device,
        dtype=info.dtype,
        backend_reason=info.backend_reason,
        architecture=info.architecture,
        labels=info.labels,
        max_batch_size=service.engine.max_batch_size,
        buckets=[
            BucketCard(
                device=b.device, batch_size=b.batch_size, cuda_graph=b.cuda_graph, reason=b.reason
            )
            for b in info.buckets
        ],
    )
