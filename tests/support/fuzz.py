"""Hostile-input strategies and the checks every fuzzed answer must pass (HTTP and gRPC).

Shared by the Ray-free fuzz suite (tests/router/test_fuzz_core.py) and the one through the real
service (tests/integration/test_fuzz.py). An answer passes when it is no 500 (no INTERNAL or
UNKNOWN), every 503 carries Retry-After (gRPC UNAVAILABLE: a ``retry-after`` trailer), an error
body is our JSON shape with the request id and a project error name (never Ray's wrapper), and
no body carries a traceback or a process's internals.
"""

from __future__ import annotations

import base64
import json
import os
import re
import string
from collections import Counter

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# Each fuzz test's example count is its share of issue 11's floor (at least 10,000 cases against
# the Ray-free core, 1,000 through the real proxies, in CI): the suite runs exactly that; a longer
# hunt multiplies it (VISIONROUTE_FUZZ_SCALE=10: ten times as many, a new seed each run).
FUZZ_SCALE = "VISIONROUTE_FUZZ_SCALE"


def fuzz_scale() -> float:
    raw = os.environ.get(FUZZ_SCALE, "").strip() or "1"
    try:
        scale = float(raw)
    except ValueError:
        scale = float("nan")
    if not scale >= 1:  # also NaN
        from visionroute.errors import ConfigError

        raise ConfigError(f"{FUZZ_SCALE} must be a number >= 1, got {raw!r}", field=FUZZ_SCALE)
    return scale


def fuzz(n: int) -> settings:
    """Hypothesis settings for a fuzz test of ``n`` examples (times VISIONROUTE_FUZZ_SCALE):
    derandomized, so the suite's cases are the same on every run, unless the scale is raised."""
    scale = fuzz_scale()
    return settings(
        max_examples=round(n * scale),
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=scale == 1,
        database=None,
    )


# What only a leaked traceback or Ray error text contains (never what a caller sent: the
# generated text below cannot form these).
LEAKS = re.compile(
    r"Traceback|File \"/|\bpid=\d|\bip=\d|actor_id|\bat 0x[0-9a-f]{6,}|site-packages|\.venv/",
)
ERROR_KEYS = {"error", "field", "reason", "request_id"}
# Ray Serve's proxy sheds load itself when the ingress queue is full (serve_config.yaml
# backpressure_config): plain text, but with Retry-After like every 503.
RAY_BACKPRESSURE = "Request dropped due to backpressure"

INT64 = 2**63
ids = st.one_of(
    st.sampled_from([0, -1, 1, INT64 - 1, INT64, -INT64, -INT64 - 1, 2**64, 2**64 + 1, -(2**64), 10**30]),
    st.integers(-(2**70), 2**70),
    st.integers(-5, 50),
)
# Text that may hold lone surrogates and control characters, never '=' (see LEAKS).
texts = st.text(st.characters(exclude_characters="="), max_size=30) | st.text(
    st.sampled_from(["\ud800", "\udfff", "\udc00", "a", "\x00", "\u00e9", "\U0001f600", " ", "\\", '"']),
    max_size=6,
)
scalars = (
    st.none()
    | st.booleans()
    | ids
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts
    | st.sampled_from(["", "red", "classify", "colour", "confirm", "correct", "reject", "default"])
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=10,
)


def deep(depth: int, inner: str = "1") -> str:
    """JSON nested ``depth`` levels, alternating arrays and objects."""
    opening = "".join('{"a":' if i % 2 else "[" for i in range(depth))
    closing = "".join("}" if i % 2 else "]" for i in reversed(range(depth)))
    return opening + inner + closing


def dumps(value: object) -> bytes:
    """JSON as a client library writes it: lone surrogates escaped (``\\ud800``), ASCII only."""
    return json.dumps(value, ensure_ascii=True).encode("ascii")


raw_json_bodies = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda d: deep(d).encode(), st.integers(1, 4000)),
    st.builds(
        lambda d, key: f'{{"{key}": {deep(d)}}}'.encode(),
        st.integers(20, 3000),
        st.sampled_from(["filters", "params", "metadata", "text", "boxes"]),
    ),
    st.sampled_from(
        [
            b"",
            b"{",
            b'{"text": "\\ud800"}',
            b'{"text": "\\udfff x"}',
            b'{"text": "a", "k": 1e999}',
            b'{"id": 18446744073709551616}',
            b'{"text": "a", "filters": {"ids": [18446744073709551616]}}',
            b'{"image_base64": ',
            b"\xff\xfe{\x00",
            b'{"text": NaN}',
            b'{"text": "x", "k": Infinity}',
            b"[1]",
            b"null",
            b'"str"',
            b'{"id": 1' + b"0" * 5000 + b"}",
        ]
    ),
    json_values.map(dumps),
)


def base64_of(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


path_values = st.one_of(
    st.text(alphabet=string.ascii_letters + string.digits + "-_.~", min_size=1, max_size=40),
    st.builds(str, ids),
    st.sampled_from(["%ED%A0%80", "%FF", "..", "x" * 10_000, "%00", "1e3", "-0"]),
)


class Cases:
    """Counts the generated cases, per suite and face (printed at the end of a run)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, name: str) -> None:
        self.counts[name] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def check_http(status: int, headers: dict[str, str], text: str, *, where: str = "") -> None:
    """One HTTP answer: no 5xx but 503, 503 with Retry-After, our error shape, no leaks."""
    headers = {k.lower(): v for k, v in headers.items()}
    assert status < 500 or status == 503, (where, status, text[:600])
    if status == 503:
        assert "retry-after" in headers, (where, status, text[:300])
    assert not LEAKS.search(text), (where, status, text[:2000])
    if status == 503 and text.startswith(RAY_BACKPRESSURE):  # the proxy's own, before our code runs
        return
    if status >= 400:
        assert headers.get("content-type", "").startswith("application/json"), (where, status, text[:300])
        body = json.loads(text)
        if "ready" in body:  # /readyz answers its checks, not an error body
            return
        assert ERROR_KEYS <= set(body), (where, body)
        assert body["request_id"], (where, body)
        assert not body["error"].startswith("Ray") and "(" not in body["error"], (where, body)
        assert len(text) < 4096, (where, len(text))


def check_grpc_status(code_name: str, details: str, trailers: dict[str, str], *, where: str = "") -> None:
    """One gRPC status: never INTERNAL or UNKNOWN, UNAVAILABLE with retry-after, our JSON
    details with the request id, short enough for gRPC's metadata limit, no leaks."""
    assert code_name not in ("INTERNAL", "UNKNOWN", "RESOURCE_EXHAUSTED"), (where, code_name, details[:600])
    if code_name == "OK":
        return
    assert not LEAKS.search(details or ""), (where, code_name, details[:2000])
    if code_name == "UNAVAILABLE":
        assert "retry-after" in trailers, (where, details[:300])
    body = json.loads(details)
    assert ERROR_KEYS <= set(body) and body["request_id"], (where, body)
    assert not body["error"].startswith("Ray") and "(" not in body["error"], (where, body)
    assert len(details) <= 4096, (where, len(details))


def documented_operations(spec: dict) -> list[tuple[str, str]]:
    """(path, METHOD) of every GET/POST/DELETE operation an OpenAPI document lists."""
    return sorted(
        (path, method.upper())
        for path, item in spec["paths"].items()
        for method in item
        if method in ("get", "post", "delete")
    )
