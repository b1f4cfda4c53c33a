"""The reviewers' web page (``GET /review``): static files shipped in ``router/http/static``.

The page and its script hold no data, so they are served without credentials: the page asks
for a login (router/http/session.py) when it has no session. They carry a strict Content
Security Policy (scripts and requests only from this origin, no framing: no clickjacking of
the login form) and are never cached by shared caches.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi.responses import Response

STATIC = Path(__file__).with_name("static")
REVIEW_ASSETS = {"review.html": "text/html; charset=utf-8", "review.js": "text/javascript; charset=utf-8"}
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' blob: data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@cache
def _read(name: str) -> bytes:
    return (STATIC / name).read_bytes()


def review_asset(name: str) -> Response:
    return Response(_read(name), media_type=REVIEW_ASSETS[name], headers=PAGE_HEADERS)
