"""Whether CUDA graphs serve each bucket is visible: /v1/models lists every bucket (graph, or
eager and why) and /metrics has a gauge per bucket."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import httpx

from app.engine.pipeline import Engine
from app.engine.tasks import BucketMode
from app.main import create_app
from tests.api.conftest import make_settings


async def test_models_and_metrics_say_per_bucket_whether_graphs_serve(tiny_model_dir: Path) -> None:
    settings = make_settings(tiny_model_dir)
    engine = Engine.load(settings.model, name="tiny", device="cpu")
    why = "capture failed at batch 8: NotCapturableError: the forward pass reads device values"
    engine.info = dataclasses.replace(
        engine.info,
        buckets=(BucketMode("cuda:0", 1, True), BucketMode("cuda:0", 8, False, why)),
    )
    app = create_app(settings, engine=engine)
    lifespan = app.router.lifespan_context(app)
    await lifespan.__aenter__()
    try:
        await app.state.runtime.wait_ready()
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            models = (await client.get("/v1/models")).json()["models"]
            metrics = (await client.get("/metrics")).text
    finally:
        await lifespan.__aexit__(None, None, None)
    assert models[0]["buckets"] == [
        {"device": "cuda:0", "batch_size": 1, "cuda_graph": True, "reason": ""},
        {"device": "cuda:0", "batch_size": 8, "cuda_graph": False, "reason": why},
    ]
    assert 'detr_serve_cuda_graph_in_use{batch_size="1",device="cuda:0"} 1.0' in metrics
    assert 'detr_serve_cuda_graph_in_use{batch_size="8",device="cuda:0"} 0.0' in metrics
