"""/v1/jobs: gigapixel images as background jobs (issue 15). Thin: the front end validates the
request, streams an upload to the job folder, writes the job row and answers 202; the job
runner (app/jobs/) runs it. Poll GET /v1/jobs/{id}; fetch large answers as JSON lines."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from app.api.http.deps import InferenceServiceDep, runtime_dependency
from app.config import Settings
from app.errors import (
    ApiError,
    InvalidRequestError,
    PayloadTooLargeError,
    QueueFullApiError,
    ValidationFailedError,
    describe_error,
)
from app.jobs.reader import NOT_AN_IMAGE, sniff
from app.jobs.store import FINISHED, Job, JobStore, new_job_id
from app.options import TilingOptions, tiling_value
from app.process.runtime import Runtime
from app.service import DetectionService

logger = logging.getLogger(__name__)
router = APIRouter(tags=["jobs"])

_MAX_JSON_BYTES = 1 << 20
MULTIPART_SLACK = 64 << 10  # headers and boundaries around the file part


class JobNotFoundError(ApiError):
    status_code = 404
    error_type = "job_not_found"


class JobStateError(ApiError):
    status_code = 409
    error_type = "job_state"


class StoreFullError(ApiError):
    status_code = 507
    error_type = "job_store_full"


class UnsupportedImageError(ApiError):
    status_code = 415
    error_type = "unsupported_image"


class JobImage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(description="http(s) URL of the image (SSRF rules as for /v1/detect).")


class JobOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    max_detections: int | None = Field(
        default=None, ge=1, description="Detections kept, best first (default job_max_detections)."
    )
    classes: list[str | int] | None = Field(default=None, max_length=1000)
    tiling: TilingOptions | None = Field(
        default=None, description="Tile options as for /v1/detect (the server's by default)."
    )
    level: int = Field(default=0, ge=0, description="Pyramid level of a TIFF (0: full size).")
    model: str | None = Field(default=None, description="The model to run (default: served).")

    @field_validator("tiling", mode="before")
    @classmethod
    def _tiling(cls, value: Any) -> TilingOptions | None:
        try:
            return tiling_value(True if value is None else value) or TilingOptions()
        except ValueError as exc:
            raise PydanticCustomError("tiling", "{reason}", {"reason": str(exc)}) from None

    @property
    def tiling_options(self) -> TilingOptions:
        """Jobs always run tiled: the server's tile options unless the request gives some."""
        return self.tiling or TilingOptions()


class JobRequest(JobOptions):
    image: JobImage


def _store(request: Request) -> JobStore:
    store: JobStore | None = getattr(request.app.state, "job_store", None)
    if store is None:
        raise JobNotFoundError("jobs are off on this server (DETR_SERVE_JOBS=false)")
    return store


StoreDep = Annotated[JobStore, Depends(_store)]
RuntimeDep = Annotated[Runtime, Depends(runtime_dependency)]


def _validated(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ValidationFailedError(describe_error(exc.errors()[0])) from None


def _resolved(options: JobOptions, service: DetectionService, settings: Settings) -> dict[str, Any]:
    """The job's options over the server's defaults, as the runner reads them."""
    if options.model is not None and options.model != service.info.name:
        raise JobNotFoundError(f"model {options.model!r} is not served here")
    spec, _ = service.tile_spec(options)  # type: ignore[arg-type]
    assert spec is not None
    if spec.full_image:
        raise InvalidRequestError(
            "tiling.full_image is not available for jobs: the whole image is never decoded"
        )
    class_ids = service.resolve_classes(options.classes)
    max_det = options.max_detections or settings.job_max_detections
    return {
        "threshold": settings.default_threshold if options.threshold is None else options.threshold,
        "max_detections": max_det,
        "tile_max_detections": min(max_det, settings.default_max_detections),
        "class_ids": sorted(class_ids) if class_ids is not None else None,
        "tiling": {
            "tile_size": spec.tile_size,
            "overlap": spec.overlap,
            "merge": spec.merge,
            "match_metric": spec.match_metric,
            "match_threshold": spec.match_threshold,
            "class_agnostic": spec.class_agnostic,
        },
        "level": options.level,
        "model": options.model,
    }


def _links(job_id: str) -> dict[str, str]:
    return {"self": f"/v1/jobs/{job_id}", "results": f"/v1/jobs/{job_id}/results"}


def job_view(job: Job, store: JobStore | None, inline_limit: int = 0) -> dict[str, Any]:
    now = time.time()
    elapsed = None
    if job.started is not None:
        elapsed = round((job.finished or now) - job.started, 3)
    remaining = None
    if job.status == "running" and job.tiles_total and job.tiles_done and elapsed:
        remaining = round(elapsed * (job.tiles_total - job.tiles_done) / job.tiles_done, 1)
    view: dict[str, Any] = {
        "id": job.id,
        "status": job.status,
        "created": job.created,
        "started": job.started,
        "finished": job.finished,
        "progress": {
            "tiles_done": job.tiles_done,
            "tiles_total": job.tiles_total,
            "elapsed_s": elapsed,
            "remaining_s": remaining,
        },
        "image": None if job.width is None else {"width": job.width, "height": job.height},
        "model": job.model,
        "links": _links(job.id),
    }
    if job.error is not None:
        view["error"] = job.error
    if job.status == "succeeded":
        view["detections"] = job.detections
        if store is not None and job.detections is not None and job.detections <= inline_limit:
            view["result"] = store.result(job.id)
    return view


async def _save_upload(
    request: Request, store: JobStore, job_id: str, limit: int
) -> tuple[dict[str, Any], int]:
    """The multipart form: the `file` part copied to the job's file (Starlette spools it to a
    temporary file first: never held in memory), the other parts as options."""
    try:
        form = await request.form(max_files=1, max_fields=16)
    except Exception as exc:  # malformed multipart: Starlette's MultiPartException and kin
        raise InvalidRequestError(f"the multipart body cannot be parsed: {exc}") from None
    try:
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise InvalidRequestError("give the image as a multipart part named 'file'")
        fields: dict[str, Any] = {}
        for name, value in form.multi_items():
            if name == "file":
                continue
            if not isinstance(value, str):
                raise InvalidRequestError(f"field {name!r}: only 'file' may be a file")
            fields[name] = value
        options: dict[str, Any] = {}
        for name, value in fields.items():
            if name == "classes":
                options[name] = [c.strip() for c in value.split(",") if c.strip()]
            elif name in ("threshold",):
                options[name] = _number(name, value, float)
            elif name in ("max_detections", "level"):
                options[name] = _number(name, value, int)
            else:
                options[name] = value
        path = store.upload_path(job_id)
        size = await asyncio.to_thread(_copy_capped, upload.file, path, limit)
        return options, size
    finally:
        await form.close()


def _number(name: str, value: str, kind: type) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise ValidationFailedError(f"{name}: {value!r} is not a number") from None


def _copy_capped(source: Any, path: Path, limit: int) -> int:
    source.seek(0)
    head = source.read(16)
    if sniff(head) is None:
        raise UnsupportedImageError(f"the file is {NOT_AN_IMAGE}")
    source.seek(0)
    with path.open("wb") as out:
        shutil.copyfileobj(source, out, 1 << 20)
        size = out.tell()
    if size > limit:
        path.unlink(missing_ok=True)
        raise PayloadTooLargeError(f"the file has {size} bytes, over max_job_bytes ({limit})")
    return size


async def _check_url(runtime: Runtime, url: str) -> None:
    """Refuse at once what the SSRF rules refuse (scheme, host, a non-public address); the
    runner checks again at download time (redirects, DNS changes)."""
    from app.fetch import Fetcher
    from app.jobs.url import job_fetch_policy

    checker = Fetcher(job_fetch_policy(runtime.settings))
    try:
        await checker.check(url, what="the image URL")
    except ApiError as exc:  # about the job's one image: no image index
        exc.message, exc.image_index = exc.message.removeprefix("image 0: "), None
        raise


@router.post(
    "/v1/jobs",
    status_code=202,
    responses={
        400: {"description": "Bad options or URL"},
        413: {"description": "File over max_job_bytes"},
        415: {"description": "Not a TIFF, JPEG, PNG or WebP file"},
        422: {"description": "Invalid field"},
        429: {"description": "max_queued_jobs jobs wait already"},
        507: {"description": "The job store is over job_store_max_bytes"},
    },
)
async def submit_job(
    request: Request, service: InferenceServiceDep, store: StoreDep, runtime: RuntimeDep
) -> JSONResponse:
    """Submit a job: JSON `{"image": {"url": ...}, "tiling": {...}, "threshold", "classes",
    "max_detections", "level"}` or multipart with a `file` part (options as fields, `tiling`
    as JSON text). Answers 202 with the job's id and links, and a Location header."""
    settings = runtime.settings
    if await asyncio.to_thread(store.size_bytes) > settings.job_store_max_bytes:
        await asyncio.to_thread(store.prune, settings.job_retention_s, settings.job_store_max_bytes)
        if await asyncio.to_thread(store.size_bytes) > settings.job_store_max_bytes:
            raise StoreFullError(
                f"the job store is over job_store_max_bytes ({settings.job_store_max_bytes}); "
                "delete finished jobs or wait for their retention to end"
            )
    job_id = new_job_id()
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        raw, size = await _save_upload(request, store, job_id, settings.max_job_bytes)
        try:
            options = _validated(JobOptions, raw)
            resolved = _resolved(options, service, settings)
        except BaseException:
            store.upload_path(job_id).unlink(missing_ok=True)
            raise
        source = "upload"
    elif content_type == "application/json":
        body = await request.body()
        if len(body) > _MAX_JSON_BYTES:
            raise PayloadTooLargeError(f"a JSON job request is at most {_MAX_JSON_BYTES} bytes")
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise InvalidRequestError(f"the body is not valid JSON: {exc}") from None
        job_request = _validated(JobRequest, data)
        resolved = _resolved(job_request, service, settings)
        await _check_url(runtime, job_request.image.url)
        source, size = job_request.image.url, 0
    else:
        raise UnsupportedImageError(
            "send application/json with an image URL, or multipart/form-data with a 'file' part"
        )
    job = await asyncio.to_thread(
        store.create, job_id, resolved, source, size, settings.max_queued_jobs
    )
    if job is None:
        store.upload_path(job_id).unlink(missing_ok=True)
        raise QueueFullApiError(
            f"{settings.max_queued_jobs} jobs wait already (max_queued_jobs); retry later",
            headers={"Retry-After": "30"},
        )
    logger.info("job %s queued (%s, %d bytes)", job_id, "upload" if size else "url", size)
    return JSONResponse(
        {"id": job.id, "status": job.status, "links": _links(job.id)},
        status_code=202,
        headers={"Location": f"/v1/jobs/{job.id}"},
    )


@router.get("/v1/jobs", responses={404: {"description": "Jobs are off"}})
async def list_jobs(
    store: StoreDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    status: Annotated[
        str | None, Query(pattern="^(queued|running|succeeded|failed|cancelled)$")
    ] = None,
) -> JSONResponse:
    """Recent jobs, newest first (no detections: poll each job for those)."""
    jobs = await asyncio.to_thread(store.recent, limit, status)
    return JSONResponse({"jobs": [job_view(j, None) for j in jobs]})


async def _job(store: JobStore, job_id: str) -> Job:
    job = await asyncio.to_thread(store.get, job_id)
    if job is None:
        raise JobNotFoundError(f"no job {job_id!r} (unknown, or deleted after its retention)")
    return job


@router.get("/v1/jobs/{job_id}", responses={404: {"description": "No such job"}})
async def get_job(job_id: str, store: StoreDep, runtime: RuntimeDep) -> JSONResponse:
    """Status, progress, and once succeeded the detections (in /v1/detect's shape for one
    image, under `result`) when there are at most job_inline_detections of them."""
    job = await _job(store, job_id)
    limit = runtime.settings.job_inline_detections
    view = await asyncio.to_thread(job_view, job, store, limit)
    return JSONResponse(view)


@router.get(
    "/v1/jobs/{job_id}/results",
    responses={404: {"description": "No such job"}, 409: {"description": "Not succeeded"}},
)
async def job_results(job_id: str, store: StoreDep) -> Response:
    """The detections as JSON lines: first {"width", "height", "detections": N}, then one
    detection per line, best first."""
    job = await _job(store, job_id)
    if job.status != "succeeded":
        raise JobStateError(f"job {job_id} is {job.status}; results exist once it has succeeded")
    result = await asyncio.to_thread(store.result, job_id)
    assert result is not None

    def lines() -> Any:
        head = {"width": result["width"], "height": result["height"]}
        yield orjson.dumps({**head, "detections": len(result["detections"])}) + b"\n"
        for det in result["detections"]:
            yield orjson.dumps(det) + b"\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.delete(
    "/v1/jobs/{job_id}",
    responses={404: {"description": "No such job"}, 409: {"description": "Already finished"}},
)
async def cancel_job(job_id: str, store: StoreDep) -> JSONResponse:
    """Cancel a queued or running job (a running one stops after its tiles in flight)."""
    job = await _job(store, job_id)
    if job.status in FINISHED:
        raise JobStateError(f"job {job_id} has already ended ({job.status})")
    cancelled = await asyncio.to_thread(store.cancel, job_id)
    assert cancelled is not None
    if cancelled.status != "cancelled":
        raise JobStateError(f"job {job_id} has already ended ({cancelled.status})")
    return JSONResponse(job_view(cancelled, None))
