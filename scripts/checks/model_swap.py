"""Swap and unload models under load with the stock tritonclient, and count what failed.

Starts detr-serve on a repository of two copies of a model folder (`a` and `b`,
--model-control explicit), runs `--clients` tritonclient HTTP clients per model, and meanwhile
loads `b` again `--swaps` times (each load swaps in new engines beside the old), then loads and
unloads a third copy `c`. Prints, as JSON: requests answered and failed per model, images per
second before and during the swaps, each load's time, and the CPU seconds the server used per
image answered.

    .venv/bin/python scripts/checks/model_swap.py                       # the embedded default model
    .venv/bin/python scripts/checks/model_swap.py --model DIR --swaps 5 --clients 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from app.config import DEFAULT_MODEL_NAME, REPO_MODELS_DIR  # noqa: E402
from scripts.bench.serverproc import RunningServer, group_members  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "shapes-640x480.jpg"


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of the server's process group, read from /proc: its live
    processes' own, plus what their ended children used (a swapped-out engine's, once reaped)."""
    import os

    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for member in group_members(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15]) / tick
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO_MODELS_DIR / DEFAULT_MODEL_NAME)
    parser.add_argument("--swaps", type=int, default=3)
    parser.add_argument("--clients", type=int, default=2, help="clients per model")
    parser.add_argument("--warm-s", type=float, default=10.0, help="load before the swaps")
    args = parser.parse_args()

    image = EXAMPLE.read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        for name in ("a", "b"):
            shutil.copytree(args.model, repo / name)
        server = RunningServer(
            ["--model-repository", str(repo), "--model-control", "explicit"], ready_timeout_s=600
        )
        url = server.url.removeprefix("http://")
        answered: Counter[str] = Counter()
        failed: Counter[str] = Counter()
        errors: list[str] = []
        stop = threading.Event()

        def client(model: str) -> None:
            c = httpclient.InferenceServerClient(url, network_timeout=120)
            while not stop.is_set():
                tensor = httpclient.InferInput("images", [1], "BYTES")
                tensor.set_data_from_numpy(np.array([image], dtype=np.object_))
                try:
                    c.infer(model, [tensor])
                    answered[model] += 1
                except Exception as exc:
                    failed[model] += 1
                    errors.append(f"{model}: {exc}")
            c.close()

        threads = [
            threading.Thread(target=client, args=(m,))
            for m in ("a", "b")
            for _ in range(args.clients)
        ]
        control = httpclient.InferenceServerClient(url, network_timeout=900)
        try:
            for t in threads:
                t.start()
            time.sleep(args.warm_s / 2)  # past the first requests' start-up
            before_n, cpu0, t0 = sum(answered.values()), _cpu_s(server.proc.pid), time.monotonic()
            time.sleep(args.warm_s / 2)
            steady = (sum(answered.values()) - before_n) / (time.monotonic() - t0)
            loads = []
            during_n, t1 = sum(answered.values()), time.monotonic()
            for _ in range(args.swaps):
                started = time.monotonic()
                control.load_model("b")
                loads.append(round(time.monotonic() - started, 2))
            shutil.copytree(args.model, repo / "c")
            started = time.monotonic()
            control.load_model("c")
            load_new = round(time.monotonic() - started, 2)
            control.unload_model("c")
            during = (sum(answered.values()) - during_n) / (time.monotonic() - t1)
            cpu_per_image = (_cpu_s(server.proc.pid) - cpu0) / max(
                1, sum(answered.values()) - before_n
            )
        finally:
            stop.set()
            for t in threads:
                t.join(150)
            control.close()
            code = server.stop()
    print(
        json.dumps(
            {
                "answered": dict(answered),
                "failed": dict(failed),
                "first_errors": errors[:3],
                "images_per_s_steady": round(steady, 2),
                "images_per_s_during_swaps": round(during, 2),
                "swap_load_s": loads,
                "new_model_load_s": load_new,
                "server_cpu_s_per_image": round(cpu_per_image, 4),
                "exit_code": code,
            },
            indent=1,
        )
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
