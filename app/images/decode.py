"""Decode image bytes with Pillow, with guards: known formats only, the container's structure
walked cheaply first (app/images/structure.py), pixel count checked from the header before the
full decode, EXIF orientation applied, every mode converted to RGB.

`probe_image` reads what admission needs from the header alone (sizes, the pixels a decode will
hold); `decode_image` given a `Fit` resizes large images to the model's input size as it decodes
(JPEGs decode at 1/2, 1/4 or 1/8 scale first), so that no later stage holds their full
resolution. Where JPEGs are decoded on the GPU, `probe_plain_jpeg` runs the same guards on the
header alone and hands the bytes on (see app/images/device.py)."""

from __future__ import annotations

import io
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, JpegImagePlugin, UnidentifiedImageError

from app.errors import ImageTooLargeError, InvalidImageError
from app.images.structure import jpeg_header, structure_problem, walk_jpeg

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
# TIFF compressions decoded here. JPEG-in-TIFF is refused: its strips are JPEG streams that
# the structure walk does not see (a progressive strip could hold thousands of scans).
TIFF_COMPRESSIONS = frozenset(
    {
        "raw",
        "packbits",
        "tiff_lzw",
        "tiff_adobe_deflate",
        "tiff_deflate",
        "tiff_ccitt",
        "group3",
        "group4",
    }
)
# Formats whose decoder holds several copies of the image: their pixels count this many times
# in the budgets. Pillow decodes every WebP with libwebp's animation decoder, which keeps two
# RGBA canvases, and copies the frame out as bytes before making the RGB image.
DECODE_WEIGHT = {"WEBP": 4}
# Images over this many pixels are resized to the model's input size while decoding (JPEGs
# decode at a reduced scale first). Below it, for a model on a GPU, they travel at full size and
# are resized on the device with the batch; for a model on the CPU they are resized while
# decoding too (Fit.reduce_above_pixels = 0), at full decode scale: Pillow's resize is what the
# model's own image processor does, and it saves the engine's cores the batched float resize.
REDUCE_ABOVE_PIXELS = 4_000_000


@dataclass(frozen=True)
class Fit:
    """How the model resizes an image: (height, width) -> (height, width) of its input, and
    Pillow's resampling filter for it (0 nearest, 2 bilinear, 3 bicubic). Images over
    `reduce_above_pixels` are reduced to it while decoding."""

    output_size: Callable[[int, int], tuple[int, int]]
    resample: int = Image.Resampling.BILINEAR
    reduce_above_pixels: int = REDUCE_ABOVE_PIXELS

    def target(self, height: int, width: int) -> tuple[int, int] | None:
        """The size an image of (height, width) is reduced to while decoding, or None when it
        is decoded at full size."""
        if height * width <= self.reduce_above_pixels:
            return None
        out = self.output_size(height, width)
        return out if out[0] * out[1] < height * width else None


def _drafts(fmt: str, width: int, height: int) -> bool:
    """Whether a reduced image is decoded at a JPEG scale first: only large ones, so that
    images under REDUCE_ABOVE_PIXELS keep exactly the pixels a full decode and resize give."""
    return fmt == "JPEG" and width * height > REDUCE_ABOVE_PIXELS


@dataclass(frozen=True)
class ImageInfo:
    """What the header says, before any pixel is decoded."""

    format: str
    height: int  # after the EXIF orientation, as the answer reports it
    width: int
    # Pixels the decode materialises: less for a JPEG decoded at a scale, more for a format whose
    # decoder holds several copies (DECODE_WEIGHT).
    decode_pixels: int
    held_pixels: int  # pixels kept once decoded (the model's input size when reduced)
    plain_jpeg: bool  # three-channel JPEG without rotation: the GPU decoder gives Pillow's pixels


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # uint8 [h, w, 3], RGB: the full image, or the model's input size
    format: str
    source_size: tuple[int, int] | None = None  # (height, width) when `pixels` was reduced

    @property
    def height(self) -> int:
        """Height of the original image (boxes are reported in its pixels)."""
        return self.source_size[0] if self.source_size else int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return self.source_size[1] if self.source_size else int(self.pixels.shape[1])


@dataclass(frozen=True)
class EncodedJpeg:
    """A JPEG whose header passed the guards, left encoded for a batched decode on the device."""

    data: bytes
    height: int
    width: int
    index: int  # its position in the request, for error messages

    @property
    def pixel_count(self) -> int:
        return self.height * self.width


_JPEG_MAGIC = b"\xff\xd8\xff"
_EXIF_ORIENTATION = 0x0112


def probe_plain_jpeg(data: bytes, *, max_pixels: int, index: int) -> EncodedJpeg | None:
    """The JPEG as an EncodedJpeg when the device decoder gives the same pixels as Pillow: a
    three-channel (YCbCr or RGB) JPEG with no EXIF rotation, whose marker walk reaches its
    end-of-image marker (nvjpeg decodes truncated files that Pillow refuses). None for anything
    else (other formats, greyscale or CMYK JPEGs, rotated ones, unreadable headers, truncated or
    malformed segments): decode_image takes those, with the CPU path's own answer. Raises
    ImageTooLargeError from the header, and InvalidImageError for a structure no real JPEG has,
    like decode_image. Bytes after the end-of-image marker (Pillow ignores them) are dropped."""
    if not data.startswith(_JPEG_MAGIC):
        return None
    problem, end = walk_jpeg(data)
    if problem is not None:
        raise InvalidImageError(problem, image_index=index)
    if end is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=["JPEG"])
        with img:
            width, height = img.size
            if width < 1 or height < 1 or img.mode != "RGB" or img.format != "JPEG":
                return None
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Image.DecompressionBombError:
        raise ImageTooLargeError(
            f"the image is larger than {max_pixels} pixels", image_index=index
        ) from None
    except Exception:  # a header Pillow cannot read: decode_image says what is wrong
        return None
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"the image has {width}x{height} = {width * height} pixels, over the limit of "
            f"{max_pixels}",
            image_index=index,
        )
    if orientation not in (None, 1):
        return None
    return EncodedJpeg(data if end == len(data) else data[:end], height, width, index)


def _open(data: bytes, *, max_pixels: int, index: int | None) -> Image.Image:
    """Open the header after the structure walk; the size and format checked, nothing decoded."""
    if not data:
        raise InvalidImageError("the image is empty (0 bytes)", image_index=index)
    problem = structure_problem(data)
    if problem is not None:
        raise InvalidImageError(problem, image_index=index)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=sorted(ALLOWED_FORMATS))
    except Image.DecompressionBombError:
        raise ImageTooLargeError(
            f"the image is larger than {max_pixels} pixels", image_index=index
        ) from None
    except UnidentifiedImageError:
        raise InvalidImageError(
            "not an image in a supported format (JPEG, PNG, WebP, BMP, GIF, TIFF)",
            image_index=index,
        ) from None
    except Exception as exc:  # Pillow raises many types on hostile headers
        raise InvalidImageError(
            f"the image header is corrupt or truncated ({type(exc).__name__})", image_index=index
        ) from None
    width, height = img.size
    if width < 1 or height < 1:
        img.close()
        raise InvalidImageError("the image has no pixels", image_index=index)
    if width * height > max_pixels:
        img.close()
        raise ImageTooLargeError(
            f"the image has {width}x{height} = {width * height} pixels, over the limit of "
            f"{max_pixels}",
            image_index=index,
        )
    compression = img.info.get("compression")
    if img.format == "TIFF" and compression not in TIFF_COMPRESSIONS:
        img.close()
        raise InvalidImageError(
            f"TIFF compression {compression!r} is not accepted; use one of "
            f"{', '.join(sorted(TIFF_COMPRESSIONS))}",
            image_index=index,
        )
    return img


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation, from the header alone: Pillow's PngImageFile.getexif decodes the
    whole image to look for an eXIf chunk after the pixels, so a PNG's counts only when the chunk
    comes before them (where the PNG specification puts it)."""
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    try:
        value = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a corrupt EXIF block: decoded as stored, as exif_transpose would
        return 1
    return value if value in _TRANSPOSE else 1


_JPEG_MODES = {1: "L", 3: "RGB", 4: "CMYK"}


def _plain_jpeg_facts(data: bytes, *, max_pixels: int, index: int) -> tuple[int, int, str] | None:
    """(width, height, mode) of a JPEG whose header Pillow would read to exactly these facts
    and an EXIF orientation of 1, from the marker walk alone (app/images/structure.py): about a
    tenth of what Image.open and getexif cost, the largest part of a front end's work per image
    where JPEGs travel encoded. None for anything else (then Pillow reads the header): other
    formats, a header that is not plainly well formed, a marker Pillow's parser does not know,
    precision other than 8 bits, an APP1 segment (EXIF or XMP: an orientation), an MPO's APP2.
    The structure guards (structure_problem) apply first, as on Pillow's path; a table Pillow's
    header parser would refuse is refused by the decode (the same 400) instead of here."""
    if not data.startswith(_JPEG_MAGIC):
        return None
    problem = structure_problem(data)
    if problem is not None:
        raise InvalidImageError(problem, image_index=index)
    header = jpeg_header(data)
    if header is None or header.precision != 8:
        return None
    mode = _JPEG_MODES.get(header.components)
    if mode is None or header.width < 1 or header.height < 1:
        return None
    if not all(0xFF00 | m in JpegImagePlugin.MARKER for m in header.markers):
        return None
    for marker, prefix in header.apps:
        if marker == 0xE1 or (marker == 0xE2 and prefix.startswith(b"MPF\0")):
            return None
    pixels = header.width * header.height
    bomb = Image.MAX_IMAGE_PIXELS
    if bomb is not None and pixels > 2 * bomb:  # where Image.open raises, as _open says it
        raise ImageTooLargeError(f"the image is larger than {max_pixels} pixels", image_index=index)
    if pixels > max_pixels:
        raise ImageTooLargeError(
            f"the image has {header.width}x{header.height} = {pixels} pixels, over the limit of "
            f"{max_pixels}",
            image_index=index,
        )
    return header.width, header.height, mode


def probe_image(data: bytes, *, max_pixels: int, index: int, fit: Fit | None = None) -> ImageInfo:
    """The header's facts about one encoded image, for admission before any decode; raises
    InvalidImageError or ImageTooLargeError naming `index`, like decode_image."""
    facts = _plain_jpeg_facts(data, max_pixels=max_pixels, index=index)
    if facts is not None:
        width, height, mode = facts
        orientation, fmt = 1, "JPEG"
    else:
        with _open(data, max_pixels=max_pixels, index=index) as img:
            width, height = img.size
            orientation = _orientation(img)
            fmt = img.format or "unknown"
            mode = img.mode
    swapped = orientation in _SWAPS_AXES
    out_height, out_width = (width, height) if swapped else (height, width)
    target = fit.target(out_height, out_width) if fit is not None else None
    decode_pixels = width * height * DECODE_WEIGHT.get(fmt, 1)
    if target is not None and _drafts(fmt, width, height):
        scale = _draft_scale(width, height, _draft_request(target, swapped))
        decode_pixels = -(-width // scale) * -(-height // scale)
    held = width * height if target is None else target[0] * target[1]
    return ImageInfo(
        format=fmt,
        height=out_height,
        width=out_width,
        decode_pixels=decode_pixels,
        held_pixels=held,
        plain_jpeg=fmt == "JPEG" and mode == "RGB" and orientation == 1,
    )


def decode_image(
    data: bytes, *, max_pixels: int, index: int | None, fit: Fit | None = None
) -> DecodedImage:
    """Decode one encoded image; raises InvalidImageError or ImageTooLargeError naming `index`
    (None: a job's one image, not one of a request's).

    With `fit`, an image over REDUCE_ABOVE_PIXELS comes back at the model's input size (its
    `height` and `width` stay the original's): the full-size RGB image is never made."""
    with _open(data, max_pixels=max_pixels, index=index) as img:
        fmt = img.format or "unknown"
        try:
            img.seek(0)  # animated images: the first frame
            orientation = _orientation(img)
            swapped = orientation in _SWAPS_AXES
            width, height = img.size
            source = (width, height) if swapped else (height, width)
            target = fit.target(*source) if fit is not None else None
            if target is None:
                rgb = _upright_rgb(img, orientation)
                return DecodedImage(pixels=np.array(rgb, dtype=np.uint8), format=fmt)
            assert fit is not None
            if _drafts(fmt, width, height):
                img.draft(None, _draft_request(target, swapped))
            img.load()
            # Resized as stored, then turned: resizing first never holds the turned copy.
            size = (target[0], target[1]) if swapped else (target[1], target[0])
            # 16-bit images are resized as they are (Pillow resamples them in 16 bits) and
            # scaled to 8 bits afterwards: no full-size copy at all.
            source_img = img if img.mode in _SIXTEEN_BIT_MODES else _flatten(img)
            small = source_img.resize(size, Image.Resampling(fit.resample))
            if orientation != 1:
                small = small.transpose(_TRANSPOSE[orientation])
            rgb = _to_rgb(small)
        except (InvalidImageError, ImageTooLargeError):
            raise
        except Exception as exc:
            raise InvalidImageError(
                f"the {fmt} data is corrupt or truncated ({type(exc).__name__})", image_index=index
            ) from None
    return DecodedImage(pixels=np.array(rgb, dtype=np.uint8), format=fmt, source_size=source)


def resize_pixels(pixels: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """Decoded uint8 [H, W, 3] pixels resized with Pillow, as the model's image processor would
    (a tiled image's full-image pass); a new, writable array (torch.from_numpy wants that)."""
    small = Image.fromarray(pixels).resize((width, height), Image.Resampling(resample))
    return np.array(small)


def decode_upright(data: bytes, *, max_pixels: int, index: int) -> Image.Image:
    """The whole image at its own resolution as an RGB Pillow image, EXIF orientation applied
    (what the renderer draws on); the same guards and errors as decode_image."""
    with _open(data, max_pixels=max_pixels, index=index) as img:
        fmt = img.format or "unknown"
        try:
            img.seek(0)
            return _upright_rgb(img, _orientation(img))
        except Exception as exc:
            raise InvalidImageError(
                f"the {fmt} data is corrupt or truncated ({type(exc).__name__})", image_index=index
            ) from None


def _upright_rgb(img: Image.Image, orientation: int) -> Image.Image:
    img.load()
    rgb = _to_rgb(img)
    if orientation != 1:
        rgb = rgb.transpose(_TRANSPOSE[orientation])
    return rgb


# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = frozenset({5, 6, 7, 8})


def _draft_request(target: tuple[int, int], swapped: bool) -> tuple[int, int]:
    """The (width, height) asked of Pillow's JPEG draft: twice the target, so that the final
    resize still averages at least two decoded pixels per output pixel (Pillow's thumbnail
    uses the same reducing gap of 2)."""
    height, width = (target[1], target[0]) if swapped else target
    return 2 * width, 2 * height


def _draft_scale(width: int, height: int, request: tuple[int, int]) -> int:
    """The scale denominator Pillow's JpegImageFile.draft picks for `request`."""
    scale = min(width // request[0], height // request[1])
    return next(s for s in (8, 4, 2, 1) if scale >= s)


def _to_rgb(img: Image.Image) -> Image.Image:
    return _flatten(img).convert("RGB")


def _flatten(img: Image.Image) -> Image.Image:
    """An "L" or "RGB" image of the same size: 16-bit scaled to 8 bits, transparency flattened
    on white (as a viewer shows it), palettes expanded, other modes converted."""
    if img.mode in ("RGB", "L"):
        return img
    if img.mode in _SIXTEEN_BIT_MODES:
        # Pillow's convert() clips 16-bit values instead of scaling them. Scaled to 8 bits by
        # keeping the high byte (value >> 8): no float copy, no wider temporary.
        if img.mode == "I":  # 32-bit integers: clipped to the 16-bit range first
            wide = np.clip(np.asarray(img), 0, 65535).astype(np.uint16)
            raw = wide.view(np.uint8).reshape(*wide.shape, 2)
            big_endian = sys.byteorder == "big"
        else:
            raw = np.frombuffer(img.tobytes(), dtype=np.uint8).reshape(img.height, img.width, 2)
            big_endian = img.mode == "I;16B" or (img.mode == "I;16N" and sys.byteorder == "big")
        high, low = (raw[..., 0], raw[..., 1]) if big_endian else (raw[..., 1], raw[..., 0])
        # Values that all fit in 8 bits are taken as they are, as before.
        return Image.fromarray(np.ascontiguousarray(high if high.any() else low))
    if img.mode == "1":
        return img.convert("L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(rgba, mask=rgba)
        return background
    return img.convert("RGB")
