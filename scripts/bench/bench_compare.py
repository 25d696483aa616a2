"""`scripts/bench/bench.py --compare` and `--overhead`: detr-serve side by side with its peers, in
the same run, with the same client (scripts/bench/httpload.py: aiohttp, closed loop) and the same
640x480 JPEG, sent as base64 JSON and as multipart.

--compare    detr-serve as shipped (engine process + front-end workers, --backend auto: onnxruntime
             on the CPU), detr-serve with --backend torch and with --precision int8 (its INT8
             model made first if missing), LitServe on the same
             checkpoint (scripts/bench/litserve_server.py: transformers' processor and model,
             LitServe's batching with max_batch_size and batch_timeout equal to detr-serve's), the
             naive endpoint (scripts/bench/naive_server.py), and the raw forward pass of the
             checkpoint in a process of its own (scripts/bench/bench.py --skip-http) at its best
             batch size, in each backend: torch (torch's default threads) and onnxruntime (the
             export --backend auto serves, threads as the server sets them). Per round and body
             format: img/s and p50, then detr-serve/LitServe, detr-serve/naive and end-to-end/raw
             of each backend (the torch row over the raw torch pass, the shipped onnx row over the
             raw onnxruntime pass); then the range of each ratio over the rounds.
             Servers run one at a time, in a rotated order each round.
--compare-int8
             the two rows of issue 19 alone: detr-serve as shipped (float32 onnxruntime) and
             --precision int8, alternating first each round; img/s, CPU time per image and
             INT8/float32 per round and format, then their ranges (no LitServe, naive or raw).
--e2e-vs-raw issue 12's torch target alone: detr-serve --backend torch as shipped, and each
             `--variant NAME=[VAR=VALUE ...] [FLAGS]` (repeatable: environment variables of the
             server, e.g. OMP_WAIT_POLICY or GOMP_SPINCOUNT, then detr-serve flags) against the
             raw torch forward pass in a process of its own, per round and body format: img/s,
             CPU time per image, the mean batch size the server settled at, end-to-end / raw and
             each variant over the shipped row.
--overhead   detr-serve with the null engine (--backend null: a fixed detection, no model;
             JPEGs travel encoded as on the GPU path, so nothing is decoded) against a bare
             FastAPI endpoint (scripts/bench/bare_server.py) that reads the same upload and answers
             the same JSON, with the same number of uvicorn workers; the ratio, and the front ends'
             CPU time per image (their process CPU time / images answered).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from scripts.bench.common import USER_OMP_WAIT_POLICY  # noqa: E402
from scripts.bench.httpload import LoadResult, run_load  # noqa: E402
from scripts.bench.serverproc import RunningServer, detr_serve_command  # noqa: E402

FORMATS = ("json", "multipart")


def _detr_env_remove() -> tuple[str, ...]:
    """detr-serve runs as shipped: without the PASSIVE scripts/bench/bench.py set for the peers
    (unless whoever runs the benchmark set a policy: then everyone gets it)."""
    return () if USER_OMP_WAIT_POLICY is not None else ("OMP_WAIT_POLICY",)


# detr-serve's rows: as shipped (--backend auto: onnxruntime on the CPU), and the other backends.
DETR_ROWS = {
    "detr-serve": [],
    "detr-serve-torch": ["--backend", "torch"],
    "detr-serve-int8": ["--backend", "onnx", "--precision", "int8"],
}


def _server(name: str, model: Path, max_batch: int, delay_ms: float, workers: int | None):
    py = [sys.executable]
    if name in DETR_ROWS:
        args = ["--model", str(model), "--max-batch-size", str(max_batch), *DETR_ROWS[name]]
        args += ["--max-batch-delay-ms", str(delay_ms), "--max-queue-size", "1024"]
        args += ["--log-level", "warning"]
        if workers:
            args += ["--workers", str(workers)]
        return RunningServer(args, ready_timeout_s=600, env_remove=_detr_env_remove())
    if name == "detr-serve-null":
        args = ["--model", str(model), "--backend", "null", "--max-batch-size", str(max_batch)]
        args += ["--max-batch-delay-ms", str(delay_ms), "--max-queue-size", "1024"]
        args += ["--log-level", "info"]  # the engine's pid is read from the log
        if workers:
            args += ["--workers", str(workers)]
        return RunningServer(
            args, ready_timeout_s=300, command=detr_serve_command(), env_remove=_detr_env_remove()
        )
    if name == "litserve":
        cmd = [*py, str(ROOT / "scripts" / "bench" / "litserve_server.py"), "--accelerator", "cpu"]
        args = ["--model", str(model), "--max-batch-size", str(max_batch)]
        args += ["--batch-timeout", str(delay_ms / 1e3)]
        return RunningServer(args, ready_timeout_s=300, command=cmd)
    if name == "naive":
        cmd = [*py, str(ROOT / "scripts" / "bench" / "naive_server.py"), "--device", "cpu"]
        args = ["--model", str(model)]
        return RunningServer(args, ready_timeout_s=300, command=cmd)
    if name == "bare":
        cmd = [
            *py,
            str(ROOT / "scripts" / "bench" / "bare_server.py"),
            "--workers",
            str(workers or 1),
        ]
        return RunningServer([], ready_timeout_s=120, command=cmd)
    raise ValueError(name)


def _prime(server: RunningServer, jpeg: bytes, fmt: str) -> None:
    """A few requests from 2 clients first: lazy imports and allocations are not what is
    measured. Outside every measured window (CPU time, batch sizes): its batches are small."""
    run_load(server.url + "/v1/detect", jpeg, 2, 1.0, warmup_s=0.5, as_json=fmt == "json")


def _load(server: RunningServer, jpeg: bytes, clients: int, seconds: float, fmt: str):
    """The measured load, after its own 2 s warm-up at full concurrency (`completed` counts
    the warm-up's answers too: they are in the CPU time)."""
    return run_load(
        server.url + "/v1/detect", jpeg, clients, seconds, warmup_s=2.0, as_json=fmt == "json"
    )


def _load_with_cpu(server: RunningServer, jpeg: bytes, args: Any, fmt: str, prime: bool = True):
    """The load's result, and the CPU time of all the server's processes per image answered: on
    a shared machine, where img/s is mostly the CPU share a server gets, this is what a quiet
    machine's img/s follows. prime=False: the caller has primed the server."""
    if prime:
        _prime(server, jpeg, fmt)
    pids = _all_pids(server)
    before = _tree_cpu_s(pids)
    res = _load(server, jpeg, args.clients, args.duration, fmt)
    return res, (_tree_cpu_s(pids) - before) * 1e3 / max(1, res.completed)


def raw_forward(
    model: Path,
    max_batch: int,
    seconds: float,
    *,
    backend: str = "torch",
    precision: str = "float",
    image: Path | None = None,
    sizes: list[int] | None = None,
) -> dict[str, Any]:
    """The raw pass in a process of its own, the server's threads, every batch size up to
    max_batch (or `sizes`), under PASSIVE, under OpenMP's default policy and with a short spin
    (GOMP_SPINCOUNT=10000, the engine process's own: app/process/openmp_policy.py): the best
    forward-only img/s. `backend`, `precision`: as scripts/bench/bench.py's flags (auto resolves as
    a server does); `image`: the JPEG the batch repeats (default the 640x480 sample)."""
    if backend == "onnx":
        variants = [("no spinning", []), ("spinning", ["--onnx-spinning"])]
        policy_of = {name: USER_OMP_WAIT_POLICY or "PASSIVE" for name, _ in variants}
    else:
        policies = [USER_OMP_WAIT_POLICY] if USER_OMP_WAIT_POLICY else ["PASSIVE", "default"]
        variants = [(policy, []) for policy in policies]
        policy_of = {policy: policy for policy in policies}
        if not USER_OMP_WAIT_POLICY:
            variants.append(("spin 10000", []))
            policy_of["spin 10000"] = "default"
    rows = []
    for variant, flags in variants:
        policy = policy_of[variant]
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if variant == "spin 10000":
            env.setdefault("GOMP_SPINCOUNT", "10000")
        if policy != "default":
            env["OMP_WAIT_POLICY"] = policy
        else:
            env["OMP_WAIT_POLICY"] = "default"  # not a policy: libgomp warns, keeps its own
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            cmd = [sys.executable, str(ROOT / "scripts" / "bench" / "bench.py"), "--skip-http"]
            cmd += ["--model", str(model), "--max-batch", str(max_batch)]
            cmd += ["--raw-seconds", str(seconds), "--out", out.name]
            cmd += ["--backend", backend, "--precision", precision]
            if image is not None:
                cmd += ["--image", str(image)]
            if sizes:
                cmd += ["--raw-batch-sizes", ",".join(map(str, sizes))]
            cmd += flags
            subprocess.run(
                cmd, check=True, cwd=ROOT, env=env,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            found = json.loads(Path(out.name).read_text())["raw"]
            rows += [{**r, "variant": variant, "omp": policy} for r in found]
    best = max(rows, key=lambda r: r["forward_img_s"])
    return {
        "backend": best["backend"],
        "forward_img_s": best["forward_img_s"],
        "forward_cpu_ms_per_image": best["forward_cpu_ms_per_image"],
        "batch": best["batch"],
        "variant": best["variant"],
        "omp": best["omp"],
        "threads": best["threads"],
        "engine_img_s": max(r["engine_img_s"] for r in rows),
        # Each variant's best (e.g. onnxruntime with and without spinning threads): a server
        # runs one of them (--onnx-spinning), the comparison takes the faster.
        "variants": {
            variant: max(r["forward_img_s"] for r in rows if r["variant"] == variant)
            for variant, _ in variants
        },
    }


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _range(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"{min(values):.2f} .. {max(values):.2f} (median {statistics.median(values):.2f})"


def bench_compare(args: Any, jpeg: bytes) -> dict[str, Any]:
    names = [*DETR_ROWS, "litserve", "naive"]
    from scripts.export_onnx import ensure_int8

    # Made before the rounds: no server's start-up in the timings exports or quantizes.
    ensure_int8(args.model)
    for name in ("detr-serve", "detr-serve-int8"):
        _server(name, args.model, args.max_batch, args.delay_ms, args.workers).stop()
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        print(f"round {r + 1}/{args.rounds}: raw forward passes ...", flush=True)
        raw = raw_forward(args.model, args.max_batch, args.raw_seconds)
        raw_onnx = raw_forward(args.model, args.max_batch, args.raw_seconds, backend="onnx")
        for found in (raw, raw_onnx):
            print(
                f"  raw {found['backend']:5s}: forward {found['forward_img_s']:.1f} img/s at "
                f"batch {found['batch']} ({found['variant']}), "
                f"engine (pre+forward+post) {found['engine_img_s']:.1f} img/s",
                flush=True,
            )
        results: dict[str, dict[str, LoadResult]] = {}
        cpu: dict[str, dict[str, float]] = {}
        for name in order:
            server = _server(name, args.model, args.max_batch, args.delay_ms, args.workers)
            try:
                for fmt in FORMATS:
                    res, cpu_ms = _load_with_cpu(server, jpeg, args, fmt)
                    results.setdefault(name, {})[fmt] = res
                    cpu.setdefault(name, {})[fmt] = cpu_ms
                    print(
                        f"  {name:10s} {fmt:9s} {args.clients} clients: {res.img_s:6.1f} img/s "
                        f"p50 {res.p50_ms:6.0f} ms  p99 {res.p99_ms:6.0f} ms  "
                        f"CPU {cpu_ms:5.1f} ms/image  failures {res.failures}",
                        flush=True,
                    )
            finally:
                server.stop()
        row: dict[str, Any] = {"raw": raw, "raw_onnx": raw_onnx, "http": {}, "ratios": {}}
        for fmt in FORMATS:
            d, torch_, int8, lit, naive = (results[n][fmt].img_s for n in names)
            row["http"][fmt] = {
                n: {**results[n][fmt].as_dict(), "cpu_ms_per_image": cpu[n][fmt]} for n in names
            }
            row["ratios"][fmt] = {
                "detr_over_litserve": _ratio(d, lit),
                "torch_over_litserve": _ratio(torch_, lit),
                "int8_over_default": _ratio(int8, d),
                "detr_over_naive": _ratio(d, naive),
                # Each backend over its own raw pass: detr-serve --backend torch over torch's,
                # detr-serve as shipped (onnxruntime on the CPU) over onnxruntime's.
                "e2e_over_raw": _ratio(torch_, raw["forward_img_s"]),
                "onnx_e2e_over_raw": _ratio(d, raw_onnx["forward_img_s"]),
                "litserve_over_raw": _ratio(lit, raw["forward_img_s"]),
                "litserve_cpu_over_detr_cpu": _ratio(cpu["litserve"][fmt], cpu["detr-serve"][fmt]),
            }
            q = row["ratios"][fmt]
            print(
                f"  => {fmt:9s} detr-serve (default)/LitServe {q['detr_over_litserve']:.2f}  "
                f"torch/LitServe {q['torch_over_litserve']:.2f}  "
                f"INT8/default {q['int8_over_default']:.2f}  "
                f"detr-serve/naive {q['detr_over_naive']:.2f}  "
                f"end-to-end/raw: torch {q['e2e_over_raw']:.2f}, "
                f"onnx (as shipped) {q['onnx_e2e_over_raw']:.2f}  "
                f"(LitServe/raw {q['litserve_over_raw']:.2f}); CPU per image "
                f"LitServe/detr-serve {q['litserve_cpu_over_detr_cpu']:.2f}",
                flush=True,
            )
        rounds.append(row)
    print(f"\nover {args.rounds} round(s), {args.clients} clients, {args.duration:.0f} s each:")
    summary: dict[str, Any] = {}
    for fmt in FORMATS:
        for key, target in (
            ("detr_over_litserve", 1.3),
            ("torch_over_litserve", None),
            ("int8_over_default", 1.3),
            ("detr_over_naive", None),
            ("e2e_over_raw", 0.9),
            ("onnx_e2e_over_raw", 0.9),
            ("litserve_over_raw", None),
            ("litserve_cpu_over_detr_cpu", None),
        ):
            values = [row["ratios"][fmt][key] for row in rounds]
            summary[f"{fmt}.{key}"] = values
            aim = f"  (target >= {target})" if target else ""
            print(f"  {fmt:9s} {key:20s} {_range(values)}{aim}")
    return {"rounds": rounds, "summary": summary}


def bench_int8(args: Any, jpeg: bytes) -> dict[str, Any]:
    """INT8 against the float32 model it was quantized from, through the same server, same run."""
    from scripts.export_onnx import ensure_int8

    names = ["detr-serve", "detr-serve-int8"]
    ensure_int8(args.model)
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        results: dict[str, dict[str, dict[str, Any]]] = {}
        for name in names[r % 2 :] + names[: r % 2]:
            server = _server(name, args.model, args.max_batch, args.delay_ms, args.workers)
            try:
                for fmt in FORMATS:
                    res, cpu_ms = _load_with_cpu(server, jpeg, args, fmt)
                    results.setdefault(name, {})[fmt] = {
                        **res.as_dict(),
                        "cpu_ms_per_image": cpu_ms,
                    }
                    print(
                        f"  round {r + 1} {name:16s} {fmt:9s} {res.img_s:6.1f} img/s  "
                        f"p50 {res.p50_ms:6.0f} ms  CPU {cpu_ms:5.1f} ms/image  "
                        f"failures {res.failures}",
                        flush=True,
                    )
            finally:
                server.stop()
        ratios = {}
        for fmt in FORMATS:
            f32, int8 = (results[n][fmt] for n in names)
            ratios[fmt] = {
                "img_s": _ratio(int8["img_s"], f32["img_s"]),
                "cpu": _ratio(f32["cpu_ms_per_image"], int8["cpu_ms_per_image"]),
            }
            print(
                f"  => {fmt:9s} INT8/float32 img/s {ratios[fmt]['img_s']:.2f}, "
                f"CPU per image float32/INT8 {ratios[fmt]['cpu']:.2f}  (target >= 1.3)",
                flush=True,
            )
        rounds.append({"http": results, "ratios": ratios})
    print(f"\nover {args.rounds} round(s), {args.clients} clients, {args.duration:.0f} s each:")
    summary: dict[str, Any] = {}
    for fmt in FORMATS:
        for key in ("img_s", "cpu"):
            values = [row["ratios"][fmt][key] for row in rounds]
            summary[f"{fmt}.int8_over_default.{key}"] = values
            print(f"  {fmt:9s} INT8/float32 {key:5s} {_range(values)}  (target >= 1.3)")
    return {"rounds": rounds, "summary": summary}


def _tree_cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def _all_pids(server: RunningServer) -> list[int]:
    root = psutil.Process(server.proc.pid)
    return [root.pid, *(c.pid for c in root.children(recursive=True))]


def _engine_pids(server: RunningServer) -> set[int]:
    """detr-serve's engine processes (none for the bare endpoint), from its log."""
    return {int(p) for p in re.findall(r"engine \d+ started \(pid (\d+)\)", server.log())}


def _front_end_pids(server: RunningServer) -> list[int]:
    """The processes that do HTTP: every descendant but the engine and the resource tracker
    (detr-serve), or the server and its workers (the bare endpoint)."""
    engines = _engine_pids(server)
    root = psutil.Process(server.proc.pid)
    procs = [root, *root.children(recursive=True)]
    return [
        p.pid
        for p in procs
        if p.pid not in engines and "resource_tracker" not in " ".join(p.cmdline())
    ]


def _roles(server: RunningServer) -> dict[str, list[int]]:
    """detr-serve's processes by what they do, from its log (`--log-level info`) and the process
    tree: the engines, the front ends (the supervisor and its uvicorn workers), the decode
    workers (the front ends' children) and the rest (job runner, resource trackers)."""
    engines = _engine_pids(server)
    runners = {int(p) for p in re.findall(r"job-runner \d+ started \(pid (\d+)\)", server.log())}
    root = psutil.Process(server.proc.pid)
    roles: dict[str, list[int]] = {"engine": [], "front end": [root.pid], "decode": [], "other": []}
    for child in root.children(recursive=True):
        try:
            helper = "resource_tracker" in " ".join(child.cmdline())
            parent = child.ppid()
        except psutil.NoSuchProcess:
            continue
        if child.pid in engines:
            roles["engine"].append(child.pid)
        elif helper or child.pid in runners:
            roles["other"].append(child.pid)
        elif parent == root.pid:
            roles["front end"].append(child.pid)
        else:
            roles["decode"].append(child.pid)
    return roles


def _load_with_cpu_split(
    server: RunningServer, jpeg: bytes, args: Any, fmt: str
) -> tuple[LoadResult, float, dict[str, float]]:
    """_load_with_cpu (primed by the caller), and where the machine's CPU went during the
    load: ms of CPU per image answered for each of the server's roles (_roles) and for the load
    generator (this process's children), and the machine's idle cores."""
    roles = _roles(server)
    before = {role: _tree_cpu_s(pids) for role, pids in roles.items()}
    children = os.times()
    idle, started = psutil.cpu_times().idle, time.monotonic()
    res, cpu_ms = _load_with_cpu(server, jpeg, args, fmt, prime=False)
    wall = time.monotonic() - started
    images = max(1, res.completed)
    split = {
        role: (_tree_cpu_s(pids) - before[role]) * 1e3 / images for role, pids in roles.items()
    }
    after = os.times()
    generator_s = after.children_user + after.children_system
    generator_s -= children.children_user + children.children_system
    split["load generator"] = generator_s * 1e3 / images
    split["idle cores"] = (psutil.cpu_times().idle - idle) / wall
    return res, cpu_ms, split


def bench_overhead(args: Any, jpeg: bytes) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for r in range(args.rounds):
        order = ["detr-serve-null", "bare"] if r % 2 == 0 else ["bare", "detr-serve-null"]
        res: dict[str, dict[str, Any]] = {}
        for name in order:
            server = _server(name, args.model, args.max_batch, args.delay_ms, args.workers)
            try:
                time.sleep(1.0)
                for fmt in FORMATS:
                    pids = _front_end_pids(server)
                    engines = list(_engine_pids(server))
                    _prime(server, jpeg, fmt)
                    before, engine_before = _tree_cpu_s(pids), _tree_cpu_s(engines)
                    load = _load(server, jpeg, args.clients, args.duration, fmt)
                    cpu_s = _tree_cpu_s(pids) - before
                    engine_s = _tree_cpu_s(engines) - engine_before
                    images = max(1, load.completed)
                    res.setdefault(name, {})[fmt] = {
                        **load.as_dict(),
                        "front_end_cpu_ms_per_image": cpu_s * 1e3 / max(1, images),
                        "front_end_processes": len(pids),
                        # The null engine's own process: the IPC and batcher side of the split.
                        "engine_cpu_ms_per_image": engine_s * 1e3 / max(1, images),
                    }
                    print(
                        f"  {name:16s} {fmt:9s} {load.img_s:7.1f} img/s  "
                        f"p50 {load.p50_ms:5.1f} ms  front-end CPU "
                        f"{cpu_s * 1e3 / max(1, images):.2f} ms/image ({len(pids)} processes)  "
                        f"engine CPU {engine_s * 1e3 / max(1, images):.2f} ms/image  "
                        f"failures {load.failures}",
                        flush=True,
                    )
            finally:
                server.stop()
        row = {"http": res, "ratio": {}}
        for fmt in FORMATS:
            row["ratio"][fmt] = _ratio(
                res["detr-serve-null"][fmt]["img_s"], res["bare"][fmt]["img_s"]
            )
            print(
                f"  => {fmt:9s} null engine / bare FastAPI {row['ratio'][fmt]:.2f} (target >= 0.7)",
                flush=True,
            )
        rows.append(row)
    print(f"\nover {args.rounds} round(s):")
    for fmt in FORMATS:
        print(f"  {fmt:9s} null/bare {_range([row['ratio'][fmt] for row in rows])}")
        cpu = [row["http"]["detr-serve-null"][fmt]["front_end_cpu_ms_per_image"] for row in rows]
        bare = [row["http"]["bare"][fmt]["front_end_cpu_ms_per_image"] for row in rows]
        print(f"  {fmt:9s} front-end CPU ms/image: detr-serve {_range(cpu)}; bare {_range(bare)}")
        engine = [row["http"]["detr-serve-null"][fmt]["engine_cpu_ms_per_image"] for row in rows]
        print(f"  {fmt:9s} engine CPU ms/image (null engine): {_range(engine)}")
    return {"rounds": rows}


@dataclass(frozen=True)
class Variant:
    """One detr-serve --backend torch row of --e2e-vs-raw: its extra flags and environment."""

    name: str
    flags: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()


def parse_variant(text: str) -> Variant:
    """--variant "NAME=[VAR=VALUE ...] [FLAGS]", split like a shell line: the leading
    VAR=VALUE words (upper-case names) go to the server's environment, the rest are detr-serve
    flags. E.g. "passive=OMP_WAIT_POLICY=PASSIVE", "threads1=--torch-threads 1"."""
    import shlex

    name, sep, rest = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"--variant takes NAME=[VAR=VALUE ...] [FLAGS], not {text!r}")
    words = shlex.split(rest)
    env = []
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        key, _, value = words.pop(0).partition("=")
        env.append((key, value))
    return Variant(name.strip(), tuple(words), tuple(env))


def _batch_size_totals(url: str) -> tuple[float, float]:
    """(sum, count) of the server's batch-size histogram: their differences over a load give
    the mean batch size the server settled at."""
    import httpx

    total = count = 0.0
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("detr_serve_batch_size_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("detr_serve_batch_size_count"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count


def bench_e2e_vs_raw(args: Any, jpeg: bytes) -> dict[str, Any]:
    """detr-serve --backend torch (as shipped, and each variant) against the raw torch forward
    pass in a process of its own, same run: img/s, CPU time of all the server's processes per
    image, the mean batch size the server settled at, end-to-end / raw, and each variant over
    the first row (paired: servers alternate, in a rotated order each round)."""
    variants = [Variant("torch"), *(parse_variant(v) for v in args.variant)]
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"--variant names must differ from each other and from torch: {names}")
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}: raw torch forward pass ...", flush=True)
        raw = raw_forward(args.model, args.max_batch, args.raw_seconds)
        print(
            f"  raw torch: forward {raw['forward_img_s']:.1f} img/s at batch {raw['batch']} "
            f"(OMP {raw['omp']}, {raw['forward_cpu_ms_per_image']:.1f} ms of CPU per image), "
            f"engine (pre+forward+post) {raw['engine_img_s']:.1f} img/s",
            flush=True,
        )
        results: dict[str, dict[str, Any]] = {}
        shift = r % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            name, env = variant.name, dict(variant.env)
            args_ = ["--model", str(args.model), "--backend", "torch", *variant.flags]
            args_ += ["--max-batch-size", str(args.max_batch)]
            args_ += ["--max-batch-delay-ms", str(args.delay_ms), "--max-queue-size", "1024"]
            args_ += ["--log-level", "info"]  # the engine's pid is read from the log
            if args.workers:
                args_ += ["--workers", str(args.workers)]
            # A policy the variant sets is its own; otherwise as --compare runs detr-serve.
            remove = tuple(k for k in _detr_env_remove() if k not in env)
            server = RunningServer(args_, env=env, ready_timeout_s=600, env_remove=remove)
            try:
                for fmt in FORMATS:
                    # Batch sizes from the measured load only: the priming's 2 clients make
                    # batches of 1 and 2.
                    _prime(server, jpeg, fmt)
                    before = _batch_size_totals(server.url)
                    res, cpu_ms, split = _load_with_cpu_split(server, jpeg, args, fmt)
                    after = _batch_size_totals(server.url)
                    batches = after[1] - before[1]
                    mean_batch = (after[0] - before[0]) / batches if batches else float("nan")
                    results.setdefault(name, {})[fmt] = {
                        **res.as_dict(),
                        "cpu_ms_per_image": cpu_ms,
                        "mean_batch": mean_batch,
                        "e2e_over_raw": _ratio(res.img_s, raw["forward_img_s"]),
                        "cpu_split": split,
                    }
                    print(
                        f"  {name:20s} {fmt:9s} {res.img_s:6.1f} img/s  p50 {res.p50_ms:6.0f} ms  "
                        f"CPU {cpu_ms:5.1f} ms/image  mean batch {mean_batch:4.2f}  "
                        f"end-to-end/raw {_ratio(res.img_s, raw['forward_img_s']):.2f}  "
                        f"failures {res.failures}",
                        flush=True,
                    )
                    # What the cores allow: the raw pass's CPU per image, and everything
                    # else the served image costs the same cores (front end, decoding, the
                    # load generator), even with no idle core and no slower forward pass.
                    rest = split["front end"] + split["decode"] + split["load generator"]
                    ceiling = _ratio(
                        raw["forward_cpu_ms_per_image"], raw["forward_cpu_ms_per_image"] + rest
                    )
                    results[name][fmt]["cores_ceiling"] = ceiling
                    print(
                        "    CPU ms/image: "
                        + ", ".join(f"{k} {v:.1f}" for k, v in split.items() if k != "idle cores")
                        + f"; machine idle {split['idle cores']:.2f} cores; the cores' ceiling "
                        f"of end-to-end/raw: {raw['forward_cpu_ms_per_image']:.1f} / "
                        f"({raw['forward_cpu_ms_per_image']:.1f} + {rest:.1f}) = {ceiling:.2f}",
                        flush=True,
                    )
            finally:
                server.stop()
        first = names[0]
        for fmt in FORMATS:
            for name in names[1:]:
                row, ref = results[name][fmt], results[first][fmt]
                row["over_first"] = _ratio(row["img_s"], ref["img_s"])
                cpu_ratio = _ratio(row["cpu_ms_per_image"], ref["cpu_ms_per_image"])
                print(
                    f"  => {fmt:9s} {name} / {first}: {row['over_first']:.2f} img/s, "
                    f"CPU per image {cpu_ratio:.2f}",
                    flush=True,
                )
        rounds.append({"raw": raw, "http": results})
    print(f"\nover {args.rounds} round(s), {args.clients} clients, {args.duration:.0f} s each:")
    summary: dict[str, Any] = {}
    for fmt in FORMATS:
        for name in names:
            values = [row["http"][name][fmt]["e2e_over_raw"] for row in rounds]
            summary[f"{fmt}.{name}.e2e_over_raw"] = values
            print(f"  {fmt:9s} {name:20s} end-to-end/raw {_range(values)}  (target >= 0.9)")
        for name in names[1:]:
            values = [row["http"][name][fmt]["over_first"] for row in rounds]
            summary[f"{fmt}.{name}.over_{first}"] = values
            print(f"  {fmt:9s} {name:20s} / {first}: {_range(values)}")
    described = {v.name: {"flags": list(v.flags), "env": dict(v.env)} for v in variants}
    return {"variants": described, "rounds": rounds, "summary": summary}


def environment() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        # Every server and the raw pass run under it (scripts/bench/bench.py sets PASSIVE unless
        # the caller set a policy).
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
