"""`scripts/bench/bench.py --device cuda`: the GPU fast path measured against the model and a naive
endpoint, for RT-DETR-R18 and -R50 sized models at 640x640 with random weights.

Per model:
1. raw: the forward pass alone on a pre-processed batch, with CUDA graphs and eagerly, at batch
   1, 2, 4 .. 64 (and, with --torch-compile, under inductor as well); the engine's whole batch
   (H2D, pre-processing, forward, post-processing, one D2H copy) from decoded pixels and, where
   nvjpeg is there, from JPEG bytes.
2. http: the real detr-serve (settings as served: dtype auto, CUDA graphs, pipelining) loaded
   by scripts/bench/httpload.py at 1, 16, 64 and 256 closed-loop clients uploading a 640x480 JPEG.
3. naive: the same load against scripts/bench/naive_server.py (transformers per request, eager).
Then the targets: e2e >= 0.8 x raw graph throughput at saturation; single-client p50 <= 2 x raw
batch-1 latency + 2 ms; e2e >= 5 x naive. The JSON (--out) is rewritten after each part, so a run
cut short keeps what it measured. Every engine and server runs in --dtype (float16 by default),
recorded in the JSON. --dry-run runs all of it on the CPU at tiny sizes (128 px models, batches of
1 and 2, a fraction of a second per step, no torch.compile): a check of the wiring, no figures.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from scripts.bench.common import batch_sizes, sample_jpeg  # noqa: E402
from scripts.bench.httpload import run_load  # noqa: E402
from scripts.bench.make_bench_models import PRESETS, build  # noqa: E402
from scripts.bench.serverproc import RunningServer  # noqa: E402

TARGET_E2E_OVER_RAW = 0.8
TARGET_OVER_NAIVE = 5.0


def time_cuda(fn: Callable[[], object], seconds: float) -> float:
    """Mean seconds per call over about `seconds`, synchronising only at the ends (throughput)."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    fn()
    sync()
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or runs < 3:
        fn()
        runs += 1
        if runs % 8 == 0:  # keep the CPU from running far ahead of the GPU
            sync()
    sync()
    return (time.perf_counter() - started) / runs


def bench_raw(
    model: Path,
    max_batch: int,
    seconds: float,
    jpeg: bytes,
    compile_: bool,
    device: str = "cuda",
    dtype: str = "float16",
) -> dict:
    """Raw figures of one model; the engine and its graphs are freed before returning. (Any
    device runs, so the script can be smoke-tested on a CPU.)"""
    import torch

    result = _bench_raw(model, max_batch, seconds, jpeg, compile_, device, dtype)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def _bench_raw(
    model: Path,
    max_batch: int,
    seconds: float,
    jpeg: bytes,
    compile_: bool,
    device: str,
    dtype: str,
) -> dict:
    from app.backends.cuda_graphs import CudaGraphBackend
    from app.config import Settings
    from app.engine.build import build_engine
    from app.images.decode import decode_image, probe_plain_jpeg

    settings = Settings(
        model=model, device=device, dtype=dtype, max_batch_size=max_batch, torch_compile=compile_
    )
    started = time.perf_counter()
    engine = build_engine(settings, device)
    startup_s = time.perf_counter() - started
    graphs = engine.backend if isinstance(engine.backend, CudaGraphBackend) else None
    captured = set(graphs.captured_batch_sizes) if graphs is not None else set()
    pixels = decode_image(jpeg, max_pixels=10**8, index=0).pixels
    encoded = probe_plain_jpeg(jpeg, max_pixels=10**8, index=0)
    eager_why = sorted({b.reason for b in engine.info.buckets if not b.cuda_graph})
    print(
        f"  {model.name}: {engine.info.dtype}, graphs for {sorted(captured) or 'none'}"
        f"{' (eager: ' + '; '.join(eager_why) + ')' if eager_why else ''}, "
        f"nvjpeg {'on' if engine.jpeg_on_device else 'off'}, start-up {startup_s:.1f} s",
        flush=True,
    )
    rows = []
    for bs in batch_sizes(max_batch):
        row = _raw_row(engine, graphs, bs in captured, pixels, encoded, bs, seconds)
        rows.append(row)
        print(
            "  raw batch {:3d}: graph {:>8} eager {:8.2f} ms  engine {:8.2f} ms  "
            "engine+nvjpeg {:>8}  ({:7.0f} img/s best forward)".format(
                bs,
                f"{row['graph_ms']:.2f}" if "graph_ms" in row else "-",
                row["eager_ms"],
                row["engine_ms"],
                f"{row['engine_jpeg_ms']:.2f}" if "engine_jpeg_ms" in row else "-",
                max(row.get("graph_img_s", 0.0), row["eager_img_s"]),
            ),
            flush=True,
        )
    return {
        "dtype": engine.info.dtype,
        "startup_s": startup_s,
        "graphs": sorted(captured),
        "eager_reasons": eager_why,
        "nvjpeg": engine.jpeg_on_device,
        "rows": rows,
    }


def _raw_row(
    engine: Any,
    graphs: Any,
    graphed: bool,
    pixels: Any,
    encoded: Any,
    bs: int,
    seconds: float,
) -> dict[str, Any]:
    import torch

    from app.engine.tasks import DetectionTask

    image = torch.from_numpy(pixels).permute(2, 0, 1)
    pv, mask = engine.preprocessor([image] * bs)
    eager = graphs.inner if graphs is not None else engine.backend
    row: dict[str, Any] = {"batch": bs}
    if graphed:
        row["graph_ms"] = time_cuda(lambda: graphs.infer(pv, mask), seconds) * 1e3
    row["eager_ms"] = time_cuda(lambda: eager.infer(pv, mask), seconds) * 1e3
    tasks = [DetectionTask(pixels, 0.5, 100)] * bs
    row["engine_ms"] = time_cuda(lambda: engine.run_batch(tasks), seconds / 2) * 1e3
    if engine.jpeg_on_device and encoded is not None:
        jtasks = [DetectionTask(None, 0.5, 100, jpeg=encoded)] * bs
        row["engine_jpeg_ms"] = time_cuda(lambda: engine.run_batch(jtasks), seconds / 2) * 1e3
    for key in [k for k in row if k.endswith("_ms")]:
        row[key.replace("_ms", "_img_s")] = bs / row[key] * 1e3
    return row


def bench_http(
    name: str,
    url_path: str,
    server_args: list[str],
    command: list[str] | None,
    clients: list[int],
    seconds: float,
    jpeg: bytes,
) -> dict:
    started = time.perf_counter()
    server = RunningServer(server_args, ready_timeout_s=600, command=command)
    startup_s = time.perf_counter() - started
    print(f"  {name}: ready in {startup_s:.1f} s", flush=True)
    rows = []
    try:
        for n in clients:
            result = run_load(server.url + url_path, jpeg, n, seconds).as_dict()
            rows.append(result)
            print(
                f"  {name:10s} {n:4d} clients: {result['img_s']:8.1f} img/s  "
                f"p50 {result['p50_ms']:8.2f}  p99 {result['p99_ms']:8.2f} ms  "
                f"failures {result['failures']}",
                flush=True,
            )
    finally:
        server.stop()
    if any(r["failures"] for r in rows):
        print(f"  {name}: server log tail:\n{server.log()[-3000:]}", flush=True)
    return {"startup_s": startup_s, "rows": rows}


def check_targets(entry: dict) -> dict:
    raw = entry["raw"]["rows"]
    forward = "graph" if any("graph_ms" in r for r in raw) else "eager"
    raw_best = max(r.get(f"{forward}_img_s", 0.0) for r in raw)
    raw_b1_ms = next(r[f"{forward}_ms"] for r in raw if r["batch"] == 1)
    targets: dict[str, Any] = {"raw_forward": forward, "raw_best_img_s": raw_best}
    http = entry.get("http")
    if http:
        best = max(r["img_s"] for r in http["rows"])
        single = next((r for r in http["rows"] if r["clients"] == 1), None)
        targets["e2e_best_img_s"] = best
        targets["e2e_over_raw"] = best / raw_best
        targets["e2e_over_raw_ok"] = best / raw_best >= TARGET_E2E_OVER_RAW
        if single is not None:
            bound = 2 * raw_b1_ms + 2
            targets["single_client_p50_ms"] = single["p50_ms"]
            targets["single_client_bound_ms"] = bound
            targets["single_client_ok"] = single["p50_ms"] <= bound
        naive = entry.get("naive")
        if naive:
            naive_best = max(r["img_s"] for r in naive["rows"])
            targets["naive_best_img_s"] = naive_best
            targets["over_naive"] = best / naive_best if naive_best else float("inf")
            targets["over_naive_ok"] = targets["over_naive"] >= TARGET_OVER_NAIVE
    return targets


def print_targets(name: str, t: dict) -> None:
    print(f"  {name} targets:", flush=True)
    print(f"    raw {t['raw_forward']} forward at saturation: {t['raw_best_img_s']:.0f} img/s")
    if "e2e_over_raw" in t:
        print(
            f"    e2e / raw = {t['e2e_best_img_s']:.0f} / {t['raw_best_img_s']:.0f} = "
            f"{t['e2e_over_raw']:.2f} (target >= {TARGET_E2E_OVER_RAW}) "
            f"{'OK' if t['e2e_over_raw_ok'] else 'MISSED'}"
        )
    if "single_client_p50_ms" in t:
        print(
            f"    single-client p50 {t['single_client_p50_ms']:.2f} ms (target <= "
            f"{t['single_client_bound_ms']:.2f}) {'OK' if t['single_client_ok'] else 'MISSED'}"
        )
    if "over_naive" in t:
        print(
            f"    e2e / naive = {t['over_naive']:.1f}x (target >= {TARGET_OVER_NAIVE}x) "
            f"{'OK' if t['over_naive_ok'] else 'MISSED'}",
            flush=True,
        )


def main_cuda(args: argparse.Namespace) -> None:
    import torch

    logging.basicConfig(level=logging.WARNING, format="    %(name)s: %(message)s")
    logging.getLogger("app").setLevel(logging.INFO)  # dtype choice, graph capture, warm-up
    dry = bool(getattr(args, "dry_run", False))
    dtype = getattr(args, "dtype", "float16")
    if dry:
        device, size, dtype = "cpu", 128, "float32"  # 128: 336 encoder tokens >= 300 queries
        max_batch = min(args.max_batch or 2, 2)
        clients = [1]
        seconds, raw_seconds = 0.3, 0.02
        if args.torch_compile:
            # Parsed and imported is all a dry run can check: inductor takes minutes on a CPU.
            print("dry run: --torch-compile skipped (inductor compiles for minutes on a CPU)")
            return
    else:
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here (--dry-run checks the wiring)")
        device, size = args.device, 640
        max_batch = args.max_batch or 64
        clients = [int(c) for c in (args.clients or "1,16,64,256").split(",")]
        seconds = args.duration or 6.0
        raw_seconds = args.raw_seconds or 1.0
    compile_ = args.torch_compile and not dry
    delay_ms = 0.0 if args.delay_ms is None else args.delay_ms
    jpeg = sample_jpeg(args.image)
    workdir = Path(tempfile.mkdtemp(prefix="detr-bench-cuda-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)  # its models and logs
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if not dry else "cpu (dry run)",
        "torch": torch.__version__,
        "dtype": dtype,
        "dry_run": dry,
        "max_batch": max_batch,
        "delay_ms": delay_ms,
        "seconds_per_step": seconds,
        "models": {},
    }

    def save() -> None:
        if args.out:
            args.out.write_text(json.dumps(report, indent=2))

    print(f"{report['device']}, torch {torch.__version__}; image {len(jpeg)} bytes", flush=True)
    for spec in args.models.split(","):
        spec = spec.strip()
        model = build(workdir, spec, size=size) if spec in PRESETS else Path(spec)
        name = model.name
        print(f"{name}:", flush=True)
        entry: dict[str, Any] = {}
        report["models"][name] = entry
        if compile_:
            # Only the compiled figures: the plain ones come from a run without the flag.
            entry["raw"] = bench_raw(model, max_batch, raw_seconds, jpeg, True, device, dtype)
        else:
            entry["raw"] = bench_raw(model, max_batch, raw_seconds, jpeg, False, device, dtype)
        entry["targets"] = check_targets(entry)
        save()
        if not args.skip_http:
            serve_args = [
                "--model",
                str(model),
                "--device",
                device,
                "--dtype",
                dtype,
                "--max-batch-size",
                str(max_batch),
                "--max-batch-delay-ms",
                str(delay_ms),
                "--max-queue-size",
                "4096",
                "--log-level",
                "warning",
            ]
            entry["http"] = bench_http(
                "detr-serve", "/v1/detect", serve_args, None, clients, seconds, jpeg
            )
            entry["targets"] = check_targets(entry)
            save()
            if not args.skip_naive:
                naive = [sys.executable, str(ROOT / "scripts" / "bench" / "naive_server.py")]
                naive += ["--model", str(model), "--device", device, "--dtype", dtype]
                entry["naive"] = bench_http("naive", "/detect", [], naive, clients, seconds, jpeg)
        entry["targets"] = check_targets(entry)
        print_targets(name, entry["targets"])
        save()
