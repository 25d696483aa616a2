"""Fixtures of `make test-docker`: the daemon, the image built once per run, containers.

Containers join a user-defined bridge network of their own and publish their ports on
127.0.0.1 at ports Docker picks, so runs beside other servers never fight over 8000/8001.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.docker import dockerhost
from tests.docker.dockerhost import IMAGE, Daemon, log

# Over any real wait (the model loads in seconds; the build cache may be cold), a hang guard only.
READY_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class BuiltImage:
    tag: str
    base: str
    build_s: float
    size_bytes: int


@pytest.fixture(scope="session")
def docker() -> Iterator[Daemon]:
    daemon = dockerhost.ensure_daemon()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="session")
def base_image(docker: Daemon) -> str:
    return dockerhost.ensure_base(docker)


@pytest.fixture(scope="session")
def image(docker: Daemon, base_image: str) -> BuiltImage:
    seconds = dockerhost.build_image(docker, base_image)
    built = BuiltImage(IMAGE, base_image, seconds, dockerhost.image_size_bytes(docker, IMAGE))
    log(f"{IMAGE} on {base_image}: built in {seconds:.0f} s, {built.size_bytes / 1e9:.2f} GB")
    dockerhost.ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (dockerhost.ARTIFACTS / "image.json").write_text(json.dumps(built.__dict__, indent=2))
    return built


@pytest.fixture(scope="session")
def network(docker: Daemon) -> Iterator[str]:
    name = f"detr-serve-test-{uuid.uuid4().hex[:8]}"
    docker("network", "create", name)
    yield name
    docker("network", "rm", name, check=False)


def wait_for(
    condition: Callable[[], bool],
    what: str,
    timeout_s: float = READY_TIMEOUT_S,
    poll_s: float = 0.2,
) -> None:
    """Wait for a state, not for a time; the timeout is a hang guard, never a measurement."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(poll_s)


class Container:
    """`docker run -d` of the image; its HTTP port published on 127.0.0.1."""

    def __init__(
        self,
        docker: Daemon,
        network: str,
        image: str = IMAGE,
        env: dict[str, str] | None = None,
        volumes: tuple[str, ...] = (),
    ) -> None:
        self.docker = docker
        self.name = f"detr-serve-test-{uuid.uuid4().hex[:8]}"
        args = ["run", "-d", "--name", self.name, "--network", network]
        # The README's flags: /dev/shm for the front ends' arenas, a stop grace above the drain.
        args += ["--shm-size", "1g", "--stop-timeout", "40", "-p", "127.0.0.1::8000"]
        for key, value in (env or {}).items():
            args += ["-e", f"{key}={value}"]
        for volume in volumes:
            args += ["-v", volume]
        docker(*args, image)
        address = docker("port", self.name, "8000/tcp").stdout.split()[0]
        self.url = f"http://{address}"

    def state(self) -> dict[str, object]:
        return dockerhost.inspect(self.docker, self.name)["State"]  # type: ignore[return-value]

    def logs(self) -> str:
        proc = self.docker("logs", self.name, check=False)
        return proc.stdout + proc.stderr

    def wait_healthy(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.state()
            if state["Health"]["Status"] == "healthy":  # type: ignore[index]
                return
            assert state["Running"], f"{self.name} exited:\n{self.logs()[-4000:]}"
            assert time.monotonic() < deadline, f"never healthy:\n{self.logs()[-4000:]}"
            time.sleep(1)

    def exec(self, *cmd: str) -> str:
        return self.docker("exec", self.name, *cmd).stdout

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=60)

    def remove(self) -> None:
        self.docker("rm", "-f", "-v", self.name, check=False)


@pytest.fixture
def start_container(
    docker: Daemon, network: str, image: BuiltImage
) -> Iterator[Callable[..., Container]]:
    """Starts containers of the built image for one test, and removes them after it."""
    started: list[Container] = []

    def start(**kw: object) -> Container:
        container = Container(docker, network, image.tag, **kw)  # type: ignore[arg-type]
        started.append(container)
        return container

    yield start
    for container in started:
        if os.environ.get("DETR_TEST_DOCKER_KEEP") != "1":
            container.remove()


@pytest.fixture(scope="module")
def default_container(docker: Daemon, network: str, image: BuiltImage) -> Iterator[Container]:
    """The image as shipped: no settings, no mounts."""
    container = Container(docker, network, image.tag)
    try:
        container.wait_healthy()
        yield container
    finally:
        container.remove()


def read_only_model_dir(tmp: Path, name: str) -> Path:
    """A small checkpoint in `tmp/name`, readable by the image's user (uid 10001)."""
    from tests.conftest import build_tiny_checkpoint

    model = tmp / name
    model.mkdir(parents=True)
    build_tiny_checkpoint(model)
    for path in (tmp, *tmp.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return model
