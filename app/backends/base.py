"""The interface every inference backend offers the engine: a batch in, raw outputs out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class RawOutputs:
    logits: torch.Tensor  # [B, Q, C]
    pred_boxes: torch.Tensor  # [B, Q, 4], normalized cxcywh


class Backend(Protocol):
    name: str
    device: torch.device
    dtype: torch.dtype

    def infer(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None) -> RawOutputs:
        """Run the detector on a pre-processed batch that already sits on `device`.

        A backend may also offer `infer_tiles`, with the same signature and result, for batches
        made only of a tiled image's tiles: the engine calls it for those when it is there
        (app/engine/pipeline.py; onnxruntime on the CPU runs them on spinning threads)."""
        ...
