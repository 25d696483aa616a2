"""The `detr-serve` main process: one engine process per device (restarted when it dies) and
uvicorn's supervisor of the HTTP front-end workers (which replaces a worker that dies).

    supervisor (this process; no model, no HTTP)
      |- engine process per device  app/ipc/server.py: model, batcher, forward pass
      |- job runner (--jobs)        app/jobs/process.py: runs /v1/jobs jobs, tiles to the
                                    engines at low priority (restarted when it dies)
      |- front-end worker x N       uvicorn + app.main.create_frontend_app: HTTP, fetch,
                                    decode, encode; pixels to the engine in shared memory

It owns a temporary directory for the engines' unix sockets and Prometheus' multiprocess
files, made empty at start and removed at exit. On SIGTERM readiness turns 503 at once, the
requests already accepted finish (up to drain_timeout_s), the engines exit, then the front
ends (see _Drain). SIGINT (Ctrl-C, which reaches every process) stops the front ends first.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from app.config import Settings
from app.ipc.server import LOAD_FAILED, run_engine_process
from app.process.cpus import available_cpus, default_workers

if TYPE_CHECKING:
    from uvicorn.supervisors import Multiprocess

    from app.metrics import Metrics
    from app.models.manager import ControlServer, ModelManager

logger = logging.getLogger(__name__)

_MAX_BACKOFF_S = 10.0
_STABLE_S = 60.0  # an engine that lived this long restarts at once again when it dies
# Shut-down, after the drain (drain_timeout_s): an engine has this long to answer what is left
# and exit before SIGKILL; then each front end (its engines gone, nothing left to wait for)
# has uvicorn's graceful shut-down, then this long for its lifespan's end (the decode workers'
# join, up to 5 s: app/images/pool.py) and its exit.
ENGINE_EXIT_S = 5.0
FRONTEND_GRACE_S = 5
FRONTEND_EXIT_S = 6.0


def shutdown_bound_s(settings: Settings) -> float:
    """The longest time from SIGTERM to the supervisor's exit: what an orchestrator's grace
    period (Kubernetes terminationGracePeriodSeconds, after preStop) must cover."""
    return settings.drain_timeout_s + ENGINE_EXIT_S + FRONTEND_GRACE_S + FRONTEND_EXIT_S


class EngineProcess:
    """One engine process, started again (with backoff) whenever it dies."""

    def __init__(
        self,
        index: int,
        settings: Settings,
        socket_path: str,
        metrics: Metrics,
        target: Callable[..., None] = run_engine_process,
        args: tuple[object, ...] | None = None,
        name: str = "engine",
    ) -> None:
        """`target`, `args`, `name`: another child kept alive the same way (the job runner,
        app/jobs/process.py)."""
        self.index = index
        self._target = target
        self._args = args if args is not None else (settings, socket_path)
        self._name = name
        self.settings = settings
        self.socket_path = socket_path
        self.metrics = metrics
        self.failed = threading.Event()  # the model cannot be loaded: give up
        self._stopping = threading.Event()
        self._process: multiprocessing.process.BaseProcess | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"engine-{index}", daemon=True)
        self.on_fatal: list[object] = []

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        from prometheus_client import multiprocess

        ctx = multiprocessing.get_context("spawn")
        backoff = 0.5
        while not self._stopping.is_set():
            with self._lock:
                if self._stopping.is_set():
                    return
                process = ctx.Process(
                    target=self._target,
                    args=self._args,
                    name=f"detr-serve-{self._name}-{self.index}",
                )
                process.start()
                self._process = process
            started = time.monotonic()
            logger.info("%s %d started (pid %d)", self._name, self.index, process.pid)
            process.join()
            assert process.pid is not None
            # Its "live" gauges (queue depth, memory) must not count any more (an engine of a
            # model swapped out or unloaded stops while the server goes on).
            multiprocess.mark_process_dead(process.pid)
            if self._stopping.is_set():
                return
            if process.exitcode == LOAD_FAILED:
                # The engine logged the cause; restarting cannot help (no restart loop).
                logger.critical(
                    "engine %d could not load the model at %s: stopping detr-serve (exit status 1)",
                    self.index,
                    self.settings.model,
                )
                self.failed.set()
                return
            if time.monotonic() - started > _STABLE_S:
                backoff = 0.5
            logger.error(
                "%s %d (pid %d) died (exit code %s); restarting in %.1f s",
                self._name,
                self.index,
                process.pid,
                process.exitcode,
                backoff,
            )
            if self._target is run_engine_process:
                self.metrics.engine_restarts.inc()
            if self._stopping.wait(backoff):
                return
            backoff = min(backoff * 2, _MAX_BACKOFF_S)

    def stop(self, timeout_s: float) -> None:
        """SIGTERM (the engine drains its queue), SIGKILL past `timeout_s`."""
        with self._lock:
            self._stopping.set()
            process = self._process
        if process is not None and process.is_alive():
            process.terminate()
            process.join(timeout_s)
            if process.is_alive():
                logger.warning(
                    "engine %d did not stop in %.0f s: killing it", self.index, timeout_s
                )
                process.kill()
                process.join()
        self._thread.join(timeout_s)


def die_with_parent() -> None:
    """Linux: have the kernel send this process SIGTERM when the supervisor dies, even by
    SIGKILL; orphaned engines and workers would otherwise hold the port and the model."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1  # from linux/prctl.h
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def engine_settings(settings: Settings) -> list[Settings]:
    """The settings of each engine process: one device each."""
    if not settings.devices:
        return [settings]
    return [settings.model_copy(update={"devices": "", "device": d}) for d in settings.device_list]


def likely_cuda(settings: Settings) -> bool:
    """Whether the engines will run on CUDA, without importing torch here."""
    if settings.devices or settings.device.startswith("cuda"):
        return True
    return settings.device == "auto" and Path("/dev/nvidiactl").exists()


def worker_count(settings: Settings) -> int:
    return settings.workers or default_workers(available_cpus(), likely_cuda(settings))


def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT; the exit status (1 when the model could not be loaded)."""
    if "prometheus_client" in sys.modules:
        raise RuntimeError(
            "prometheus_client was imported before the supervisor set PROMETHEUS_MULTIPROC_DIR: "
            "the metrics would not be merged across processes"
        )
    if settings.grpc_port:
        from app.api.kserve.grpc.port import GrpcPortInUseError, check_port_free

        try:
            check_port_free(settings)  # the workers bind it with SO_REUSEPORT: never refused
        except GrpcPortInUseError as exc:
            logger.critical("%s", exc)
            return 2
    workdir = Path(tempfile.mkdtemp(prefix="detr-serve-"))
    metrics_dir = workdir / "metrics"
    metrics_dir.mkdir()
    # Before prometheus_client is imported anywhere: this process and every child (they
    # inherit the environment) write their samples to files there (app/metrics.py).
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from app.api.http.server_limits import uvicorn_limits
    from app.main import create_frontend_app
    from app.metrics import Metrics

    metrics = Metrics()
    manager: ModelManager | None = None
    control: ControlServer | None = None
    control_path: str | None = None
    if settings.several_models:
        # Several models: the engines (per model, per device) come and go at run time.
        from app.models.manager import ControlServer, ModelManager

        if settings.jobs:
            logger.warning(
                "/v1/jobs is off with several models: the job runner drives one model's engines"
            )
            settings = settings.model_copy(update={"jobs": False})
        manager = ModelManager(settings, workdir, metrics)
        problem = manager.problem()
        if problem is not None:
            logger.critical("%s", problem)
            shutil.rmtree(workdir, ignore_errors=True)
            return 2
        control_path = str(workdir / "control.sock")
        control = ControlServer(manager, control_path)
        control.start()
        engines: list[EngineProcess] = []
    else:
        engines = [
            EngineProcess(i, s, str(workdir / f"engine-{i}.sock"), metrics)
            for i, s in enumerate(engine_settings(settings))
        ]
    children = list(engines)
    if settings.jobs:
        from app.jobs.process import run_job_runner_process

        children.append(
            EngineProcess(
                0,
                settings,
                "",
                metrics,
                target=run_job_runner_process,
                args=(settings, [e.socket_path for e in engines]),
                name="job-runner",
            )
        )
    workers = worker_count(settings)
    logger.info(
        "starting %s and %d front-end worker(s) (%d CPUs usable)",
        f"{len(engines)} engine process(es)"
        if manager is None
        else f"the engines of {len(manager.views())} model(s)",
        workers,
        available_cpus(),
    )
    config = uvicorn.Config(
        functools.partial(
            create_frontend_app,
            settings,
            [e.socket_path for e in engines],
            workers,
            control_path,
        ),
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=workers,
        log_config=None,
        access_log=False,
        # The front ends stop after the engines have drained (see _Drain): no work is left.
        timeout_graceful_shutdown=FRONTEND_GRACE_S,
        # uvicorn kills a worker that does not answer its ping in time; on a busy machine
        # its default (5 s) also kills workers that are only slow to start.
        timeout_worker_healthcheck=15,
        **uvicorn_limits(settings, workers),
    )
    sock = config.bind_socket()
    supervisor = Multiprocess(config, sockets=[sock])  # installs uvicorn's signal handlers
    signal.signal(
        signal.SIGTERM, _Drain(children, supervisor, settings, manager, control).on_sigterm
    )
    for child in children:
        child.start()
    if manager is not None:
        manager.start()
    else:
        watcher = threading.Thread(
            target=_stop_when_an_engine_fails, args=(engines, supervisor), daemon=True
        )
        watcher.start()
    try:
        supervisor.run()
    finally:
        sock.close()
        if manager is not None:
            manager.close()
            children = manager.engines()
        for child in children:
            child.stop(settings.drain_timeout_s + 5)
        if control is not None:
            control.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    logger.info("detr-serve stopped")
    return 1 if any(e.failed.is_set() for e in engines) else 0


def _stop_when_an_engine_fails(engines: list[EngineProcess], supervisor: Multiprocess) -> None:
    while not supervisor.should_exit.is_set():
        if any(e.failed.is_set() for e in engines):
            supervisor.should_exit.set()
            return
        time.sleep(0.2)


class _Drain:
    """SIGTERM, in the order an orchestrator needs (uvicorn's own order would stop accepting
    first, so /readyz could never say "draining"):
      1. at once, SIGTERM to the engines: each tells every front end "draining", so /readyz
         answers 503 and new requests 503 while the front ends keep accepting connections;
      2. the requests already accepted finish (the engines wait for every front end to say it
         is idle and for their queues, up to drain_timeout_s; then what is left is answered
         503) and the engines exit;
      3. then uvicorn stops the front ends, which have nothing left to wait for.
    uvicorn handles its queued signals every 0.5 s: the first step runs in the handler."""

    def __init__(
        self,
        engines: list[EngineProcess],
        supervisor: Multiprocess,
        settings: Settings,
        manager: ModelManager | None = None,
        control: ControlServer | None = None,
    ) -> None:
        self.engines = engines
        self.manager = manager
        self.control = control
        self.supervisor = supervisor
        self.timeout_s = settings.drain_timeout_s + ENGINE_EXIT_S
        self._started = False

    def on_sigterm(self, signum: int, frame: object) -> None:
        if self._started:
            return
        self._started = True
        logger.info("SIGTERM: draining (readiness 503; accepted requests finish)")
        if self.control is not None and self.manager is not None:
            # Several models: the front ends hear of the drain from the supervisor (an engine
            # that drains may only be a model's old version being swapped out).
            self.control.drain()
            self.manager.close()
            self.engines = self.manager.engines()
        stopping = [
            threading.Thread(target=e.stop, args=(self.timeout_s,), name=f"drain-{e.index}")
            for e in self.engines
        ]
        for thread in stopping:
            thread.start()

        def then_the_front_ends() -> None:
            for thread in stopping:
                thread.join()
            self.supervisor.should_exit.set()

        threading.Thread(target=then_the_front_ends, name="drain", daemon=True).start()
