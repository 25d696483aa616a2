"""CUDA graphs around any torch Backend: one graph per batch-size bucket, captured at start-up,
replayed with static input and output buffers.

An eager forward pass of an RT-DETR at batch 1 is bound by Python kernel launches (~17 ms on an
H100, for ~2 ms of GPU work); a graph replays the same kernels with one launch. Shapes without a
graph run eagerly, and so does every shape when a capture fails or its replay disagrees with
the eager pass (a model that reads values back to the host cannot be captured).

torch.cuda.CUDAGraph rather than torch.compile(mode="reduce-overhead"): capture takes seconds per
bucket, where inductor compiles each static shape for about a minute. `compile_model` adds
inductor's fused kernels under the same graphs, for those who can afford the start-up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from app.backends.base import Backend, RawOutputs

logger = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor, torch.Tensor | None], RawOutputs]


class GraphMismatchError(RuntimeError):
    """A replayed graph gave other outputs than the eager pass on the same input."""


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    pixel_values: torch.Tensor  # static input buffer
    pixel_mask: torch.Tensor | None
    outputs: RawOutputs  # static output buffers, overwritten by each replay


class CudaGraphBackend:
    def __init__(
        self,
        inner: Backend,
        *,
        compile_model: bool = False,
        warmup_runs: int = 3,
        atol: float = 2e-2,
    ) -> None:
        self.inner = inner
        self.name = inner.name
        self.device = inner.device
        self.dtype = inner.dtype
        self.warmup_runs = warmup_runs
        self.atol = atol
        self._graphs: dict[tuple[tuple[int, ...], bool], _Graph] = {}
        self._forward: Forward = inner.infer
        if compile_model:
            self._forward = _compiled_forward(inner)

    @property
    def captured_batch_sizes(self) -> list[int]:
        return sorted(shape[0] for shape, _ in self._graphs)

    def infer(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None) -> RawOutputs:
        graph = self._graphs.get((tuple(pixel_values.shape), pixel_mask is not None))
        if graph is None or pixel_values.dtype != graph.pixel_values.dtype:
            return self._forward(pixel_values, pixel_mask)
        graph.pixel_values.copy_(pixel_values)
        if pixel_mask is not None and graph.pixel_mask is not None:
            graph.pixel_mask.copy_(pixel_mask)
        graph.graph.replay()
        # Copies: the next replay overwrites the static outputs, and in the pool the graphs
        # share, another bucket's replay may reuse their memory.
        return RawOutputs(graph.outputs.logits.clone(), graph.outputs.pred_boxes.clone())

    def capture(
        self, batch_sizes: Sequence[int], height: int, width: int, *, with_mask: bool
    ) -> bool:
        """Capture a graph for each batch size (largest first: the smaller ones then fit in the
        memory pool the graphs share). False, with every graph dropped, when one fails."""
        if self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {self.device}")
        sizes = sorted(set(batch_sizes), reverse=True)
        with torch.cuda.device(self.device):
            pool = torch.cuda.graph_pool_handle()
            for step, size in enumerate(sizes, 1):
                started = time.perf_counter()
                try:
                    self._capture_one(size, height, width, with_mask, pool)
                except Exception as exc:
                    logger.warning(
                        "CUDA graph capture failed at batch %d (%s: %s): serving eagerly",
                        size,
                        type(exc).__name__,
                        exc,
                    )
                    self._graphs.clear()
                    self._forward = self.inner.infer
                    return False
                logger.info(
                    "CUDA graph %d/%d on %s: batch %d captured and checked in %.1f s",
                    step,
                    len(sizes),
                    self.device,
                    size,
                    time.perf_counter() - started,
                )
        return True

    def _capture_one(self, size: int, height: int, width: int, with_mask: bool, pool: Any) -> None:
        gen = torch.Generator(device=self.device).manual_seed(size)

        def sample() -> torch.Tensor:
            return torch.randn((size, 3, height, width), generator=gen, device=self.device).to(
                self.dtype
            )

        static_in = sample()
        static_mask = (
            torch.ones((size, height, width), dtype=torch.int64, device=self.device)
            if with_mask
            else None
        )
        # Warm-up on a side stream, as the CUDA graph docs ask: lazy initialisation (cuBLAS
        # workspaces, cuDNN autotuning, Triton compilation, cached anchors) must not happen
        # during capture.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup_runs):
                self._forward(static_in, static_mask)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: engines of other devices may capture or run from other threads.
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            outputs = self._forward(static_in, static_mask)
        captured = _Graph(graph, static_in, static_mask, outputs)
        # Check on fresh data: a graph that baked in a value of the capture input would still
        # agree on the input it was captured with.
        probe = sample()
        expected = self._forward(probe, static_mask)
        self._graphs[(tuple(static_in.shape), with_mask)] = captured
        got = self.infer(probe, static_mask)
        torch.cuda.synchronize(self.device)
        for name in ("logits", "pred_boxes"):
            a, b = getattr(got, name).float(), getattr(expected, name).float()
            diff = float((a - b).abs().max())
            if not diff <= self.atol:  # also catches NaN
                del self._graphs[(tuple(static_in.shape), with_mask)]
                raise GraphMismatchError(f"{name} differ from the eager pass by {diff:.4g}")


def _compiled_forward(inner: Backend) -> Forward:
    """inductor-compiled forward of a torch backend's module (static shapes: one compilation per
    bucket; TORCHINDUCTOR_CACHE_DIR keeps them across restarts)."""
    model = getattr(inner, "model", None)
    if not isinstance(model, torch.nn.Module):
        logger.warning(
            "torch_compile: the %s backend has no torch module; not compiled", inner.name
        )
        return inner.infer
    # One compiled graph per bucket: the default limit of recompilations (8) is too low for 7+.
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), 16))
    compiled = torch.compile(model, dynamic=False)

    @torch.inference_mode()
    def forward(pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None) -> RawOutputs:
        kwargs = {"pixel_values": pixel_values}
        if pixel_mask is not None:
            kwargs["pixel_mask"] = pixel_mask
        out = compiled(**kwargs)
        return RawOutputs(logits=out.logits, pred_boxes=out.pred_boxes)

    return forward
