"""Tiled throughput of the engine alone (no HTTP): tiles/s, CPU time per tile and how busy the
forward pass is, for batches-in-flight settings alternated in one process on one engine, so that
a shared machine's load falls on every setting alike (issue 14: tiles/s against the raw pass).

    python scripts/bench/bench_tiles.py                      # backend auto (onnxruntime on the CPU)
    python scripts/bench/bench_tiles.py --backend torch --rounds 4 --crop 1280x1024
    python scripts/bench/bench_tiles.py --decode --rounds 12 # the front end's side: see below

Each round runs, per setting, `--requests` tiled requests of the example 4K image cropped to
`--crop`, `--concurrency` in flight, through EngineHost.submit (the engine process's path). The
settings: `1` one batch in flight, `2` two, `default` what the server picks (2 with a full
second batch under onnxruntime on the CPU, 1 with torch). "forward busy" is the time inside
the backend's forward over the wall time: what the engine leaves idle between passes.

--decode measures the front end's side instead (no model): a 3840x2160 and a 4000x3000 scene
decoded at full size by two decode workers at once, their pixels either written by the workers
straight into a shared-memory arena (what the server does for tiled images) or sent back
through pebble's pipe and copied into the arena by the front end (as before), the two ways
alternated; CPU time of the front end and of the workers per pair of images.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from app.config import DEFAULT_MODEL_NAME, REPO_MODELS_DIR, Settings  # noqa: E402

EXAMPLE = ROOT / "examples" / "highres" / "shapes-3840x2160.jpg"


def _cpu_s() -> float:
    times = os.times()
    return times.user + times.system


async def bench_tiles(
    model: Path,
    backend: str,
    settings: list[str],
    pixels: np.ndarray,
    *,
    rounds: int = 3,
    requests: int = 6,
    concurrency: int = 2,
    tile_size: int | None = None,
) -> dict[str, dict[str, float]]:
    """{setting: {tiles, tiles_per_s, cpu_ms_per_tile, forward_busy}} over every round."""
    from app.engine.build import build_engines
    from app.engine.tasks import DetectionTask
    from app.metrics import Metrics
    from app.process.engine_host import EngineHost
    from app.tile_geometry import TileSpec

    base = Settings(model=model, backend=backend, max_queue_size=1024, tiling_max_tiles=1024)
    engine = build_engines(base)[0]
    spans: list[float] = []
    forward = engine.backend.infer

    def timed_infer(*args):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        try:
            return forward(*args)
        finally:
            spans.append(time.perf_counter() - started)

    engine.backend.infer = timed_infer  # type: ignore[method-assign]
    hosts = {}
    for name in settings:
        value = None if name == "default" else int(name)
        host = EngineHost(base.model_copy(update={"batches_in_flight": value}), Metrics(), engine)
        await host.load()
        hosts[name] = host
    side = tile_size or engine.preprocessor.spec.output_size(10**4, 10**4)[0]
    task = DetectionTask(pixels, 0.3, 100, tiling=TileSpec(tile_size=min(side, 4096)))
    totals = {name: [0, 0.0, 0.0, 0.0] for name in settings}
    per_client = max(1, requests // concurrency)

    async def client(host: EngineHost) -> int:
        tiles = 0
        for _ in range(per_client):
            (out,) = await host.submit([task], time.monotonic() + 3600)
            tiles += out.tiles
        return tiles

    for _ in range(rounds):
        for name, host in hosts.items():
            spans.clear()
            wall, cpu = time.perf_counter(), _cpu_s()
            tiles = sum(await asyncio.gather(*(client(host) for _ in range(concurrency))))
            total = totals[name]
            total[0] += tiles
            total[1] += time.perf_counter() - wall
            total[2] += _cpu_s() - cpu
            total[3] += sum(spans)
    for host in hosts.values():
        await host.stop(5)
    return {
        name: {
            "tiles": tiles,
            "tiles_per_s": tiles / wall,
            "cpu_ms_per_tile": cpu / tiles * 1e3,
            "forward_busy": busy / wall,
        }
        for name, (tiles, wall, cpu, busy) in totals.items()
    }


def bench_decode(rounds: int, jpegs: list[bytes] | None = None) -> dict[str, dict[str, float]]:
    """{way: {front_end_ms, workers_ms, total_ms}} of CPU per set of images decoded at once
    (default: a 3840x2160 and a 4000x3000 scene of the high-resolution evaluation)."""
    import io

    import psutil
    from PIL import Image

    from app.images.pool import DecodePool, Into
    from app.ipc.wire import ArenaAllocator, ArenaRef, create_arena
    from scripts.training import synthetic_shapes as shapes

    if jpegs is None:
        jpegs = [shapes.generate_highres(shapes.HIGHRES_SEED, i).jpeg for i in range(2)]
    sizes = [Image.open(io.BytesIO(data)).size for data in jpegs]
    size = 128 << 20
    arena = create_arena(size, unlink=True)
    ref, allocator = ArenaRef.of(arena), ArenaAllocator(size)
    pool = DecodePool(2)
    pool.wait_started()
    me = psutil.Process()

    def workers_cpu() -> dict[int, float]:
        """CPU seconds of each child process now (the decode workers, and whatever else the
        caller runs: a test suite's servers come and go meanwhile)."""
        seconds = {}
        for child in me.children():
            try:
                seconds[child.pid] = sum(child.cpu_times()[:2])
            except psutil.Error:  # gone since it was listed
                pass
        return seconds

    def workers_since(before: dict[int, float]) -> float:
        """CPU seconds the children alive both then and now used since `before`."""
        now = workers_cpu()
        return sum(now[pid] - before[pid] for pid in now.keys() & before.keys())

    async def one(data: bytes, width: int, height: int, into_arena: bool) -> None:
        nbytes = height * width * 3
        offset = allocator.allocate(nbytes)
        assert offset is not None
        into = Into(ref, offset, height, width) if into_arena else None
        pixels = await pool.decode(
            data,
            max_pixels=10**9,
            index=0,
            target=None,
            resample=2,
            timeout_s=600,
            into=into,
        )
        if pixels is not None:  # the way before: the front end copies them into the arena
            view = np.ndarray(pixels.shape, np.uint8, buffer=arena.buf, offset=offset)
            np.copyto(view, pixels)
        allocator.release(offset, nbytes)

    totals = {"into the arena": [0.0, 0.0], "back through the pipe": [0.0, 0.0]}

    async def each_once(into_arena: bool) -> None:
        images = zip(jpegs, sizes, strict=True)
        await asyncio.gather(*(one(data, w, h, into_arena) for data, (w, h) in images))

    async def run() -> None:
        for way in totals:  # untimed: every mapping's first touch of the arena's pages
            await each_once(way == "into the arena")
        for r in range(rounds):
            ways = list(totals) if r % 2 == 0 else list(totals)[::-1]
            for way in ways:
                front, workers = _cpu_s(), workers_cpu()
                await each_once(way == "into the arena")
                totals[way][0] += _cpu_s() - front
                totals[way][1] += workers_since(workers)

    try:
        asyncio.run(run())
    finally:
        pool.close()
        arena.close()
    return {
        way: {
            "front_end_ms": front / rounds * 1e3,
            "workers_ms": workers / rounds * 1e3,
            "total_ms": (front + workers) / rounds * 1e3,
        }
        for way, (front, workers) in totals.items()
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=REPO_MODELS_DIR / DEFAULT_MODEL_NAME)
    parser.add_argument("--backend", choices=("auto", "onnx", "torch"), default="auto")
    parser.add_argument("--settings", default="1,default", help="batches in flight to compare")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=6, help="tiled requests per round")
    parser.add_argument("--concurrency", type=int, default=2, help="requests in flight")
    parser.add_argument("--crop", default="1280x1024", help="WxH of the example used, or full")
    parser.add_argument("--image", type=Path, default=EXAMPLE)
    parser.add_argument("--out", type=Path, help="write the figures as JSON")
    parser.add_argument(
        "--decode", action="store_true", help="the front end's decode hand-over (see above)"
    )
    args = parser.parse_args(argv)
    report: dict[str, dict[str, float]]
    if args.decode:
        report = bench_decode(args.rounds)
        lines = [
            f"{way:>22}: front end {row['front_end_ms']:6.1f} ms, decode workers "
            f"{row['workers_ms']:6.1f} ms, total {row['total_ms']:6.1f} ms CPU per pair"
            for way, row in report.items()
        ]
    else:
        from PIL import Image

        pixels = np.array(Image.open(args.image).convert("RGB"))
        if args.crop != "full":
            width, height = (int(v) for v in args.crop.split("x"))
            pixels = np.ascontiguousarray(pixels[:height, :width])
        report = asyncio.run(
            bench_tiles(
                args.model,
                args.backend,
                args.settings.split(","),
                pixels,
                rounds=args.rounds,
                requests=args.requests,
                concurrency=args.concurrency,
            )
        )
        lines = [
            f"batches in flight {name:>7}: {row['tiles_per_s']:6.1f} tiles/s  "
            f"{row['cpu_ms_per_tile']:5.1f} ms CPU/tile  forward busy {row['forward_busy']:.1%}"
            for name, row in report.items()
        ]
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
