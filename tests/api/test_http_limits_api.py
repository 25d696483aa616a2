"""Request parsing, authentication and docs through the app in-process (issue 20, findings 3,
6 and 9): bodies refused by count before they are parsed, what Python cannot parse turned into
400s, the bearer scheme read per RFC 7235, /metrics behind the key on request, docs offline."""

from __future__ import annotations

import io
import random
import re

import pytest
from PIL import Image

from app.api.http.request_body import MAX_JSON_VALUES
from tests.api.conftest import CountingEngine, assert_error, b64

JSON = {"content-type": "application/json"}


@pytest.mark.parametrize(
    ("body", "status", "type_", "text"),
    [
        (
            b'{"images":[' + b",".join([b'{"url":"a"}'] * (MAX_JSON_VALUES + 2)) + b"]}",
            413,
            "payload_too_large",
            f"more than {MAX_JSON_VALUES} JSON values",
        ),
        (
            b'{"images":[{"url":"a"}],"classes":[' + b",".join([b"0"] * 100_000) + b"]}",
            413,
            "payload_too_large",
            "JSON values, over the limit",
        ),
        (
            b'{"images":[' + b",".join([b'{"url":"a"}'] * 5_000) + b"]}",
            400,
            "invalid_request",
            "the request holds 5000 images, over the limit of 16",
        ),
        (b'{"images":' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "invalid_request", "nests"),
        (
            b'{"images":[{"url":"a"}],"max_detections":' + b"7" * 5000 + b"}",
            400,
            "invalid_request",
            "an integer of 5000 digits",
        ),
        (b'{"images": [', 400, "invalid_request", "the body is not valid JSON"),
        (b'{"images": "\xff"}', 400, "invalid_request", "not valid UTF-8"),
    ],
    ids=["many-values", "many-classes", "many-images", "deep", "huge-int", "cut-off", "not-utf8"],
)
async def test_v1_json_bodies_are_refused_by_count_and_shape(
    client, body: bytes, status: int, type_: str, text: str
) -> None:
    r = await client.post("/v1/detect", content=body, headers=JSON)
    assert_error(r, status, type_, text)
    assert CountingEngine.images_seen == 0


async def test_v1_refuses_a_compressed_body_with_415(client) -> None:
    r = await client.post(
        "/v1/detect", content=b"\x1f\x8b", headers={**JSON, "content-encoding": "gzip"}
    )
    assert_error(r, 415, "unsupported_media_type", "Content-Encoding 'gzip'")


async def test_large_base64_images_are_decoded(client) -> None:
    """Over the inline size the text is decoded on a thread, in slices: same answer."""
    noise = Image.frombytes("RGB", (800, 600), random.Random(0).randbytes(800 * 600 * 3))
    buf = io.BytesIO()
    noise.save(buf, format="PNG")
    text = b64(buf.getvalue())
    assert len(text) > 1 << 20
    r = await client.post("/v1/detect", json={"images": [{"data": text}]})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["width"] == 800
    # Misplaced padding in the middle is still refused, as b64decode(validate=True) would.
    broken = text[:1000] + "==" + text[1002:]
    r = await client.post("/v1/detect", json={"images": [{"data": broken}]})
    assert_error(r, 400, "invalid_image", "not valid base64")
    # MIME-style line breaks are still accepted.
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    r = await client.post("/v1/detect", json={"images": [{"data": wrapped}]})
    assert r.status_code == 200, r.text


async def test_the_openapi_document_states_the_image_limit(client_factory) -> None:
    client, _ = await client_factory(max_images_per_request=5)
    schema = (await client.get("/openapi.json")).json()
    assert schema["components"]["schemas"]["DetectRequest"]["properties"]["images"]["maxItems"] == 5


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
async def test_the_bearer_scheme_is_case_insensitive(client_factory, scheme: str) -> None:
    client, _ = await client_factory(api_key="s3cret-key")
    r = await client.get("/v1/models", headers={"Authorization": f"{scheme} s3cret-key"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "value",
    ["Basic s3cret-key", "Bearers3cret-key", "Bearer s3cret-ke", "s3cret-key", "Bearer"],
)
async def test_other_schemes_and_keys_are_refused(client_factory, value: str) -> None:
    client, _ = await client_factory(api_key="s3cret-key")
    r = await client.get("/v1/models", headers={"Authorization": value})
    assert_error(r, 401, "unauthorized", "Bearer <key>")


async def test_metrics_need_the_key_when_protected(client_factory) -> None:
    client, _ = await client_factory(api_key="s3cret-key", protect_metrics=True)
    assert_error(await client.get("/metrics"), 401, "unauthorized")
    ok = await client.get("/metrics", headers={"Authorization": "Bearer s3cret-key"})
    assert ok.status_code == 200 and "detr_serve_" in ok.text
    for path in ("/healthz", "/readyz", "/docs", "/openapi.json"):
        assert (await client.get(path)).status_code == 200, path


async def test_metrics_stay_open_with_a_key_by_default(client_factory) -> None:
    client, _ = await client_factory(api_key="s3cret-key")
    assert (await client.get("/metrics")).status_code == 200


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_docs_load_nothing_from_another_host(client_factory, page: str) -> None:
    client, _ = await client_factory(api_key="s3cret-key")
    r = await client.get(page)
    assert r.status_code == 200
    # Every script, style sheet and icon the page loads is a path on this server.
    sources = re.findall(r'(?:src|href)\s*=\s*["\']([^"\']+)', r.text)
    sources += re.findall(r'url:\s*["\']([^"\']+)', r.text)
    assert sources, r.text
    for url in sources:
        assert url.startswith("/"), f"{page} loads {url}"
        asset = await client.get(url)
        assert asset.status_code == 200, url
        assert len(asset.content) > 100, url
    assert "cdn" not in r.text.lower()
