"""scripts/bench/bench.py's raw pass: the backend it times is the one asked for, resolved as a
server resolves it (issue 14: tiles/s compared with the raw pass of the backend the server runs)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from scripts.bench.bench import bench_raw
from tests.conftest import shapes_image


@pytest.mark.parametrize(
    ("backend", "runs"),
    [
        ("torch", "torch"),
        pytest.param(
            "auto",
            "onnx",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("onnxruntime") is None, reason="no onnxruntime"
            ),
        ),
    ],
)
def test_raw_pass_times_the_backend_a_server_would_run(tiny_model_dir, backend, runs):
    threads = torch.get_num_threads()
    try:
        rows = bench_raw(
            tiny_model_dir, "cpu", 2, 0.05, shapes_image(64, 64), backend=backend, sizes=[2]
        )
    finally:
        torch.set_num_threads(threads)
    assert [(r["batch"], r["backend"]) for r in rows] == [(2, runs)]
    assert rows[0]["forward_img_s"] > 0 and rows[0]["engine_img_s"] > 0
    assert rows[0]["forward_cpu_ms_per_image"] > 0
