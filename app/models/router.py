"""A front end's side of several models: it follows the supervisor's model table (the control
socket, app/models/manager.py), keeps one engine client per model (a RemoteEngine of the
model's live engines) and one DetectionService per model, and finds the model a request names.

A model's service submits through a `ModelClient` that reads the model's current engines at
submit time: a request still downloading or decoding while its model is swapped goes to the new
engines; the old engines' client lets go (after the answers it still owes) and the old engines
then drain and exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from app.config import Settings
from app.engine.tasks import DetectionTask, ImageDetections, ModelInfo
from app.errors import ApiError, ModelLoadFailedError, UnavailableError, UnknownModelError
from app.ipc.client import EngineUnavailableError, RemoteEngine, Reservation
from app.ipc.wire import read_message, write_message
from app.models.manager import ModelView
from app.service import DetectionService

logger = logging.getLogger(__name__)

_RECONNECT_S = 0.05


class ModelControlError(ApiError):
    """A load/unload/index call the supervisor refused; carries its status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status
        self.error_type = {404: "not_found", 403: "forbidden"}.get(status, "model_control")


class ModelClient:
    """The engine client of one model, whichever engines serve it now."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.target: RemoteEngine | None = None

    @property
    def max_batch_size(self) -> int:
        return self.target.max_batch_size if self.target is not None else 1

    def reserve(self, height: int, width: int) -> Reservation | None:
        target = self.target
        return target.reserve(height, width) if target is not None else None

    async def submit(
        self, tasks: Sequence[DetectionTask], deadline: float
    ) -> list[ImageDetections]:
        target = self.target
        if target is None:
            raise EngineUnavailableError(f"the model {self.name!r} is not loaded any more")
        return await target.submit(tasks, deadline)


@dataclass
class _Model:
    name: str
    view: ModelView
    client: ModelClient
    service: DetectionService | None = None
    generation: int = 0  # of the engines `client` uses
    pending: RemoteEngine | None = None  # the next engines, until they say hello
    pending_generation: int = 0
    retiring: set[asyncio.Task[None]] = field(default_factory=set)


class ModelRouter:
    def __init__(
        self,
        settings: Settings,
        control_path: str,
        make_service: Callable[[Settings, ModelInfo, ModelClient, bool], DetectionService],
        on_draining: Callable[[], None],
        report_if_idle: Callable[[], None],
    ) -> None:
        """`on_draining`: the server is stopping (SIGTERM); `report_if_idle`: an engine drains,
        and waits for the front ends that have no request open to say so."""
        self.settings = settings
        self.control_path = control_path
        self._make_service = make_service
        self._on_draining = on_draining
        self._report_if_idle = report_if_idle
        self.models: dict[str, _Model] = {}
        self.draining = False
        self._watcher: asyncio.Task[None] | None = None
        self._seen_table = False

    # -- following the supervisor -------------------------------------------------------------
    def start(self) -> None:
        self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="models")

    async def _watch(self) -> None:
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(self.control_path)
            except OSError:
                await asyncio.sleep(_RECONNECT_S)
                continue
            try:
                write_message(writer, ("watch",))
                while True:
                    message = await read_message(reader)
                    if message[0] == "models":
                        self._apply(message[1])
                    elif message[0] == "draining":
                        self.draining = True
                        self._on_draining()
            except (asyncio.IncompleteReadError, ConnectionError, OSError, ValueError):
                pass
            finally:
                writer.close()
            await asyncio.sleep(_RECONNECT_S)

    def _apply(self, views: dict[str, ModelView]) -> None:
        self._seen_table = True
        for name, view in views.items():
            model = self.models.get(name)
            if model is None:
                model = self.models[name] = _Model(name, view, ModelClient(name))
            model.view = view
            if view.sockets and view.generation not in (model.generation, model.pending_generation):
                self._connect(model, view)
            elif not view.sockets and model.client.target is not None:
                # Unloaded: new requests are refused; those it holds still get their answers.
                old, model.client.target, model.generation = model.client.target, None, 0
                self._retire(model, old)
        for name in set(self.models) - set(views):
            model = self.models.pop(name)
            if model.client.target is not None:
                self._retire(model, model.client.target)

    def _connect(self, model: _Model, view: ModelView) -> None:
        if model.pending is not None:
            self._retire(model, model.pending)
        settings = view.settings or self.settings
        remote = RemoteEngine(
            view.sockets,
            settings.shm_arena_mb << 20,
            on_connect=lambda info, mbs, jpeg: self._connected(model, remote, view, info, jpeg),
            on_draining=self._engine_draining,
        )
        model.pending, model.pending_generation = remote, view.generation
        remote.start()

    def _connected(
        self, model: _Model, remote: RemoteEngine, view: ModelView, info: ModelInfo, jpeg: bool
    ) -> None:
        if model.pending is not remote:
            return  # a reconnection of the engines in use (an engine restarted)
        old = model.client.target
        settings = view.settings or self.settings
        model.service = self._make_service(settings, info, model.client, jpeg)
        model.client.target, model.generation = remote, view.generation
        model.pending, model.pending_generation = None, 0
        logger.info("model %s: engines generation %d in use", model.name, view.generation)
        if old is not None:
            self._retire(model, old)

    def _retire(self, model: _Model, remote: RemoteEngine) -> None:
        task = asyncio.get_running_loop().create_task(remote.stop(self.settings.drain_timeout_s))
        model.retiring.add(task)
        task.add_done_callback(model.retiring.discard)

    def _engine_draining(self) -> None:
        # An engine drains when its model is swapped or unloaded, and at SIGTERM; only the
        # supervisor's "draining" means the server is stopping (and the idle report is due).
        self._report_if_idle()

    def report_idle(self) -> None:
        for model in self.models.values():
            for remote in (model.client.target, model.pending):
                if remote is not None:
                    remote.report_idle()

    async def stop(self, timeout_s: float) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watcher
        remotes = [
            r for m in self.models.values() for r in (m.client.target, m.pending) if r is not None
        ]
        await asyncio.gather(*(r.stop(timeout_s) for r in remotes), return_exceptions=True)
        for model in self.models.values():
            if model.retiring:
                await asyncio.wait(model.retiring, timeout=timeout_s)

    # -- what the routes ask ------------------------------------------------------------------
    @property
    def default_name(self) -> str | None:
        if self.settings.default_model is not None:
            return self.settings.default_model
        names = sorted(self.models)
        return names[0] if names else None

    def state(self, name: str) -> tuple[str, str]:
        """(state, reason) of a model as this front end sees it: the supervisor's, "loading"
        until this front end is connected to its engines, and the engines' own trouble
        (stuck, restarting) while it lasts."""
        model = self.models[name]
        state, reason = model.view.state, model.view.reason
        if state == "ready":
            target = model.client.target
            if target is None or model.generation != model.view.generation:
                return "loading", ""
            engine_state = target.state
            if engine_state not in ("ready", "draining"):
                return ("restarting" if engine_state == "loading" else engine_state), ""
        return state, reason

    @property
    def ready(self) -> bool:
        """Every model loaded at start-up is ready (what /readyz reports); one unloaded since
        through the control API no longer counts."""
        return self._seen_table and not self.not_ready()

    def not_ready(self) -> dict[str, str]:
        """The start-up models that are not ready, with their state (and reason)."""
        found = {}
        for model in self.models.values():
            if model.view.startup:
                state, reason = self.state(model.name)
                if state not in ("ready", "unloaded"):
                    found[model.name] = f"{state}: {reason}" if reason else state
        return found

    def known(self) -> str:
        return ", ".join(sorted(self.models)) or "none"

    def service(self, name: str | None) -> DetectionService:
        """The service of the model a request names (None: the default model)."""
        if name is None:
            name = self.default_name
            if name is None:
                raise UnavailableError("no model is served yet", headers={"Retry-After": "2"})
        model = self.models.get(name)
        if model is None:
            raise UnknownModelError(f"unknown model {name!r}; the models are: {self.known()}")
        state, reason = self.state(name)
        if state == "unloaded":
            raise UnknownModelError(
                f"model {name!r} is not loaded (unloaded); load it with POST "
                f"/v2/repository/models/{name}/load, or use one of: {self.loaded()}"
            )
        if state == "failed":
            raise ModelLoadFailedError(f"model {name!r} failed to load: {reason}")
        if model.service is None or model.client.target is None:
            raise UnavailableError(
                f"model {name!r} is still loading; poll /v1/models/{name}",
                headers={"Retry-After": "2"},
            )
        return model.service

    async def wait_connected(self, name: str | None, timeout_s: float = 5.0) -> None:
        """Wait (bounded) while the supervisor says `name` is ready and this front end is not
        connected to its engines yet."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            model = self.models.get(name or self.default_name or "")
            if model is None or model.view.state != "ready":
                return
            if model.generation == model.view.generation and model.service is not None:
                return
            await asyncio.sleep(0.01)

    def loaded(self) -> str:
        return ", ".join(sorted(n for n in self.models if self.models[n].client.target)) or "none"

    # -- the control calls --------------------------------------------------------------------
    async def control(self, *message: Any) -> Any:
        """One call to the supervisor's ModelManager; its refusal raised as ModelControlError."""
        try:
            reader, writer = await asyncio.open_unix_connection(self.control_path)
        except OSError as exc:
            raise UnavailableError(f"the model control channel is not reachable: {exc}") from None
        try:
            write_message(writer, message)
            await writer.drain()
            answer = await read_message(reader)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise UnavailableError(f"the model control channel closed: {exc}") from None
        finally:
            writer.close()
        if answer[0] == "error":
            raise ModelControlError(answer[1], answer[2])
        return answer[1]

    async def settled(self, view: ModelView, timeout_s: float = 30.0) -> None:
        """After a load: wait (bounded) until this front end routes to the loaded engines, so
        that a request right after the load's answer finds them here."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            model = self.models.get(view.name)
            if model is not None and model.generation >= view.generation > 0:
                return
            await asyncio.sleep(0.01)
