"""Checks every operation shares, whatever face it came through."""

from __future__ import annotations

import re
import uuid

from visionroute.errors import InputError

REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


def checked_request_id(value: str | None, field: str = "X-Request-Id") -> str:
    """The caller's request id, or a new one; a malformed one is an InputError naming ``field``."""
    if not value:
        return uuid.uuid4().hex
    if not REQUEST_ID_PATTERN.fullmatch(value):
        raise InputError(f"{field} must be 1-128 characters from [A-Za-z0-9_.:-]", field=field)
    return value


def checked_tenant(value: str | None) -> str | None:
    if value is not None and not TENANT_PATTERN.fullmatch(value):
        raise InputError("tenant must be 1-128 characters from [A-Za-z0-9_.-]", field="tenant")
    return value
