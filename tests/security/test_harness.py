"""The harness itself: ordinary traffic stays within the bounds the hostile tests assert, and
the watch does see a server that stops answering or grows."""

from __future__ import annotations

import signal
import time

import httpx
import psutil

from tests.conftest import shapes_image
from tests.security.conftest import concurrently


def test_ordinary_uploads_stay_within_the_bounds(hostile_server, watch) -> None:
    data = shapes_image(640, 480)
    # One request first: the module's server is fresh, and its first batch grows onnxruntime's
    # arenas and starts the decode workers (130 to 156 MB measured), which is start-up, not what
    # ordinary uploads cost.
    files = [("file", ("warm.jpg", data, "image/jpeg"))]
    assert httpx.post(hostile_server.url + "/v1/detect", files=files, timeout=60).status_code == 200
    with watch(hostile_server) as report:
        responses = concurrently(
            8,
            lambda i: httpx.post(
                hostile_server.url + "/v1/detect",
                files=[("file", (f"{i}.jpg", data, "image/jpeg"))],
                timeout=30,
            ),
        )
    assert [r.status_code for r in responses] == [200] * 8
    report.assert_bounds(rss_growth_mb=150)


def test_the_watch_sees_a_frozen_server(hostile_server, watch) -> None:
    root = psutil.Process(hostile_server.proc.pid)
    tree = [root, *root.children(recursive=True)]  # the front-end workers answer /healthz
    with watch(hostile_server) as report:
        time.sleep(0.1)
        for proc in tree:
            proc.send_signal(signal.SIGSTOP)
        time.sleep(0.3)
        for proc in tree:
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.1)
    assert report.max_health_s >= 0.2
