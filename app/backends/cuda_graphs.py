"""CUDA graphs around any torch Backend: one graph per batch-size bucket, captured at start-up,
replayed with static input and output buffers.

An eager forward pass of an RT-DETR at small batches is bound by Python's kernel launches, not
by the GPU; a graph replays the same kernels with one launch. Shapes without a graph run
eagerly, and so does every shape when a capture fails or its replay disagrees with the eager
pass. Which buckets replay a graph, and why the others do not, is kept per bucket
(`bucket_states`) for /v1/models and the metrics: a silent fallback to eager would cost most of
the speed with nothing to show for it.

Warm-up and capture run on one side stream per backend (so per device), under
app/backends/capture_guard.py, which makes transformers' RT-DETR, RT-DETRv2 and D-FINE code
capturable and names the model line of any other host synchronisation.

torch.cuda.CUDAGraph rather than torch.compile(mode="reduce-overhead"): capture takes seconds per
bucket, where inductor compiles each static shape for about a minute. `compile_model` adds
inductor's fused kernels under the same graphs, for those who can afford the start-up.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from app.backends.base import Backend, RawOutputs
from app.backends.capture_guard import HostScalarWrites, checks_skipped

logger = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor, torch.Tensor | None], RawOutputs]


class GraphMismatchError(RuntimeError):
    """A replayed graph gave other outputs than the eager pass on the same input."""


class NotCapturableError(RuntimeError):
    """The model's forward pass synchronises with the host, which a capture cannot hold."""


@dataclass(frozen=True)
class BucketState:
    """How one batch-size bucket runs: a replayed graph, or eagerly and why."""

    batch_size: int
    cuda_graph: bool
    reason: str = ""  # why not a graph; empty when it is one


class GraphRuntime(Protocol):
    """The CUDA calls capture needs (tests pass a CPU stand-in that records them)."""

    def device_scope(self, device: torch.device) -> contextlib.AbstractContextManager[Any]: ...

    def new_stream(self, device: torch.device) -> Any: ...

    def current_stream(self, device: torch.device) -> Any: ...

    def on_stream(self, stream: Any) -> contextlib.AbstractContextManager[Any]: ...

    def wait(self, waiter: Any, producer: Any) -> None:
        """Work queued on `waiter` from now on runs after the work queued on `producer`."""

    def new_pool(self) -> Any: ...

    def capture(
        self, fn: Callable[[], RawOutputs], *, pool: Any, stream: Any
    ) -> tuple[Callable[[], None], RawOutputs]:
        """Record `fn` on `stream`; (replay, the static outputs each replay overwrites)."""

    def synchronize(self, device: torch.device) -> None: ...


class TorchCudaRuntime:
    """GraphRuntime on torch.cuda."""

    def device_scope(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        return torch.cuda.device(device)

    def new_stream(self, device: torch.device) -> torch.cuda.Stream:
        return torch.cuda.Stream(device)

    def current_stream(self, device: torch.device) -> torch.cuda.Stream:
        return torch.cuda.current_stream(device)

    def on_stream(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        return torch.cuda.stream(stream)

    def wait(self, waiter: Any, producer: Any) -> None:
        waiter.wait_stream(producer)

    def new_pool(self) -> Any:
        return torch.cuda.graph_pool_handle()

    def capture(
        self, fn: Callable[[], RawOutputs], *, pool: Any, stream: Any
    ) -> tuple[Callable[[], None], RawOutputs]:
        graph = torch.cuda.CUDAGraph()
        # stream=: torch.cuda.graph's default capture stream is created once, on whichever
        # device captured first; a second GPU's capture would start on the first one.
        # thread_local: engines of other devices may capture or run from other threads.
        with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            outputs = fn()
        return graph.replay, outputs

    def synchronize(self, device: torch.device) -> None:
        torch.cuda.synchronize(device)


@dataclass
class _Graph:
    replay: Callable[[], None]
    pixel_values: torch.Tensor  # static input buffer
    pixel_mask: torch.Tensor | None
    outputs: RawOutputs  # static output buffers, overwritten by each replay


def describe(exc: BaseException) -> str:
    """The exception with the ones it was raised while handling: CUDA reports a failed capture
    when the capture ends ("operation failed due to a previous error during capture"), and the
    error that caused it is only in the chain."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current).strip().splitlines()
        parts.append(f"{type(current).__name__}: {text[0] if text else ''}")
        suppressed = current.__suppress_context__  # `raise ... from None`
        current = current.__cause__ or (None if suppressed else current.__context__)
    # The innermost is the cause: say it first.
    return " <- raised while handling -> ".join(reversed(parts)) if len(parts) > 1 else parts[0]


class CudaGraphBackend:
    def __init__(
        self,
        inner: Backend,
        *,
        compile_model: bool = False,
        warmup_runs: int = 3,
        atol: float = 2e-2,
        runtime: GraphRuntime | None = None,
    ) -> None:
        self.inner = inner
        self.name = inner.name
        self.device = inner.device
        self.dtype = inner.dtype
        self.warmup_runs = warmup_runs
        self.atol = atol
        self.runtime: GraphRuntime = runtime or TorchCudaRuntime()
        self.compiled = compile_model
        self._graphs: dict[tuple[tuple[int, ...], bool], _Graph] = {}
        self._states: dict[int, BucketState] = {}
        self._forward: Forward = inner.infer
        if compile_model:
            self._forward = _compiled_forward(inner)
        # Batches served by a replay and eagerly (shapes without a graph), for tests and logs.
        self.graph_batches = 0
        self.eager_batches = 0

    @property
    def captured_batch_sizes(self) -> list[int]:
        return sorted(shape[0] for shape, _ in self._graphs)

    def bucket_states(self) -> list[BucketState]:
        """Every bucket capture was asked for, ascending: graph, or eager with the reason."""
        return [self._states[size] for size in sorted(self._states)]

    def infer(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None) -> RawOutputs:
        graph = self._graphs.get((tuple(pixel_values.shape), pixel_mask is not None))
        if graph is None or pixel_values.dtype != graph.pixel_values.dtype:
            self.eager_batches += 1
            return self._forward(pixel_values, pixel_mask)
        self.graph_batches += 1
        return self._replay(graph, pixel_values, pixel_mask)

    @staticmethod
    def _replay(
        graph: _Graph, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None
    ) -> RawOutputs:
        graph.pixel_values.copy_(pixel_values)
        if pixel_mask is not None and graph.pixel_mask is not None:
            graph.pixel_mask.copy_(pixel_mask)
        graph.replay()
        # Copies: the next replay overwrites the static outputs, and in the pool the graphs
        # share, another bucket's replay may reuse their memory.
        return RawOutputs(graph.outputs.logits.clone(), graph.outputs.pred_boxes.clone())

    def capture(
        self, batch_sizes: Sequence[int], height: int, width: int, *, with_mask: bool
    ) -> bool:
        """Capture a graph for each batch size (largest first: the smaller ones then fit in the
        memory pool the graphs share). False, with every graph dropped and every bucket marked
        eager with the cause, when one fails."""
        if self.device.type != "cuda" and isinstance(self.runtime, TorchCudaRuntime):
            raise ValueError(f"CUDA graphs need a CUDA device, not {self.device}")
        sizes = sorted(set(batch_sizes), reverse=True)
        self._states = {s: BucketState(s, False, "not captured") for s in sizes}
        rt = self.runtime
        with rt.device_scope(self.device):
            # One side stream per backend, that is per device: warm-up and capture on it.
            stream = rt.new_stream(self.device)
            pool = rt.new_pool()
            for step, size in enumerate(sizes, 1):
                started = time.perf_counter()
                try:
                    self._capture_one(size, height, width, with_mask, pool, stream)
                except Exception as exc:
                    reason = f"capture failed at batch {size}: {describe(exc)}"
                    logger.error(
                        "CUDA graphs on %s: %s. Every batch size is served EAGERLY",
                        self.device,
                        reason,
                        exc_info=exc,
                    )
                    self._graphs.clear()
                    self._forward = self.inner.infer
                    self._states = {s: BucketState(s, False, reason) for s in sizes}
                    return False
                self._states[size] = BucketState(size, True)
                logger.info(
                    "CUDA graph %d/%d on %s: batch %d captured and checked in %.1f s",
                    step,
                    len(sizes),
                    self.device,
                    size,
                    time.perf_counter() - started,
                )
        return True

    @contextlib.contextmanager
    def _guard(self) -> Iterator[HostScalarWrites | None]:
        """capture_guard's conversions for an eager forward; under torch.compile the shapes are
        traced as constants and a Python dispatch mode would only get in the way."""
        model = getattr(self.inner, "model", None)
        with contextlib.ExitStack() as stack:
            if isinstance(model, torch.nn.Module):
                stack.enter_context(checks_skipped(model))
            if self.compiled:
                yield None
                return
            mode = HostScalarWrites(self.device)
            stack.enter_context(mode)
            yield mode

    def _capture_one(
        self, size: int, height: int, width: int, with_mask: bool, pool: Any, stream: Any
    ) -> None:
        rt = self.runtime
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
        forward = self._forward
        current = rt.current_stream(self.device)
        with self._guard() as guard:
            # Warm-up on the capture stream, as the CUDA graph docs ask: lazy initialisation
            # (cuBLAS workspaces, cuDNN autotuning, Triton compilation, cached anchors) must
            # not happen during capture.
            rt.wait(stream, current)
            with rt.on_stream(stream):
                for run in range(self.warmup_runs):
                    if guard is not None and run == self.warmup_runs - 1:
                        # What only the first passes do (lazy set-up) is not in the graph.
                        guard.host_reads.clear()
                    forward(static_in, static_mask)
            rt.wait(current, stream)
            if guard is not None and guard.host_reads:
                reads = list(dict.fromkeys(guard.host_reads))
                raise NotCapturableError(
                    "the forward pass reads device values on the host ("
                    + "; ".join(reads[:3])
                    + (f"; {len(reads) - 3} more" if len(reads) > 3 else "")
                    + ")"
                )
            replay, outputs = rt.capture(
                functools.partial(forward, static_in, static_mask), pool=pool, stream=stream
            )
        captured = _Graph(replay, static_in, static_mask, outputs)
        # Check on fresh data: a graph that baked in a value of the capture input would still
        # agree on the input it was captured with.
        probe = sample()
        expected = self._forward(probe, static_mask)
        got = self._replay(captured, probe, static_mask)
        rt.synchronize(self.device)
        for name in ("logits", "pred_boxes"):
            a, b = getattr(got, name).float(), getattr(expected, name).float()
            diff = float((a - b).abs().max())
            if not diff <= self.atol:  # also catches NaN
                raise GraphMismatchError(f"{name} differ from the eager pass by {diff:.4g}")
        self._graphs[(tuple(static_in.shape), with_mask)] = captured


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
