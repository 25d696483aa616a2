"""What a checkpoint's image processor does to an image, read from its preprocessor_config.json:
the resize rule, rescale, normalisation and padding. No torch here: the front ends read it too
(to reduce large images to the model's input size while they decode).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

PREPROCESSOR_FILE = "preprocessor_config.json"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# PIL resampling codes, as preprocessor_config.json stores them.
NEAREST, BILINEAR, BICUBIC = 0, 2, 3
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
# torch's antialiased kernels are ports of Pillow's filters (bicubic with a = -0.5).
_INTERPOLATE_MODES = {BILINEAR: "bilinear", BICUBIC: "bicubic"}

# Class defaults of the transformers processors whose preprocessing is reproduced here: keys a
# preprocessor_config.json leaves out take these values, as they do in transformers.
_DETR_DEFAULTS: dict[str, Any] = {
    "do_normalize": True,
    "do_pad": True,
    "size": {"shortest_edge": 800, "longest_edge": 1333},
}
_PROCESSOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "RTDetr": {"do_normalize": False, "do_pad": False, "size": {"height": 640, "width": 640}},
    "DeformableDetr": _DETR_DEFAULTS,
    "ConditionalDetr": _DETR_DEFAULTS,
    "Detr": _DETR_DEFAULTS,
}
_PROCESSOR_SUFFIXES = (
    "ImageProcessorFast",
    "ImageProcessorPil",
    "ImageProcessor",
    "FeatureExtractor",
)


@dataclass(frozen=True)
class FixedSize:
    """``size: {"height", "width"}``: stretched to exactly this size."""

    height: int
    width: int

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return self.height, self.width


@dataclass(frozen=True)
class ShortestEdge:
    """``size: {"shortest_edge", "longest_edge"}``: aspect ratio kept, both bounds respected."""

    shortest_edge: int
    longest_edge: int

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        # Same float arithmetic, round() and int() truncations as transformers'
        # get_size_with_aspect_ratio, so the size agrees to the pixel.
        size = self.shortest_edge
        raw_size: float | None = None
        min_original, max_original = float(min(height, width)), float(max(height, width))
        if max_original / min_original * size > self.longest_edge:
            raw_size = self.longest_edge * min_original / max_original
            size = int(round(raw_size))
        if (height <= width and height == size) or (width <= height and width == size):
            return height, width
        scale = raw_size if raw_size is not None else size
        if width < height:
            out_height, out_width = int(scale * height / width), size
        else:
            out_height, out_width = size, int(scale * width / height)
        # transformers fails on a zero-sized side (extreme aspect ratios); we keep one pixel.
        return max(out_height, 1), max(out_width, 1)


@dataclass(frozen=True)
class MaxSize:
    """``size: {"max_height", "max_width"}``: aspect ratio kept, scaled to touch one bound."""

    max_height: int
    max_width: int

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        scale = min(self.max_height / height, self.max_width / width)
        return max(int(height * scale), 1), max(int(width * scale), 1)


ResizeSpec = FixedSize | ShortestEdge | MaxSize


@dataclass(frozen=True)
class PreprocessSpec:
    """What the checkpoint's image processor does to an image, read from its JSON."""

    resize: ResizeSpec | None  # None when do_resize is false
    resample: int = BILINEAR
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = False
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    do_pad: bool = False
    pad_size: tuple[int, int] | None = None  # (height, width); None pads to the batch's largest
    # "pillow": resized as transformers' processors do (Pillow's filters, antialiased);
    # "opencv": cv2.resize(INTER_LINEAR) on the host, as Ultralytics' LetterBox does.
    resize_with: Literal["pillow", "opencv"] = "pillow"

    def __post_init__(self) -> None:
        if self.resize is not None and self.resample not in (NEAREST, *_INTERPOLATE_MODES):
            name = _RESAMPLE_NAMES.get(self.resample, "unknown")
            raise ValueError(
                f"resample={self.resample} ({name}) is not supported; "
                f"use {NEAREST} (nearest), {BILINEAR} (bilinear) or {BICUBIC} (bicubic)"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or any(s == 0 for s in self.std):
            raise ValueError(
                f"image_mean and image_std need three values each, std non-zero; "
                f"got {self.mean} and {self.std}"
            )
        if not self.do_pad and not isinstance(self.resize, FixedSize):
            # Images of different shapes could not be stacked into one batch: transformers itself
            # cannot batch them either. Refuse at start-up rather than on some batches only.
            raise ValueError(
                'do_pad=false needs a fixed size {"height": H, "width": W}; '
                "without padding, images of different aspect ratios cannot share a batch"
            )

    @classmethod
    def for_model(cls, model: Path) -> PreprocessSpec:
        """The pre-processing of whatever `model` is: an Ultralytics checkpoint file, else a
        Hugging Face folder (from_dir)."""
        from app.models.ultralytics import preprocess_spec_for

        spec = preprocess_spec_for(Path(model))
        return spec if spec is not None else cls.from_dir(model)

    @classmethod
    def from_dir(cls, model_dir: Path) -> PreprocessSpec:
        """Read ``model_dir/preprocessor_config.json``; ValueError naming the file and key."""
        path = Path(model_dir) / PREPROCESSOR_FILE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(
                f"{path}: not found; the model directory needs its image processor "
                "(save it with image_processor.save_pretrained)"
            ) from None
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot be read as JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object")
        try:
            return cls._from_json(raw)
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"{path}: {exc}") from exc

    @classmethod
    def _from_json(cls, raw: dict[str, Any]) -> PreprocessSpec:
        kind = raw.get("image_processor_type") or raw.get("feature_extractor_type")
        family = _processor_family(kind)
        if family is None:
            supported = ", ".join(f"{name}ImageProcessor" for name in _PROCESSOR_DEFAULTS)
            raise ValueError(
                f"image_processor_type={kind!r} is not supported; use one of {supported}"
            )
        defaults = _PROCESSOR_DEFAULTS[family]

        def get(key: str, default: Any) -> Any:
            value = raw.get(key)
            return default if value is None else value

        do_resize = bool(get("do_resize", True))
        resize = (
            _resize_spec(get("size", defaults["size"]), raw.get("max_size")) if do_resize else None
        )
        return cls(
            resize=resize,
            resample=int(get("resample", BILINEAR)),
            do_rescale=bool(get("do_rescale", True)),
            rescale_factor=float(get("rescale_factor", 1 / 255)),
            do_normalize=bool(get("do_normalize", defaults["do_normalize"])),
            mean=_three_floats("image_mean", get("image_mean", IMAGENET_MEAN)),
            std=_three_floats("image_std", get("image_std", IMAGENET_STD)),
            # DETR-era configs spell do_pad as pad_and_return_pixel_mask.
            do_pad=bool(get("do_pad", get("pad_and_return_pixel_mask", defaults["do_pad"]))),
            pad_size=_pad_size(raw.get("pad_size")),
        )

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Size (height, width) of an image of this size after resizing, before padding."""
        return (height, width) if self.resize is None else self.resize.output_size(height, width)


def _processor_family(kind: Any) -> str | None:
    if not isinstance(kind, str):
        return None
    for suffix in _PROCESSOR_SUFFIXES:
        if kind.endswith(suffix):
            family = kind.removesuffix(suffix)
            return family if family in _PROCESSOR_DEFAULTS else None
    return None


def _resize_spec(size: Any, max_size: Any) -> ResizeSpec:
    if isinstance(size, int):
        # Old DETR configs: an int shortest edge plus max_size (transformers assumes 1333).
        return ShortestEdge(size, int(max_size) if max_size is not None else 1333)
    if isinstance(size, dict):
        keys = {k for k, v in size.items() if v}
        if {"shortest_edge", "longest_edge"} <= keys:
            return ShortestEdge(int(size["shortest_edge"]), int(size["longest_edge"]))
        if {"max_height", "max_width"} <= keys:
            return MaxSize(int(size["max_height"]), int(size["max_width"]))
        if {"height", "width"} <= keys:
            return FixedSize(int(size["height"]), int(size["width"]))
    raise ValueError(
        f"size={size!r} is not supported; use {{'height', 'width'}}, "
        "{'shortest_edge', 'longest_edge'} or {'max_height', 'max_width'}"
    )


def _pad_size(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, dict) and value.get("height") and value.get("width"):
        return int(value["height"]), int(value["width"])
    raise ValueError(f"pad_size={value!r} is not supported; use {{'height': H, 'width': W}}")


def _three_floats(key: str, value: Any) -> tuple[float, float, float]:
    values = [float(value)] * 3 if isinstance(value, int | float) else [float(v) for v in value]
    if len(values) != 3:
        raise ValueError(f"{key}={value!r}: expected one value per RGB channel")
    return values[0], values[1], values[2]
