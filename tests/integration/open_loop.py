"""Open-loop load against a running service, for the fault and overload tests: requests start at
a fixed rate whatever the answers, so overload and faults show as statuses, never as waiting."""

from __future__ import annotations

import asyncio
import io
import time
import uuid

import httpx
from PIL import Image

RETRYABLE = {503, 429}


def jpeg(png: bytes, size: int = 224) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").resize((size, size)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


async def one(client: httpx.AsyncClient, image: bytes, request_id: str) -> dict:
    started = time.perf_counter()
    try:
        response = await client.post(
            "/v1/analyze",
            files={"image": ("x.jpg", image, "image/jpeg")},
            headers={"x-request-id": request_id},
        )
        body = response.json() if response.status_code == 200 else {}
        return {
            "status": response.status_code,
            "latency_s": time.perf_counter() - started,
            "retry_after": response.headers.get("retry-after"),
            "item": body.get("review_item_id"),
            "request_id": request_id,
        }
    except httpx.HTTPError as exc:
        return {
            "status": type(exc).__name__,
            "latency_s": time.perf_counter() - started,
            "request_id": request_id,
        }


async def open_loop(url: str, image: bytes, rate_per_s: float, duration_s: float, during=None) -> list[dict]:
    """Requests started at a fixed rate whatever the answers (open loop: overload shows);
    ``during()`` is called once, halfway."""
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
    async with httpx.AsyncClient(base_url=url, timeout=30.0, limits=limits) as client:
        tasks, started = [], time.perf_counter()
        for i in range(int(rate_per_s * duration_s)):
            delay = started + i / rate_per_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if during is not None and i == int(rate_per_s * duration_s) // 2:
                during()
            tasks.append(asyncio.create_task(one(client, image, f"load-{uuid.uuid4().hex}")))
        return list(await asyncio.gather(*tasks))


def listed_items(url: str) -> list[dict]:
    """Every review item the service lists (all statuses), page by page."""
    items: list[dict] = []
    while True:
        page = httpx.get(
            url + "/v1/review/items",
            params={"status": "all", "limit": 1000, "offset": len(items)},
            timeout=60,
        )
        if not page.json()["items"]:
            return items
        items += page.json()["items"]
