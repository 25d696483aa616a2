"""Start-up on the CPU: the GPU-only steps are skipped with a log line, buckets and warm-up sizes
follow the settings, and misconfigurations fail with a message."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from app.backends.base import RawOutputs
from app.backends.cuda_graphs import CudaGraphBackend
from app.config import Settings
from app.engine.buckets import BatchBuckets
from app.engine.build import build_engine, fixed_input_size, use_compile_cache, warmup_sizes
from app.engine.preprocess_spec import FixedSize, PreprocessSpec, ShortestEdge
from app.images.device import PillowDecoder


def test_on_the_cpu_graphs_are_skipped_with_a_log_and_batches_are_not_padded(
    tiny_model_dir: Path, caplog
) -> None:
    caplog.set_level(logging.INFO)
    settings = Settings(model=tiny_model_dir, device="cpu", max_batch_size=4, cuda_graphs=True)
    engine = build_engine(settings, "cpu")
    assert "cuda_graphs is ignored: CUDA graphs need a CUDA device, not cpu" in caplog.text
    assert "JPEGs are decoded with Pillow on the CPU" in caplog.text
    assert engine.buckets == BatchBuckets((1, 2, 4), pad=False)
    # Every bucket says it runs eagerly, and why (for /v1/models and the metrics).
    assert [(b.batch_size, b.cuda_graph) for b in engine.info.buckets] == [
        (1, False),
        (2, False),
        (4, False),
    ]
    assert all(b.reason == "CUDA graphs need a CUDA device, not cpu" for b in engine.info.buckets)
    assert engine.decoder.name == "Pillow" and not engine.jpeg_on_device
    assert engine.info.dtype == "float32"
    assert "warm-up 2/2 on cpu: batch 4" in caplog.text


def test_nvjpeg_asked_for_on_the_cpu_stops_the_start_up(tiny_model_dir: Path) -> None:
    # device auto finds no CUDA here: only the engine's start-up can tell (device cpu is
    # refused by the settings already).
    settings = Settings(model=tiny_model_dir, device="auto", image_decoder="nvjpeg")
    with pytest.raises(RuntimeError, match="nvjpeg cannot be honoured"):
        build_engine(settings, "cpu")


def test_every_bucket_is_warmed_on_cuda_and_the_ends_on_the_cpu() -> None:
    buckets = BatchBuckets((1, 2, 4, 8))
    assert warmup_sizes(buckets, torch.device("cuda")) == [1, 2, 4, 8]
    assert warmup_sizes(buckets, torch.device("cpu")) == [1, 8]


def test_graphs_apply_only_to_models_with_one_input_size() -> None:
    assert fixed_input_size(PreprocessSpec(FixedSize(640, 640))) == (640, 640)
    padded = PreprocessSpec(ShortestEdge(800, 1333), do_pad=True, pad_size=(1333, 1333))
    assert fixed_input_size(padded) == (1333, 1333)
    assert fixed_input_size(PreprocessSpec(ShortestEdge(800, 1333), do_pad=True)) is None


def test_compile_caches_go_under_the_configured_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    use_compile_cache(tmp_path / "cache")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "cache" / "triton")


class EchoBackend:
    name, device, dtype = "echo", torch.device("cpu"), torch.float32

    def infer(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None) -> RawOutputs:
        return RawOutputs(pixel_values[:, :1, 0, :3], pixel_values[:, :1, 0, :4])


def test_graph_backend_runs_shapes_without_a_graph_eagerly_and_refuses_the_cpu() -> None:
    graphs = CudaGraphBackend(EchoBackend())
    x = torch.rand(2, 3, 4, 4)
    assert torch.equal(graphs.infer(x, None).logits, x[:, :1, 0, :3])
    assert graphs.captured_batch_sizes == []
    with pytest.raises(ValueError, match="need a CUDA device"):
        graphs.capture([1, 2], 4, 4, with_mask=False)


def test_the_jpeg_decoder_is_chosen_knowing_how_many_devices_serve(
    tiny_model_dir: Path, monkeypatch
) -> None:
    import app.engine.build as build

    asked: list[int] = []

    def choose(setting, device, devices_in_use=1):
        asked.append(devices_in_use)
        return PillowDecoder(device)

    monkeypatch.setattr(build, "choose_decoder", choose)
    settings = Settings(model=tiny_model_dir, devices="0,1", max_batch_size=2)
    build_engine(settings, "cpu")  # one of the two engines, here on the CPU
    assert asked == [2]


def test_the_served_engine_is_constructed_once_and_never_reassigned(
    tiny_model_dir: Path, monkeypatch
) -> None:
    import app.engine.build as build
    from app.engine.pipeline import Engine

    built: list[Engine] = []

    class Sealed(Engine):
        """An Engine that refuses any attribute set after its constructor returned."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            built.append(self)
            self._sealed = True

        def __setattr__(self, name: str, value: object) -> None:
            if getattr(self, "_sealed", False):
                raise AssertionError(f"Engine.{name} reassigned after construction")
            super().__setattr__(name, value)

    monkeypatch.setattr(build, "Engine", Sealed)
    settings = Settings(model=tiny_model_dir, device="cpu", max_batch_size=4, batch_buckets="2")
    engine = build_engine(settings, "cpu")
    # The plain engine the model was loaded as, then the served one, built from its spec.
    assert len(built) == 2 and engine is built[-1]
    spec = build.resolve_engine(settings, "cpu")
    assert engine.buckets == spec.buckets == BatchBuckets((2, 4), pad=False)
    assert engine.decoder.name == spec.decoder.name == "Pillow"
    assert engine.info.buckets == spec.info.buckets and spec.warmup == (2, 4)
