"""Start-up: one loaded, tuned and warmed engine per device, from the settings.

`resolve_engine` settles everything an engine is made of (an `EngineSpec`), then `build_engine`
constructs the Engine once from it and warms it. On CUDA, with the torch backend: dtype auto is
checked against float32 (app/engine/precision.py), a CUDA graph is captured per batch bucket
(app/backends/cuda_graphs.py) and batches are padded to their bucket, JPEGs are decoded on the
GPU (app/images/device.py). Elsewhere each of these is skipped with a log line saying why. The
warm-up runs before /readyz turns 200: every bucket on CUDA, the smallest and the largest on
the CPU (`warmup_sizes`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from app.backends.base import Backend
from app.backends.cuda_graphs import CudaGraphBackend
from app.backends.torch_backend import TorchBackend, resolve_device
from app.config import Settings
from app.engine.backend_choice import BackendChoice, choose_backend
from app.engine.buckets import BatchBuckets
from app.engine.pipeline import Engine
from app.engine.postprocess import Postprocessor
from app.engine.precision import check_tasks, choose_precision
from app.engine.preprocess import Preprocessor
from app.engine.preprocess_spec import FixedSize, PreprocessSpec
from app.engine.tasks import BucketMode, ModelInfo
from app.images.device import ImageDecoder, choose_decoder
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


@dataclass(frozen=True)
class EngineSpec:
    """One device's engine, complete, before it is constructed: the model loaded in its checked
    precision, wrapped in CUDA graphs where they apply, its buckets, its image decoder and the
    warm-up. `build_engine` resolves it from the settings, then constructs the Engine once."""

    device: torch.device
    backend: Backend  # the model, under a CUDA graph per bucket where graphs apply
    preprocessor: Preprocessor
    postprocessor: Postprocessor
    info: ModelInfo  # dtype, the backend's reason and every bucket's mode included
    buckets: BatchBuckets  # padded to the bucket under CUDA graphs
    decoder: ImageDecoder
    warmup: tuple[int, ...]  # batch sizes run once before /readyz turns 200
    eager_reason: str  # why batches run without CUDA graphs ("" under graphs)


def build_engine(settings: Settings, device: str) -> Engine:
    started = time.perf_counter()
    spec = resolve_engine(settings, device)
    engine = Engine(
        spec.backend,
        spec.preprocessor,
        spec.postprocessor,
        spec.info,
        buckets=spec.buckets,
        decoder=spec.decoder,
    )
    engine.warmup(spec.warmup)
    logger.info(
        "engine on %s ready in %.1f s: %s, buckets %s%s, JPEG decoding %s",
        spec.device,
        time.perf_counter() - started,
        spec.info.dtype,
        ",".join(map(str, spec.buckets.sizes)),
        " (padded, CUDA graphs)" if spec.buckets.pad else f" (eager: {spec.eager_reason})",
        spec.decoder.name,
    )
    return engine


def resolve_engine(settings: Settings, device: str) -> EngineSpec:
    """Load the model (the backend chosen, its fallback, dtype auto's check), capture its CUDA
    graphs, choose the JPEG decoder: everything the device's Engine is constructed from."""
    s = settings
    device_type = resolve_device(device).type
    choice = choose_backend(s, device_type)
    logger.info("backend %s: %s", choice.backend, choice.reason)
    check_dtype = device_type == "cuda" and s.dtype == "auto"
    model, choice = _load_model(s, device, choice, check_dtype=check_dtype)
    dev = model.backend.device
    info = dataclasses.replace(
        model.info,
        backend_reason=choice.reason,
        dtype="int8" if choice.int8 else model.info.dtype,
    )
    buckets = BatchBuckets.from_setting(s.batch_buckets, s.max_batch_size)
    backend: Backend = model.backend
    graphs: CudaGraphBackend | None = None
    if s.cuda_graphs:
        graphs, why_not = capture_graphs(
            model.backend, model.preprocessor.spec, buckets, compile_model=s.torch_compile
        )
    else:
        why_not = "cuda_graphs is off"
        if s.torch_compile:
            logger.info("torch_compile is ignored: it applies under CUDA graphs (--cuda-graphs)")
    if graphs is not None:
        backend = graphs
        buckets = buckets.with_padding(True)
        modes = tuple(
            BucketMode(str(dev), b.batch_size, b.cuda_graph, b.reason)
            for b in graphs.bucket_states()
        )
    else:
        modes = tuple(BucketMode(str(dev), size, False, why_not) for size in buckets.sizes)
    return EngineSpec(
        device=dev,
        backend=backend,
        preprocessor=model.preprocessor,
        postprocessor=model.postprocessor,
        info=dataclasses.replace(info, buckets=modes),
        buckets=buckets,
        decoder=choose_decoder(s.image_decoder, dev, devices_in_use=len(s.device_list)),
        warmup=tuple(warmup_sizes(buckets, dev)),
        eager_reason=why_not,
    )


def _load_model(
    s: Settings, device: str, choice: BackendChoice, *, check_dtype: bool
) -> tuple[Engine, BackendChoice]:
    """The model in its dtype, as a plain engine (Pillow, no buckets: what the precision check
    runs; resolve_engine takes its parts), and the backend choice after onnxruntime's fallback.
    check_dtype: dtype auto on CUDA, decided by the precision check with torch."""

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
            return load(s.dtype), choice
        except Exception as exc:  # a file onnxruntime refuses: still a live server
            logger.warning(
                "backend auto: onnxruntime could not load %s (%s): torch instead",
                choice.onnx_path,
                exc,
                exc_info=exc,
            )
            choice = BackendChoice("torch", f"auto: torch, since onnxruntime failed: {exc}")
            return load(s.dtype), choice
    if check_dtype and choice.backend == "torch":
        try:
            tasks = check_tasks()
        except FileNotFoundError as exc:  # an installation without the repository's examples/
            logger.warning("dtype auto: %s; serving in float32", exc)
            return load("float32"), choice
        model = choose_precision(load, tasks, _check_size(s.model))
        torch.cuda.empty_cache()  # the float32 model used for the check is gone
        return model, choice
    return load(s.dtype), choice


def _check_size(model_dir: Path) -> tuple[int, int]:
    """(height, width) the precision check's pixel tolerances refer to: the model's input."""
    return fixed_input_size(PreprocessSpec.for_model(model_dir)) or _FALLBACK_CHECK_SIZE


def capture_graphs(
    backend: Backend,
    spec: PreprocessSpec,
    buckets: BatchBuckets,
    *,
    compile_model: bool = False,
) -> tuple[CudaGraphBackend | None, str]:
    """The backend wrapped with a graph per bucket, or None and the reason (logged) where
    graphs do not apply or capture failed."""
    device = backend.device
    if device.type != "cuda":
        why = f"CUDA graphs need a CUDA device, not {device}"
        logger.info("cuda_graphs is ignored: %s", why)
        return None, why
    if not isinstance(backend, TorchBackend):
        why = f"CUDA graphs apply to the torch backend, not {backend.name}"
        logger.info("cuda_graphs is ignored: %s", why)
        return None, why
    size = fixed_input_size(spec)
    if size is None:
        why = (
            "the model's input size varies with the image (its preprocessor_config.json has "
            "no fixed size)"
        )
        logger.info("cuda_graphs is ignored: %s", why)
        return None, why
    torch.backends.cudnn.benchmark = True  # fixed shapes: autotuning pays once per bucket
    graphs = CudaGraphBackend(backend, compile_model=compile_model)
    if graphs.capture(buckets.sizes, *size, with_mask=spec.do_pad):
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
