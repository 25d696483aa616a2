"""GET /v1/models: what this server serves."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import ServiceDep
from app.schemas import BucketCard, ErrorResponse, ModelCard, ModelList

router = APIRouter(tags=["models"])


@router.get(
    "/v1/models",
    response_model=ModelList,
    summary="The served model: name, backend, device, dtype and labels",
    responses={503: {"model": ErrorResponse, "description": "The model is still loading."}},
)
async def list_models(service: ServiceDep) -> ModelList:
    info = service.info
    return ModelList(
        models=[
            ModelCard(
                name=info.name,
                backend=info.backend,
                device=info.device,
                dtype=info.dtype,
                backend_reason=info.backend_reason,
                architecture=info.architecture,
                labels=info.labels,
                max_batch_size=service.engine.max_batch_size,
                buckets=[
                    BucketCard(
                        device=b.device,
                        batch_size=b.batch_size,
                        cuda_graph=b.cuda_graph,
                        reason=b.reason,
                    )
                    for b in info.buckets
                ],
            )
        ]
    )
