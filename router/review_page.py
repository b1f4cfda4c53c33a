"""The reviewers' web page (``GET /review``): static files shipped in ``router/static``."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi.responses import Response

STATIC = Path(__file__).with_name("static")
REVIEW_ASSETS = {"review.html": "text/html; charset=utf-8", "review.js": "text/javascript; charset=utf-8"}


@cache
def _read(name: str) -> bytes:
    return (STATIC / name).read_bytes()


def review_asset(name: str) -> Response:
    return Response(_read(name), media_type=REVIEW_ASSETS[name], headers={"Cache-Control": "no-cache"})
