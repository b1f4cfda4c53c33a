"""Warm a freshly started VisionRoute service (Ray Serve) up before tests use it.

The first request through Ray Serve's proxy, the ingress and a tier replica pays for lazy
imports and first calls; on a loaded machine that can be slow. The warm-up uses real requests
that change no state, because tests count what they create (review items, search ids, budget
use): a review-queue listing through the ingress and, with search on, an image search, which
decodes an image, runs the ConSE classifier in the search tier and queries the index.
"""

from __future__ import annotations

import base64
import io
import time

import httpx
import numpy as np
from PIL import Image


def _png(size: int = 64) -> bytes:
    pixels = (np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def warm_up_service(
    url: str,
    *,
    search: bool = True,
    headers: dict[str, str] | None = None,
    deadline_s: float = 180.0,
    request_timeout_s: float = 120.0,
) -> float:
    """Each warm-up request, retried until it answers 200; returns the seconds it took.

    Raises RuntimeError naming the request and its last answer if ``deadline_s`` passes.
    """
    requests = [("GET", "/v1/review/items", {"params": {"limit": 1}})]
    if search:
        image = base64.b64encode(_png()).decode("ascii")
        requests.append(("POST", "/v1/search", {"json": {"image_base64": image, "k": 1}}))
    started = time.monotonic()
    deadline = started + deadline_s
    with httpx.Client(base_url=url, headers=headers) as client:
        for method, path, options in requests:
            last = "no attempt made"
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RuntimeError(
                        f"warm-up {method} {path} at {url} got no 200 within {deadline_s:.0f} s (last: {last})"
                    )
                try:
                    response = client.request(
                        method, path, timeout=min(request_timeout_s, max(remaining, 1.0)), **options
                    )
                    if response.status_code == 200:
                        break
                    if response.status_code in (401, 403):  # waiting will not help
                        raise RuntimeError(
                            f"warm-up {method} {path} at {url} was refused (HTTP {response.status_code}): "
                            "the config has API keys; pass an admin key's header (warm_up_headers)"
                        )
                    last = f"HTTP {response.status_code}: {response.text[:300]}"
                except httpx.HTTPError as exc:
                    last = f"{type(exc).__name__}: {exc}"
                time.sleep(1.0)
    return time.monotonic() - started
