"""CUDA-graph capture on the CPU: the conversions that make transformers' RT-DETR family
capturable (run on the real tiny models, with the CPU standing in for the device), and the
capture logic (streams, per-bucket state, causes of failure, no eager pass once graphs serve)
with a runtime that records what CUDA would be asked."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from app.backends.base import RawOutputs
from app.backends.capture_guard import HostScalarWrites, checks_skipped
from app.backends.cuda_graphs import CudaGraphBackend, describe
from app.backends.torch_backend import TorchBackend
from app.ops.patch import install_msda
from tests.unit.test_msda_op import _build

CPU = torch.device("cpu")
KINDS = ["rt_detr", "rt_detr_v2", "d_fine"]


# -- the dispatch-mode conversion, on the real models ------------------------------------------


class Passthrough(TorchDispatchMode):
    """A dispatch mode that changes nothing: the reference for "same outputs under a mode"."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("msda", [False, True], ids=["grid_sample", "detr_serve_op"])
@pytest.mark.parametrize("kind", KINDS)
def test_spatial_shape_writes_become_fills_and_checks_stop_reading_the_host(
    kind: str, msda: bool
) -> None:
    model = _build(kind)
    if msda:
        install_msda(model)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    forwards = [m.__dict__.get("forward") for m in model.modules()]
    with torch.inference_mode(), Passthrough():
        want = model(pixel_values=x)
    guard = HostScalarWrites(CPU)
    with torch.inference_mode(), checks_skipped(model) as redirected, guard:
        got = model(pixel_values=x)
    # 3 feature levels x (height, width) written as Python ints into spatial_shapes.
    assert guard.converted == 6
    assert guard.host_reads == []
    assert redirected >= 1
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    torch.testing.assert_close(got.pred_boxes, want.pred_boxes, rtol=0, atol=0)
    # The model's instances are restored: the checks run again outside the block.
    assert [m.__dict__.get("forward") for m in model.modules()] == forwards


class HostTensors(TorchDispatchMode):
    """Counts tensors made from Python data or by a factory without a device: on CUDA those are
    host tensors, and copying one to the device inside a capture fails."""

    FACTORIES = {
        torch.ops.aten.empty.memory_format,
        torch.ops.aten.full.default,
        torch.ops.aten.ones.default,
        torch.ops.aten.zeros.default,
        torch.ops.aten.arange.default,
        torch.ops.aten.arange.start,
        torch.ops.aten.arange.start_step,
        torch.ops.aten.scalar_tensor.default,
    }

    def __init__(self) -> None:
        super().__init__()
        self.from_python = 0
        self.without_device = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.lift_fresh.default:
            self.from_python += 1
        elif func in self.FACTORIES and kwargs.get("device") is None:
            self.without_device += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("kind", KINDS)
def test_the_only_host_tensors_of_a_forward_are_the_ones_turned_into_fills(kind: str) -> None:
    model = _build(kind)
    install_msda(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        model(pixel_values=x)  # the first pass fills transformers' anchor cache
    host, guard = HostTensors(), HostScalarWrites(CPU)
    # guard inside: it sees the copies first, host the ops they become
    with torch.inference_mode(), checks_skipped(model), host, guard:
        model(pixel_values=x)
    assert host.without_device == 0
    assert host.from_python == guard.converted == 6


@pytest.mark.parametrize("kind", ["rt_detr_v2", "d_fine"])
def test_without_skipping_the_checks_v2_and_dfine_read_the_host_at_their_check(kind: str) -> None:
    model = _build(kind)
    guard = HostScalarWrites(CPU)
    with torch.inference_mode(), guard:
        model(pixel_values=torch.randn(1, 3, 64, 64))
    assert guard.host_reads, "transformers' torch_compilable_check no longer reads the host?"
    assert all("aten.item" in r or "_local_scalar_dense" in r for r in guard.host_reads)


@pytest.mark.parametrize("kind", ["rt_detr_v2", "d_fine"])
def test_on_a_device_that_cannot_answer_host_reads_the_forward_needs_the_skipped_checks(
    kind: str,
) -> None:
    # The meta device, like a capturing stream, has no values to hand to the host.
    model = _build(kind).to("meta")
    x = torch.empty(2, 3, 64, 64, device="meta")
    with pytest.raises(RuntimeError, match="item"), torch.inference_mode():
        model(pixel_values=x)
    with torch.inference_mode(), checks_skipped(model):
        assert model(pixel_values=x).logits.shape == (2, 10, 3)


def test_only_zero_dim_cpu_sources_into_the_device_are_converted() -> None:
    device_tensor = torch.zeros(3, 2, dtype=torch.long)
    other = torch.zeros(2)
    guard = HostScalarWrites(CPU)
    with guard:
        device_tensor[1, 0] = 7  # a Python int: the case transformers hits
        other.copy_(torch.ones(2))  # a real tensor copy stays a copy
    assert guard.converted == 1
    assert device_tensor[1, 0] == 7 and device_tensor.sum() == 7
    assert torch.equal(other, torch.ones(2))
    # Tensors of another device are left alone (here: the mode watches cuda:0).
    elsewhere = HostScalarWrites(torch.device("cuda", 0))
    with elsewhere:
        device_tensor[0, 0] = 1
    assert elsewhere.converted == 0 and device_tensor[0, 0] == 1


# -- capture logic, with a recording runtime ---------------------------------------------------


class FakeStream:
    def __init__(self, device: torch.device, name: str) -> None:
        self.device, self.name = device, name


class RecordingRuntime:
    """GraphRuntime on the CPU: a "capture" runs the function once and a replay re-runs the
    function recorded then (the forward bound at capture time, on the static buffers)."""

    def __init__(self, fail_capture: Exception | None = None) -> None:
        self.active: FakeStream | None = None
        self.streams: list[FakeStream] = []
        self.captured_on: list[FakeStream] = []
        self.replays = 0
        self.fail_capture = fail_capture

    def device_scope(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def new_stream(self, device: torch.device) -> FakeStream:
        stream = FakeStream(device, f"side{len(self.streams)}")
        self.streams.append(stream)
        return stream

    def current_stream(self, device: torch.device) -> FakeStream:
        return FakeStream(device, "default")

    @contextlib.contextmanager
    def on_stream(self, stream: FakeStream) -> Iterator[None]:
        previous, self.active = self.active, stream
        try:
            yield
        finally:
            self.active = previous

    def wait(self, waiter: Any, producer: Any) -> None:
        pass

    def new_pool(self) -> object:
        return object()

    def capture(
        self, fn: Callable[[], RawOutputs], *, pool: Any, stream: FakeStream
    ) -> tuple[Callable[[], None], RawOutputs]:
        self.captured_on.append(stream)
        with self.on_stream(stream):
            if self.fail_capture is not None:
                try:
                    raise self.fail_capture
                finally:
                    # as torch.cuda.graph's __exit__ does when the body raised
                    raise RuntimeError("operation failed due to a previous error during capture")
            first = fn()
        # Plain tensors (the forward's may be inference tensors), overwritten by each replay.
        static = RawOutputs(first.logits.clone(), first.pred_boxes.clone())

        def replay() -> None:
            self.replays += 1
            fresh = fn()
            static.logits.copy_(fresh.logits)
            static.pred_boxes.copy_(fresh.pred_boxes)

        return replay, static

    def synchronize(self, device: torch.device) -> None:
        pass


class StreamRecordingBackend:
    """A backend whose forward notes the stream it ran on and can read a value to the host."""

    name = "fake"
    dtype = torch.float32

    def __init__(self, runtime: RecordingRuntime, device: torch.device, read_host: bool) -> None:
        self.runtime, self.device, self.read_host = runtime, device, read_host
        self.forward_streams: list[str] = []

    def infer(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None) -> RawOutputs:
        stream = self.runtime.active
        self.forward_streams.append(stream.name if stream is not None else "default")
        if self.read_host:
            threshold = float(pixel_values.mean().item())  # a host read: uncapturable
        else:
            threshold = 0.0
        n = pixel_values.shape[0]
        logits = pixel_values.mean(dim=(1, 2, 3)).view(n, 1, 1).expand(n, 4, 2) + threshold
        return RawOutputs(logits.clone(), torch.zeros(n, 4, 4))


def test_warm_up_and_capture_run_on_one_side_stream_per_device() -> None:
    runtime = RecordingRuntime()
    backends = [
        StreamRecordingBackend(runtime, torch.device("cpu", i), read_host=False) for i in (0, 1)
    ]
    for backend in backends:
        graphs = CudaGraphBackend(backend, warmup_runs=2, runtime=runtime)
        assert graphs.capture([1, 2], 8, 8, with_mask=False)
    first, second = runtime.streams
    assert (first.device, second.device) == (torch.device("cpu", 0), torch.device("cpu", 1))
    assert runtime.captured_on == [first, first, second, second]
    # Per bucket: 2 warm-up passes and the captured one on the side stream, then the eager
    # check on fresh data and the fake's replay (a forward here) on the default stream.
    per_bucket = [first.name] * 3 + ["default", "default"]
    assert backends[0].forward_streams == per_bucket * 2


def test_a_host_read_is_named_with_its_line_and_every_bucket_says_eager(caplog) -> None:
    runtime = RecordingRuntime()
    backend = StreamRecordingBackend(runtime, CPU, read_host=True)
    graphs = CudaGraphBackend(backend, warmup_runs=1, runtime=runtime)
    caplog.set_level(logging.INFO, logger="app.backends.cuda_graphs")
    assert not graphs.capture([1, 2, 4], 8, 8, with_mask=False)
    assert runtime.captured_on == []  # refused before CUDA is asked to capture
    states = graphs.bucket_states()
    assert [s.batch_size for s in states] == [1, 2, 4]
    assert not any(s.cuda_graph for s in states)
    for state in states:
        assert "reads device values on the host" in state.reason
        assert "test_cuda_graphs.py" in state.reason and ".item()" in state.reason
    assert "EAGERLY" in caplog.text and "test_cuda_graphs.py" in caplog.text
    assert graphs.captured_batch_sizes == []


def test_a_failed_capture_reports_its_cause_not_only_cudas_last_words(caplog) -> None:
    runtime = RecordingRuntime(fail_capture=RuntimeError("pageable copy while capturing"))
    graphs = CudaGraphBackend(
        StreamRecordingBackend(runtime, CPU, read_host=False), warmup_runs=1, runtime=runtime
    )
    caplog.set_level(logging.ERROR, logger="app.backends.cuda_graphs")
    assert not graphs.capture([2], 8, 8, with_mask=False)
    (state,) = graphs.bucket_states()
    assert state.reason.index("pageable copy while capturing") < state.reason.index(
        "previous error during capture"
    )
    assert "pageable copy while capturing" in caplog.text


def test_describe_puts_the_root_cause_first() -> None:
    try:
        try:
            raise ValueError("the cause")
        except ValueError:
            raise RuntimeError("the consequence") from None
    except RuntimeError as exc:
        assert describe(exc) == "RuntimeError: the consequence"
    try:
        try:
            raise ValueError("the cause")
        except ValueError:
            raise RuntimeError("the consequence")  # noqa: B904 (the implicit chain is the point)
    except RuntimeError as exc:
        assert describe(exc).startswith("ValueError: the cause <- ")


@pytest.fixture(scope="module")
def tiny_graphs() -> tuple[TorchBackend, CudaGraphBackend, RecordingRuntime]:
    model = _build("rt_detr_v2")
    install_msda(model)
    eager = TorchBackend(model, CPU, torch.float32)
    runtime = RecordingRuntime()
    graphs = CudaGraphBackend(eager, warmup_runs=1, runtime=runtime)
    assert graphs.capture([1, 2, 4], 64, 64, with_mask=False), graphs.bucket_states()
    return eager, graphs, runtime


def test_captured_buckets_replay_and_other_shapes_run_eagerly_and_are_counted(
    tiny_graphs: tuple[TorchBackend, CudaGraphBackend, RecordingRuntime],
) -> None:
    eager, graphs, runtime = tiny_graphs
    assert [(s.batch_size, s.cuda_graph, s.reason) for s in graphs.bucket_states()] == [
        (1, True, ""),
        (2, True, ""),
        (4, True, ""),
    ]
    before = (graphs.graph_batches, graphs.eager_batches, runtime.replays)
    x = torch.randn(4, 3, 64, 64)
    got = graphs.infer(x, None)
    want = eager.infer(x, None)
    torch.testing.assert_close(got.logits, want.logits)
    graphs.infer(torch.randn(3, 3, 64, 64), None)  # no graph for 3: eager, counted
    after = (graphs.graph_batches, graphs.eager_batches, runtime.replays)
    assert [b - a for a, b in zip(before, after, strict=True)] == [1, 1, 1]


def test_host_to_device_copies_are_named_as_uncapturable() -> None:
    # The meta device stands in for a GPU: on it, host tensors are other tensors.
    guard = HostScalarWrites(torch.device("meta"))
    with guard:
        on_device = torch.empty(3, device="meta")
        on_device.copy_(torch.ones(3))  # a pageable host-to-device copy
        torch.arange(4).to("meta")
        torch.ones(2).to(device="meta", dtype=torch.float16)
        on_device.to(torch.float16)  # on the device already: fine
    assert len(guard.host_reads) == 3
    assert guard.host_reads[0].startswith("a host-to-device copy (3) at test_cuda_graphs.py:")
    assert "(4)" in guard.host_reads[1] and "(2)" in guard.host_reads[2]


def test_host_reads_of_the_first_warm_up_passes_only_do_not_block_capture() -> None:
    runtime = RecordingRuntime()

    class LazyBackend(StreamRecordingBackend):
        calls = 0

        def infer(self, pixel_values, pixel_mask):
            type(self).calls += 1
            if type(self).calls == 1:
                float(pixel_values.sum().item())  # a one-off set-up read, as lazy code does
            return super().infer(pixel_values, pixel_mask)

    graphs = CudaGraphBackend(LazyBackend(runtime, CPU, read_host=False), runtime=runtime)
    # 3 warm-up passes; the read happened in the first only, so the graph is captured.
    assert graphs.capture([2], 8, 8, with_mask=False), graphs.bucket_states()
    assert len(runtime.captured_on) == 1
