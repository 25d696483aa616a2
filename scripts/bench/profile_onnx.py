"""Where an exported model's CPU time goes: the float32 and INT8 files side by side, same run.

    python scripts/bench/profile_onnx.py                     # default model, batch 1,4,8, 2 threads
    python scripts/bench/profile_onnx.py MODEL --batches 8 --threads 1 --reps 15
    python scripts/bench/profile_onnx.py --files a.onnx b.onnx  # any files (the first: baseline)

1. Raw session throughput: ``session.run`` on random 3 x H x W inputs at each batch size, the
   files interleaved run by run (a loaded machine slows them alike), medians of process CPU time
   and wall time per image; speed-up against the first file.
2. onnxruntime's own profile (``SessionOptions.enable_profiling``) of a few runs at the largest
   batch: kernel time per node type and per part of the detector (backbone, encoder, decoder,
   the deformable-attention function body...), read from the module scope torch.onnx records in
   each node's metadata (app/export/quantize.py `module_of`) and, for the nodes onnxruntime makes
   (fusions, layout changes), from the tensors they write (its optimized graph). Kernel times
   are wall times: each node counts its fastest run, which filters out the worst of what a shared
   machine's scheduler adds, not all of it (long kernels are interrupted in every run there):
   read the shares there, and trust the CPU times of step 1 over the kernel sums.

The files are the server's (app/export/: model folder, then --cache-dir, default the server's
cache); a missing INT8 file is made first, as `scripts/export_onnx.py --int8` does.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from app.config import DEFAULT_MODEL_NAME, REPO_MODELS_DIR  # noqa: E402

MSDA_BODY = "deformable attention (function body)"
# Names onnxruntime gives the nodes it makes (layout transforms, fusions, quantization) around
# an original name; what is left after removing them is a node or tensor name of the export.
_SUFFIXES = re.compile(
    r"(_nchwc|_token_\d+|/.*|_(De)?[Qq]uantizeLinear(_\d+)?|_output_\d+|_quantized)+$"
)
_INLINED = re.compile(r"^[A-Z][A-Za-z]+_\d+$")  # inlined function-body nodes: OpType_N


def session(
    path: Path, threads: int, profile_prefix: str | None = None, optimized: Path | None = None
) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as served
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if optimized is not None:  # the graph as it runs: fused nodes are named after no original
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def input_shape(sess: Any) -> tuple[int, int, int]:
    shape = next(i.shape for i in sess.get_inputs() if i.name == "pixel_values")
    return tuple(int(d) for d in shape[1:])  # type: ignore[return-value]


def throughput(
    files: list[Path], batches: list[int], threads: int, reps: int
) -> list[dict[str, Any]]:
    sessions = [session(f, threads) for f in files]
    chw = input_shape(sessions[0])
    rng = np.random.default_rng(0)
    rows = []
    for batch in batches:
        x = rng.standard_normal((batch, *chw)).astype(np.float32)
        cpu: list[list[float]] = [[] for _ in files]
        wall: list[list[float]] = [[] for _ in files]
        for s in sessions:
            s.run(None, {"pixel_values": x})
        for _ in range(reps):
            for i, s in enumerate(sessions):
                c0, w0 = time.process_time(), time.perf_counter()
                s.run(None, {"pixel_values": x})
                cpu[i].append((time.process_time() - c0) * 1e3 / batch)
                wall[i].append((time.perf_counter() - w0) * 1e3 / batch)
        base = statistics.median(cpu[0])
        for i, f in enumerate(files):
            row = {
                "file": str(f),
                "batch": batch,
                "threads": threads,
                "cpu_ms_per_image": statistics.median(cpu[i]),
                "wall_ms_per_image": statistics.median(wall[i]),
            }
            row["speedup_cpu"] = base / row["cpu_ms_per_image"]
            rows.append(row)
            print(
                f"batch {batch} threads {threads} {f.name:18s} CPU {row['cpu_ms_per_image']:6.2f} "
                f"ms/image  wall {row['wall_ms_per_image']:6.2f} ms/image  "
                f"speed-up (CPU) {row['speedup_cpu']:.2f}x",
                flush=True,
            )
    return rows


def module_names(path: Path) -> dict[str, str]:
    """Node and tensor names of the file -> the detector's part they were exported from."""
    import onnx

    from app.export.quantize import module_of

    model = onnx.load(str(path), load_external_data=False)
    parts: dict[str, str] = {}
    for node in model.graph.node:
        part = (
            "deformable attention (node)"
            if node.domain.startswith("detr_serve")
            else module_of(node) or "other"
        )
        parts[node.name] = part
        for out in node.output:
            parts.setdefault(out, part)
    return parts


def running_parts(optimized: Path, parts: dict[str, str]) -> dict[str, str]:
    """Node names of the graph onnxruntime runs -> part: a node keeps its export name, or is
    known by the tensors it writes (a fusion writes the fused nodes' last output), or by a name
    onnxruntime derived from an export name, or is a node of the inlined MSDA function body, or
    is known by the tensors it reads."""
    import onnx

    graph = onnx.load(str(optimized), load_external_data=False).graph
    found: dict[str, str] = {}
    for node in graph.node:
        candidates = [node.name, *node.output, _SUFFIXES.sub("", node.name)]
        candidates += [_SUFFIXES.sub("", o) for o in node.output]
        part = next((parts[c] for c in candidates if c in parts), None)
        if part is None and any(o.startswith("_inlfunc_") for o in node.output):
            part = MSDA_BODY
        if part is None:
            ins = [parts[i] for i in node.input if i in parts]
            ins += [
                parts[_SUFFIXES.sub("", i)] for i in node.input if _SUFFIXES.sub("", i) in parts
            ]
            part = ins[0] if ins else "other"
        if node.name:  # onnxruntime names the inlined function's nodes only when it runs them
            found[node.name] = part
    return found


def part_of(name: str, running: dict[str, str], parts: dict[str, str]) -> str:
    """The part a profiled node belongs to (its name in onnxruntime's profile)."""
    if name in running:
        return running[name]
    stripped = _SUFFIXES.sub("", name)
    if stripped in parts:
        return parts[stripped]
    return MSDA_BODY if _INLINED.match(name) else "other"


def profile(path: Path, batch: int, threads: int, runs: int) -> dict[str, dict[str, float]]:
    """Kernel ms per run by node type and by part of the detector, from onnxruntime's profile:
    each node's fastest of ``runs`` runs (its durations are wall times: on a shared machine a
    run is often descheduled mid-kernel; the minimum drops the worst of it), summed."""
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        sess = session(path, threads, str(Path(tmp) / "profile"), optimized)
        x = np.random.default_rng(1).standard_normal((batch, *input_shape(sess)))
        feed = {"pixel_values": x.astype(np.float32)}
        sess.run(None, feed)  # allocations; dropped below
        for _ in range(runs):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
        parts = module_names(path)
        running = running_parts(optimized, parts)
    durations: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
    op_type: dict[tuple[str, str], str] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            key = (e["name"].removesuffix("_kernel_time"), str(e["args"].get("node_index")))
            durations[key].append(e["dur"])
            op_type[key] = e["args"]["op_name"]
    by_op: collections.Counter[str] = collections.Counter()
    by_part: collections.Counter[str] = collections.Counter()
    for key, times in durations.items():
        fastest = min(times[1:] or times) / 1e3  # the first run's allocations are not counted
        by_op[op_type[key]] += fastest
        by_part[part_of(key[0], running, parts)] += fastest
    return {"by_op": dict(by_op.most_common()), "by_part": dict(by_part.most_common())}


def print_profile(name: str, prof: dict[str, dict[str, float]], top: int) -> None:
    total = sum(prof["by_op"].values())
    print(f"\n{name}: kernel time {total:.1f} ms per run (each node's fastest run)")
    print("  by part of the detector:")
    for key, ms in prof["by_part"].items():
        print(f"    {key:40s} {ms:8.2f} ms  {100 * ms / total:5.1f}%")
    print(f"  by node type (top {top}):")
    for key, ms in list(prof["by_op"].items())[:top]:
        print(f"    {key:40s} {ms:8.2f} ms  {100 * ms / total:5.1f}%")


def default_files(model: Path, cache_dir: Path | None) -> list[Path]:
    from app.config import Settings
    from app.engine.backend_choice import onnx_cache_dir
    from app.export.cache import find_export
    from scripts.export_onnx import main as export_main

    settings = Settings(model=model) if cache_dir is None else None
    cache = onnx_cache_dir(settings) if settings is not None else cache_dir
    assert cache is not None
    found = {p: find_export(model, cache, p) for p in ("float32", "int8")}
    if None in found.values():
        print(f"exporting {model} into {cache} (float32 and INT8) ...", flush=True)
        export_main([str(model), "--cache-dir", str(cache), "--int8"])
        found = {p: find_export(model, cache, p) for p in ("float32", "int8")}
    return [found[p].path for p in ("float32", "int8")]  # type: ignore[union-attr]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path, nargs="?", default=REPO_MODELS_DIR / DEFAULT_MODEL_NAME)
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: the server's")
    parser.add_argument("--files", type=Path, nargs="+", default=None, help="instead of MODEL's")
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (served: CPUs)")
    parser.add_argument("--reps", type=int, default=9, help="timed runs per file and batch")
    parser.add_argument("--profile-runs", type=int, default=3, help="0: no profile")
    parser.add_argument("--top", type=int, default=12, help="node types listed")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = parser.parse_args(argv)
    files = args.files or default_files(args.model.resolve(), args.cache_dir)
    batches = [int(b) for b in args.batches.split(",")]
    report: dict[str, Any] = {"throughput": throughput(files, batches, args.threads, args.reps)}
    if args.profile_runs:
        report["profile"] = {}
        for f in files:
            prof = profile(f, max(batches), args.threads, args.profile_runs)
            report["profile"][str(f)] = prof
            print_profile(f"{f.name} at batch {max(batches)}", prof, args.top)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
