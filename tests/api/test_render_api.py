"""POST /v1/render, "render": true on /v1/detect, and the page at / (in-process, tiny model)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from tests.api.conftest import assert_error, b64
from tests.conftest import shapes_image


def _image(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


async def test_render_multipart_answers_the_jpeg_with_the_detections_drawn(client) -> None:
    jpeg = shapes_image(320, 240)
    r = await client.post(
        "/v1/render",
        files={"file": ("a.jpg", jpeg)},
        data={"threshold": "0.0", "max_detections": "5"},
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/jpeg"
    drawn = _image(r.content)
    assert (drawn.format, drawn.size) == ("JPEG", (320, 240))
    detect = await client.post(
        "/v1/detect",
        files={"file": ("a.jpg", jpeg)},
        data={"threshold": "0.0", "max_detections": "5"},
    )
    count = len(detect.json()["results"][0]["detections"])
    assert count > 0
    assert r.headers["x-detections"] == str(count)
    # Something was drawn: the picture differs from the plain decode by more than JPEG noise.
    plain = np.asarray(_image(jpeg).convert("RGB"), dtype=int)
    assert (
        np.abs(np.asarray(drawn.convert("RGB"), dtype=int) - plain).max(axis=2) > 80
    ).sum() > 100


async def test_render_json_png_by_format_or_accept(client) -> None:
    data = b64(shapes_image(200, 150, "PNG"))
    by_format = await client.post("/v1/render", json={"images": [{"data": data}], "format": "png"})
    by_accept = await client.post(
        "/v1/render", json={"images": [{"data": data}]}, headers={"Accept": "image/png"}
    )
    for r in (by_format, by_accept):
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/png"
        assert (_image(r.content).format, _image(r.content).size) == ("PNG", (200, 150))
    jpeg = await client.post(
        "/v1/render", json={"images": [{"data": data}]}, headers={"Accept": "image/jpeg, image/png"}
    )
    assert jpeg.headers["content-type"] == "image/jpeg"


async def test_render_labels_false_draws_less(client) -> None:
    data = b64(shapes_image(320, 240, "PNG"))
    body = {"images": [{"data": data}], "format": "png", "threshold": 0.0, "max_detections": 5}
    labelled = await client.post("/v1/render", json=body)
    bare = await client.post("/v1/render", json={**body, "labels": False})
    assert labelled.status_code == bare.status_code == 200
    plain = np.asarray(_image(base64.b64decode(data)).convert("RGB"))
    changed_labelled = (np.asarray(_image(labelled.content)) != plain).any(axis=2).sum()
    changed_bare = (np.asarray(_image(bare.content)) != plain).any(axis=2).sum()
    assert 0 < changed_bare < changed_labelled


async def test_detect_with_render_adds_a_base64_jpeg_per_result(client) -> None:
    files = [
        ("file", ("a.jpg", shapes_image(320, 240), "image/jpeg")),
        ("file", ("b.png", shapes_image(200, 500, "PNG"), "image/png")),
    ]
    r = await client.post("/v1/detect", files=files, data={"render": "true"})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    sizes = [_image(base64.b64decode(x["image"])).size for x in results]
    assert sizes == [(320, 240), (200, 500)]
    assert all(_image(base64.b64decode(x["image"])).format == "JPEG" for x in results)
    assert all(x["timings"]["render_ms"] > 0 for x in results)
    plain = await client.post("/v1/detect", files=files)
    assert all("image" not in x for x in plain.json()["results"])


@pytest.mark.parametrize(
    ("kwargs", "status", "type_", "text"),
    [
        (
            {"files": [("file", ("a", b"x")), ("file", ("b", b"y"))]},
            400,
            "invalid_request",
            "2 images, over the limit of 1",
        ),
        (
            {"json": {"images": [{"data": "AAAA"}, {"data": "AAAA"}]}},
            400,
            "invalid_request",
            "2 images, over the limit of 1",
        ),
        (
            {"files": {"file": ("notes.txt", b"plain text, not an image")}},
            400,
            "invalid_image",
            "image 0: not an image",
        ),
        (
            {"json": {"images": [{"data": "AAAA"}], "format": "gif"}},
            422,
            "validation_error",
            "format",
        ),
        ({"content": b"raw", "headers": {"content-type": "image/jpeg"}}, 415, "unsupported", ""),
    ],
)
async def test_render_refuses_bad_requests_with_a_named_4xx(
    client, kwargs, status, type_, text
) -> None:
    r = await client.post("/v1/render", **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["error"]["type"].startswith(type_)
    assert text in r.json()["error"]["message"]


async def test_render_is_admitted_by_the_full_size_pixels(client_factory) -> None:
    # 6 megapixels: detection decodes the JPEG at 1/8 scale (well under the limit), drawing
    # needs all of it.
    client, _ = await client_factory(max_request_pixels=1_000_000, max_inflight_pixels=1_000_000)
    jpeg = shapes_image(3000, 2000)
    detect = await client.post("/v1/detect", files={"file": ("a.jpg", jpeg)})
    assert detect.status_code == 200, detect.text
    r = await client.post("/v1/render", files={"file": ("a.jpg", jpeg)})
    assert_error(r, 413, "payload_too_large", "the request's 1 images drawn at full size take")
    r = await client.post("/v1/detect", files={"file": ("a.jpg", jpeg)}, data={"render": "true"})
    assert_error(r, 413, "payload_too_large", "6000000 pixels")


async def test_render_gives_its_pixels_back(client) -> None:
    from app.api.http.deps import get_service  # noqa: F401  (the service the app holds)

    r = await client.post("/v1/render", files={"file": ("a.jpg", shapes_image(640, 480))})
    assert r.status_code == 200
    service = client._transport.app.state.runtime.service  # type: ignore[attr-defined]
    assert service._pixels.held == 0
    assert service._decoding.held == 0


async def test_openapi_documents_render(client) -> None:
    doc = (await client.get("/openapi.json")).json()
    post = doc["paths"]["/v1/render"]["post"]
    assert set(post["responses"]["200"]["content"]) == {"image/jpeg", "image/png"}
    assert set(post["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    schema = doc["components"]["schemas"]["RenderRequest"]
    assert schema["properties"]["images"]["maxItems"] == 1
    assert "render" in doc["components"]["schemas"]["DetectRequest"]["properties"]
    assert "/" not in doc["paths"]


async def test_page_and_its_files_are_served_from_the_package(client) -> None:
    page = await client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert 'data-key-required="false"' in page.text
    assert "/ui/app.js" in page.text and "http" not in page.text.split("<body")[0].replace(
        "http-equiv", ""
    )
    script = await client.get("/ui/app.js")
    assert script.status_code == 200
    assert "javascript" in script.headers["content-type"]
    assert "/v1/detect" in script.text
    assert (await client.get("/ui/style.css")).status_code == 200
    assert (await client.get("/ui/missing.js")).status_code == 404


async def test_page_is_exempt_from_the_api_key_and_says_it_needs_one(client_factory) -> None:
    client, _ = await client_factory(api_key="s3cret-key")
    page = await client.get("/")
    assert page.status_code == 200
    assert 'data-key-required="true"' in page.text
    assert (await client.get("/ui/app.js")).status_code == 200
    files = {"file": ("a.jpg", shapes_image(320, 240))}
    assert (await client.post("/v1/render", files=files)).status_code == 401
    r = await client.post("/v1/render", files=files, headers={"Authorization": "Bearer s3cret-key"})
    assert r.status_code == 200


async def test_render_form_fields_choose_png_and_no_labels(client) -> None:
    png = shapes_image(320, 240, "PNG")
    files = {"file": ("a.png", png)}
    form = {"threshold": "0.0", "max_detections": "5"}
    bare = await client.post(
        "/v1/render", files=files, data={**form, "labels": "false"}, headers={"Accept": "image/png"}
    )
    labelled = await client.post("/v1/render", files=files, data={**form, "format": "png"})
    assert bare.headers["content-type"] == labelled.headers["content-type"] == "image/png"
    plain = np.asarray(_image(png).convert("RGB"))
    changed = [(np.asarray(_image(r.content)) != plain).any(axis=2).sum() for r in (bare, labelled)]
    assert 0 < changed[0] < changed[1]
