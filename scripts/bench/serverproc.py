"""Boot the real `detr-serve` console script on a free port, wait for /readyz, stop it.

Used by the end-to-end tests and the benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def detr_serve_command() -> list[str]:
    """The installed console script, or the module where the package is only on the path (a GPU
    machine that got the source tree and carried wheels, no `pip install`)."""
    script = Path(sys.executable).parent / "detr-serve"
    return [str(script)] if script.exists() else [sys.executable, "-m", "app.cli"]


class RunningServer:
    def __init__(
        self,
        args: list[str],
        env: dict[str, str] | None = None,
        ready_timeout_s: float = 120.0,
        command: list[str] | None = None,
        env_remove: tuple[str, ...] = (),
    ) -> None:
        """`command` (default: detr-serve) is started with `--host 127.0.0.1 --port P` + args;
        it inherits this environment, plus `env`, less the variables in `env_remove`."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # detr-serve's gRPC port is 8001 by default: a free one unless the caller chose,
        # so that servers started side by side never share (or fight over) 8001.
        env = dict(env or {})
        if "--grpc-port" in args:
            self.grpc_port = int(args[args.index("--grpc-port") + 1])
        else:
            env.setdefault("DETR_SERVE_GRPC_PORT", str(free_port()))
            self.grpc_port = int(env["DETR_SERVE_GRPC_PORT"])
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        prefix = command or detr_serve_command()
        cmd = [*prefix, "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"detr-serve-{self.port}.log"
        self._log = self.log_path.open("wb")
        # A session of its own: stop() can find and end whatever the server left behind
        # (LitServe's forked API servers, or a detr-serve child that outlived its parent).
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in {**os.environ, **(env or {})}.items() if k not in env_remove},
            start_new_session=True,
        )
        self.leftovers: list[int] = []  # processes still alive after the server exited
        self._wait_ready(ready_timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"detr-serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"detr-serve was not ready in {timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        """Signal the server (only its main process, as an orchestrator would), wait for it,
        then kill what is left of its process group (recorded in `leftovers`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.leftovers = group_members(self.proc.pid)
        if self.leftovers:
            time.sleep(1.0)  # children exiting on their own right after their parent
            self.leftovers = group_members(self.proc.pid)
        for pid in self.leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not self._log.closed:
            self._log.close()
        return int(self.proc.returncode)


def group_members(pgid: int) -> list[int]:
    """Live processes of process group `pgid` (Linux /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields after the command: state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members
