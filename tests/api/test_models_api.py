"""One model (no repository): the "model" field, /v1/models/{name} and the repository routes
behave as the single model's server should."""

from __future__ import annotations

from tests.api.conftest import assert_error, b64
from tests.conftest import shapes_image


async def test_detect_naming_the_served_model_answers_and_another_is_404(client) -> None:
    body = {"images": [{"data": b64(shapes_image())}], "model": "tiny"}
    named = await client.post("/v1/detect", json=body)
    assert named.status_code == 200 and named.json()["model"] == "tiny"
    other = await client.post("/v1/detect", json={**body, "model": "other"})
    assert_error(other, 404, "not_found", "unknown model 'other'; this server serves 'tiny'")
    form = await client.post(
        "/v1/detect",
        files={"file": ("a.jpg", shapes_image(), "image/jpeg")},
        data={"model": "other"},
    )
    assert_error(form, 404, "not_found", "unknown model 'other'")
    render = await client.post("/v1/render", json={**body, "model": "other"})
    assert_error(render, 404, "not_found", "this server serves 'tiny'")


async def test_the_model_field_is_validated(client) -> None:
    body = {"images": [{"data": b64(shapes_image())}], "model": ""}
    assert_error(await client.post("/v1/detect", json=body), 422, "validation_error", "model")
    body["model"] = 3
    assert_error(await client.post("/v1/detect", json=body), 422, "validation_error", "model")


async def test_one_model_card_by_name(client) -> None:
    card = await client.get("/v1/models/tiny")
    assert card.status_code == 200
    assert (card.json()["name"], card.json()["state"], card.json()["default"]) == (
        "tiny",
        "ready",
        True,
    )
    listed = (await client.get("/v1/models")).json()["models"]
    assert [m["name"] for m in listed] == ["tiny"] and listed[0]["backend"]
    assert_error(await client.get("/v1/models/other"), 404, "not_found", "serves 'tiny'")


async def test_repository_index_lists_the_one_model_and_control_is_refused(client) -> None:
    index = await client.post("/v2/repository/index")
    assert index.status_code == 200
    assert index.json() == [{"name": "tiny", "version": "1", "state": "READY", "reason": ""}]
    ready_only = await client.post("/v2/repository/index", json={"ready": True})
    assert [e["name"] for e in ready_only.json()] == ["tiny"]
    bad = await client.post("/v2/repository/index", json={"ready": "yes"})
    assert bad.status_code == 400 and "ready" in bad.json()["error"]
    load = await client.post("/v2/repository/models/tiny/load")
    assert load.status_code == 403
    assert "--model-repository" in load.json()["error"]
    unload = await client.post("/v2/repository/models/tiny/unload")
    assert unload.status_code == 403
