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

from app.errors import ImageTooLargeError, InvalidImageError
from app.images.decode import EncodedJpeg, decode_image, probe_plain_jpeg
from app.images.device import DeviceJpegDecoder, choose_jpeg_decoder, nvjpeg_unavailable_reason
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


def with_comment(jpeg: bytes, text: bytes) -> bytes:
    """The JPEG with a COM segment after its SOI: still a valid file."""
    return jpeg[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + jpeg[2:]


def test_one_jpeg_nvjpeg_refuses_fails_the_batch_and_only_that_one_goes_to_pillow() -> None:
    good = shapes_image(64, 48)
    odd = with_comment(shapes_image(56, 40, seed=3), b"nvjpeg-refuses-me")
    jpegs = [
        EncodedJpeg(good, 48, 64, 0),
        EncodedJpeg(odd, 40, 56, 1),
        EncodedJpeg(shapes_image(32, 40, seed=2), 40, 32, 2),
    ]
    calls: list[int] = []
    pillow = pillow_batch(calls)

    def picky(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        if any(b"nvjpeg-refuses-me" in e.numpy().tobytes() for e in data):
            calls.append(-len(data))
            raise RuntimeError("nvjpeg: bitstream error")  # the whole batch fails
        return pillow(data, device)

    out = DeviceJpegDecoder(CPU, picky).decode(jpegs)
    assert calls == [-3, 1, -1, 1]  # the batch, then one by one
    for jpeg, image in zip(jpegs, out, strict=True):  # Pillow decoded the refused one
        expected = decode_image(jpeg.data, max_pixels=10**6, index=0).pixels
        assert isinstance(image, torch.Tensor)
        assert torch.equal(image, torch.from_numpy(expected).permute(2, 0, 1))


def tolerant(calls: list[bytes]):
    """nvjpeg at its most lenient: an image of the header's size for any bytes it is given."""

    def decode(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        out = []
        for encoded in data:
            raw = encoded.numpy().tobytes()
            calls.append(raw)
            with Image.open(io.BytesIO(raw)) as img:
                width, height = img.size
            out.append(torch.zeros((3, height, width), dtype=torch.uint8))
        return out

    return decode


def test_a_truncated_jpeg_in_a_device_batch_fails_alone_and_never_reaches_nvjpeg() -> None:
    good = shapes_image(64, 48)
    cut = good[: len(good) - 40]
    jpegs = [
        EncodedJpeg(good, 48, 64, 0),
        EncodedJpeg(cut, 48, 64, 1),
        EncodedJpeg(good, 48, 64, 2),
    ]
    seen: list[bytes] = []
    out = DeviceJpegDecoder(CPU, tolerant(seen)).decode(jpegs)
    assert seen == [good, good]
    assert isinstance(out[0], torch.Tensor) and isinstance(out[2], torch.Tensor)
    assert isinstance(out[1], InvalidImageError) and out[1].image_index == 1
    with pytest.raises(InvalidImageError) as cpu:  # the CPU path's answer, word for word
        decode_image(cut, max_pixels=10**6, index=1)
    assert out[1].message == cpu.value.message


def gpu_path_serves(data: bytes, seen: list[bytes]) -> bool:
    """Whether the GPU path answers with detections: the front end's probe, then the device
    decoder, with nvjpeg at its most lenient (any bytes it gets decode)."""
    try:
        jpeg = probe_plain_jpeg(data, max_pixels=10**6, index=0)
    except (InvalidImageError, ImageTooLargeError):
        return False
    if jpeg is None:  # the CPU path takes it
        return cpu_path_serves(data)
    (image,) = DeviceJpegDecoder(CPU, tolerant(seen)).decode([jpeg])
    return isinstance(image, torch.Tensor)


def cpu_path_serves(data: bytes) -> bool:
    try:
        decode_image(data, max_pixels=10**6, index=0)
    except (InvalidImageError, ImageTooLargeError):
        return False
    return True


@pytest.mark.parametrize("progressive", [False, True])
def test_every_truncation_is_refused_on_the_gpu_path_as_pillow_refuses_it(progressive) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, size=(40, 56, 3), dtype=np.uint8)
    jpeg = encode(Image.fromarray(pixels), quality=85, progressive=progressive)
    seen: list[bytes] = []
    for cut in range(3, len(jpeg)):
        data = jpeg[:cut]
        assert not cpu_path_serves(data), cut  # libjpeg refuses every truncation, EOI included
        assert not gpu_path_serves(data, seen), cut
    assert seen == []  # none of them reached nvjpeg


def test_bytes_after_the_end_marker_are_cut_before_nvjpeg() -> None:
    jpeg = shapes_image(64, 48)
    probed = probe_plain_jpeg(jpeg + b"trailing bytes", max_pixels=10**6, index=0)
    assert probed is not None and probed.data == jpeg
    assert cpu_path_serves(jpeg + b"trailing bytes")  # as Pillow, which ignores them


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
