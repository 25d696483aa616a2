"""Start-up: one loaded, tuned and warmed engine per device, from the settings.

On CUDA, with the torch backend: dtype auto is checked against float32 (app/engine/precision.py), a
CUDA graph is captured per batch bucket (app/backends/cuda_graphs.py) and batches are padded to
their bucket, JPEGs are decoded on the GPU (app/images/device.py). Elsewhere each of these is
skipped with a log line saying why. Every bucket is warmed before /readyz turns 200.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import torch

from app.backends.cuda_graphs import CudaGraphBackend
from app.backends.torch_backend import TorchBackend, resolve_device
from app.config import Settings
from app.engine.backend_choice import BackendChoice, choose_backend
from app.engine.buckets import BatchBuckets
from app.engine.pipeline import BucketMode, Engine
from app.engine.precision import check_tasks, choose_precision
from app.engine.processing import FixedSize, PreprocessSpec
from app.images.device import choose_jpeg_decoder
from app.process.cpus import available_cpus

logger = logging.getLogger(__name__)

# Where a model's input size varies with the image: the size RT-DETRs are trained at.
_FALLBACK_CHECK_SIZE = (640, 640)


def build_engines(settings: Settings) -> list[Engine]:
    """One engine per device of the settings, in order. Devices start one after the other:
    start-up time grows with their number (see README, GPU fast path)."""
    # The model's intra-op threads (torch's, and onnxruntime's, which reuses the count): the
    # CPUs this process may use, container quota included, rather than torch's default (the
    # host's physical cores, which a CPU-limited container would oversubscribe).
    torch.set_num_threads(settings.torch_threads or available_cpus())
    if settings.compile_cache_dir is not None:
        use_compile_cache(settings.compile_cache_dir)
    return [build_engine(settings, device) for device in settings.device_list]


def use_compile_cache(directory: os.PathLike[str] | str) -> None:
    """Point inductor's and Triton's on-disk caches at `directory` (they read these variables
    when they first compile, which is after this)."""
    root = os.fspath(directory)
    os.makedirs(root, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(root, "inductor")
    os.environ["TRITON_CACHE_DIR"] = os.path.join(root, "triton")


def build_engine(settings: Settings, device: str) -> Engine:
    started = time.perf_counter()
    dev = resolve_device(device)
    s = settings
    choice = choose_backend(s, dev.type)
    logger.info("backend %s: %s", choice.backend, choice.reason)

    def load(dtype: str) -> Engine:
        return Engine.load(
            s.model,
            name=s.served_model_name,
            device=device,
            dtype=dtype,
            backend=choice.backend,
            msda_kernel=s.msda_kernel,
            onnx_path=choice.onnx_path,
            onnx_spinning=s.onnx_spinning,
        )

    if choice.backend == "onnx" and s.backend == "auto":
        try:
            engine = load(s.dtype)
        except Exception as exc:  # a file onnxruntime refuses: still a live server
            logger.warning(
                "backend auto: onnxruntime could not load %s (%s): torch instead",
                choice.onnx_path,
                exc,
                exc_info=exc,
            )
            choice = BackendChoice("torch", f"auto: torch, since onnxruntime failed: {exc}")
            return _finish(s, dev, load(s.dtype), choice, started)
        return _finish(s, dev, engine, choice, started)
    if dev.type == "cuda" and choice.backend == "torch" and s.dtype == "auto":
        try:
            tasks = check_tasks()
        except FileNotFoundError as exc:  # an installation without the repository's examples/
            logger.warning("dtype auto: %s; serving in float32", exc)
            engine = load("float32")
        else:
            engine = choose_precision(load, tasks, _check_size(s.model))
            torch.cuda.empty_cache()  # the float32 model used for the check is gone
    else:
        engine = load(s.dtype)
    return _finish(s, dev, engine, choice, started)


def _finish(
    s: Settings, dev: torch.device, engine: Engine, choice: BackendChoice, started: float
) -> Engine:
    """Buckets, CUDA graphs, the JPEG decoder and the warm-up of a loaded engine."""
    engine.info = dataclasses.replace(
        engine.info,
        backend_reason=choice.reason,
        dtype="int8" if choice.int8 else engine.info.dtype,
    )
    buckets = BatchBuckets.from_setting(s.batch_buckets, s.max_batch_size)
    graphs: CudaGraphBackend | None = None
    if s.cuda_graphs:
        graphs, why_not = capture_graphs(engine, buckets, compile_model=s.torch_compile)
    else:
        why_not = "cuda_graphs is off"
        if s.torch_compile:
            logger.info("torch_compile is ignored: it applies under CUDA graphs (--cuda-graphs)")
    if graphs is not None:
        engine.backend = graphs
        buckets = buckets.with_padding(True)
        modes = tuple(
            BucketMode(str(dev), b.batch_size, b.cuda_graph, b.reason)
            for b in graphs.bucket_states()
        )
    else:
        modes = tuple(BucketMode(str(dev), size, False, why_not) for size in buckets.sizes)
    engine.info = dataclasses.replace(engine.info, buckets=modes)
    engine.buckets = buckets
    engine.jpeg_decoder = choose_jpeg_decoder(
        s.image_decoder, engine.backend.device, devices_in_use=len(s.device_list)
    )
    engine.warmup(warmup_sizes(buckets, engine.backend.device))
    logger.info(
        "engine on %s ready in %.1f s: %s, buckets %s%s, JPEG decoding %s",
        engine.backend.device,
        time.perf_counter() - started,
        engine.info.dtype,
        ",".join(map(str, buckets.sizes)),
        " (padded, CUDA graphs)" if buckets.pad else f" (eager: {why_not})",
        "nvjpeg" if engine.jpeg_decoder is not None else "Pillow",
    )
    return engine


def _check_size(model_dir: Path) -> tuple[int, int]:
    """(height, width) the precision check's pixel tolerances refer to: the model's input."""
    return fixed_input_size(PreprocessSpec.for_model(model_dir)) or _FALLBACK_CHECK_SIZE


def capture_graphs(
    engine: Engine, buckets: BatchBuckets, *, compile_model: bool = False
) -> tuple[CudaGraphBackend | None, str]:
    """The engine's backend wrapped with a graph per bucket, or None and the reason (logged)
    where graphs do not apply or capture failed."""
    device = engine.backend.device
    if device.type != "cuda":
        why = f"CUDA graphs need a CUDA device, not {device}"
        logger.info("cuda_graphs is ignored: %s", why)
        return None, why
    if not isinstance(engine.backend, TorchBackend):
        why = f"CUDA graphs apply to the torch backend, not {engine.backend.name}"
        logger.info("cuda_graphs is ignored: %s", why)
        return None, why
    size = fixed_input_size(engine.preprocessor.spec)
    if size is None:
        why = (
            "the model's input size varies with the image (its preprocessor_config.json has "
            "no fixed size)"
        )
        logger.info("cuda_graphs is ignored: %s", why)
        return None, why
    torch.backends.cudnn.benchmark = True  # fixed shapes: autotuning pays once per bucket
    graphs = CudaGraphBackend(engine.backend, compile_model=compile_model)
    if graphs.capture(buckets.sizes, *size, with_mask=engine.preprocessor.spec.do_pad):
        return graphs, ""
    reason = graphs.bucket_states()[0].reason
    return None, reason


def fixed_input_size(spec: PreprocessSpec) -> tuple[int, int] | None:
    """(height, width) of every pixel_values the preprocessor makes, when it is one size."""
    if spec.do_pad and spec.pad_size is not None:
        return spec.pad_size
    if isinstance(spec.resize, FixedSize):
        return spec.resize.height, spec.resize.width
    return None


def warmup_sizes(buckets: BatchBuckets, device: torch.device) -> list[int]:
    """Every bucket on CUDA (kernels, autotuning and memory differ by shape); on the CPU, where
    nothing is tuned per shape, the smallest and the largest batch."""
    if device.type == "cuda":
        return list(buckets.sizes)
    return sorted({buckets.sizes[0], buckets.sizes[-1]})
