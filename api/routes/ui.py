"""The chat page a new user opens after `make run` (self-contained: nothing fetched from elsewhere)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

router = APIRouter(include_in_schema=False)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
_ASSETS = {"chat.js": "text/javascript", "chat.css": "text/css"}


@router.get("/")
async def chat_page() -> FileResponse:
    """The chat page."""
    return FileResponse(STATIC_DIR / "chat.html", media_type="text/html; charset=utf-8")


@router.get("/static/{name}")
async def static_asset(name: str) -> FileResponse:
    """The page's script and stylesheet (an explicit allow-list, no directory serving)."""
    if name not in _ASSETS:
        raise HTTPException(status_code=404, detail=f"No static asset named {name[:64]}")
    return FileResponse(STATIC_DIR / name, media_type=_ASSETS[name])
