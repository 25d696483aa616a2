"""create_app(settings): the FastAPI application and its lifespan, wired from app/api/ (routers,
middleware, error handlers)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi_offline import FastAPIOffline

from app.api import health, page
from app.api.http.errors import install_error_handlers
from app.api.http.middleware import ApiKeyMiddleware, BodyLimitMiddleware, RequestContextMiddleware
from app.api.http.open_requests import OpenRequestsMiddleware
from app.api.kserve import repository
from app.api.kserve import routes as kserve
from app.api.v1 import detect, jobs, models, render
from app.api.v1.detect_asgi import DetectRoute
from app.api.v1.protocol import detect_request_model
from app.config import Settings
from app.process.malloc_tuning import freeze_startup_heap
from app.process.runtime import Runtime

if TYPE_CHECKING:
    from app.engine.pipeline import Engine


def create_app(
    settings: Settings,
    engine: Engine | None = None,
    *,
    engine_sockets: Sequence[str] | None = None,
    control_socket: str | None = None,
    grpc_workers: int = 0,
    on_load_failure: Callable[[], None] | None = None,
) -> FastAPI:
    """Build the app. `engine` lets tests inject an already loaded engine; `engine_sockets`
    makes it a front end of the engine process(es) listening there (app/process/supervisor.py);
    `on_load_failure` (one process): see Runtime. With `grpc_workers` (how many processes
    serve the gRPC port, this one among them) and a --grpc-port, the lifespan also runs the
    KServe v2 gRPC server (app/api/kserve/grpc/)."""
    runtime = Runtime(
        settings,
        engine,
        engine_sockets=engine_sockets,
        control_socket=control_socket,
        on_load_failure=on_load_failure,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime.start()
        await runtime.settle()
        job_runner = None
        if settings.jobs and not engine_sockets:  # one process: the jobs run here
            from app.jobs.local import start_local_runner

            job_runner = await start_local_runner(settings, runtime)
        grpc_server = None
        if grpc_workers and settings.grpc_port:
            from app.api.kserve.grpc.server import start_grpc_server

            grpc_server = await start_grpc_server(
                settings, runtime, app.version, workers=grpc_workers
            )
        freeze_startup_heap()
        yield
        if job_runner is not None:
            await job_runner()
        if grpc_server is not None:
            # Calls in progress finish (up to the drain timeout); new ones are refused.
            await grpc_server.stop(settings.drain_timeout_s)
        await runtime.stop()

    # FastAPIOffline: /docs and /redoc load Swagger UI and ReDoc from the installed package
    # (served under /docs/static), not from a CDN, so the docs work offline.
    app = FastAPIOffline(
        title="detr-serve",
        version="0.1.0",
        summary="Deformable-attention object detection (RT-DETR family) over HTTP.",
        lifespan=lifespan,
        static_url="/docs/static",
    )
    app.state.runtime = runtime
    if settings.jobs:
        from app.jobs.store import JobStore

        app.state.job_store = JobStore(settings.jobs_path)
    app.include_router(detect.router)
    app.include_router(render.router)
    app.include_router(page.router)
    app.mount(page.STATIC_PREFIX.rstrip("/"), page.static_files(), name="ui")
    app.include_router(models.router)
    app.include_router(health.router)
    app.include_router(kserve.router)
    app.include_router(jobs.router)
    app.include_router(repository.router)
    install_error_handlers(app)
    # Added last runs first: request context, then open requests (counted for the drain,
    # cancelled when their client goes), then CORS, then auth, then the body limit; then
    # POST /v1/detect is answered as plain ASGI (app/api/v1/detect_asgi.py), the rest routed.
    app.add_middleware(DetectRoute, runtime=runtime)
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_upload_bytes,
        paths={"/v1/jobs": settings.max_job_bytes + jobs.MULTIPART_SLACK} if settings.jobs else {},
    )
    if settings.api_key is not None:
        app.add_middleware(
            ApiKeyMiddleware,
            api_key=settings.api_key.get_secret_value(),
            protect_metrics=settings.protect_metrics,
            exempt_paths=page.PATHS,
            exempt_prefixes=(page.STATIC_PREFIX,),
        )
    if settings.cors_origin_list:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    app.add_middleware(OpenRequestsMiddleware, runtime=runtime)
    app.add_middleware(RequestContextMiddleware, metrics=runtime.metrics)
    app.openapi = lambda: _openapi(app, settings.max_images_per_request)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI, max_images: int) -> dict[str, Any]:
    """The generated document, plus DetectRequest, which the detect route reads by hand
    (it accepts JSON and multipart on one path)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, summary=app.summary, routes=app.routes
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    request_schema = detect_request_model(max_images).model_json_schema(
        ref_template="#/components/schemas/{model}"
    )
    components.update(request_schema.pop("$defs", {}))
    components["DetectRequest"] = request_schema
    render_schema = render.openapi_components()
    components.update(render_schema.pop("$defs", {}))
    components["RenderRequest"] = render_schema
    app.openapi_schema = schema
    return schema


def create_frontend_app(
    settings: Settings,
    engine_sockets: Sequence[str],
    workers: int = 1,
    control_socket: str | None = None,
) -> FastAPI:
    """The app of one front-end worker process (uvicorn calls this factory in each of the
    `workers`). With several models, `control_socket` is the supervisor's (app/models/manager.py)
    and the engines' sockets come from there."""
    from app.logging_setup import configure_logging
    from app.process.malloc_tuning import return_large_frees
    from app.process.supervisor import die_with_parent

    die_with_parent()
    return_large_frees()
    configure_logging(settings.log_level, settings.json_logs)
    return create_app(
        settings,
        engine_sockets=engine_sockets,
        control_socket=control_socket,
        grpc_workers=workers,
    )
