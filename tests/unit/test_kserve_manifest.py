"""deploy/kserve/inferenceservice.yaml, checked against KServe's own CRD schema (v0.20.0,
vendored under deploy/kserve/crd/) with jsonschema, plus the field-level strictness of
`kubectl apply --validate=strict`, and against the app's settings, routes and drain."""

from __future__ import annotations

import copy
import gzip
import hashlib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from app.process.supervisor import shutdown_bound_s

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy" / "kserve" / "inferenceservice.yaml"
CRD = ROOT / "deploy" / "kserve" / "crd" / "serving.kserve.io_inferenceservices.yaml.gz"
CRD_SHA256 = "57c3bf13f77de94678bf2ae3748056ec071ad2b9e88d6a28f44fb4710758fcff"


@cache
def _crd_text() -> bytes:
    return gzip.decompress(CRD.read_bytes())


@cache
def _crd() -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # 2 MB: libyaml's parser if present
    crd: dict[str, Any] = yaml.load(_crd_text(), Loader=loader)
    return crd


def _schema(version: str) -> dict[str, Any]:
    (served,) = [v for v in _crd()["spec"]["versions"] if v["name"] == version]
    schema: dict[str, Any] = served["schema"]["openAPIV3Schema"]
    return schema


def _manifest() -> dict[str, Any]:
    manifest: dict[str, Any] = yaml.safe_load(MANIFEST.read_text())
    return manifest


def _problems(manifest: dict[str, Any]) -> list[str]:
    """Schema errors (jsonschema) and fields the schema does not know (as the API server's
    strict field validation reports them), each with its path."""
    group, version = manifest["apiVersion"].split("/")
    crd = _crd()
    if group != crd["spec"]["group"] or manifest["kind"] != crd["spec"]["names"]["kind"]:
        return [f"{manifest['apiVersion']} {manifest['kind']} is not this CRD's kind"]
    schema = _schema(version)
    validator = jsonschema.Draft7Validator(schema)
    found = [
        f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in validator.iter_errors(manifest)
    ]
    return found + list(_unknown_fields(manifest, schema, ""))


def _unknown_fields(value: Any, schema: dict[str, Any], path: str) -> Iterator[str]:
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(value, dict):
        if (
            path.endswith("metadata")
            and schema.get("type") == "object"
            and not schema.get("properties")
        ):
            return  # ObjectMeta: the API server checks it, the CRD only says "object"
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            where = f"{path}.{key}" if path else key
            if key in properties:
                yield from _unknown_fields(item, properties[key], where)
            elif isinstance(extra, dict):
                yield from _unknown_fields(item, extra, where)
            elif extra is not True:
                yield f"{where}: unknown field"
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            yield from _unknown_fields(item, schema["items"], f"{path}[{i}]")


def _container() -> dict[str, Any]:
    (container,) = _manifest()["spec"]["predictor"]["containers"]
    return container


def test_vendored_crd_is_kserves_file_byte_for_byte() -> None:
    assert hashlib.sha256(_crd_text()).hexdigest() == CRD_SHA256
    assert _crd()["metadata"]["name"] == "inferenceservices.serving.kserve.io"


def test_inference_service_matches_the_crd_schema() -> None:
    manifest = _manifest()
    assert (manifest["apiVersion"], manifest["kind"]) == (
        "serving.kserve.io/v1beta1",
        "InferenceService",
    )
    assert _problems(manifest) == []


@pytest.mark.parametrize(
    ("path", "value", "problem"),
    [
        (("spec", "predictor", "minReplica"), 1, "spec.predictor.minReplica: unknown field"),
        (("spec", "predictor", "minReplicas"), "one", "spec.predictor.minReplicas: 'one' is not"),
        (
            ("spec", "predictor", "containers", 0, "ports", 1, "containerPort"),
            "8081",
            "containerPort: '8081' is not of type 'integer'",
        ),
        (("spec", "predictor", "containers", 0, "name"), None, "None is not of type 'string'"),
    ],
    ids=["unknown-field", "wrong-type", "port-as-string", "no-name"],
)
def test_the_validation_catches_broken_manifests(path, value, problem) -> None:
    broken = copy.deepcopy(_manifest())
    target = broken
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert any(problem in p for p in _problems(broken)), _problems(broken)


def test_container_serves_v2_http_and_grpc_on_its_declared_ports(tmp_path: Path) -> None:
    container = _container()
    assert container["name"] == "kserve-container"  # KServe's name for a custom predictor
    env = {e["name"]: e["value"] for e in container["env"]}
    for name in ("config.json", "preprocessor_config.json"):
        (tmp_path / name).write_text("{}")
    values = {k.removeprefix("DETR_SERVE_").lower(): v for k, v in env.items()}
    settings = Settings.model_validate({**values, "model": tmp_path})
    http, grpc = container["ports"]
    # The first port is KServe's predictor HTTP port; a port named grpc becomes h2c.
    assert (http["name"], http["containerPort"]) == ("http", settings.port)
    assert (grpc["name"], grpc["containerPort"]) == ("grpc", settings.grpc_port)
    assert settings.host == "0.0.0.0"
    annotations = _manifest()["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "Standard"  # Knative: one port
    assert annotations["prometheus.io/port"] == str(settings.port)

    client = TestClient(create_app(Settings(model=tmp_path)))
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["port"] == "http" and get["path"].startswith("/v2/health/")
        assert client.get(get["path"]).status_code != 404, get["path"]
    assert client.get(annotations["prometheus.io/path"]).status_code == 200


def test_grace_period_outlasts_prestop_plus_the_worst_shutdown() -> None:
    """As for the plain Kubernetes manifest: preStop, then SIGTERM's worst case (the drain, the
    engines' exit, the front ends' shut-down: app/process/supervisor.py shutdown_bound_s)."""
    predictor = _manifest()["spec"]["predictor"]
    env = {e["name"]: e["value"] for e in _container()["env"]}
    pre_stop = _container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    worst_s = shutdown_bound_s(Settings(drain_timeout_s=float(env["DETR_SERVE_DRAIN_TIMEOUT_S"])))
    assert predictor["terminationGracePeriodSeconds"] > float(pre_stop[1]) + worst_s
    requests = _container()["resources"]["requests"]
    assert {"cpu", "memory"} <= set(requests)
