"""The supervisor's side of several models: one set of engine processes (one per device) per
model, loaded, swapped and unloaded at run time, and the control socket through which the front
ends follow the models and ask for loads and unloads (Triton's repository extension).

    supervisor
      ModelManager: per model a Slot (state, reason) and its live Generation of engines
      ControlServer: <workdir>/control.sock
        front end -> ("watch",)            answered ("models", {name: ModelView}) now and on
                                           every change, ("draining",) at SIGTERM
                     ("index",)            ("ok", [ModelView, ...])
                     ("load", name)        ("ok", ModelView) once loaded, or ("error", status, msg)
                     ("unload", name)      ("ok", ModelView) or ("error", status, msg)

A load of a model that is being served swaps it without dropping a request: the new engines
load beside the old ones; once they answer ready, the front ends are told of the new sockets
(they route new requests there as soon as they are connected) and the old engines drain: each
answers what it holds and exits once every front end has let go of it. A load that fails
leaves the old engines serving (as Triton does) and answers the reason.

Engines of several models share the CPU: unless --torch-threads is set, each model's engine
gets the usable CPUs divided by the number of models found at start-up (at least one thread).
On CUDA each engine checks the device's free memory before it loads (app/engine/memory_budget.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.config import DEFAULT_MODEL_NAME, REPO_MODELS_DIR, Settings
from app.ipc.wire import call_blocking, read_message, write_message
from app.models.repository import model_name, model_settings, name_problem, scan
from app.process.cpus import available_cpus

if TYPE_CHECKING:
    from app.metrics import Metrics
    from app.process.supervisor import EngineProcess

logger = logging.getLogger(__name__)

_PROBE_PERIOD_S = 0.1
_LOAD_TIMEOUT_S = 900.0  # a first ONNX export on a slow machine takes minutes


@dataclass(frozen=True)
class ModelView:
    """What the front ends know of one model."""

    name: str
    path: str
    state: str  # loading | ready | failed | unloaded
    reason: str
    startup: bool  # loaded at start-up: /readyz waits for it
    generation: int  # of the engines serving it (0: none)
    sockets: tuple[str, ...]  # where those engines listen (empty unless ready)
    settings: Settings | None  # the model's own (serve.json applied)


class ControlError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class _Generation:
    number: int
    settings: Settings
    engines: list[EngineProcess]

    @property
    def sockets(self) -> tuple[str, ...]:
        return tuple(e.socket_path for e in self.engines)


@dataclass
class _Slot:
    name: str
    path: Path
    startup: bool
    state: str = "unloaded"
    reason: str = ""
    live: _Generation | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class ModelManager:
    def __init__(self, settings: Settings, workdir: Path, metrics: Metrics) -> None:
        self.settings = settings
        self.workdir = workdir
        self.metrics = metrics
        self._slots: dict[str, _Slot] = {}
        self._lock = threading.Lock()
        self._generations = 0
        self._closing = False
        self.on_change: Callable[[], None] = lambda: None
        found = self.available()
        self._threads = settings.torch_threads or max(1, available_cpus() // max(1, len(found)))
        for name, path in found.items():
            self._slots[name] = _Slot(name, path, startup=True, state="loading")

    # -- what there is ------------------------------------------------------------------------
    def explicit(self) -> dict[str, Path]:
        """The models named by --model (repeated), by name. Beside a repository, one --model
        joins it unless it is the embedded default (which the container image always sets)."""
        s = self.settings
        paths = s.model_list
        embedded = s.model == REPO_MODELS_DIR / DEFAULT_MODEL_NAME
        if not paths and (s.model_repository is None or not embedded):
            paths = [s.model]
        return {model_name(p): p.resolve() for p in paths}

    def problem(self) -> str | None:
        """What stops the server from starting: no model at all, or an unknown default."""
        if not self._slots:
            return f"the model repository {self.settings.model_repository} holds no model folder"
        default = self.settings.default_model
        if default is not None and default not in self._slots:
            known = ", ".join(sorted(self._slots))
            return f"default_model {default!r} is not among the models served: {known}"
        return None

    def available(self) -> dict[str, Path]:
        """Every model that could be served now: the repository's (scanned again each time: a
        folder added at run time can be loaded) and the explicit ones."""
        found: dict[str, Path] = {}
        if self.settings.model_repository is not None:
            found.update(scan(self.settings.model_repository))
        found.update(self.explicit())
        return found

    @property
    def default_model(self) -> str | None:
        if self.settings.default_model is not None:
            return self.settings.default_model
        names = sorted(self._slots)
        return names[0] if names else None

    def views(self) -> dict[str, ModelView]:
        with self._lock:
            return {name: self._view(slot) for name, slot in sorted(self._slots.items())}

    def index(self) -> list[ModelView]:
        """Every model of the repository (and the explicit ones), loaded or not."""
        for name, path in self.available().items():
            with self._lock:
                self._slots.setdefault(name, _Slot(name, path, startup=False))
        return list(self.views().values())

    @staticmethod
    def _view(slot: _Slot) -> ModelView:
        live = slot.live if slot.state == "ready" else None
        return ModelView(
            name=slot.name,
            path=str(slot.path),
            state=slot.state,
            reason=slot.reason,
            startup=slot.startup,
            generation=live.number if live else 0,
            sockets=live.sockets if live else (),
            settings=live.settings if live else None,
        )

    # -- load and unload ----------------------------------------------------------------------
    def start(self) -> None:
        """Load every start-up model, each on a thread of its own (they load side by side)."""
        for name in list(self._slots):
            threading.Thread(
                target=self._load_quietly, args=(name,), name=f"load-{name}", daemon=True
            ).start()

    def _load_quietly(self, name: str) -> None:
        with contextlib.suppress(ControlError):
            self.load(name)

    def load(self, name: str) -> ModelView:
        """Load (or load again: swap) a model; returns once it is ready. ControlError(404) for
        a name the repository does not hold, (400) with the reason when it fails to load."""
        slot = self._slot(name, create=True)
        with slot.lock:
            if self._closing:
                raise ControlError(503, "the server is shutting down")
            problem = name_problem(name)
            settings, reason = model_settings(
                self.settings,
                name,
                slot.path,
                models="",
                model_repository=None,
                default_model=None,
                exit_on_load_failure=False,  # a failed model must not stop the others
                torch_threads=self._threads,
            )
            reason = problem or reason
            if reason is None:
                generation = self._spawn(settings)
                if slot.live is None:
                    self._set(slot, "loading", "")
                reason = self._wait_loaded(generation)
                if reason is None:
                    old, slot.live = slot.live, generation
                    self._set(slot, "ready", "")
                    logger.info("model %s ready (engines generation %d)", name, generation.number)
                    if old is not None:  # the front ends move to the new engines; these drain
                        self._retire(old)
                    return self._view(slot)
                self._retire(generation)
            logger.error("model %s failed to load: %s", name, reason)
            if slot.live is not None:
                raise ControlError(
                    400, f"failed to load {name!r} (the loaded version still serves): {reason}"
                )
            self._set(slot, "failed", reason)
            raise ControlError(400, f"failed to load {name!r}: {reason}")

    def unload(self, name: str) -> ModelView:
        slot = self._slot(name, create=False)
        with slot.lock:
            old, slot.live = slot.live, None
            self._set(slot, "unloaded", "")
            if old is not None:
                self._retire(old)
            logger.info("model %s unloaded", name)
            return self._view(slot)

    def _slot(self, name: str, *, create: bool) -> _Slot:
        with self._lock:
            slot = self._slots.get(name)
            if slot is None and create:
                path = self.available().get(name)
                if path is not None:
                    slot = self._slots[name] = _Slot(name, path, startup=False)
            if slot is None:
                known = ", ".join(sorted(self._slots) or ["none"])
                raise ControlError(404, f"unknown model {name!r}; the repository holds: {known}")
            return slot

    def _set(self, slot: _Slot, state: str, reason: str) -> None:
        with self._lock:
            slot.state, slot.reason = state, reason
        self.on_change()

    def _spawn(self, settings: Settings) -> _Generation:
        from app.process.supervisor import EngineProcess, engine_settings

        with self._lock:
            self._generations += 1
            number = self._generations
        engines = [
            EngineProcess(
                number * 100 + i, s, str(self.workdir / f"engine-g{number}-{i}.sock"), self.metrics
            )
            for i, s in enumerate(engine_settings(settings))
        ]
        for engine in engines:
            engine.start()
        return _Generation(number, settings, engines)

    def _wait_loaded(self, generation: _Generation) -> str | None:
        """None once every engine of the generation is ready; else why it failed."""
        deadline = time.monotonic() + _LOAD_TIMEOUT_S
        waiting = list(generation.sockets)
        while waiting:
            if self._closing:
                return "the server is shutting down"
            if time.monotonic() > deadline:
                return f"not ready after {_LOAD_TIMEOUT_S:.0f} s"
            for path in list(waiting):
                answer = probe(path)
                if answer is None:
                    continue
                if answer[0] == "failed":
                    return str(answer[1])
                if answer[1] in ("ready", "stuck"):
                    waiting.remove(path)
            time.sleep(_PROBE_PERIOD_S)
        return None

    def _retire(self, generation: _Generation) -> None:
        """Stop a generation's engines in the background: each drains (the front ends let go
        of it once they have moved on) and exits."""
        timeout_s = self.settings.drain_timeout_s + 5

        def stop() -> None:
            for engine in generation.engines:
                engine.stop(timeout_s)
            for path in generation.sockets:
                with contextlib.suppress(OSError):
                    os.unlink(path)

        threading.Thread(target=stop, name=f"retire-{generation.number}", daemon=True).start()

    def engines(self) -> list[EngineProcess]:
        with self._lock:
            return [e for s in self._slots.values() if s.live for e in s.live.engines]

    def close(self) -> None:
        """No more loads (the supervisor is stopping the engines)."""
        self._closing = True


def probe(path: str, timeout_s: float = 1.0) -> tuple[Any, ...] | None:
    """Ask the engine at `path` for its state: ("state", s), ("failed", reason), or None when
    nothing answers there yet (still loading)."""
    try:
        answer = call_blocking(path, ("probe",), timeout_s)
    except (OSError, EOFError, ValueError, pickle.UnpicklingError):
        return None
    return answer if isinstance(answer, tuple) else None


class ControlServer:
    """The supervisor's unix socket for the front ends, served by an asyncio loop on a thread
    of its own (the supervisor's main thread runs uvicorn's worker supervisor)."""

    def __init__(self, manager: ModelManager, path: str) -> None:
        self.manager = manager
        self.path = path
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchers: set[asyncio.StreamWriter] = set()
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self._draining = False
        self._thread = threading.Thread(target=self._run, name="model-control", daemon=True)
        manager.on_change = self.publish

    def start(self) -> None:
        self._thread.start()
        self._started.wait(10)

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_unix_server(self._connection, path=self.path)
        self._started.set()
        await self._stop.wait()
        server.close()
        for writer in list(self._watchers):
            writer.close()

    def publish(self) -> None:
        """Tell every front end the models as they are now (thread-safe)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._broadcast, ("models", self.manager.views()))

    def drain(self) -> None:
        """SIGTERM: the front ends refuse new requests (thread- and signal-safe)."""
        self._draining = True
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._broadcast, ("draining",))

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)

    def _broadcast(self, message: Any) -> None:
        for writer in list(self._watchers):
            with contextlib.suppress(Exception):
                write_message(writer, message)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        manager = self.manager
        try:
            message = await read_message(reader)
            kind = message[0]
            if kind == "watch":
                self._watchers.add(writer)
                write_message(writer, ("models", manager.views()))
                if self._draining:
                    write_message(writer, ("draining",))
                await reader.read()  # until the front end goes
                return
            try:
                if kind == "index":
                    reply: Any = ("ok", await asyncio.to_thread(manager.index))
                elif kind == "load":
                    reply = ("ok", await asyncio.to_thread(manager.load, str(message[1])))
                elif kind == "unload":
                    reply = ("ok", await asyncio.to_thread(manager.unload, str(message[1])))
                else:
                    reply = ("error", 400, f"unknown control message {kind!r}")
            except ControlError as exc:
                reply = ("error", exc.status, exc.message)
            write_message(writer, reply)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            self._watchers.discard(writer)
            writer.close()
