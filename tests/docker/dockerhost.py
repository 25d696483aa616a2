"""The Docker side of `make test-docker`: packages, daemon, base image, torch wheel, images.

Everything here works on a bare CI machine as root (Debian bookworm, package registries only):
- Debian's docker.io, mmdebstrap and docker-compose are installed when missing;
- dockerd is started when no daemon answers (`--iptables=false --bridge=none`, as these
  machines need), and stopped again by whoever started it (`Daemon.stop`);
- the base image is the official python:3.11-slim when it is there or can be pulled, else one
  made from Debian's packages with mmdebstrap and `docker import`ed as local/python:3.11-slim;
- torch comes from the PyTorch CPU index when it answers, else from the CPU wheel that pip finds
  for the host (`pip download --no-deps torch==V -d wheelhouse/`, TORCH_FROM_WHEELHOUSE=1);
- pip in the build gets the host's CA bundle as a BuildKit secret (a TLS-intercepting proxy).

Builds use BuildKit: `docker buildx` when the CLI has it, else a Docker <= 22 CLI with
DOCKER_BUILDKIT=1 (Debian's docker.io 20.10 has BuildKit built in, without buildx).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "docker"
OFFICIAL_BASE = "python:3.11-slim"
LOCAL_BASE = "local/python:3.11-slim"
IMAGE = "detr-serve:cpu"  # the tag docker-compose.yml gives the CPU detector
PROMETHEUS_IMAGE = "prom/prometheus:v2.53.0"  # as in docker-compose.yml
LOCAL_PROMETHEUS = "local/prometheus:debian"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# What Prometheus runs as in our image: Debian's package, its own user, prom/prometheus's paths.
PROMETHEUS_DOCKERFILE = """\
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN apt-get update && \\
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus && \\
    rm -rf /var/lib/apt/lists/* && \\
    mkdir -p /prometheus && chown prometheus:prometheus /prometheus
USER prometheus
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
"""


def log(message: str) -> None:
    """Progress on the terminal (`make test-docker` runs pytest -s: the build takes minutes)."""
    print(f"[test-docker {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(
    cmd: list[str], *, timeout: float = 120, check: bool = True, **kw: object
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc


def _ok(cmd: list[str], timeout: float = 30) -> bool:
    try:
        return run(cmd, timeout=timeout, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# --- packages -------------------------------------------------------------------------------


def _docker_clis() -> list[str]:
    """Every docker CLI on this machine, PATH's first (a machine may have a newer static one
    in /usr/local/bin beside Debian's /usr/bin/docker)."""
    found = [shutil.which("docker"), "/usr/bin/docker"]
    return list(dict.fromkeys(p for p in found if p and os.access(p, os.X_OK)))


def _buildkit_cli() -> tuple[str, bool] | None:
    """(docker CLI, has buildx) of the first CLI that builds with BuildKit."""
    for cli in _docker_clis():
        if _ok([cli, "buildx", "version"]):
            return cli, True
        version = run([cli, "--version"], check=False).stdout
        major = re.search(r"version (\d+)\.", version)
        if major and int(major.group(1)) <= 22:  # BuildKit built into the CLI, no buildx needed
            return cli, False
    return None


def _compose_cli(docker: str) -> list[str] | None:
    if _ok([docker, "compose", "version"]):
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def missing_packages() -> list[str]:
    """Debian packages this run needs and lacks (mmdebstrap only matters without Docker Hub,
    but a fresh machine cannot tell before it has a daemon to pull with)."""
    missing = []
    if not shutil.which("dockerd") or _buildkit_cli() is None:
        missing.append("docker.io")
    if not shutil.which("mmdebstrap"):
        missing.append("mmdebstrap")
    cli = _buildkit_cli()
    if cli is None or _compose_cli(cli[0]) is None:
        missing.append("docker-compose")
    return missing


def ensure_packages() -> None:
    missing = missing_packages()
    if not missing:
        return
    if os.geteuid() != 0:
        raise RuntimeError(
            f"missing {', '.join(missing)}: as root, `make test-docker` installs them "
            f"(apt-get install {' '.join(missing)})"
        )
    log(f"installing Debian's {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update"], timeout=600, env=env)
    run(["apt-get", "install", "-y", *missing], timeout=1200, env=env)


# --- the daemon ------------------------------------------------------------------------------


@dataclass
class Daemon:
    """The docker CLI to use, and the dockerd this run started (None: one was running)."""

    cli: str
    buildx: bool
    compose: list[str]
    started: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    env: dict[str, str] = field(default_factory=dict)

    def __call__(
        self, *args: str, timeout: float = 120, check: bool = True, **kw: object
    ) -> subprocess.CompletedProcess[str]:
        return run([self.cli, *args], timeout=timeout, check=check, env=self.env, **kw)

    def answers(self) -> bool:
        return _ok([self.cli, "info"], timeout=20)

    def stop(self) -> None:
        if self.started is None:
            return
        log(f"stopping the dockerd this run started (pid {self.started.pid})")
        self.started.terminate()
        try:
            self.started.wait(60)
        except subprocess.TimeoutExpired:
            self.started.kill()
            self.started.wait(10)
        self.started = None


def ensure_daemon() -> Daemon:
    ensure_packages()
    found = _buildkit_cli()
    assert found is not None, "no docker CLI that builds with BuildKit"
    cli, buildx = found
    compose = _compose_cli(cli)
    assert compose is not None, "no docker compose"
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}
    daemon = Daemon(cli, buildx, compose, env=env)
    if daemon.answers():
        return daemon
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    daemon.log_path = ARTIFACTS / "dockerd.log"
    log(f"no Docker daemon answers: starting dockerd (log: {daemon.log_path})")
    with daemon.log_path.open("wb") as out:
        daemon.started = subprocess.Popen(
            ["dockerd", "--iptables=false", "--bridge=none"],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 120
    while not daemon.answers():
        if daemon.started.poll() is not None or time.monotonic() > deadline:
            tail = daemon.log_path.read_text()[-3000:]
            daemon.stop()
            raise RuntimeError(f"dockerd did not come up:\n{tail}")
        time.sleep(0.5)
    return daemon


# --- images ----------------------------------------------------------------------------------


def has_image(docker: Daemon, ref: str) -> bool:
    return docker("image", "inspect", ref, check=False).returncode == 0


def pulled(docker: Daemon, ref: str) -> bool:
    """Whether `ref` is here, pulling it if need be (False where Docker Hub is unreachable)."""
    if has_image(docker, ref):
        return True
    proc = docker("pull", ref, timeout=900, check=False)
    if proc.returncode != 0:
        log(f"cannot pull {ref}: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    return proc.returncode == 0


def ensure_base(docker: Daemon) -> str:
    """The image both stages build FROM: the official one, else one from Debian's packages."""
    if pulled(docker, OFFICIAL_BASE):
        return OFFICIAL_BASE
    if has_image(docker, LOCAL_BASE):
        return LOCAL_BASE
    log(f"building {LOCAL_BASE} from Debian bookworm's packages (mmdebstrap)")
    with tempfile.TemporaryDirectory() as tmp:
        tar = Path(tmp) / "base.tar"
        run(
            [
                "mmdebstrap",
                "--variant=minbase",
                "--include=python3,python3-venv,ca-certificates",
                "bookworm",
                str(tar),
            ],
            timeout=1800,
        )
        docker("import", str(tar), LOCAL_BASE, timeout=600)
    return LOCAL_BASE


def _reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=10):
            return True
    except Exception:
        return False


def torch_version() -> str:
    (version,) = re.findall(r"^ARG TORCH_VERSION=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    return version


def torch_build_args() -> list[str]:
    """The PyTorch CPU index as users get it when it answers; else the host's CPU wheel."""
    if _reachable(TORCH_CPU_INDEX + "/torch/"):
        return []
    version = torch_version()
    wheelhouse = ROOT / "wheelhouse"
    wheels = list(wheelhouse.glob(f"torch-{version}+cpu-*.whl"))
    if not wheels:
        log(f"{TORCH_CPU_INDEX} is unreachable: pip download torch=={version} into wheelhouse/")
        run(
            [
                sys.executable,
                *("-m", "pip", "download", "--no-deps", f"torch=={version}"),
                *("--only-binary", ":all:", "-d", str(wheelhouse)),
            ],
            timeout=1800,
        )
        wheels = list(wheelhouse.glob(f"torch-{version}+cpu-*.whl"))
    assert wheels, f"pip found no CPU build of torch {version} (a +cpu wheel) for wheelhouse/"
    return ["--build-arg", "TORCH_FROM_WHEELHOUSE=1"]


def ca_build_args() -> list[str]:
    return ["--secret", f"id=ca,src={CA_BUNDLE}"] if CA_BUNDLE.is_file() else []


def build(
    docker: Daemon, tag: str, context: Path, args: list[str], log_name: str, **kw: object
) -> float:
    """`docker build` with BuildKit, on the host's network; its log in test-artifacts/docker.
    Returns the seconds it took."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    out = ARTIFACTS / log_name
    cmd = ["buildx", "build", "--load"] if docker.buildx else ["build"]
    started = time.monotonic()
    proc = docker(
        *cmd, "--progress=plain", "--network", "host", *args, "-t", tag, str(context),
        timeout=3600, check=False, **kw,
    )  # fmt: skip
    seconds = time.monotonic() - started
    out.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"docker build of {tag} failed; log: {out}\n{proc.stderr[-4000:]}")
    return seconds


def build_image(docker: Daemon, base: str) -> float:
    args = ["--build-arg", f"BASE_IMAGE={base}", *torch_build_args(), *ca_build_args()]
    log(f"building {IMAGE} ({' '.join(args)})")
    return build(docker, IMAGE, ROOT, args, "build-detr-serve.log")


def ensure_prometheus_image(docker: Daemon, base: str) -> str:
    """prom/prometheus when it can be pulled, else an image of Debian's prometheus package."""
    if pulled(docker, PROMETHEUS_IMAGE):
        return PROMETHEUS_IMAGE
    log(f"building {LOCAL_PROMETHEUS} from Debian's prometheus package")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "Dockerfile").write_text(PROMETHEUS_DOCKERFILE)
        build(
            docker,
            LOCAL_PROMETHEUS,
            Path(tmp),
            ["--build-arg", f"BASE_IMAGE={base}"],
            "build-prometheus.log",
        )
    return LOCAL_PROMETHEUS


def image_size_bytes(docker: Daemon, ref: str) -> int:
    return int(docker("image", "inspect", "--format", "{{.Size}}", ref).stdout)


def inspect(docker: Daemon, ref: str) -> dict[str, object]:
    (data,) = json.loads(docker("inspect", ref).stdout)
    return data
