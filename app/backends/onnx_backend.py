"""ONNX Runtime backend: an exported model (app/export/: MODEL_DIR/model.onnx, or the cache's
export that app/engine/backend_choice.py found or made; model.int8.onnx for --precision int8).

Execution providers are taken from what the installed onnxruntime offers, best first:
TensorRT, CUDA, CPU. Deformable attention is the custom node
``detr_serve::MultiscaleDeformableAttnPlugin_TRT``; onnxruntime runs its function body (standard
ops) unless a provider claims the node.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.backends.base import RawOutputs
from app.backends.torch_backend import resolve_device

logger = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
WEIGHTS_FILE = "model.safetensors"
META_WEIGHTS_SHA256 = "detr_serve.weights_sha256"  # written by scripts/export_onnx.py
PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_GPU_PROVIDERS = frozenset(PROVIDER_ORDER[:2])
_ORT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16}
_NUMPY_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


class OnnxModelMissingError(FileNotFoundError):
    """The model folder has no model.onnx: it must be exported first."""


def choose_providers(available: list[str], device: str) -> list[str]:
    """Providers to ask for, best first, from those installed; ``device`` cpu keeps to the CPU."""
    wanted = ["CPUExecutionProvider"] if device == "cpu" else list(PROVIDER_ORDER)
    chosen = [p for p in wanted if p in available]
    if device.startswith("cuda") and not _GPU_PROVIDERS.intersection(chosen):
        raise RuntimeError(
            f"device {device!r} was asked for but onnxruntime offers only {available}: "
            "install onnxruntime-gpu (pip install -e '.[gpu]') or use --device cpu"
        )
    if not chosen:
        raise RuntimeError(f"onnxruntime offers no usable execution provider: {available}")
    return chosen


class OnnxBackend:
    name = "onnx"

    def __init__(
        self,
        session: Any,
        device: torch.device,
        dtype: torch.dtype,
        spinning_for_tiles: Callable[[], Any] | None = None,
    ) -> None:
        """`spinning_for_tiles`: makes the session that runs batches of tiles (infer_tiles);
        None: `session` runs them too."""
        self.session = session
        self._make_tiles_session = spinning_for_tiles
        self._tiles_session: Any = None
        self._tiles_lock = threading.Lock()
        self.device = device
        self.dtype = dtype
        self.providers: list[str] = session.get_providers()
        self._input_names = {i.name for i in session.get_inputs()}
        self._outputs = {o.name: o for o in session.get_outputs()}
        missing = ({"pixel_values"} - self._input_names) | (
            {"logits", "pred_boxes"} - set(self._outputs)
        )
        if missing:
            raise ValueError(
                f"model.onnx lacks {sorted(missing)}: re-export it with scripts/export_onnx.py"
            )

    @classmethod
    def load(
        cls,
        model_dir: Path,
        device: str = "auto",
        dtype: str = "auto",
        threads: int | None = None,
        path: Path | None = None,
        spinning: bool = False,
    ) -> OnnxBackend:
        """``path``: the ONNX file (default MODEL_DIR/model.onnx; app/engine/backend_choice.py
        passes the up-to-date export it found or made)."""
        path = Path(path) if path is not None else Path(model_dir) / ONNX_FILE
        if not path.is_file():
            raise OnnxModelMissingError(
                f"{path} not found: --backend onnx serves an exported model; run "
                f"`python scripts/export_onnx.py {model_dir}` first, or serve with --backend torch"
            )
        try:
            import onnxruntime as ort
        except ImportError:
            raise RuntimeError(
                "--backend onnx needs onnxruntime: pip install -e '.[onnx]' "
                "(or '.[gpu]' for onnxruntime-gpu)"
            ) from None
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        providers = choose_providers(ort.get_available_providers(), device)

        def make_session(spin: bool) -> Any:
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            # One knob for both backends: --torch-threads sets torch's count
            # (app/engine/build.py: default the CPUs this process may use), which we reuse.
            options.intra_op_num_threads = threads or torch.get_num_threads()
            options.inter_op_num_threads = 1
            # Spinning threads burn the cores the front ends decode on (README, Threads).
            options.add_session_config_entry(
                "session.intra_op.allow_spinning", "1" if spin else "0"
            )
            return ort.InferenceSession(str(path), sess_options=options, providers=providers)

        session = make_session(spinning)
        used = session.get_providers()
        dev = resolve_device("cuda" if _GPU_PROVIDERS.intersection(used) else "cpu")
        if dev.type == "cuda" and ":" in device:
            dev = torch.device(device)
        input_type = next(i.type for i in session.get_inputs() if i.name == "pixel_values")
        file_dtype = _ORT_TYPES.get(input_type)
        if file_dtype is None:
            raise ValueError(f"model.onnx takes pixel_values of type {input_type}; expected float")
        if dtype != "auto" and str(file_dtype).removeprefix("torch.") != dtype:
            raise ValueError(
                f"--dtype {dtype} does not match model.onnx, exported in {file_dtype}: "
                "use --dtype auto with --backend onnx"
            )
        _warn_if_stale(session, Path(model_dir), path)
        logger.info("loaded %s in onnxruntime %s with %s", path, ort.__version__, used)
        spinning_for_tiles = None
        if dev.type == "cpu" and not spinning:
            spinning_for_tiles = functools.partial(make_session, True)
        return cls(session, dev, file_dtype, spinning_for_tiles)

    @property
    def num_queries(self) -> int:
        """The queries of the exported model (its logits' second dimension)."""
        return int(self._outputs["logits"].shape[1])

    def infer(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None) -> RawOutputs:
        return self._run(self.session, pixel_values, pixel_mask)

    def infer_tiles(
        self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None
    ) -> RawOutputs:
        """A batch of a tiled image's tiles (app/engine/pipeline.py). On the CPU, unless every
        batch spins already (--onnx-spinning), a second session runs it, made at the first
        such batch, whose intra-op threads spin between ops instead of sleeping: tiles come
        with no decoding to leave the cores to (one decode makes hundreds of them), and
        spinning measured 0.89x the raw forward pass in tiles/s against 0.75x sleeping, where
        on plain requests it measured 0.93x to 1.06x of sleeping (README, tiled inference).
        Its price: the weights held twice."""
        if self._make_tiles_session is None:
            return self.infer(pixel_values, pixel_mask)
        if self._tiles_session is None:  # the lock only until it is made
            with self._tiles_lock:
                if self._tiles_session is None:
                    logger.info("making onnxruntime's spinning session for batches of tiles")
                    self._tiles_session = self._make_tiles_session()
        return self._run(self._tiles_session, pixel_values, pixel_mask)

    def _run(
        self, session: Any, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None
    ) -> RawOutputs:
        inputs = {"pixel_values": pixel_values.to(self.dtype)}
        if "pixel_mask" in self._input_names:
            if pixel_mask is None:
                pixel_mask = torch.ones(
                    (pixel_values.shape[0], *pixel_values.shape[2:]),
                    dtype=torch.int64,
                    device=pixel_values.device,
                )
            inputs["pixel_mask"] = pixel_mask.to(torch.int64)
        if self.device.type == "cuda":
            return self._infer_bound(inputs)
        feeds = {name: t.contiguous().numpy() for name, t in inputs.items()}
        logits, boxes = session.run(["logits", "pred_boxes"], feeds)
        return RawOutputs(logits=torch.from_numpy(logits), pred_boxes=torch.from_numpy(boxes))

    def _infer_bound(self, inputs: dict[str, torch.Tensor]) -> RawOutputs:
        # Inputs and outputs stay in CUDA memory: I/O binding on torch's buffers, no host copy.
        binding = self.session.io_binding()
        batch = next(iter(inputs.values())).shape[0]
        index = self.device.index or 0
        for name, tensor in inputs.items():
            tensor = tensor.contiguous()
            binding.bind_input(
                name,
                "cuda",
                index,
                _NUMPY_TYPES[tensor.dtype],
                tuple(tensor.shape),
                tensor.data_ptr(),
            )
        outputs = {}
        for name in ("logits", "pred_boxes"):
            shape = [batch, *self._outputs[name].shape[1:]]
            if not all(isinstance(d, int) for d in shape):
                raise ValueError(f"model.onnx output {name} has a dynamic shape {shape}")
            out = torch.empty(shape, dtype=self.dtype, device=self.device)
            binding.bind_output(
                name, "cuda", index, _NUMPY_TYPES[self.dtype], tuple(shape), out.data_ptr()
            )
            outputs[name] = out
        torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        return RawOutputs(logits=outputs["logits"], pred_boxes=outputs["pred_boxes"])


def _warn_if_stale(session: Any, model_dir: Path, path: Path) -> None:
    recorded = session.get_modelmeta().custom_metadata_map.get(META_WEIGHTS_SHA256)
    weights = model_dir / WEIGHTS_FILE
    if not recorded or not weights.is_file():
        return
    digest = hashlib.sha256()
    with weights.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != recorded:
        logger.warning(
            "%s was exported from other weights than %s: its detections will differ from "
            "--backend torch; re-run scripts/export_onnx.py %s",
            path,
            weights,
            model_dir,
        )
