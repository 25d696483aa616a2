"""The GPU fast path on a real GPU: CUDA graphs captured for every RT-DETR-family model and
checked against eager, replays that leave earlier answers intact, padded batches whose every row
gets its own image's answer, ~30 mixed pixel/JPEG batches on two workers each checked row by
row, nvjpeg against Pillow, float16 against float32, graphs on a second GPU. Skipped without
CUDA; scripts/gpu_check.sh runs them (with tests/unit/test_msda_op.py, the Triton kernel's).

Every batch holds distinct images, and every row is compared with the answer its image gets
alone, in both directions: a row swapped, overwritten or stale fails."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from app.backends.cuda_graphs import CudaGraphBackend
from app.backends.torch_backend import TorchBackend
from app.config import DEFAULT_MODEL_NAME, REPO_MODELS_DIR, Settings
from app.engine.buckets import BatchBuckets
from app.engine.build import build_engine, fixed_input_size
from app.engine.pipeline import DetectionTask, Engine, ImageDetections
from app.engine.precision import check_tasks, detections_agree
from app.images.decode import decode_image, probe_plain_jpeg
from app.images.device import DeviceJpegDecoder, nvjpeg_unavailable_reason
from app.ops.patch import install_msda
from scripts.training.synthetic_shapes import HELDOUT_SEED, generate_sample
from tests.unit.test_msda_op import _build

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO_MODELS_DIR / DEFAULT_MODEL_NAME
EXAMPLES = sorted((ROOT / "examples").glob("*.jpg"))
INPUT_SIZE = (256, 256)  # the default model's (models/rtdetr-shapes/preprocessor_config.json)


def scene(index: int, *, jpeg: bool) -> DetectionTask:
    """Held-out synthetic scene number `index`: a different picture and size each time."""
    sample = generate_sample(HELDOUT_SEED + 17, index)
    if jpeg:
        encoded = probe_plain_jpeg(sample.jpeg, max_pixels=10**8, index=0)
        assert encoded is not None
        return DetectionTask(None, 0.0, 100, jpeg=encoded)
    return DetectionTask(np.array(sample.image), 0.0, 100)


def pixels_of(task: DetectionTask) -> DetectionTask:
    """The same image as decoded pixels (the eager reference decodes with Pillow)."""
    if task.jpeg is None:
        return task
    pixels = decode_image(task.jpeg.data, max_pixels=10**8, index=0).pixels
    return DetectionTask(pixels, task.threshold, task.max_detections)


def assert_same_detections(
    got: object, want: object, *, score_atol: float, box_atol: float, min_score: float = 0.3
) -> None:
    """One to one, both ways: every detection scoring >= min_score in either answer is paired
    with one of the other of the same class, score and box (original pixels) within tolerance."""
    assert isinstance(got, ImageDetections) and isinstance(want, ImageDetections)
    g = np.flatnonzero(got.scores >= min_score - score_atol)
    w = np.flatnonzero(want.scores >= min_score - score_atol)
    must_g = set(np.flatnonzero(got.scores >= min_score))
    must_w = set(np.flatnonzero(want.scores >= min_score))
    paired_g: set[int] = set()
    paired_w: set[int] = set()
    if len(g) and len(w):
        ok = (
            (got.labels[g][:, None] == want.labels[w][None, :])
            & (np.abs(got.scores[g][:, None] - want.scores[w][None, :]) <= score_atol)
            & (np.abs(got.boxes[g][:, None] - want.boxes[w][None, :]).max(-1) <= box_atol)
        )
        box = np.abs(got.boxes[g][:, None] - want.boxes[w][None, :]).max(-1)
        rows, cols = linear_sum_assignment(np.where(ok, box, 1e9))
        for r, c in zip(rows, cols, strict=True):
            if ok[r, c]:
                paired_g.add(int(g[r]))
                paired_w.add(int(w[c]))
    assert must_g <= paired_g and must_w <= paired_w, (
        f"unpaired: got {sorted(must_g - paired_g)} of {got.scores[:8]}, "
        f"want {sorted(must_w - paired_w)} of {want.scores[:8]}"
    )


def assert_rows_match_singles(
    batch: list[DetectionTask], got: list, singles: list, *, score_atol: float, box_px: float
) -> None:
    """Row by row against the single-image answers; box_px: pixels at the model's input size
    (the boxes come back in each original image's pixels, scaled by its longer side)."""
    assert len(got) == len(batch)
    # Images without a confident detection would match any row: make sure there are few.
    confident = sum(int((s.scores >= 0.3).sum()) for s in singles)
    assert confident >= len(batch), f"{confident} confident detections in {len(batch)} images"
    for row, (a, b) in enumerate(zip(got, singles, strict=True)):
        assert isinstance(a, ImageDetections), (row, a)
        box_atol = box_px * max(batch[row].size) / min(INPUT_SIZE)
        try:
            assert_same_detections(a, b, score_atol=score_atol, box_atol=box_atol)
        except AssertionError as exc:
            raise AssertionError(f"row {row} of a batch of {len(batch)}: {exc}") from None


@pytest.fixture(scope="module")
def fp32_default() -> Engine:
    """The eager float32 reference: one image at a time, Pillow decode."""
    return Engine.load(DEFAULT_MODEL, name="m", device="cuda", dtype="float32")


def graphs_engine(model_dir: Path, sizes: tuple[int, ...], dtype: str = "float32") -> Engine:
    engine = Engine.load(model_dir, name="m", device="cuda", dtype=dtype)
    spec = engine.preprocessor.spec
    size = fixed_input_size(spec)
    assert size is not None
    graphs = CudaGraphBackend(engine.backend)
    assert graphs.capture(sizes, *size, with_mask=spec.do_pad), graphs.bucket_states()
    engine.backend, engine.buckets = graphs, BatchBuckets(sizes, pad=True)
    return engine


@pytest.fixture
def no_eager_forward() -> Iterator[list[CudaGraphBackend]]:
    """Graph backends appended to the yielded list fail the test if they run a forward eagerly."""
    watched: list[CudaGraphBackend] = []
    yield watched
    for graphs in watched:
        assert graphs.eager_batches == 0, f"{graphs.eager_batches} batches ran eagerly"


# -- capture ------------------------------------------------------------------------------------


@pytest.mark.parametrize("msda", [False, True], ids=["grid_sample", "detr_serve_op"])
@pytest.mark.parametrize("kind", ["rt_detr", "rt_detr_v2", "d_fine"])
def test_every_rt_detr_family_model_is_captured_and_replays_like_eager(
    kind: str, msda: bool
) -> None:
    model = _build(kind).cuda()
    if msda:
        install_msda(model)
    eager = TorchBackend(model, torch.device("cuda"), torch.float32)
    graphs = CudaGraphBackend(eager)
    assert graphs.capture([1, 2, 4], 64, 64, with_mask=False), graphs.bucket_states()
    assert all(s.cuda_graph for s in graphs.bucket_states())
    for batch in (1, 2, 4):
        x = torch.randn((batch, 3, 64, 64), device="cuda")
        want, got = eager.infer(x, None), graphs.infer(x, None)
        torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got.pred_boxes, want.pred_boxes, atol=1e-4, rtol=1e-4)
    assert graphs.eager_batches == 0 and graphs.graph_batches == 3


def test_replays_x4_y2_z4_leave_the_first_answer_intact(tiny_model_dir: Path) -> None:
    engine = Engine.load(tiny_model_dir, name="tiny", device="cuda", dtype="float32")
    eager = engine.backend
    graphs = CudaGraphBackend(eager)
    assert graphs.capture([2, 4], 128, 128, with_mask=False), graphs.bucket_states()
    gen = torch.Generator(device="cuda").manual_seed(7)
    x4, y2, z4 = (torch.randn((n, 3, 128, 128), device="cuda", generator=gen) for n in (4, 2, 4))
    first = graphs.infer(x4, None)
    kept = (first.logits.clone(), first.pred_boxes.clone())
    second, third = graphs.infer(y2, None), graphs.infer(z4, None)
    torch.cuda.synchronize()
    # The answer handed out first is the caller's: later replays of its bucket and of others
    # (which share the graphs' memory pool) must not have written into it.
    assert torch.equal(first.logits, kept[0]) and torch.equal(first.pred_boxes, kept[1])
    for x, got in ((x4, first), (y2, second), (z4, third)):
        want = eager.infer(x, None)
        torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(first.logits, third.logits)  # distinct inputs, distinct answers


def test_graphs_on_a_second_gpu_are_captured_there() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    model = _build("rt_detr").to("cuda:1")
    eager = TorchBackend(model, torch.device("cuda:1"), torch.float32)
    graphs = CudaGraphBackend(eager)
    assert graphs.capture([1, 2], 64, 64, with_mask=False), graphs.bucket_states()
    x = torch.randn((2, 3, 64, 64), device="cuda:1")
    got = graphs.infer(x, None)
    assert got.logits.device == torch.device("cuda:1")
    torch.testing.assert_close(got.logits, eager.infer(x, None).logits, atol=1e-4, rtol=1e-4)


# -- padded batches and pipelining on the default model ------------------------------------------


@pytest.mark.parametrize(("n", "bucket"), [(3, 4), (5, 8), (7, 8)])
def test_each_row_of_a_padded_graph_batch_gets_its_own_images_answer(
    fp32_default: Engine, no_eager_forward: list[CudaGraphBackend], n: int, bucket: int
) -> None:
    engine = graphs_engine(DEFAULT_MODEL, (1, 2, 4, 8))
    assert isinstance(engine.backend, CudaGraphBackend)
    no_eager_forward.append(engine.backend)
    batch = [scene(100 * n + k, jpeg=False) for k in range(n)]
    got = engine.run_batch(batch)
    singles = [fp32_default.run_batch([t])[0] for t in batch]
    assert engine.backend.graph_batches == 1
    # float32 both, batch 8 against batch 1: cuDNN may pick other algorithms (TF32).
    assert_rows_match_singles(batch, got, singles, score_atol=5e-3, box_px=0.25)


def test_thirty_mixed_batches_on_two_workers_each_row_its_own_answer(
    fp32_default: Engine, no_eager_forward: list[CudaGraphBackend]
) -> None:
    settings = Settings(model=DEFAULT_MODEL, device="cuda", dtype="float32", max_batch_size=8)
    engine = build_engine(settings, "cuda")
    assert isinstance(engine.backend, CudaGraphBackend), engine.info.buckets
    no_eager_forward.append(engine.backend)
    sizes = [8, 3, 5, 1, 8, 2, 7, 4, 6, 8] * 3
    batches, index = [], 0
    for k, size in enumerate(sizes):
        batch = []
        for _ in range(size):
            # Mixed: JPEGs (nvjpeg where it is on) and decoded pixels in every other batch.
            batch.append(scene(index, jpeg=(index + k) % 2 == 0))
            index += 1
        batches.append(batch)
    with ThreadPoolExecutor(2) as pool:  # two batches in flight, as served on CUDA
        answers = list(pool.map(engine.run_batch, batches))
    for batch, got in zip(batches, answers, strict=True):
        singles = [fp32_default.run_batch([pixels_of(t)])[0] for t in batch]
        # nvjpeg and Pillow differ by a few grey levels: more room than graphs alone, still far
        # less than another image's answer would need.
        assert_rows_match_singles(batch, got, singles, score_atol=0.05, box_px=1.5)


# -- decode and precision ----------------------------------------------------------------------


def test_nvjpeg_decodes_within_a_few_grey_levels_of_pillow() -> None:
    reason = nvjpeg_unavailable_reason(torch.device("cuda"))
    if reason is not None:
        pytest.skip(reason)
    datas = [p.read_bytes() for p in EXAMPLES] + [generate_sample(5, i).jpeg for i in range(3)]
    jpegs = [probe_plain_jpeg(d, max_pixels=10**8, index=i) for i, d in enumerate(datas)]
    assert all(j is not None for j in jpegs)
    decoded = DeviceJpegDecoder(torch.device("cuda")).decode(jpegs)  # type: ignore[arg-type]
    for data, image in zip(datas, decoded, strict=True):
        assert isinstance(image, torch.Tensor) and image.is_cuda
        expected = torch.from_numpy(decode_image(data, max_pixels=10**8, index=0).pixels)
        diff = (image.permute(1, 2, 0).cpu().int() - expected.int()).abs().float()
        assert diff.mean() <= 1.5 and diff.quantile(0.99) <= 6, (diff.mean(), diff.max())


def test_float16_detections_match_float32_on_the_example_images() -> None:
    fp32 = Engine.load(DEFAULT_MODEL, name="m", device="cuda", dtype="float32")
    fp16 = Engine.load(DEFAULT_MODEL, name="m", device="cuda", dtype="float16")
    tasks = check_tasks()
    reference = fp32.normalized_detections(tasks)
    assert (reference.scores >= 0.3).sum() >= 10  # a trained model: real detections to compare
    size = fixed_input_size(fp32.preprocessor.spec)
    assert size is not None
    agree, summary = detections_agree(reference, fp16.normalized_detections(tasks), size)
    assert agree, summary


def test_the_full_fast_path_captures_every_bucket_and_answers_like_eager_float32(
    fp32_default: Engine, caplog
) -> None:
    caplog.set_level("INFO")
    settings = Settings(model=DEFAULT_MODEL, device="cuda", max_batch_size=8)
    fast = build_engine(settings, "cuda")
    modes = [(b.batch_size, b.cuda_graph, b.reason) for b in fast.info.buckets]
    assert modes == [(s, True, "") for s in (1, 2, 4, 8)], caplog.text
    assert isinstance(fast.backend, CudaGraphBackend) and fast.buckets is not None
    eager_before = fast.backend.eager_batches
    tasks = [scene(5000 + k, jpeg=k % 2 == 0) for k in range(5)]
    got = fast.run_batch(tasks)
    assert fast.backend.eager_batches == eager_before
    singles = [fp32_default.run_batch([pixels_of(t)])[0] for t in tasks]
    # dtype auto may have kept float16: same objects, a little more room.
    assert_rows_match_singles(tasks, got, singles, score_atol=0.08, box_px=2.0)
