"""scripts/bench/bench_tiles.py, the README's engine-only tiled A/B: it runs every setting through
the engine host's tiled path and accounts for the tiles it ran."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scripts.bench.bench_tiles import bench_tiles


async def test_bench_tiles_runs_each_setting_on_every_tile(tiny_model_dir) -> None:
    pixels = np.random.default_rng(0).integers(0, 255, (160, 160, 3), dtype=np.uint8)
    threads = torch.get_num_threads()
    try:
        report = await bench_tiles(
            tiny_model_dir, "torch", ["1", "default"], pixels, rounds=1, requests=2, tile_size=64
        )
    finally:
        torch.set_num_threads(threads)
    assert set(report) == {"1", "default"}
    for row in report.values():
        assert row["tiles"] == 2 * 9  # 3 x 3 tiles of 64 px (step 52) per request
        assert row["tiles_per_s"] > 0 and row["cpu_ms_per_tile"] > 0
        assert 0 < row["forward_busy"] <= 1


def test_bench_decode_times_both_hand_overs_of_the_decoded_pixels() -> None:
    from scripts.bench.bench_tiles import bench_decode
    from tests.conftest import shapes_image

    report = bench_decode(rounds=1, jpegs=[shapes_image(1600, 1200), shapes_image(1200, 900)])
    assert set(report) == {"into the arena", "back through the pipe"}
    for row in report.values():
        assert row["workers_ms"] >= 0 and row["front_end_ms"] >= 0
        # (front + workers) / rounds * 1e3 against the two rounded apart: equal up to rounding
        assert row["total_ms"] == pytest.approx(row["front_end_ms"] + row["workers_ms"])
