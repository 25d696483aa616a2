"""A model that fails to load, as an operator meets it: the real `detr-serve` started on a
broken model folder, in either mode of --exit-on-load-failure, and what it did, as one row.

    python scripts/checks/failed_load.py                 every case, both modes, as a table
    failed_load_row("corrupt-weights", stay_up=False)   one row (for scripts/checks/chaos.py)

Cases: a missing folder, corrupt weights (a safetensors file with a broken header), an unknown
architecture (config.json names a model type transformers does not know).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.bench.serverproc import detr_serve_command, free_port  # noqa: E402

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "models" / "rtdetr-shapes"
CASES = ("missing-folder", "corrupt-weights", "unknown-architecture")
# What the log (and, staying up, the reason) must say for each case.
CAUSES = {
    "missing-folder": "is not a directory",
    "corrupt-weights": "SafetensorError",
    "unknown-architecture": "not-a-detector",
}


def broken_model(case: str, parent: Path, source: Path = DEFAULT_MODEL) -> Path:
    """A model folder under `parent` that fails to load in the way `case` names."""
    target = parent / f"broken-{case}"
    if case == "missing-folder":
        return target  # never made
    target.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "preprocessor_config.json", "model.safetensors"):
        shutil.copy(source / name, target / name)
    if case == "corrupt-weights":
        # A header length of 2**64 - 1: safetensors refuses it before reading anything.
        (target / "model.safetensors").write_bytes(b"\xff" * 1024)
    elif case == "unknown-architecture":
        config = json.loads((target / "config.json").read_text())
        config["model_type"] = "not-a-detector"
        (target / "config.json").write_text(json.dumps(config))
    else:
        raise ValueError(f"unknown case {case!r}; use one of {', '.join(CASES)}")
    return target


def _start(model: Path, port: int, args: list[str], log: Path) -> subprocess.Popen[bytes]:
    cmd = [*detr_serve_command(), "--model", str(model), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--workers", "1", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DETR_SERVE_TORCH_THREADS": "1"}
    # A free gRPC port of its own (8001 by default), unless the caller's environment chose one:
    # rows started beside other servers never fight over 8001.
    env.setdefault("DETR_SERVE_GRPC_PORT", str(free_port()))
    with log.open("wb") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def _end(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return int(proc.returncode)


def failed_load_row(
    case: str, *, stay_up: bool, extra_args: tuple[str, ...] = (), timeout_s: float = 180.0
) -> dict[str, Any]:
    """Start detr-serve on a broken model and report what it did.

    Exiting (the default): `exit_status`, `seconds` from start to exit, `log_names_model`
    and `log_names_cause`. Staying up (--no-exit-on-load-failure): the answers of /readyz,
    /healthz, /v1/detect, /v1/models and the v2 infer route once /readyz says "failed",
    `seconds` until then, and the exit status after SIGTERM."""
    with tempfile.TemporaryDirectory(prefix="detr-serve-failed-load-") as tmp:
        model = broken_model(case, Path(tmp))
        log = Path(tmp) / "server.log"
        port = free_port()
        args = [*extra_args, "--no-exit-on-load-failure"] if stay_up else [*extra_args]
        started = time.monotonic()
        proc = _start(model, port, args, log)
        row: dict[str, Any] = {"case": case, "mode": "stay up" if stay_up else "exit"}
        try:
            if stay_up:
                url = f"http://127.0.0.1:{port}"
                row.update(_probe_failed_server(url, model.name, proc, timeout_s))
                row["seconds"] = round(time.monotonic() - started, 1)
            else:
                try:
                    proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    row["timed_out"] = True
                row["seconds"] = round(time.monotonic() - started, 1)
        finally:
            row["exit_status"] = _end(proc)
            text = log.read_text(errors="replace")
        row["log_names_model"] = str(model) in text
        row["log_names_cause"] = CAUSES[case] in text
        row["log"] = text
        return row


def _probe_failed_server(
    url: str, name: str, proc: subprocess.Popen[bytes], timeout_s: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    ready: httpx.Response | None = None
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            ready = httpx.get(url + "/readyz", timeout=2)
            if ready.json().get("status") == "failed":
                break
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    if ready is None or proc.poll() is not None:
        return {"readyz": None, "running": proc.poll() is None}
    image = (DEFAULT_MODEL / "README.md").read_bytes()[:64]  # never decoded: refused first
    detect = httpx.post(
        url + "/v1/detect", json={"images": [{"data": base64.b64encode(image).decode()}]}
    )
    v2 = httpx.post(
        f"{url}/v2/models/{name}/infer",
        json={"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": ["x"]}]},
    )
    return {
        "running": True,
        "readyz": ready.status_code,
        "readyz_body": ready.json(),
        "healthz": httpx.get(url + "/healthz").status_code,
        "healthz_body": httpx.get(url + "/healthz").json(),
        "detect": detect.status_code,
        "detect_body": detect.json(),
        "models": httpx.get(url + "/v1/models").status_code,
        "v2_infer": v2.status_code,
        "v2_infer_body": v2.json(),
        "v2_ready": httpx.get(url + "/v2/health/ready").status_code,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=CASES, action="append")
    parser.add_argument("--no-engine-process", action="store_true")
    opts = parser.parse_args()
    extra = ("--no-engine-process",) if opts.no_engine_process else ()
    print("| case | mode | exit status | seconds | log names model, cause | 503s staying up |")
    print("| --- | --- | --- | --- | --- | --- |")
    for case in opts.case or CASES:
        for stay_up in (False, True):
            row = failed_load_row(case, stay_up=stay_up, extra_args=extra)
            answers = (
                f"readyz {row.get('readyz')}, detect {row.get('detect')}, "
                f"v2 infer {row.get('v2_infer')}, healthz {row.get('healthz')}"
                if stay_up
                else "-"
            )
            print(
                f"| {case} | {row['mode']} | {row['exit_status']} | {row['seconds']} | "
                f"{row['log_names_model']}, {row['log_names_cause']} | {answers} |"
            )


if __name__ == "__main__":
    main()
