"""app.engine.preprocess against transformers' own image processors and post-processing."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw
from transformers import (
    AutoConfig,
    AutoModelForObjectDetection,
    DeformableDetrConfig,
    DeformableDetrImageProcessorPil,
    DetrConfig,
    DetrImageProcessorPil,
    DFineConfig,
    HGNetV2Config,
    PreTrainedModel,
    ResNetConfig,
    RTDetrConfig,
    RTDetrImageProcessorPil,
    RTDetrResNetConfig,
    RTDetrV2Config,
)
from transformers.image_transforms import get_size_with_aspect_ratio
from transformers.image_utils import get_image_size_for_max_height_width

from app.engine.postprocess import BatchDetections, Postprocessor, PostprocessSpec, select
from app.engine.preprocess import Preprocessor
from app.engine.preprocess_spec import MaxSize, PreprocessSpec, ShortestEdge

CPU = torch.device("cpu")
# (width, height): landscape, portrait, tiny, wide.
IMAGE_SIZES = [(640, 480), (333, 517), (97, 61), (1280, 720)]
ImageProcessor = RTDetrImageProcessorPil | DeformableDetrImageProcessorPil | DetrImageProcessorPil


def _jpeg_image(width: int, height: int, seed: int) -> Image.Image:
    """Shapes on a flat background, through a JPEG round trip like an uploaded photo."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(10):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = [
            x0,
            y0,
            x0 + int(rng.integers(4, width // 2)),
            y0 + int(rng.integers(4, height // 2)),
        ]
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _chw(image: Image.Image) -> torch.Tensor:
    # The engine hands over HWC arrays viewed as CHW; keep that stride pattern here.
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny models gain nothing from threads, and on a busy machine OpenMP spinning makes
    # them several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [_jpeg_image(w, h, seed) for seed, (w, h) in enumerate(IMAGE_SIZES)]


def _preprocess(processor: ImageProcessor, path: Path, images: list[Image.Image]) -> Any:
    processor.save_pretrained(path)
    spec = PreprocessSpec.from_dir(path)
    ours = Preprocessor(spec, CPU, torch.float32)([_chw(im) for im in images])
    return spec, ours, processor(images=images, return_tensors="pt")


@pytest.mark.parametrize(
    "processor",
    [
        RTDetrImageProcessorPil(),  # 640x640 bilinear, rescale only: the RT-DETR default
        RTDetrImageProcessorPil(size={"height": 64, "width": 96}, resample=3, do_normalize=True),
        RTDetrImageProcessorPil(size={"height": 100, "width": 150}, resample=0),
        DeformableDetrImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 96}),
        DetrImageProcessorPil(size={"max_height": 200, "max_width": 150}, resample=3),
        DetrImageProcessorPil(
            size={"shortest_edge": 64, "longest_edge": 96}, pad_size={"height": 100, "width": 100}
        ),
    ],
    ids=["rtdetr-640", "rtdetr-bicubic-norm", "rtdetr-nearest", "deformable", "detr-max", "pad"],
)
def test_preprocess_matches_transformers_image_processor(
    processor: ImageProcessor, images: list[Image.Image], tmp_path: Path
) -> None:
    spec, (pixel_values, pixel_mask), expected = _preprocess(processor, tmp_path, images)

    assert pixel_values.shape == expected["pixel_values"].shape
    if "pixel_mask" in expected:
        assert pixel_mask is not None and torch.equal(pixel_mask, expected["pixel_mask"])
    else:
        assert pixel_mask is None
    # Measured: at most one grey level (1/255 before normalisation, 0.0175 after), on < 0.1 % of
    # values: PIL's fixed-point filter arithmetic against torch's float one. Nearest is exact.
    level = spec.rescale_factor / (min(spec.std) if spec.do_normalize else 1.0)
    diff = (pixel_values - expected["pixel_values"]).abs()
    assert diff.max().item() <= level + 1e-5
    assert (diff > 1e-5).float().mean().item() < 0.002
    if spec.resample == 0:
        assert diff.max().item() < 1e-5


def test_preprocess_pads_bottom_right_with_zeros_and_masks_the_padding(tmp_path: Path) -> None:
    DetrImageProcessorPil(size={"shortest_edge": 20, "longest_edge": 40}).save_pretrained(tmp_path)
    preprocess = Preprocessor(PreprocessSpec.from_dir(tmp_path), CPU, torch.float32)
    wide = torch.full((3, 10, 40), 200, dtype=torch.uint8)  # -> 10x40
    tall = torch.full((3, 40, 20), 200, dtype=torch.uint8)  # -> 40x20

    pixel_values, pixel_mask = preprocess([wide, tall])

    assert pixel_values.shape == (2, 3, 40, 40) and pixel_mask is not None
    assert pixel_mask[0, :10, :].all() and not pixel_mask[0, 10:, :].any()
    assert pixel_mask[1, :, :20].all() and not pixel_mask[1, :, 20:].any()
    assert (pixel_values[0, :, 10:, :] == 0).all() and (pixel_values[1, :, :, 20:] == 0).all()
    assert (pixel_values[0, :, :10, :] != 0).all()


def test_preprocess_returns_the_requested_dtype(tmp_path: Path) -> None:
    RTDetrImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    preprocess = Preprocessor(PreprocessSpec.from_dir(tmp_path), CPU, torch.bfloat16)

    pixel_values, pixel_mask = preprocess([torch.zeros((3, 50, 70), dtype=torch.uint8)])

    assert pixel_values.dtype == torch.bfloat16 and pixel_values.shape == (1, 3, 32, 32)
    assert pixel_mask is None


def test_preprocess_rejects_images_that_are_not_uint8_rgb(tmp_path: Path) -> None:
    RTDetrImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    preprocess = Preprocessor(PreprocessSpec.from_dir(tmp_path), CPU, torch.float32)

    with pytest.raises(ValueError, match=r"image 1: expected a uint8 RGB tensor \[3, H, W\]"):
        preprocess([torch.zeros((3, 8, 8), dtype=torch.uint8), torch.zeros((3, 8, 8))])
    with pytest.raises(ValueError, match="image 0"):
        preprocess([torch.zeros((4, 8, 8), dtype=torch.uint8)])


@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(1, 5000),
    width=st.integers(1, 5000),
    shortest=st.integers(1, 1500),
    extra=st.integers(0, 1500),
)
def test_aspect_preserving_sizes_match_transformers(
    height: int, width: int, shortest: int, extra: int
) -> None:
    longest = shortest + extra
    expected = get_size_with_aspect_ratio((height, width), shortest, longest)
    if min(expected) > 0:  # transformers returns 0 for extreme ratios; we keep one pixel
        assert ShortestEdge(shortest, longest).output_size(height, width) == expected
    expected = get_image_size_for_max_height_width((height, width), shortest, longest)
    if min(expected) > 0:
        assert MaxSize(shortest, longest).output_size(height, width) == expected


def _write_config(path: Path, **values: Any) -> Path:
    base = json.loads(RTDetrImageProcessorPil().to_json_string())
    (path / "preprocessor_config.json").write_text(json.dumps(base | values))
    return path


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"resample": 1}, r"resample=1 \(lanczos\) is not supported"),
        ({"image_processor_type": "YolosImageProcessor"}, "image_processor_type='YolosImage"),
        ({"size": {"shortest_edge": 640}}, "size=.*shortest_edge.* is not supported"),
        ({"size": {"shortest_edge": 64, "longest_edge": 96}}, "do_pad=false needs a fixed size"),
        ({"image_mean": [0.5, 0.5]}, "image_mean"),
        ({"do_pad": True, "pad_size": 640}, "pad_size=640 is not supported"),
    ],
)
def test_from_dir_rejects_unsupported_config_naming_file_and_key(
    tmp_path: Path, values: dict[str, Any], message: str
) -> None:
    _write_config(tmp_path, **values)

    with pytest.raises(ValueError, match=message) as error:
        PreprocessSpec.from_dir(tmp_path)
    assert "preprocessor_config.json" in str(error.value)


def test_from_dir_says_when_the_preprocessor_config_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"preprocessor_config.json: not found"):
        PreprocessSpec.from_dir(tmp_path)


def test_from_dir_fills_keys_left_out_with_the_processor_defaults(tmp_path: Path) -> None:
    payload = {"image_processor_type": "DeformableDetrImageProcessor"}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(payload))

    spec = PreprocessSpec.from_dir(tmp_path)

    assert spec.resize == ShortestEdge(800, 1333)
    assert spec.do_normalize and spec.do_pad and spec.resample == 2


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (RTDetrConfig(num_queries=300), PostprocessSpec("sigmoid", 300)),
        (RTDetrV2Config(num_queries=200), PostprocessSpec("sigmoid", 200)),
        (DFineConfig(num_queries=250), PostprocessSpec("sigmoid", 250)),
        (
            DeformableDetrConfig(num_queries=300, backbone_config=ResNetConfig()),
            PostprocessSpec("sigmoid", 100),
        ),
        (
            DetrConfig(num_queries=100, backbone_config=ResNetConfig()),
            PostprocessSpec("softmax", 100),
        ),
    ],
    ids=["rt_detr", "rt_detr_v2", "d_fine", "deformable_detr", "detr"],
)
def test_postprocess_spec_follows_transformers_per_family(
    config: Any, expected: PostprocessSpec
) -> None:
    assert PostprocessSpec.from_config(config) == expected


def test_postprocess_spec_rejects_unsupported_models() -> None:
    with pytest.raises(ValueError, match="model_type='yolos' is not supported"):
        PostprocessSpec.from_config(SimpleNamespace(model_type="yolos"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="use_focal_loss=false"):
        PostprocessSpec.from_config(RTDetrConfig(use_focal_loss=False))


def _reference_postprocess(
    family: str, logits: torch.Tensor, boxes: torch.Tensor, sizes: torch.Tensor, threshold: float
) -> list[dict[str, torch.Tensor]]:
    outputs = SimpleNamespace(logits=logits, pred_boxes=boxes)
    classes: dict[str, type[ImageProcessor]] = {
        "rt_detr": RTDetrImageProcessorPil,
        "deformable_detr": DeformableDetrImageProcessorPil,
        "detr": DetrImageProcessorPil,
    }
    processor = classes[family]()
    results = processor.post_process_object_detection(
        outputs, threshold=threshold, target_sizes=sizes
    )
    # DETR returns queries in query order; ours come best first.
    for result in results:
        order = torch.argsort(result["scores"], descending=True, stable=True)
        for key in result:
            result[key] = result[key][order]
    return results


SPECS = {
    "rt_detr": lambda queries: PostprocessSpec("sigmoid", queries),
    "deformable_detr": lambda queries: PostprocessSpec("sigmoid", 100),
    "detr": lambda queries: PostprocessSpec("softmax", queries),
}


@settings(max_examples=25, deadline=None)
@given(
    family=st.sampled_from(sorted(SPECS)),
    batch=st.integers(1, 3),
    queries=st.integers(1, 40),
    classes=st.integers(2, 6),
    threshold=st.floats(0.0, 0.9),
    seed=st.integers(0, 2**31 - 1),
)
def test_postprocess_matches_transformers_on_random_outputs(
    family: str, batch: int, queries: int, classes: int, threshold: float, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn((batch, queries, classes), generator=generator) * 3
    boxes = torch.rand((batch, queries, 4), generator=generator)
    sizes = torch.randint(1, 2000, (batch, 2), generator=generator)

    dets = Postprocessor(SPECS[family](queries))(logits, boxes, sizes)
    expected = _reference_postprocess(family, logits, boxes, sizes, threshold)

    for i, reference in enumerate(expected):
        scores, labels, xyxy = select(dets, i, threshold, max_detections=10_000)
        np.testing.assert_allclose(scores, reference["scores"].numpy(), atol=1e-5)
        np.testing.assert_array_equal(labels, reference["labels"].numpy())
        np.testing.assert_allclose(xyxy, reference["boxes"].numpy(), atol=1e-5, rtol=1e-5)


def test_boxes_scale_to_each_images_own_original_size() -> None:
    logits = torch.tensor([[[5.0, -5.0]], [[5.0, -5.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.5]], [[0.25, 0.5, 0.5, 1.0]]])  # cxcywh
    sizes = torch.tensor([[100, 200], [300, 40]])  # (height, width)

    dets = Postprocessor(PostprocessSpec("sigmoid", 1))(logits, boxes, sizes)

    np.testing.assert_allclose(dets.boxes[0, 0], [50, 25, 150, 75])
    np.testing.assert_allclose(dets.boxes[1, 0], [0, 0, 20, 300])
    assert dets.scores.dtype == np.float32 and dets.labels.dtype == np.int64


def test_class_masks_exclude_classes_before_the_top_k() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn((2, 10, 4), generator=generator)
    logits[:, :, 0] += 10  # class 0 would fill every top-k slot
    boxes = torch.rand((2, 10, 4), generator=generator)
    sizes = torch.tensor([[100, 100], [100, 100]])
    masks = torch.tensor([[False, True, True, True], [True, True, True, True]])
    postprocess = Postprocessor(PostprocessSpec("sigmoid", 5))

    masked = postprocess(logits, boxes, sizes, masks)
    plain = postprocess(logits, boxes, sizes)

    assert (plain.labels[0] == 0).all()
    assert (masked.labels[0] != 0).all() and np.isfinite(masked.scores[0]).all()
    allowed = logits[0, :, 1:].sigmoid().flatten().topk(5).values.numpy()
    np.testing.assert_allclose(masked.scores[0], allowed, rtol=1e-6)
    np.testing.assert_array_equal(masked.labels[1], plain.labels[1])
    np.testing.assert_array_equal(masked.scores[1], plain.scores[1])


def test_class_masks_for_softmax_models_pick_the_best_allowed_class() -> None:
    logits = torch.tensor([[[4.0, 3.0, 0.0, 1.0]]])  # classes 0..2, then no-object
    boxes = torch.full((1, 1, 4), 0.5)
    postprocess = Postprocessor(PostprocessSpec("softmax", 1))
    # The engine's masks may span every logit column, the no-object one included.
    masks = torch.tensor([[False, True, True, True]])

    dets = postprocess(logits, boxes, torch.tensor([[10, 10]]), masks)

    assert dets.labels[0, 0] == 1
    np.testing.assert_allclose(dets.scores[0, 0], logits[0, 0].softmax(-1)[1].item(), rtol=1e-6)


def test_select_keeps_scores_strictly_above_threshold_up_to_max_detections() -> None:
    scores = np.array([[0.9, 0.7, 0.5, 0.5, 0.1], [0.3, 0.2, 0.1, -np.inf, -np.inf]], np.float32)
    labels = np.arange(10).reshape(2, 5)
    boxes = np.arange(40, dtype=np.float32).reshape(2, 5, 4)
    dets = BatchDetections(scores=scores, labels=labels, boxes=boxes)

    kept, kept_labels, kept_boxes = select(dets, 0, threshold=0.5, max_detections=10)
    np.testing.assert_array_equal(kept, scores[0, :2])  # 0.5 is not above 0.5: transformers
    np.testing.assert_array_equal(kept_labels, [0, 1])
    np.testing.assert_array_equal(kept_boxes, boxes[0, :2])
    assert select(dets, 0, threshold=0.0, max_detections=3)[0].tolist() == pytest.approx(
        [0.9, 0.7, 0.5]
    )
    assert select(dets, 1, threshold=-1.0, max_detections=10)[1].tolist() == [5, 6, 7]
    assert select(dets, 1, threshold=0.5, max_detections=10)[0].size == 0


# Tiny random checkpoints of each family, built in seconds on a CPU.
def _outputs(stages: list[str]) -> dict[str, Any]:
    # Backbone configs take out_features in __init__ without declaring it as a field.
    return {"out_features": stages}


def _rt_detr_family(config_cls: type, **extra: Any) -> Callable[[], Any]:
    def build() -> Any:
        backbone = RTDetrResNetConfig(
            embedding_size=8,
            hidden_sizes=[8, 16, 16, 16],
            depths=[1, 1, 1, 1],
            layer_type="basic",
            **_outputs(["stage2", "stage3", "stage4"]),
        )
        return config_cls(backbone_config=backbone, **_RT_DETR_COMMON, **extra)

    return build


_RT_DETR_COMMON: dict[str, Any] = {
    "d_model": 16,
    "encoder_hidden_dim": 16,
    "encoder_in_channels": [16, 16, 16],
    "decoder_in_channels": [16, 16, 16],
    "encoder_ffn_dim": 16,
    "decoder_ffn_dim": 16,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "decoder_layers": 2,
    "num_queries": 12,
    "num_labels": 3,
}


def _d_fine() -> Any:
    backbone = HGNetV2Config(
        stem_channels=[3, 8, 8],
        stage_in_channels=[8, 8, 16, 16],
        stage_mid_channels=[8, 8, 8, 8],
        stage_out_channels=[8, 16, 16, 16],
        hidden_sizes=[8, 16, 16, 16],
        stage_num_blocks=[1, 1, 1, 1],
        stage_downsample=[False, True, True, True],
        stage_light_block=[False, False, True, True],
        stage_kernel_size=[3, 3, 5, 5],
        stage_numb_of_layers=[1, 1, 1, 1],
        **_outputs(["stage2", "stage3", "stage4"]),
    )
    return DFineConfig(
        backbone_config=backbone, decoder_n_points=[2, 2, 2], lqe_hidden_dim=8, **_RT_DETR_COMMON
    )


def _resnet(out_features: list[str]) -> ResNetConfig:
    return ResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 16, 16, 16],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        **_outputs(out_features),
    )


_DETR_COMMON: dict[str, Any] = {
    "encoder_layers": 1,
    "decoder_layers": 2,
    "encoder_ffn_dim": 16,
    "decoder_ffn_dim": 16,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "num_queries": 12,
    "num_labels": 3,
}

RT_DETR_PROCESSOR = {"size": {"height": 64, "width": 96}}  # multiples of the stride, 32
DETR_PROCESSOR = {"size": {"shortest_edge": 64, "longest_edge": 96}}
FAMILIES: dict[str, tuple[Callable[[], Any], type[ImageProcessor], dict[str, Any]]] = {
    "rt_detr": (_rt_detr_family(RTDetrConfig), RTDetrImageProcessorPil, RT_DETR_PROCESSOR),
    "rt_detr_v2": (_rt_detr_family(RTDetrV2Config), RTDetrImageProcessorPil, RT_DETR_PROCESSOR),
    "d_fine": (_d_fine, RTDetrImageProcessorPil, RT_DETR_PROCESSOR),
    "deformable_detr": (
        lambda: DeformableDetrConfig(
            backbone_config=_resnet(["stage2", "stage3", "stage4"]),
            d_model=32,  # its GroupNorm needs a multiple of 32
            num_feature_levels=3,
            disable_custom_kernels=True,
            **_DETR_COMMON,
        ),
        DeformableDetrImageProcessorPil,
        DETR_PROCESSOR,
    ),
    "detr": (
        lambda: DetrConfig(backbone_config=_resnet(["stage4"]), d_model=16, **_DETR_COMMON),
        DetrImageProcessorPil,
        DETR_PROCESSOR,
    ),
}


def _save_checkpoint(family: str, path: Path) -> None:
    build_config, processor_cls, processor_kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model = AutoModelForObjectDetection.from_config(build_config())
    model.save_pretrained(path)
    processor_cls(**processor_kwargs).save_pretrained(path)


def _match(
    reference: dict[str, torch.Tensor], ours: tuple[np.ndarray, ...], threshold: float
) -> None:
    """Every detection clear of the threshold has a twin: same label, score within 0.01 and
    box within 1 px. Near-ties may swap places, so twins are found rather than zipped."""
    scores, labels, boxes = ours
    unmatched = list(range(len(scores)))
    for score, label, box in zip(
        reference["scores"].numpy(),
        reference["labels"].numpy(),
        reference["boxes"].numpy(),
        strict=True,
    ):
        twin = next(
            (
                j
                for j in unmatched
                if labels[j] == label
                and abs(scores[j] - score) < 0.01
                and np.abs(boxes[j] - box).max() < 1.0
            ),
            None,
        )
        if twin is not None:
            unmatched.remove(twin)
        else:
            assert score < threshold + 0.01, f"reference detection {score, label, box} unmatched"
    assert all(scores[j] < threshold + 0.01 for j in unmatched), "extra detections"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_full_pipeline_matches_transformers(
    family: str, images: list[Image.Image], tmp_path: Path
) -> None:
    _save_checkpoint(family, tmp_path)
    model: PreTrainedModel = AutoModelForObjectDetection.from_pretrained(tmp_path).eval()
    processor = FAMILIES[family][1].from_pretrained(tmp_path)
    preprocess = Preprocessor(PreprocessSpec.from_dir(tmp_path), CPU, torch.float32)
    postprocess = Postprocessor(PostprocessSpec.from_config(AutoConfig.from_pretrained(tmp_path)))
    sizes = torch.tensor([(im.height, im.width) for im in images])

    with torch.no_grad():
        expected_outputs = model(**processor(images=images, return_tensors="pt"))
        pixel_values, pixel_mask = preprocess([_chw(im) for im in images])
        outputs = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
    dets = postprocess(outputs.logits, outputs.pred_boxes, sizes)
    # Random weights bunch the scores: cut at the median candidate so that there is
    # something on both sides of the threshold.
    threshold = float(np.median(dets.scores))
    expected = processor.post_process_object_detection(
        expected_outputs, threshold=threshold, target_sizes=sizes
    )

    assert sum(len(r["scores"]) for r in expected) > 0
    for i, reference in enumerate(expected):
        _match(reference, select(dets, i, threshold, max_detections=1000), threshold)
