"""docker-compose.yml, brought up for real: the CPU detector and Prometheus scraping it.

The stack runs as shipped (its network, the detector's `detector` alias that Prometheus'
DNS discovery finds, deploy/prometheus/prometheus.yml) with two changes made from outside
the file: the published ports are free ones on 127.0.0.1 (the file's own variables), and,
where prom/prometheus cannot be pulled, an override file the test writes runs an image of
Debian's prometheus package instead. Grafana's image cannot be pulled here; its provisioning
and dashboard are checked statically (tests/unit/test_deploy_files.py, tests/e2e/).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import yaml

from scripts.bench.serverproc import free_port
from tests.conftest import shapes_image
from tests.docker import dockerhost
from tests.docker.conftest import BuiltImage, wait_for
from tests.docker.dockerhost import ROOT, Daemon, log

pytestmark = pytest.mark.docker

SERVICES = ("detr-serve", "prometheus")


@dataclass
class Stack:
    compose: list[str]
    env: dict[str, str]
    project: str
    detector_url: str
    prometheus_url: str

    def __call__(self, *args: str, timeout: float = 600, check: bool = True) -> str:
        proc = dockerhost.run([*self.compose, *args], timeout=timeout, check=check, env=self.env)
        return proc.stdout + proc.stderr

    def query(self, expr: str) -> list[dict[str, object]]:
        r = httpx.get(self.prometheus_url + "/api/v1/query", params={"query": expr}, timeout=30)
        r.raise_for_status()
        return r.json()["data"]["result"]


def _project_containers(docker: Daemon, project: str, *more: str) -> list[str]:
    label = f"label=com.docker.compose.project={project}"
    return docker("ps", *more, "--filter", label, "--format", "{{.Names}}").stdout.split()


@pytest.fixture(scope="module")
def stack(
    docker: Daemon, image: BuiltImage, base_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    prometheus_image = dockerhost.ensure_prometheus_image(docker, base_image)
    files = ["-f", str(ROOT / "docker-compose.yml")]
    if prometheus_image != dockerhost.PROMETHEUS_IMAGE:
        override = tmp_path_factory.mktemp("compose") / "docker-compose.override.yml"
        services = {"prometheus": {"image": prometheus_image}}
        override.write_text(yaml.safe_dump({"services": services}))
        files += ["-f", str(override)]
    detector_port, grpc_port, prometheus_port = free_port(), free_port(), free_port()
    project = f"detr-serve-test-{uuid.uuid4().hex[:6]}"
    env = {
        **docker.env,
        "DETR_SERVE_PUBLISH_PORT": f"127.0.0.1:{detector_port}",
        "DETR_SERVE_GRPC_PUBLISH_PORT": f"127.0.0.1:{grpc_port}",
        "PROMETHEUS_PORT": f"127.0.0.1:{prometheus_port}",
        # A setting from the shell, as the compose file promises.
        "DETR_SERVE_MODEL_NAME": "shapes-in-compose",
    }
    stack = Stack(
        [*docker.compose, "--project-directory", str(ROOT), "-p", project, *files],
        env,
        project,
        f"http://127.0.0.1:{detector_port}",
        f"http://127.0.0.1:{prometheus_port}",
    )
    try:
        # --no-build: the image the session built (compose would build it with its own args).
        stack("up", "-d", "--no-build", *SERVICES)
        yield stack
    finally:
        dockerhost.ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (dockerhost.ARTIFACTS / "compose-logs.txt").write_text(stack("logs", check=False))
        stack("down", "-v", "--remove-orphans", check=False)


def _healthy(docker: Daemon, project: str) -> bool:
    names = _project_containers(docker, project, "--filter", "health=healthy")
    return any("detr-serve" in n for n in names)


def test_the_stack_comes_up_and_prometheus_scrapes_the_detector(
    docker: Daemon, stack: Stack
) -> None:
    wait_for(lambda: _healthy(docker, stack.project), "the detector healthy")
    ps = stack("ps")
    log(f"compose ps:\n{ps}")
    (dockerhost.ARTIFACTS / "compose-ps.txt").write_text(ps)
    (model,) = httpx.get(stack.detector_url + "/v1/models", timeout=30).json()["models"]
    assert model["name"] == "shapes-in-compose"

    def up() -> bool:
        result = stack.query('up{job="detr-serve"}')
        return bool(result) and all(r["value"][1] == "1" for r in result)  # type: ignore[index]

    wait_for(up, "Prometheus scraping the detector (up == 1)")

    def images_total() -> float:
        result = stack.query('sum(detr_serve_images_total{job="detr-serve"})')
        return float(result[0]["value"][1]) if result else -1.0  # type: ignore[index]

    wait_for(lambda: images_total() >= 0, "detr_serve_images_total scraped")
    before = images_total()
    files = [("file", (f"{i}.jpg", shapes_image(seed=i), "image/jpeg")) for i in range(3)]
    r = httpx.post(stack.detector_url + "/v1/detect", files=files, timeout=120)
    assert r.status_code == 200, r.text
    wait_for(lambda: images_total() >= before + 3, "detr_serve_images_total up by 3")
    log(f"Prometheus: up == 1, detr_serve_images_total {before:.0f} -> {images_total():.0f}")


def test_compose_down_leaves_nothing_running(docker: Daemon, stack: Stack) -> None:
    assert _project_containers(docker, stack.project), "the stack is not running"
    stack("down", "-v", "--remove-orphans")
    assert _project_containers(docker, stack.project, "-a") == []
    label = f"label=com.docker.compose.project={stack.project}"
    for kind in ("network", "volume"):
        left = docker(kind, "ls", "--filter", label, "--format", "{{.Name}}").stdout.split()
        assert left == [], f"{kind}s left by compose down: {left}"
