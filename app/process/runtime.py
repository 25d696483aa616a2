"""The resources the app's lifespan owns: the engine client, fetcher, service and state.

Two shapes, one interface for app/service.py (an engine client: `submit(tasks, deadline)`):
  - a front-end worker (the default; `engine_sockets` given): a RemoteEngine that talks to the
    engine process(es) the supervisor (app/process/supervisor.py) runs;
  - one process (`--no-engine-process`, and the in-process API tests, which may inject an
    engine): the EngineHost's batcher, with the model loaded in the background so that
    /healthz answers at once and /readyz says 503 until the model is loaded and warmed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from app.config import Settings
from app.engine.pool import EnginePool
from app.engine.tasks import ModelInfo
from app.errors import ModelLoadFailedError, UnavailableError, UnknownModelError
from app.fetch import Fetcher, FetchPolicy
from app.ipc.client import RemoteEngine
from app.metrics import Metrics
from app.process.engine_host import EngineHost, describe_load_failure
from app.service import DetectionService, EngineClient

if TYPE_CHECKING:
    from app.engine.pipeline import Engine
    from app.models.router import ModelRouter

logger = logging.getLogger(__name__)

State = Literal["loading", "ready", "stuck", "draining", "failed", "restarting"]


class Runtime:
    def __init__(
        self,
        settings: Settings,
        engine: Engine | None = None,
        *,
        engine_sockets: Sequence[str] | None = None,
        control_socket: str | None = None,
        on_load_failure: Callable[[], None] | None = None,
    ) -> None:
        """`on_load_failure`: called (one process) when the model cannot be loaded and
        settings.exit_on_load_failure holds; the CLI stops the server with it.
        `control_socket`: several models (app/models/router.py), followed through the
        supervisor's control socket there."""
        self.settings = settings
        self._on_load_failure = on_load_failure
        self.metrics = Metrics()
        self._state: State = "loading"
        self.engine = engine  # the first device's engine (tests may inject one, loaded)
        self.service: DetectionService | None = None
        self.load_error: BaseException | None = None
        self._failure: str | None = None  # the load failure, as /readyz and the 503s say it
        self.host: EngineHost | None = None
        self.remote: RemoteEngine | None = None
        self.router: ModelRouter | None = None
        if control_socket:
            from app.models.router import ModelRouter

            self.router = ModelRouter(
                settings,
                control_socket,
                self._make_model_service,
                self._drain_started,
                self._report_if_idle,
            )
        elif engine_sockets:
            self.remote = RemoteEngine(
                engine_sockets,
                settings.shm_arena_mb << 20,
                on_connect=self._on_connect,
                on_draining=self._drain_started,
            )
        else:
            self.host = EngineHost(settings, self.metrics, engine)
        self._fetcher: Fetcher | None = None
        self._loader: asyncio.Task[None] | None = None
        self._starting: asyncio.Task[None] | None = None
        self.open_requests = 0  # inference requests accepted and not answered yet

    # -- the drain: accepted requests are counted, the engines wait for them ------------------
    def request_started(self) -> None:
        self.open_requests += 1
        self.metrics.open_requests.inc()

    def request_finished(self) -> None:
        self.open_requests -= 1
        self.metrics.open_requests.dec()
        self._report_if_idle()

    @property
    def draining(self) -> bool:
        """SIGTERM reached the engines (or, in one process, the lifespan is ending)."""
        if self.remote is not None and self.remote.state == "draining":
            return True
        if self.router is not None and self.router.draining:
            return True
        return self._state == "draining"

    def _drain_started(self) -> None:
        logger.info("front end draining: /readyz 503, new requests 503")
        self._report_if_idle()

    def _report_if_idle(self) -> None:
        if self.remote is not None and self.open_requests == 0 and self.draining:
            self.remote.report_idle()
        if self.router is not None and self.open_requests == 0 and self.draining:
            self.router.report_idle()

    @property
    def pool(self) -> EnginePool[Any, Any] | None:
        return self.host.pool if self.host is not None else None

    @property
    def failure(self) -> str | None:
        """Why the model could not be loaded (the model folder and the cause), or None."""
        if self.remote is not None:
            return self.remote.failure
        return self._failure

    @property
    def state(self) -> State:
        """loading -> ready -> draining; "stuck" while a forward pass outlives the watchdog;
        "restarting" while the engine process is being replaced; "failed" when the model
        could not be loaded."""
        if self.router is not None:
            if self.router.draining:
                return "draining"
            return "ready" if self.router.ready else "loading"
        if self.failure is not None and self._state in ("loading", "failed"):
            return "failed"
        if self._state != "ready":
            return self._state
        if self.remote is not None:
            remote_state = self.remote.state
            if remote_state == "loading":  # connected once: it is a restart
                return "restarting"
            return remote_state  # type: ignore[return-value]
        if self.host is not None and self.host.stuck():
            return "stuck"
        return self._state

    def start(self) -> None:
        self._fetcher = Fetcher(
            FetchPolicy(
                allow_private=self.settings.allow_private_urls,
                allowed_hosts=self.settings.allowed_url_host_set,
                max_bytes=self.settings.max_upload_bytes,
                timeout_s=self.settings.url_timeout_s,
                max_redirects=self.settings.max_redirects,
                max_concurrent=self.settings.max_concurrent_downloads,
                max_buffered_bytes=self.settings.max_download_buffer_bytes,
            )
        )
        if self.router is not None:
            self.router.start()  # each model's service appears when its engines say hello
            return
        if self.remote is not None:
            self.remote.start()  # the service appears when the engine says hello
            return
        self._loader = asyncio.get_running_loop().create_task(self._load(), name="model-loader")

    async def settle(self, timeout_s: float = 10.0) -> None:
        """A front end started while its engine is up (a replaced worker) connects before it
        takes requests: uvicorn accepts on it once the lifespan has started. At first start the
        engine is still loading (no socket yet): no wait, /healthz must answer meanwhile."""
        if self.remote is None or not self.remote.engine_listening():
            return
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self._state == "loading" and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.005)

    async def wait_ready(self) -> None:
        if self._loader is not None:
            await self._loader
        while self.remote is not None and self._state == "loading":
            await asyncio.sleep(0.02)

    def _on_connect(self, info: ModelInfo, max_batch_size: int, jpeg_on_device: bool) -> None:
        assert self.remote is not None and self._fetcher is not None
        if self.service is None:
            service = self._make_service(info, self.remote, jpeg_on_device)
            self.service = service

            async def ready_once_decoders_start() -> None:
                # The decode workers' start-up is not the first request's.
                await asyncio.to_thread(service.wait_started)
                if self._state == "loading":
                    self._state = "ready"
                logger.info("front end ready: %s on %s", info.name, info.device)

            self._starting = asyncio.get_running_loop().create_task(ready_once_decoders_start())
        elif self._state == "loading":
            self._state = "ready"

    def service_for(self, name: str | None) -> DetectionService:
        """The service of the model a request names (None: the default one); ApiErrors for an
        unknown model (404), one loading or failed (503)."""
        if self.router is not None:
            return self.router.service(name)
        failure = self.failure
        if failure is not None:
            raise ModelLoadFailedError(failure)
        if self.service is None:
            raise UnavailableError(
                "the model is still loading; poll /readyz", headers={"Retry-After": "2"}
            )
        served = self.service.info.name
        if name is not None and name != served:
            raise UnknownModelError(f"unknown model {name!r}; this server serves {served!r}")
        return self.service

    async def inference_service(self, name: str | None) -> DetectionService:
        """service_for, for a request that runs the model: a model the supervisor reports
        ready that this front end is still connecting to (a load answered by another front
        end a moment ago) is waited for, briefly, instead of answered 503."""
        if self.router is not None:
            await self.router.wait_connected(name)
        return self.service_for(name)

    def _make_model_service(
        self, settings: Settings, info: ModelInfo, client: EngineClient, jpeg_on_device: bool
    ) -> DetectionService:
        """One model's service (several models): the first one made owns the decode workers,
        the pixel budgets and the fetcher; the others share them."""
        assert self._fetcher is not None
        if self.service is None:
            self.service = DetectionService(
                settings, info, client, self._fetcher, self.metrics, jpeg_on_device=jpeg_on_device
            )
            return self.service
        return self.service.for_model(settings, info, client, jpeg_on_device=jpeg_on_device)

    def _make_service(
        self, info: ModelInfo, client: EngineClient, jpeg_on_device: bool
    ) -> DetectionService:
        assert self._fetcher is not None
        return DetectionService(
            self.settings, info, client, self._fetcher, self.metrics, jpeg_on_device=jpeg_on_device
        )

    async def _load(self) -> None:
        host = self.host
        assert host is not None
        try:
            await host.load()
        except Exception as exc:
            self._state = "failed"
            self.load_error = exc
            self._failure = describe_load_failure(self.settings.model, exc)
            logger.critical("%s", self._failure, exc_info=exc)
            if self.settings.exit_on_load_failure and self._on_load_failure is not None:
                self._on_load_failure()
            return
        if self.engine is None and host.engines and hasattr(host.engines[0], "backend"):
            self.engine = host.engines[0]  # type: ignore[assignment]
        batcher, pool = host.batcher, host.pool
        assert batcher is not None and pool is not None
        self.metrics.observe_queue(lambda: batcher.queue_depth, lambda: batcher.in_flight)
        self.metrics.observe_device_memory(pool.memory_usage)
        self.service = self._make_service(host.info, host, host.jpeg_on_device)
        # Ready once the decode workers are up: their start-up is not the first request's.
        await asyncio.to_thread(self.service.wait_started)
        self._state = "ready"

    async def stop(self) -> None:
        """Stop intake (503), finish queued and running work, release resources."""
        if self._state == "ready":
            self._state = "draining"
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
        if self.host is not None:
            await self.host.stop()
        if self.remote is not None:
            await self.remote.stop(self.settings.drain_timeout_s)
        if self.router is not None:
            await self.router.stop(self.settings.drain_timeout_s)
        if self._fetcher is not None:
            await self._fetcher.aclose()
        if self.service is not None:
            self.service.close()
        logger.info("stopped")
