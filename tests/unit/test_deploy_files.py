"""Deployment files, checked statically: linters and schemas, and consistency with the app.

The Dockerfile goes through hadolint, docker-compose.yml through the compose specification,
deploy/k8s through the Kubernetes OpenAPI schemas (all offline: the tools ship their rules and
schemas), and the files are checked against each other and against the app's own routes,
settings and metrics, so that a renamed route, setting or metric breaks here and not in a cluster.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.config import DEFAULT_MODEL_NAME, Settings
from app.metrics import Metrics
from app.process.supervisor import shutdown_bound_s

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
K8S_FILES = sorted(K8S.glob("*.yaml"))
BIN = Path(sys.executable).parent
# Panels for metrics that the app does not expose yet (announced, added later).
PENDING_METRICS: set[str] = set()


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is missing from {BIN}: `make install` installs the dev extra")
    return str(path)


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _deployment() -> dict[str, Any]:
    return _load_yaml(K8S / "deployment.yaml")


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _compose() -> dict[str, Any]:
    return _load_yaml(ROOT / "docker-compose.yml")


def _detectors() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in _compose()["services"].items() if n.startswith("detr-serve")}


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line, continuations joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _docker_args(instruction: str) -> list[str]:
    return [a for i, a in _dockerfile() if i == instruction]


def _env_pairs(instruction_args: list[str]) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for args in instruction_args:
        for token in shlex.split(args):
            key, sep, value = token.partition("=")
            if sep:
                pairs[key] = value
    return pairs


@pytest.fixture(scope="module")
def checkpoint_stub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough of a checkpoint for Settings, which only checks that its two files exist."""
    model = tmp_path_factory.mktemp("model")
    for name in ("config.json", "preprocessor_config.json"):
        (model / name).write_text("{}")
    return model


@pytest.fixture(scope="module")
def app_serves(checkpoint_stub: Path) -> Callable[[str], bool]:
    """Whether the real app routes GET `path` (anything but 404). The lifespan does not run,
    so no model loads: /readyz answers 503 (loading), which still proves the route exists."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    client = TestClient(create_app(Settings(model=checkpoint_stub)))
    return lambda path: client.get(path).status_code != 404


def _exposed_metric_names() -> set[str]:
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "info": ("_info",),
    }
    metrics = Metrics()
    # The runtime registers the device-memory collector once a model is loaded.
    metrics.observe_device_memory(lambda: [("cpu", "rss", 1.0)])
    return {
        family.name + suffix
        for family in metrics.registry.collect()
        for suffix in suffixes[family.type]
    }


def _metric_names_in(expr: str) -> set[str]:
    return set(re.findall(r"\bdetr_serve_\w+", expr))


def _setting_env_names() -> set[str]:
    return {"DETR_SERVE_" + name.upper() for name in Settings.model_fields}


def _strategic_merge(base: Any, patch: Any) -> Any:
    """kubectl's strategic merge, as far as our patch needs it: maps merge, lists of named
    objects (containers) merge by name, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = _strategic_merge(base[key], value) if key in base else value
        return merged
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(i, dict) and "name" in i for i in [*base, *patch])
    ):
        by_name = {i["name"]: i for i in base}
        for item in patch:
            by_name[item["name"]] = _strategic_merge(by_name.get(item["name"], {}), item)
        return list(by_name.values())
    return patch


# --- the tools ----------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    proc = _run(_tool("hadolint"), "--no-color", "Dockerfile")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_file_matches_the_compose_specification() -> None:
    proc = _run(
        _tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "docker-compose.yml"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: p.name)
def test_k8s_manifest_is_valid_kubernetes(path: Path) -> None:
    proc = _run(_tool("kubernetes-validate"), "--strict", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_k8s_gpu_patch_yields_a_valid_deployment_with_one_gpu(tmp_path: Path) -> None:
    patched = _strategic_merge(_deployment(), _load_yaml(K8S / "patches" / "gpu.yaml"))
    out = tmp_path / "deployment-gpu.yaml"
    out.write_text(yaml.safe_dump(patched))
    proc = _run(_tool("kubernetes-validate"), "--strict", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    container = _container(patched)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"] == _detectors()["detr-serve-gpu"]["image"]
    # The patch adds to the CPU deployment; it does not lose its probes or settings.
    assert container["readinessProbe"] == _container(_deployment())["readinessProbe"]
    assert container["envFrom"] == _container(_deployment())["envFrom"]


@pytest.mark.parametrize(
    ("tool_args", "broken", "message"),
    [
        (("hadolint", "--no-color"), "FROM python\nRUN pip install flask\n", "DL3006"),
        (
            ("check-jsonschema", "--builtin-schema", "vendor.compose-spec"),
            "services:\n  api:\n    image: x\n    healthcheck: {tset: [CMD, 'true']}\n",
            "tset",
        ),
        (
            ("kubernetes-validate", "--strict"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: [{port: http}]}\n",
            "port",
        ),
    ],
    ids=["hadolint", "compose-spec", "kubernetes"],
)
def test_validators_reject_a_broken_file_offline(
    tool_args: tuple[str, ...], broken: str, message: str, tmp_path: Path
) -> None:
    # Guards the checks above against a tool that silently validates nothing.
    path = tmp_path / "broken.yaml"
    path.write_text(broken)
    proc = _run(_tool(tool_args[0]), *tool_args[1:], str(path))
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr


# --- Dockerfile -----------------------------------------------------------------------------


def test_dockerfile_installs_torch_and_extras_as_the_makefile_does() -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile[makefile.index("$(STAMP):") :]
    cuda_branch, _, cpu_branch = recipe.partition("else")
    cpu_branch = cpu_branch.partition("fi")[0]

    def makefile_extras(branch: str) -> set[str]:
        (extras,) = re.findall(r"-e '\.\[([^\]]*)\]'", branch)
        return set(extras.split(","))

    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    picked = re.search(
        r"extras='\[?([^'\]]*)\]?'; +"
        r"if \[ \"\$TORCH_VARIANT\" = cuda \]; then extras='\[([^\]]*)\]'",
        text,
    )
    assert picked, "the Dockerfile no longer picks the extras from TORCH_VARIANT"
    assert 'pip install --no-cache-dir "./$extras"' in text

    def docker_extras(group: str) -> set[str]:
        return set(group.split(",")) - {""}

    assert docker_extras(picked.group(1)) == makefile_extras(cpu_branch) - {"dev"}
    assert docker_extras(picked.group(2)) == makefile_extras(cuda_branch) - {"dev"}

    torch_pin = re.search(r"^TORCH_CPU \?= torch==(\S+)$", makefile, re.M)
    assert torch_pin
    assert _env_pairs(_docker_args("ARG"))["TORCH_VERSION"] == torch_pin.group(1)
    # torch goes in before the package, in both places.
    assert text.index('"torch==$TORCH_VERSION"') < text.index('"./$extras"')
    assert cpu_branch.index("$(TORCH_CPU)") < cpu_branch.index("-e '.[")
    assert "https://download.pytorch.org/whl/cpu" in text


def test_dockerfile_image_is_slim_non_root_and_serves_the_baked_default_model(
    app_serves: Callable[[str], bool],
) -> None:
    stages = _docker_args("FROM")
    # Every stage is FROM the BASE_IMAGE argument, python:3.11-slim unless a build says otherwise
    # (make test-docker passes one made from Debian's packages where Docker Hub is unreachable).
    assert len(stages) >= 2 and {s.split()[0] for s in stages} == {"${BASE_IMAGE}"}
    assert _env_pairs(_docker_args("ARG"))["BASE_IMAGE"] == "python:3.11-slim"
    user = _docker_args("USER")[-1]
    assert user.split(":")[0] not in ("root", "0")
    pod_security = _deployment()["spec"]["template"]["spec"]["securityContext"]
    assert user == f"{pod_security['runAsUser']}:{pod_security['runAsGroup']}"

    env = _env_pairs(_docker_args("ENV"))
    assert env["DETR_SERVE_HOST"] == "0.0.0.0"
    models_copy = [a.split() for a in _docker_args("COPY") if a.split()[0] == "models/"]
    assert models_copy, "the Dockerfile does not bake models/ in"
    baked = models_copy[0][-1].rstrip("/")
    assert env["DETR_SERVE_MODEL"] == f"{baked}/{DEFAULT_MODEL_NAME}"
    assert (ROOT / "models" / DEFAULT_MODEL_NAME / "config.json").is_file()
    assert set(env) - {"PATH"} <= _setting_env_names() | {
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONUNBUFFERED",
        "HF_HUB_OFFLINE",
        "PIP_NO_CACHE_DIR",
        "PIP_DISABLE_PIP_VERSION_CHECK",
    }
    assert json.loads(_docker_args("VOLUME")[0]) == ["/models"]
    assert _docker_args("EXPOSE")[0].split() == [
        env["DETR_SERVE_PORT"],
        env["DETR_SERVE_GRPC_PORT"],
    ]
    assert json.loads(_docker_args("ENTRYPOINT")[0]) == ["detr-serve"]
    healthcheck = _docker_args("HEALTHCHECK")[0]
    assert "/readyz" in healthcheck and app_serves("/readyz")
    assert "urllib.request" in healthcheck and "curl" not in healthcheck


def test_dockerignore_keeps_local_state_out_of_the_build_context() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", "runs", ".git", ".pytest_cache", ".mypy_cache", ".ruff_cache"} <= ignored
    copied = {a.split()[0].rstrip("/") for a in _docker_args("COPY") if "--from" not in a}
    assert not copied & ignored, "the Dockerfile copies something .dockerignore leaves out"


# --- docker compose -------------------------------------------------------------------------


def test_compose_runs_cpu_by_default_and_cuda_in_the_gpu_profile() -> None:
    detectors = _detectors()
    cpu, gpu = detectors["detr-serve"], detectors["detr-serve-gpu"]
    assert "profiles" not in cpu
    assert cpu["build"]["args"]["TORCH_VARIANT"] == "cpu"
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["args"]["TORCH_VARIANT"] == "cuda"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert cpu["image"] == _container(_deployment())["image"]


def test_compose_detectors_use_real_settings_routes_and_a_grace_above_the_drain(
    app_serves: Callable[[str], bool],
) -> None:
    drain_s = Settings.model_fields["drain_timeout_s"].default
    for name, service in _detectors().items():
        env = dict(e.partition("=")[::2] for e in service["environment"])
        assert set(env) <= _setting_env_names(), f"{name}: unknown DETR_SERVE_* variable"
        missing = _setting_env_names() - set(env)
        assert not missing, f"{name}: add {sorted(missing)} to the environment list"
        assert env["DETR_SERVE_HOST"] == "0.0.0.0"
        container_port = env["DETR_SERVE_PORT"]
        http_port, grpc_port = service["ports"]
        assert http_port.endswith(":" + container_port)
        assert grpc_port.endswith(":" + env["DETR_SERVE_GRPC_PORT"])
        probe = " ".join(service["healthcheck"]["test"])
        path = re.search(r"127\.0\.0\.1:(\d+)(/\w+)", probe)
        assert path and path.group(1) == container_port and app_serves(path.group(2))
        assert path.group(2) == "/readyz"
        # SIGTERM to exit at worst: the drain, the engines' exit, the front ends' shut-down.
        worst_s = shutdown_bound_s(Settings(drain_timeout_s=drain_s))
        assert int(service["stop_grace_period"].rstrip("s")) > worst_s
        assert "detector" in service["networks"]["default"]["aliases"]
        assert any(v.endswith(":/models:ro") for v in service["volumes"])


def test_prometheus_scrapes_the_detectors_metrics_route(app_serves: Callable[[str], bool]) -> None:
    config = _load_yaml(ROOT / "deploy" / "prometheus" / "prometheus.yml")
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "detr-serve"]
    assert app_serves(job["metrics_path"])
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["detector"]
    assert str(sd["port"]) == _docker_args("EXPOSE")[0].split()[0]
    prometheus = _compose()["services"]["prometheus"]
    mount = "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro"
    assert mount in prometheus["volumes"]


def test_grafana_provisions_the_datasource_and_dashboard_it_mounts() -> None:
    grafana = _compose()["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("./"))
    provisioning = ROOT / "deploy" / "grafana" / "provisioning"
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    (datasource,) = _load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    (provider,) = _load_yaml(provisioning / "dashboards" / "detr-serve.yml")["providers"]
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]

    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/detr-serve.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert {p["datasource"]["uid"] for p in panels} == {datasource["uid"]}


def test_dashboard_queries_use_only_metrics_the_app_exposes() -> None:
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/detr-serve.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = set().union(*map(_metric_names_in, exprs))
    assert used - PENDING_METRICS <= _exposed_metric_names()
    assert {
        "detr_serve_images_total",
        "detr_serve_stage_duration_seconds_bucket",
        "detr_serve_http_request_duration_seconds_bucket",
        "detr_serve_batch_size_bucket",
        "detr_serve_queue_depth",
        "detr_serve_inflight_images",
        "detr_serve_http_requests_total",
        "detr_serve_device_memory_bytes",
    } <= used
    stage = [e for e in exprs if "detr_serve_stage_duration_seconds_bucket" in e]
    assert stage and all("histogram_quantile(" in e and "stage" in e for e in stage)
    assert any("by (status)" in e for e in exprs if "detr_serve_http_requests_total" in e)


# --- Kubernetes -----------------------------------------------------------------------------


def test_k8s_probes_hit_the_apps_health_routes(app_serves: Callable[[str], bool]) -> None:
    container = _container(_deployment())
    port_names = {p["name"] for p in container["ports"]}
    paths = {}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["port"] in port_names
        paths[probe] = get["path"]
    assert paths == {
        "startupProbe": "/readyz",
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",
    }
    assert all(map(app_serves, paths.values()))
    annotations = _deployment()["spec"]["template"]["metadata"]["annotations"]
    assert app_serves(annotations["prometheus.io/path"])


def test_k8s_grace_period_outlasts_prestop_plus_the_worst_shutdown() -> None:
    """Kubernetes counts the grace period from the start of preStop; then SIGTERM: the drain,
    the engines' exit, the front ends' shut-down (app/process/supervisor.py, shutdown_bound_s; the
    e2e test of a drain that times out checks the server keeps within it)."""
    spec = _deployment()["spec"]["template"]["spec"]
    config = _load_yaml(K8S / "configmap.yaml")["data"]
    pre_stop = _container(_deployment())["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    worst_s = shutdown_bound_s(
        Settings(drain_timeout_s=float(config["DETR_SERVE_DRAIN_TIMEOUT_S"]))
    )
    assert spec["terminationGracePeriodSeconds"] > float(pre_stop[1]) + worst_s


def test_k8s_configmap_holds_valid_settings_and_feeds_the_pods(checkpoint_stub: Path) -> None:
    configmap = _load_yaml(K8S / "configmap.yaml")
    data = configmap["data"]
    assert set(data) <= _setting_env_names()
    assert data["DETR_SERVE_HOST"] == "0.0.0.0"
    container = _container(_deployment())
    assert container["envFrom"] == [{"configMapRef": {"name": configmap["metadata"]["name"]}}]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "http": int(data["DETR_SERVE_PORT"]),
        "grpc": int(data["DETR_SERVE_GRPC_PORT"]),
    }
    values = {k.removeprefix("DETR_SERVE_").lower(): v for k, v in data.items()}
    Settings.model_validate({**values, "model": checkpoint_stub})


def test_k8s_service_and_pdb_select_the_deployments_pods() -> None:
    deployment = _deployment()
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = _load_yaml(K8S / "service.yaml")
    assert service["spec"]["selector"].items() <= labels.items()
    port_names = {p["name"] for p in _container(deployment)["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    pdb = _load_yaml(K8S / "pdb.yaml")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_k8s_hpa_scales_on_pending_images_per_pod_with_cpu_as_fallback() -> None:
    hpa = _load_yaml(K8S / "hpa.yaml")
    deployment = _deployment()
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": deployment["apiVersion"],
        "kind": deployment["kind"],
        "name": deployment["metadata"]["name"],
    }
    by_type = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert set(by_type) == {"Pods", "Resource"}
    assert by_type["Resource"]["resource"]["name"] == "cpu"
    # A Utilization target needs a CPU request to be measured against.
    assert "cpu" in _container(deployment)["resources"]["requests"]
    pdb = _load_yaml(K8S / "pdb.yaml")
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"]

    adapter = _load_yaml(K8S / "prometheus-adapter-rules.yaml")
    rules = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    served = {r["name"]["as"]: r for r in rules}
    metric = by_type["Pods"]["pods"]["metric"]["name"]
    assert metric in served
    rule = served[metric]
    used = _metric_names_in(rule["seriesQuery"] + rule["metricsQuery"])
    assert used == {"detr_serve_queue_depth", "detr_serve_inflight_images"}
    assert used <= _exposed_metric_names()
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
