"""An Ultralytics RT-DETR checkpoint behind the torch backend's interface (imports ultralytics).

The model is loaded by Ultralytics' own ``load_checkpoint`` (float32, Conv+BN fused and, where
the installed AutoBackend does it, in channels-last memory format, as its predictor's
AutoBackend does) and wrapped so that it takes ``pixel_values`` and gives what a
transformers detector gives: ``logits`` [B, Q, C] (before the sigmoid) and ``pred_boxes`` [B, Q, 4]
(normalised cxcywh), the decoder's last layer. The engine's Postprocessor then does what the
installed version's ``RTDETRPredictor.postprocess`` does; the decoder head says which of its two
layouts that is:

- Ultralytics >= 8.4.x with ``RTDETRDecoder.postprocess`` (8.4.190 is): the head gives
  [B, K, 6] = (cx, cy, w, h, score, class) from a top-K over queries x classes (K = queries),
  the predictor keeps score > conf: the engine's flat sigmoid top-K.
- Before it (8.3.x, 8.4.0): the head gives [B, Q, 4 + C] with sigmoid scores, the predictor takes
  each query's best class, keeps score > conf and sorts by score: best class per query.
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any, NamedTuple

import torch
from torch import nn

from app.backends.torch_backend import (
    TorchBackend,
    conv_memory_format,
    resolve_device,
    resolve_dtype,
)
from app.engine.postprocess import PostprocessSpec
from app.models.ultralytics import UltralyticsCheckpoint

logger = logging.getLogger(__name__)


def _offline() -> None:
    """Before ultralytics is first imported: its import probes the internet (a DNS lookup of
    public resolvers) and its events would be sent out; a server stays quiet. An explicit
    YOLO_OFFLINE in the environment wins."""
    os.environ.setdefault("YOLO_OFFLINE", "true")


class DetectorOutput(NamedTuple):
    logits: torch.Tensor
    pred_boxes: torch.Tensor


class UltralyticsDetector(nn.Module):
    """An RTDETRDetectionModel with transformers' calling convention."""

    def __init__(self, model: Any) -> None:  # an ultralytics RTDETRDetectionModel
        super().__init__()
        self.model = model

    def forward(
        self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None
    ) -> DetectorOutput:
        # In eval mode the head returns (predictions, (dec_bboxes, dec_scores, enc_bboxes,
        # enc_scores, dn_meta)) in every version; the decoder's stacks hold the eval layer only.
        _, raw = self.model.predict(pixel_values)
        dec_bboxes, dec_scores = raw[0], raw[1]
        return DetectorOutput(logits=dec_scores[-1], pred_boxes=dec_bboxes[-1])


def output_layout(model: Any) -> str:
    """Either "topk" (the head selects a top-K over queries x classes) or "best_class" (the
    predictor takes each query's best class): see the module docstring."""
    head = model.model[-1]
    return "topk" if callable(getattr(type(head), "postprocess", None)) else "best_class"


def postprocess_spec(model: Any) -> PostprocessSpec:
    return _spec(output_layout(model), int(model.model[-1].num_queries))


def installed_postprocess_spec(queries: int) -> PostprocessSpec:
    """The post-processing of the installed Ultralytics for a model with `queries` queries, with
    no model loaded (the onnx backend: the export holds the decoder's raw outputs)."""
    _offline()
    from ultralytics.nn.modules.head import RTDETRDecoder

    topk = callable(getattr(RTDETRDecoder, "postprocess", None))
    return _spec("topk" if topk else "best_class", queries)


def _spec(layout: str, queries: int) -> PostprocessSpec:
    if layout == "topk":
        return PostprocessSpec("sigmoid", queries)
    return PostprocessSpec("sigmoid", queries, best_class_per_query=True)


def predictor_memory_format(device: torch.device) -> torch.memory_format:
    """The memory format the installed Ultralytics' predictor gives a PyTorch model on `device`.

    AutoBackend versions with a ``channels_last`` argument apply `conv_memory_format`'s rule
    (channels-last on CUDA and on x86 CPUs with oneDNN): the convolutions then round
    differently (~1e-5 after the first layer), so the same format is what gives the predictor's
    answers. Older versions leave the model as loaded."""
    from ultralytics.nn.autobackend import AutoBackend

    if "channels_last" not in inspect.signature(AutoBackend.__init__).parameters:
        return torch.contiguous_format
    return conv_memory_format(device)


def load_module(checkpoint: UltralyticsCheckpoint, device: torch.device) -> Any:
    """The checkpoint's RTDETRDetectionModel, float32, fused, in eval mode, on `device`, in
    the memory format the installed predictor uses there."""
    _offline()
    try:
        from ultralytics.nn.tasks import load_checkpoint as ultralytics_load
    except ImportError as exc:
        raise RuntimeError(
            f"{checkpoint.path} is an Ultralytics checkpoint: serving it needs the ultralytics "
            f"package (AGPL-3.0): pip install -e '.[ultralytics]' ({exc})"
        ) from exc
    model, _ = ultralytics_load(str(checkpoint.path), device=device, fuse=True)
    model = model.float().eval().to(memory_format=predictor_memory_format(device))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_checkpoint(
    checkpoint: UltralyticsCheckpoint,
    device: str = "auto",
    dtype: str = "auto",
    msda_kernel: bool = False,
) -> tuple[TorchBackend, PostprocessSpec]:
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    model = load_module(checkpoint, dev)
    spec = postprocess_spec(model)
    detector = UltralyticsDetector(model).to(device=dev, dtype=dt).eval()
    if msda_kernel:
        from app.ops.patch import install_msda

        install_msda(detector)
    logger.info(
        "loaded %s (%s, %s outputs) on %s in %s",
        checkpoint.path,
        checkpoint.architecture,
        output_layout(model),
        dev,
        dt,
    )
    return TorchBackend(detector, dev, dt), spec


def warm_anchors(detector: Any, height: int, width: int) -> None:
    """Run the model once at its input size: the head caches its anchors for that size, so a
    trace (torch.export) sees them as constants instead of a module attribute it writes."""
    param = next(detector.parameters())
    with torch.inference_mode():
        detector(torch.zeros(1, 3, height, width, dtype=param.dtype, device=param.device))
