"""Decode image bytes with Pillow, with guards: known formats only, pixel count checked from
the header before the full decode, EXIF orientation applied, every mode converted to RGB.

Where JPEGs are decoded on the GPU, `probe_plain_jpeg` runs the same guards on the header alone
and hands the bytes on (see app/engine/device_jpeg.py)."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from app.errors import ImageTooLargeError, InvalidImageError

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # uint8 [H, W, 3], RGB
    format: str

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


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
    three-channel (YCbCr or RGB) JPEG with no EXIF rotation. None for anything else (other formats,
    greyscale or CMYK JPEGs, rotated ones, unreadable headers): decode_image takes those, with
    its own errors. Raises ImageTooLargeError from the header, like decode_image."""
    if not data.startswith(_JPEG_MAGIC):
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
    return EncodedJpeg(data, height, width, index)


def decode_image(data: bytes, *, max_pixels: int, index: int) -> DecodedImage:
    """Decode one encoded image; raises InvalidImageError or ImageTooLargeError naming `index`."""
    if not data:
        raise InvalidImageError("the image is empty (0 bytes)", image_index=index)
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
    with img:
        width, height = img.size
        if width < 1 or height < 1:
            raise InvalidImageError("the image has no pixels", image_index=index)
        if width * height > max_pixels:
            raise ImageTooLargeError(
                f"the image has {width}x{height} = {width * height} pixels, over the limit of "
                f"{max_pixels}",
                image_index=index,
            )
        fmt = img.format or "unknown"
        try:
            img.seek(0)  # animated images: the first frame
            img.load()
            rgb = _to_rgb(ImageOps.exif_transpose(img))
        except Exception as exc:
            raise InvalidImageError(
                f"the {fmt} data is corrupt or truncated ({type(exc).__name__})", image_index=index
            ) from None
    return DecodedImage(pixels=np.array(rgb, dtype=np.uint8), format=fmt)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES:
        # Pillow's convert() clips 16-bit values instead of scaling them; scale to 8 bits.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        grey = np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        # Flatten on white, as a viewer would show a transparent image.
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    return img.convert("RGB")
