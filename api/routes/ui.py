"""The chat page a new user opens after `make run`, and the operator dashboard (both self-contained: no CDN)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

from api.deps import AdminPage

router = APIRouter(include_in_schema=False)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
_ASSETS = {
    "chat.js": "text/javascript",
    "chat.css": "text/css",
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
}


@router.get("/")
async def chat_page() -> FileResponse:
    """The chat page."""
    return FileResponse(STATIC_DIR / "chat.html", media_type="text/html; charset=utf-8")


@router.get("/dashboard", dependencies=[AdminPage])
async def dashboard_page() -> FileResponse:
    """The live operator dashboard (ADMIN_TOKEN as a bearer header or `?token=` when set)."""
    return FileResponse(
        STATIC_DIR / "dashboard.html", media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-store"}
    )


@router.get("/static/{name}")
async def static_asset(name: str) -> FileResponse:
    """The pages' scripts and stylesheets (an explicit allow-list, no directory serving)."""
    if name not in _ASSETS:
        raise HTTPException(status_code=404, detail=f"No static asset named {name[:64]}")
    return FileResponse(STATIC_DIR / name, media_type=_ASSETS[name])
