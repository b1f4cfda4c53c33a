"""Checks every operation shares, whatever face it came through.

Untrusted JSON (HTTP bodies, gRPC ``*_json`` fields) goes through ``parsed_json``: UTF-8 only,
nesting bounded, no lone surrogates (they cannot be stored or encoded), no NaN/Infinity; the
error names the field. Ids that reach SQLite or FAISS are checked to fit int64 first.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from visionroute.errors import InputError
from visionroute.redaction import shown

REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_JSON_DEPTH = 32  # no request of ours nests deeper than a few levels
MAX_PAGE = 1000  # review listings: items per page
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def checked_request_id(value: str | None, field: str = "X-Request-Id") -> str:
    """The caller's request id, or a new one; a malformed one is an InputError naming ``field``."""
    if not value:
        return uuid.uuid4().hex
    if not REQUEST_ID_PATTERN.fullmatch(value):
        raise InputError(f"{field} must be 1-128 characters from [A-Za-z0-9_.:-]", field=field)
    return value


def checked_tenant(value: str | None) -> str | None:
    if value is not None and not TENANT_PATTERN.fullmatch(value):
        raise InputError(
            f"tenant must be 1-128 characters from [A-Za-z0-9_.-], got {shown(value)}", field="tenant"
        )
    return value


def checked_int64(value: Any, field: str) -> int:
    """``value`` as an id SQLite and FAISS can hold (a signed 64-bit integer)."""
    if isinstance(value, bool) or not isinstance(value, int) or not INT64_MIN <= value <= INT64_MAX:
        raise InputError(f"{field} must be an integer in [-2^63, 2^63-1], got {shown(value)}", field=field)
    return value


def checked_page(limit: int, offset: int) -> tuple[int, int]:
    """A listing's page: 1..MAX_PAGE items from a non-negative offset that fits int64."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise InputError(f"limit must be an integer in [1, {MAX_PAGE}], got {shown(limit)}", field="limit")
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= INT64_MAX:
        raise InputError(f"offset must be an integer in [0, 2^63-1], got {shown(offset)}", field="offset")
    return limit, offset


def checked_text(value: str, field: str) -> str:
    """``value`` if it is valid Unicode text (no lone surrogate), else an InputError naming ``field``."""
    found = _SURROGATE.search(value)
    if found is not None:
        raise InputError(
            f"{field} contains a lone surrogate (\\u{ord(found.group()):04x} at character "
            f"{found.start()}): not valid Unicode text",
            field=field,
        )
    return value


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parsed_json(data: bytes | str, field: str = "body", max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Untrusted JSON as Python values, or an InputError naming ``field`` (or the path inside it)
    and the reason: not UTF-8, not JSON, nested deeper than ``max_depth``, a lone surrogate."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(
                f"{field} is not UTF-8: byte 0x{exc.object[exc.start]:02x} at offset {exc.start}",
                field=field,
            ) from None
    else:
        text = data
    try:
        value = json.loads(text, parse_constant=_no_constants)
    except RecursionError:
        raise InputError(f"{field} nests JSON deeper than {max_depth} levels", field=field) from None
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{field} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", field=field
        ) from None
    except ValueError as exc:  # NaN, Infinity
        raise InputError(f"{field} is not valid JSON: {exc}", field=field) from None
    checked_json_value(value, field, max_depth)
    return value


def checked_json_value(value: Any, field: str = "body", max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Walk parsed JSON (iteratively): depth within ``max_depth``, every key and string valid
    Unicode. The error names the path of the offending value: ``filters.tags_any.0``, or just
    ``text`` for a top-level field of a request body (``field="body"``)."""
    stack: list[tuple[Any, tuple[str, ...], int]] = [(value, (), 0)]
    while stack:
        node, path, depth = stack.pop()
        where = ".".join(path if field == "body" and path else (field, *path))
        if isinstance(node, str):
            checked_text(node, where)
        elif isinstance(node, (dict, list)):
            if depth >= max_depth:
                raise InputError(f"{field} nests JSON deeper than {max_depth} levels", field=where)
            for key, child in node.items() if isinstance(node, dict) else enumerate(node):
                if isinstance(key, str):  # a bad key is reported at its object: never echoed raw
                    checked_text(key, f"{where} (a key)")
                stack.append((child, (*path, _path_part(key)), depth + 1))
    return value


def _path_part(key: str | int) -> str:
    key = str(key)
    return key if len(key) <= 40 else f"{key[:40]}…"
