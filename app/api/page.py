"""The browser page at /: plain HTML, CSS and JavaScript from the package (app/web/), no CDN and
no build step. It holds no data, so it is exempt from the API key; its requests carry the key."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

from app.api.http.deps import get_runtime

STATIC_PREFIX = "/ui/"
PATHS = frozenset({"/"})

router = APIRouter()


@cache
def _index() -> str:
    return (files("app") / "web" / "index.html").read_text(encoding="utf-8")


@router.get("/", include_in_schema=False)
async def index(request: Request) -> HTMLResponse:
    settings = get_runtime(request).settings
    # The page shows its API-key field from the start when the server wants one.
    required = "true" if settings.api_key is not None else "false"
    html = _index().replace("{{KEY_REQUIRED}}", required)
    return HTMLResponse(html, headers={"Cache-Control": "no-cache"})


def static_files() -> StaticFiles:
    """The page's scripts and styles, served from the installed package."""
    return StaticFiles(packages=[("app", "web")])
