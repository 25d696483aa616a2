"""Benchmark deformable attention and the torch vs onnx backends.

    python scripts/bench/bench_backends.py                          # both parts, default model
    python scripts/bench/bench_backends.py --part op --threads 1
    python scripts/bench/bench_backends.py --part engine --model DIR --max-batch 8 --seconds 5

(a) ``op``: detr-serve's MSDA op against transformers' grid_sample formulation at RT-DETR decoder
    shapes (levels 80x80/40x40/20x20, 8 heads, 4 points, 300 queries, head dim 32), batch 1 and
    32, on the current device (CUDA: fp16, with the max error of each against an fp64
    reference; the op runs the Triton kernel when triton is installed).
(b) ``engine``: Engine.run_batch on decoded 640x480 images, images/s at batch 1..max for the
    torch backend (transformers' grid_sample, then detr-serve's op) and the onnx backend
    (MODEL/model.onnx; exported into a temporary copy of the model when missing or stale).
Writes JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from app.config import DEFAULT_MODEL_NAME, REPO_MODELS_DIR  # noqa: E402

DECODER_LEVELS = ((80, 80), (40, 40), (20, 20))


def _interleaved(
    fns: dict[str, Callable[[], Any]], device: torch.device, min_s: float, min_rounds: int = 5
) -> dict[str, dict[str, float]]:
    """Seconds per call of each function: median and minimum over rounds that run each once.

    Interleaving makes every candidate see the same background load (shared CI machines are
    noisy); the minimum is the least disturbed run.
    """

    def once(fn: Callable[[], Any]) -> float:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for fn in fns.values():
        once(fn)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    started = time.perf_counter()
    while min(len(t) for t in times.values()) < min_rounds or time.perf_counter() - started < min_s:
        for name, fn in fns.items():
            times[name].append(once(fn))
    return {
        name: {"median": float(np.median(t)), "min": float(np.min(t)), "rounds": len(t)}
        for name, t in times.items()
    }


def bench_op(device: torch.device, seconds: float) -> list[dict[str, Any]]:
    from app.ops.msda import (
        ms_deform_attn,
        ms_deform_attn_gather,
        ms_deform_attn_reference,
        triton_available,
    )

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    shapes = torch.tensor(DECODER_LEVELS, device=device)
    start = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    seq = int(shapes.prod(1).sum())
    heads, dim, queries, points = 8, 32, 300, 4
    impls: dict[str, Callable[..., torch.Tensor]] = {
        "grid_sample (transformers)": ms_deform_attn_reference,
        "detr_serve op": ms_deform_attn,
    }
    if device.type == "cuda" and triton_available():
        # The op runs the Triton kernel there; time the gather fallback as well.
        impls["gather fallback"] = ms_deform_attn_gather
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for batch in (1, 32):
        value = torch.randn(batch, seq, heads, dim, generator=gen)
        loc = torch.rand(batch, queries, heads, len(DECODER_LEVELS), points, 2, generator=gen)
        attn = torch.rand(batch, queries, heads, len(DECODER_LEVELS), points, generator=gen)
        attn = attn / attn.sum((-1, -2), keepdim=True)
        exact = None
        if device.type == "cuda":
            exact = ms_deform_attn_reference(
                value.double(), shapes.cpu(), start, loc.double(), attn.double()
            )
        args = [t.to(device) for t in (value, shapes, start, loc, attn)]
        args = [a.to(dtype) if a.is_floating_point() else a for a in args]
        with torch.inference_mode():
            timing = _interleaved(
                {name: (lambda fn=fn, a=args: fn(*a)) for name, fn in impls.items()},
                device,
                seconds,
            )
            for name, fn in impls.items():
                row: dict[str, Any] = {
                    "impl": name,
                    "batch": batch,
                    "device": str(device),
                    "dtype": str(dtype).removeprefix("torch."),
                    "ms": timing[name]["median"] * 1e3,
                    "ms_min": timing[name]["min"] * 1e3,
                }
                if exact is not None:
                    got = fn(*args).double().cpu()
                    row["max_abs_err_vs_fp64"] = float((got - exact).abs().max())
                rows.append(row)
                print(_op_line(row), flush=True)
    return rows


def _op_line(row: dict[str, Any]) -> str:
    err = row.get("max_abs_err_vs_fp64")
    tail = f"  max err vs fp64 {err:.2e}" if err is not None else ""
    return (
        f"  MSDA {row['impl']:<28} batch {row['batch']:>2} {row['dtype']} on {row['device']}: "
        f"{row['ms']:8.2f} ms (min {row['ms_min']:.2f}){tail}"
    )


def _onnx_model_dir(model: Path, workdir: Path) -> Path:
    """MODEL itself when its model.onnx is current, else a temporary copy with a fresh export."""
    from app.backends.onnx_backend import META_WEIGHTS_SHA256, ONNX_FILE, WEIGHTS_FILE

    onnx_path = model / ONNX_FILE
    if onnx_path.is_file():
        import hashlib

        import onnx

        meta = {
            p.key: p.value for p in onnx.load(onnx_path, load_external_data=False).metadata_props
        }
        weights = model / WEIGHTS_FILE
        if (
            not weights.is_file()
            or meta.get(META_WEIGHTS_SHA256) == hashlib.sha256(weights.read_bytes()).hexdigest()
        ):
            return model
    copy = workdir / model.name
    copy.mkdir()
    for item in model.iterdir():
        if item.is_file() and item.name != ONNX_FILE:
            shutil.copy2(item, copy / item.name)
    from scripts.export_onnx import export_onnx

    print(f"  exporting {model} to {copy / ONNX_FILE} (model.onnx missing or stale)", flush=True)
    export_onnx(copy, verify=False, log=lambda *_: None)
    return copy


def bench_engine(model: Path, device: str, max_batch: int, seconds: float) -> list[dict[str, Any]]:
    from app.engine.pipeline import DetectionTask, Engine

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, size=(480, 640, 3), dtype=np.uint8) for _ in range(max_batch)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        variants = [
            ("torch (grid_sample)", model, {"backend": "torch", "msda_kernel": False}),
            ("torch (detr_serve op)", model, {"backend": "torch", "msda_kernel": True}),
            ("onnx", _onnx_model_dir(model, Path(tmp)), {"backend": "onnx"}),
        ]
        engines = {
            label: Engine.load(folder, name=model.name, device=device, **kwargs)
            for label, folder, kwargs in variants
        }
        for batch in range(1, max_batch + 1):
            tasks = [DetectionTask(images[i], 0.5, 100) for i in range(batch)]
            some = next(iter(engines.values()))
            timing = _interleaved(
                {label: (lambda e=e, t=tasks: e.run_batch(t)) for label, e in engines.items()},
                some.backend.device,
                seconds,
            )
            for label, engine in engines.items():
                per_batch = timing[label]["median"]
                row = {
                    "backend": label,
                    "batch": batch,
                    "device": engine.info.device,
                    "images_per_s": batch / per_batch,
                    "images_per_s_best": batch / timing[label]["min"],
                    "ms_per_batch": per_batch * 1e3,
                }
                rows.append(row)
                print(
                    f"  {label:<22} batch {batch}: {row['images_per_s']:7.1f} img/s "
                    f"(best run {row['images_per_s_best']:.1f}; "
                    f"{row['ms_per_batch']:.1f} ms/batch)",
                    flush=True,
                )
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    best = {}
    for label in {r["backend"] for r in rows}:
        top = max((r for r in rows if r["backend"] == label), key=lambda r: r["images_per_s"])
        best[label] = {"batch": top["batch"], "images_per_s": top["images_per_s"]}
    eager = best.get("torch (grid_sample)")
    if eager and "onnx" in best:
        best["onnx_vs_eager_best"] = best["onnx"]["images_per_s"] / eager["images_per_s"]
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("all", "op", "engine"), default="all")
    parser.add_argument("--model", type=Path, default=REPO_MODELS_DIR / DEFAULT_MODEL_NAME)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch / onnxruntime threads")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per measurement")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    results: dict[str, Any] = {"device": str(device), "threads": torch.get_num_threads()}
    if args.part in ("all", "op"):
        print("(a) deformable attention at RT-DETR decoder shapes")
        results["op"] = bench_op(device, args.seconds)
    if args.part in ("all", "engine"):
        if not (args.model / "config.json").is_file():
            parser.error(f"{args.model} is not a model folder: pass --model DIR")
        print(f"(b) Engine.run_batch on decoded 640x480 images, {args.model}")
        rows = bench_engine(args.model, str(device), args.max_batch, args.seconds)
        results["engine"] = rows
        results["engine_best"] = summarize(rows)
        for label, best in results["engine_best"].items():
            if isinstance(best, dict):
                print(f"  best {label}: {best['images_per_s']:.1f} img/s at batch {best['batch']}")
        if "onnx_vs_eager_best" in results["engine_best"]:
            ratio = results["engine_best"]["onnx_vs_eager_best"]
            print(f"  onnx / eager (best batch each): {ratio:.2f}x")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
