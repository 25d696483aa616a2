"""JPEG decoding for the device, on the CPU with fakes: which decoder is chosen, which JPEGs
stay encoded, and the Pillow fallback for every image the device decoder refuses."""

from __future__ import annotations

import io
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from app.engine.device_jpeg import DeviceJpegDecoder, choose_jpeg_decoder, nvjpeg_unavailable_reason
from app.errors import ImageTooLargeError, InvalidImageError
from app.images import EncodedJpeg, decode_image, probe_plain_jpeg
from tests.conftest import shapes_image

CUDA = torch.device("cuda")  # a device object only: nothing here runs on it
CPU = torch.device("cpu")


def fake_torchvision(monkeypatch: pytest.MonkeyPatch, *, gpu_decode: bool = True) -> None:
    io_module = types.ModuleType("torchvision.io")

    if gpu_decode:

        def decode_jpeg(input, mode=None, device="cpu"):  # noqa: A002 (torchvision's name)
            raise AssertionError("selection must not decode")
    else:

        def decode_jpeg(input, mode=None):  # type: ignore[misc]  # noqa: A002
            raise AssertionError("selection must not decode")

    io_module.decode_jpeg = decode_jpeg  # type: ignore[attr-defined]
    io_module.ImageReadMode = types.SimpleNamespace(RGB="RGB")  # type: ignore[attr-defined]
    package = types.ModuleType("torchvision")
    package.__version__ = "0.18.0" if not gpu_decode else "0.26.0"  # type: ignore[attr-defined]
    package.io = io_module  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.io", io_module)


def test_without_torchvision_jpegs_go_through_pillow(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)
    assert "torchvision is not installed" in (nvjpeg_unavailable_reason(CUDA) or "")
    assert choose_jpeg_decoder("auto", CUDA) is None
    with pytest.raises(RuntimeError, match="nvjpeg cannot be honoured: torchvision"):
        choose_jpeg_decoder("nvjpeg", CUDA)


def test_with_torchvision_and_cuda_jpegs_are_decoded_on_the_device(monkeypatch) -> None:
    fake_torchvision(monkeypatch)
    decoder = choose_jpeg_decoder("auto", CUDA)
    assert isinstance(decoder, DeviceJpegDecoder) and decoder.device == CUDA
    assert choose_jpeg_decoder("pillow", CUDA) is None


def test_the_cpu_and_old_torchvision_keep_pillow(monkeypatch) -> None:
    fake_torchvision(monkeypatch)
    assert choose_jpeg_decoder("auto", CPU) is None
    with pytest.raises(RuntimeError, match="not CUDA"):
        choose_jpeg_decoder("nvjpeg", CPU)
    fake_torchvision(monkeypatch, gpu_decode=False)
    assert "0.18.0 cannot decode on the GPU" in (nvjpeg_unavailable_reason(CUDA) or "")


def encode(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=kw.pop("format", "JPEG"), **kw)
    return buf.getvalue()


def test_only_plain_three_channel_unrotated_jpegs_stay_encoded() -> None:
    jpeg = shapes_image(64, 48)
    probed = probe_plain_jpeg(jpeg, max_pixels=10**6, index=3)
    assert probed == EncodedJpeg(jpeg, 48, 64, 3)
    rgb = Image.open(io.BytesIO(jpeg))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: Pillow applies it, nvjpeg would not
    for other in (
        shapes_image(64, 48, "PNG"),
        encode(rgb.convert("L")),
        encode(rgb.convert("CMYK")),
        encode(rgb, exif=exif),
        b"\xff\xd8\xff but no JPEG after the magic",
    ):
        assert probe_plain_jpeg(other, max_pixels=10**6, index=0) is None
    assert probe_plain_jpeg(encode(rgb, exif=Image.Exif()), max_pixels=10**6, index=0)


def test_the_pixel_limit_is_enforced_when_probing() -> None:
    jpeg = shapes_image(100, 100)
    with pytest.raises(ImageTooLargeError, match="image 2: .* over the limit of 5000"):
        probe_plain_jpeg(jpeg, max_pixels=5000, index=2)


def pillow_batch(calls: list[int]):
    """A stand-in for nvjpeg on the CPU: decodes with Pillow, fails the whole batch on one bad
    file (as nvjpeg does)."""

    def decode(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        calls.append(len(data))
        out = []
        for encoded in data:
            img = Image.open(io.BytesIO(encoded.numpy().tobytes()))
            img.load()
            out.append(torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1))
        return out

    return decode


def test_one_bad_jpeg_fails_alone_after_the_batch_is_retried_one_by_one() -> None:
    good = shapes_image(64, 48)
    jpegs = [
        EncodedJpeg(good, 48, 64, 0),
        EncodedJpeg(good[: len(good) // 2], 48, 64, 1),
        EncodedJpeg(shapes_image(32, 40, seed=2), 40, 32, 2),
    ]
    calls: list[int] = []
    out = DeviceJpegDecoder(CPU, pillow_batch(calls)).decode(jpegs)
    assert calls == [3, 1, 1, 1]
    assert isinstance(out[1], InvalidImageError) and out[1].image_index == 1
    for jpeg, image in zip([jpegs[0], jpegs[2]], [out[0], out[2]], strict=True):
        expected = decode_image(jpeg.data, max_pixels=10**6, index=0).pixels
        assert isinstance(image, torch.Tensor)
        assert torch.equal(image, torch.from_numpy(expected).permute(2, 0, 1))


def test_a_device_result_of_the_wrong_size_is_replaced_by_pillows() -> None:
    jpeg = EncodedJpeg(shapes_image(64, 48), 48, 64, 0)

    def transposed(data, device):
        return [torch.zeros((3, 64, 48), dtype=torch.uint8) for _ in data]

    (image,) = DeviceJpegDecoder(CPU, transposed).decode([jpeg])
    expected = decode_image(jpeg.data, max_pixels=10**6, index=0).pixels
    assert torch.equal(image, torch.from_numpy(expected).permute(2, 0, 1))  # type: ignore[arg-type]


def test_with_several_devices_nvjpeg_is_off_under_auto_and_refused_when_asked(monkeypatch) -> None:
    fake_torchvision(monkeypatch)
    assert isinstance(choose_jpeg_decoder("auto", CUDA, devices_in_use=1), DeviceJpegDecoder)
    assert choose_jpeg_decoder("auto", torch.device("cuda:1"), devices_in_use=2) is None
    with pytest.raises(RuntimeError, match="2 devices are in use"):
        choose_jpeg_decoder("nvjpeg", CUDA, devices_in_use=2)


class QueuedStream:
    """A CUDA stream as the caching allocator sees it: kernels queued and not yet run. A buffer
    freed by one of them is handed out again at once, while that kernel may still read it."""

    def __init__(self) -> None:
        self.queued: list[str] = []
        self.drained = 0

    def enqueue(self, kernel: str) -> None:
        self.queued.append(kernel)

    def synchronize(self) -> None:
        self.queued.clear()
        self.drained += 1


def test_nvjpeg_starts_writing_only_after_the_previous_batchs_kernels_ran() -> None:
    stream = QueuedStream()
    still_queued_at_decode: list[list[str]] = []
    calls: list[int] = []
    pillow = pillow_batch(calls)

    def nvjpeg(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        # nvjpeg's hardware engine writes at once, whatever the stream still has queued.
        still_queued_at_decode.append(list(stream.queued))
        out = pillow(data, device)
        stream.enqueue(f"resize of batch {len(still_queued_at_decode)}")
        return out

    decoder = DeviceJpegDecoder(CUDA, nvjpeg, current_stream=lambda device: stream)
    batches = [[EncodedJpeg(shapes_image(64, 48, seed=k), 48, 64, 0)] for k in range(3)]
    stream.enqueue("resize of batch 0")  # a batch prepared before the decoder's first call
    for batch in batches:
        assert isinstance(decoder.decode(batch)[0], torch.Tensor)
    assert still_queued_at_decode == [[], [], []]
    assert stream.drained == 3 and calls == [1, 1, 1]
