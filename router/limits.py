"""Reading untrusted bodies (requests, fetched URLs) without ever holding more than the limit."""

from __future__ import annotations

from collections.abc import AsyncIterator

from visionroute.errors import PayloadTooLarge


async def read_limited(
    chunks: AsyncIterator[bytes], *, declared: str | None, max_bytes: int, field: str, what: str
) -> bytes:
    """Refuse early on a declared length over the limit, and stop reading once past it."""
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"{what} is {declared} bytes; the limit is {max_bytes}", field=field)
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"{what} exceeds the limit of {max_bytes} bytes", field=field)
        parts.append(chunk)
    return b"".join(parts)
