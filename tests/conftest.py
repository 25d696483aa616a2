"""Shared fixtures: a tiny randomly initialised RT-DETR checkpoint and real encoded images."""

from __future__ import annotations

import importlib.util
import io
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

LABELS = ["circle", "square", "triangle", "star", "cross"]


def build_tiny_checkpoint(path: Path, size: int = 128) -> Path:
    """A ~0.5 M-parameter RT-DETR saved with save_pretrained, with its image processor."""
    import torch
    from transformers import (
        RTDetrConfig,
        RTDetrForObjectDetection,
        RTDetrImageProcessor,
        RTDetrResNetConfig,
    )

    torch.manual_seed(0)
    backbone = RTDetrResNetConfig(
        embedding_size=16,
        hidden_sizes=[16, 32, 64, 128],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=["stage2", "stage3", "stage4"],
    )
    config = RTDetrConfig(
        backbone_config=backbone,
        d_model=32,
        encoder_hidden_dim=32,
        encoder_in_channels=[32, 64, 128],
        decoder_in_channels=[32, 32, 32],
        encoder_ffn_dim=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        decoder_ffn_dim=64,
        decoder_layers=1,
        num_queries=20,
        decoder_n_points=2,
        num_denoising=0,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)},
    )
    RTDetrForObjectDetection(config).save_pretrained(path)
    RTDetrImageProcessor(size={"height": size, "width": size}).save_pretrained(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def onnx_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Servers and engines of the session export into one temporary cache (each model once),
    never into the user's: the environment variable reaches the servers the tests start."""
    path = tmp_path_factory.mktemp("onnx-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DETR_SERVE_ONNX_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="session", autouse=True)
def jobs_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The job store (issue 15) of every server and app the session starts that names none:
    a temporary folder, never the user's cache (a test's runner would take its lock)."""
    path = tmp_path_factory.mktemp("jobs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DETR_SERVE_JOBS_DIR", str(path))
        yield path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, onnx_cache_dir: Path) -> Path:
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-rtdetr"))
    # Exported once here, into the session's cache: servers started on it (backend auto) then
    # start from the cache, within their readiness timeouts; tests/e2e/test_onnx_default.py and
    # tests/api/test_backend_auto.py cover the export at start-up on fresh caches.
    if importlib.util.find_spec("onnxruntime") is not None:
        from app.export.cache import ensure_export

        ensure_export(path, onnx_cache_dir)
    return path


def shapes_image(width: int = 320, height: int = 240, fmt: str = "JPEG", seed: int = 0) -> bytes:
    """A real encoded picture: a gradient with a few filled shapes."""
    img = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(img)
    for y in range(height):
        shade = int(40 + 120 * y / max(1, height - 1))
        draw.line([(0, y), (width, y)], fill=(shade, shade // 2, 90 + seed * 10 % 100))
    w, h = width, height
    draw.ellipse([w * 0.1, h * 0.1, w * 0.4, h * 0.5], fill=(230, 40, 40))
    draw.rectangle([w * 0.55, h * 0.2, w * 0.9, h * 0.6], fill=(40, 200, 60))
    draw.polygon([(w * 0.2, h * 0.9), (w * 0.35, h * 0.6), (w * 0.5, h * 0.9)], fill=(250, 220, 0))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="session")
def jpeg_bytes() -> bytes:
    return shapes_image()


class _ImageHandler(BaseHTTPRequestHandler):
    """Serves test images on loopback: /shapes.jpg, /missing (404), /slow, /redirect, /text."""

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        if self.path == "/shapes.jpg":
            self._send(200, shapes_image(), "image/jpeg")
        elif self.path == "/text":
            self._send(200, b"hello, not an image", "image/jpeg")
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/shapes.jpg")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/redirect-localhost":
            self.send_response(302)
            port = self.server.server_address[1]
            self.send_header("Location", f"http://localhost:{port}/shapes.jpg")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/slow":
            time.sleep(3)
            self._send(200, shapes_image(), "image/jpeg")
        else:
            self._send(404, b"not found", "text/plain")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up first (deadline tests)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture(scope="session")
def image_server() -> Iterator[str]:
    """Base URL of a real HTTP server on 127.0.0.1 serving test images."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Wait for a state, not for a time: polls `condition` until it holds. The timeout is a
    hang guard, far above any real wait, never a measurement (the machine may be loaded)."""
    import asyncio

    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.005)
