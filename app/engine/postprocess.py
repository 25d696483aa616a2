"""Batched post-processing in torch, on the model's device: raw logits and boxes -> scored,
labelled boxes in each original image's pixels (the one place a box is scaled to its image).

Reproduces transformers' ``post_process_object_detection`` for the DETR family from a
checkpoint's config.json, without importing it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig


# Model types by how transformers post-processes them:
# RTDetrImageProcessor: sigmoid, top-k over queries x classes with k = number of queries.
_TOPK_NUM_QUERIES = frozenset({"rt_detr", "rt_detr_v2", "d_fine", "deimv2"})
# DeformableDetr / ConditionalDetr image processors: sigmoid, top-k with k = 100 (their default).
_TOPK_100 = frozenset({"deformable_detr", "conditional_detr", "lw_detr"})
# DetrImageProcessor: softmax, the trailing no-object class dropped, best class per query.
_SOFTMAX = frozenset({"detr", "table-transformer"})


@dataclass(frozen=True)
class PostprocessSpec:
    activation: Literal["sigmoid", "softmax"]
    top_k: int
    # Sigmoid models: the top-k over queries x classes (transformers, Ultralytics >= 8.4.x), or
    # each query's best class ranked by its score (Ultralytics' RTDETRPredictor before that).
    # Softmax models always take each query's best class.
    best_class_per_query: bool = False

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> PostprocessSpec:
        model_type = getattr(config, "model_type", None)
        if model_type in _TOPK_NUM_QUERIES:
            if not getattr(config, "use_focal_loss", True):
                # transformers' softmax branch for these models applies softmax over the batch
                # dimension (no dim given): there is nothing sound to reproduce.
                raise ValueError(
                    f"config.json: {model_type} with use_focal_loss=false is not supported"
                )
            return cls("sigmoid", int(config.num_queries))
        if model_type in _TOPK_100:
            return cls("sigmoid", 100)
        if model_type in _SOFTMAX:
            return cls("softmax", int(config.num_queries))
        supported = ", ".join(sorted(_TOPK_NUM_QUERIES | _TOPK_100 | _SOFTMAX))
        raise ValueError(
            f"config.json: model_type={model_type!r} is not supported; use {supported}"
        )


@dataclass(frozen=True)
class BatchDetections:
    """Top-k candidates of each image, best first, on the host."""

    scores: np.ndarray  # float32 [B, K]; -inf for candidates of classes masked out
    labels: np.ndarray  # int64 [B, K]
    boxes: np.ndarray  # float32 [B, K, 4], xyxy in the original image's pixels, not clipped


class Postprocessor:
    """Raw logits and boxes -> scored, labelled boxes in each original image's pixels."""

    def __init__(self, spec: PostprocessSpec) -> None:
        self.spec = spec

    @torch.no_grad()
    def __call__(
        self,
        logits: torch.Tensor,
        pred_boxes: torch.Tensor,
        orig_sizes: torch.Tensor,
        class_masks: torch.Tensor | None = None,
    ) -> BatchDetections:
        """logits [B, Q, C]; pred_boxes [B, Q, 4] normalised cxcywh; orig_sizes [B, 2] (h, w).

        class_masks: bool [B, num_classes], False drops that class for that image. transformers
        has no such option: we apply it to the scores before the top-k (before the best-class
        choice for softmax models), so an excluded class never takes a slot from an allowed one.
        For softmax models the mask may include the no-object column; it is ignored.
        """
        batch, _, num_logits = logits.shape
        if pred_boxes.shape[:2] != logits.shape[:2] or orig_sizes.shape != (batch, 2):
            raise ValueError(
                f"shapes disagree: logits {tuple(logits.shape)}, pred_boxes "
                f"{tuple(pred_boxes.shape)}, orig_sizes {tuple(orig_sizes.shape)}"
            )
        # float32 whatever the model's dtype: fp16 scores would tie and reorder the top-k.
        logits = logits.float()
        device = logits.device
        if self.spec.activation == "sigmoid":
            probs = logits.sigmoid()
        else:
            probs = logits.softmax(-1)[..., :-1]
        num_classes = probs.shape[-1]
        if class_masks is not None:
            if class_masks.shape[0] != batch or class_masks.shape[1] not in (
                num_classes,
                num_logits,
            ):
                raise ValueError(
                    f"class_masks {tuple(class_masks.shape)} does not match {num_classes} classes"
                )
            keep = class_masks[:, :num_classes].to(device=device, dtype=torch.bool)
            probs = probs.masked_fill(~keep[:, None, :], float("-inf"))

        if self.spec.activation == "sigmoid" and not self.spec.best_class_per_query:
            flat = probs.flatten(1)
            scores, index = flat.topk(min(self.spec.top_k, flat.shape[1]), dim=1)
            labels = index % num_classes
            query = torch.div(index, num_classes, rounding_mode="floor")
        else:
            # DETR keeps every query in query order (Ultralytics' older predictor sorts them by
            # score); we sort them by score like the others.
            best, best_label = probs.max(-1)
            scores, query = best.topk(min(self.spec.top_k, best.shape[1]), dim=1)
            labels = best_label.gather(1, query)

        boxes = pred_boxes.float().gather(1, query[..., None].expand(-1, -1, 4))
        # cxcywh -> xyxy, with the same arithmetic as transformers' center_to_corners_format
        # (written by hand: torchvision is not a dependency). Not clipped, as in transformers.
        center, extent = boxes[..., :2], boxes[..., 2:]
        boxes = torch.cat([center - 0.5 * extent, center + 0.5 * extent], dim=-1)
        height, width = orig_sizes.to(device=device, dtype=torch.float32).unbind(1)
        boxes = boxes * torch.stack([width, height, width, height], dim=1)[:, None, :]

        # One device-to-host copy for everything (labels < 2**24 are exact in float32).
        packed = torch.cat([scores[..., None], labels[..., None].float(), boxes], dim=-1).cpu()
        host = packed.numpy()
        return BatchDetections(
            scores=np.ascontiguousarray(host[..., 0]),
            labels=host[..., 1].astype(np.int64),
            boxes=np.ascontiguousarray(host[..., 2:]),
        )


def select(
    dets: BatchDetections, index: int, threshold: float, max_detections: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores, labels and boxes of image ``index`` scoring strictly above ``threshold``
    (transformers keeps ``score > threshold``), at most ``max_detections``, best first."""
    if max_detections < 0:
        raise ValueError(f"max_detections must be >= 0, got {max_detections}")
    scores = dets.scores[index]
    keep = np.flatnonzero(scores > threshold)[:max_detections]
    return scores[keep], dets.labels[index][keep], dets.boxes[index][keep]
