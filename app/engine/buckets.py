"""Batch-size buckets: the few batch shapes the model is warmed (and CUDA-graph captured) for.

A batch of n images runs as the smallest bucket >= n, its extra rows padded, when padding is
on; the outputs of the padding rows are sliced off. Rows of a detector's batch never mix, so the
padding only costs compute, which is why it is on only where fixed shapes pay (CUDA graphs).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch stays out of the settings' import (app/config.py parses buckets)
    import torch

DEFAULT_BUCKETS = "1,2,4,8,16,32,64"


def parse_buckets(text: str) -> list[int]:
    """Parse "1,2,4" into [1, 2, 4]; ValueError saying how to write it otherwise."""
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(
            f"{text!r} is not a comma-separated list of batch sizes, e.g. {DEFAULT_BUCKETS}"
        ) from None
    if not sizes or sizes[0] < 1:
        raise ValueError(f"{text!r}: give at least one batch size, each >= 1")
    return sizes


@dataclass(frozen=True)
class BatchBuckets:
    sizes: tuple[int, ...]  # ascending; the last one is the largest batch the batcher forms
    pad: bool = False

    @classmethod
    def from_setting(cls, text: str, max_batch_size: int, *, pad: bool = False) -> BatchBuckets:
        """Buckets above max_batch_size are dropped and max_batch_size itself is always one,
        so that every batch the batcher can form has a bucket."""
        sizes = [s for s in parse_buckets(text) if s < max_batch_size]
        return cls((*sizes, max_batch_size), pad)

    def with_padding(self, pad: bool) -> BatchBuckets:
        return BatchBuckets(self.sizes, pad)

    def bucket_for(self, n: int) -> int:
        """The batch size a batch of n images runs as: n itself without padding, else the
        smallest bucket holding it (n when larger than every bucket)."""
        if n < 1:
            raise ValueError(f"a batch holds at least one image, got {n}")
        if not self.pad:
            return n
        i = bisect.bisect_left(self.sizes, n)
        return self.sizes[i] if i < len(self.sizes) else n


def pad_rows(x: torch.Tensor, rows: int, value: float = 0) -> torch.Tensor:
    """x with rows added along dim 0 up to `rows`, filled with `value` (x itself if long enough)."""
    import torch

    missing = rows - x.shape[0]
    if missing <= 0:
        return x
    filler = x.new_full((missing, *x.shape[1:]), value)
    return torch.cat([x, filler])
