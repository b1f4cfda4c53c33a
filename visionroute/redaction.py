"""What of a failure may leave the process: the kind and a short, scrubbed message.

Exception text from a dependency (Ray, ONNX Runtime, SQLite, an HTTP client) can carry
install paths, process ids, node addresses, actor ids and whole tracebacks. A client body
or a trace step (which reviewers and callers read) gets ``failure_summary(exc)``: the
exception's kind and the first line of its message with those scrubbed out; the full text
goes to the server log only. Echoed user values are cut with ``shown``.
"""

from __future__ import annotations

import re

ECHO_CHARS = 80  # an echoed value longer than this is cut, with a marker saying by how much
MESSAGE_CHARS = 200  # a failure's message in a trace step or an error body
TOKEN_CHARS = 120  # a run of non-space characters in a reason longer than this is cut

_TRACEBACK = re.compile(r"Traceback \(most recent call last\).*", re.DOTALL)
_FRAME = re.compile(r'\s*File "[^"]*", line \d+.*')
_RAY_CONTEXT = re.compile(r"\((?:[^()]|\([^()]*\))*\b(?:pid|ip|actor_id)=[^)]*\)")
_KEY_VALUE = re.compile(r"\b(pid|ip|actor_id|node_id|worker_id|job_id|task_id)\s*[=:]\s*\S+", re.IGNORECASE)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_MEMORY = re.compile(r"\s*\bat 0x[0-9a-fA-F]+|0x[0-9a-fA-F]{6,}")
_REPR = re.compile(r"<[\w.:]+ object>")
_PATH = re.compile(r"(?:(?<=^)|(?<=[\s'\"(=\[,]))(?:[A-Za-z]:)?(?:[/\\][\w.@+~-]+){2,}[/\\]?")
_URL_AUTHORITY = re.compile(r"\b([a-z][a-z0-9+.-]*://)[^/\s'\"]+", re.IGNORECASE)
_IPV4 = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}(?::\d+)?\b")
_IPV6 = re.compile(r"\[?\b(?:[0-9a-fA-F]{1,4}:){2,7}[0-9a-fA-F]{0,4}\]?(?::\d+)?")
_HEX_ID = re.compile(r"\b[0-9a-f]{24,}\b")


def shown(value: object, limit: int = ECHO_CHARS) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters with a marker."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…[{len(text) - limit} more characters]"


def cut(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters with a marker saying how many were left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…[{len(text) - limit} more characters]"


def bounded_echoes(text: str, token_chars: int = TOKEN_CHARS, total_chars: int = 1000) -> str:
    """Every run of non-space characters longer than ``token_chars`` cut (an echoed value that
    was never passed through ``shown``), then the whole cut to ``total_chars``."""
    text = re.sub(rf"\S{{{token_chars + 1},}}", lambda m: cut(m.group(0), token_chars // 2), text)
    return cut(text, total_chars)


def scrubbed(text: str, *, addresses: bool = True) -> str:
    """``text`` without tracebacks, frames, process/actor/node ids and memory addresses; with
    ``addresses`` (text from a dependency, not an echo of the caller's input) also without
    absolute paths, network addresses and long hex ids."""
    text = _ANSI.sub("", text)
    text = _TRACEBACK.sub("", text)
    text = _FRAME.sub("", text)
    text = _RAY_CONTEXT.sub("", text)
    text = _KEY_VALUE.sub(lambda m: f"{m.group(1)}=<hidden>", text)
    text = _MEMORY.sub("", text)
    text = _REPR.sub("<object>", text)
    if addresses:
        text = _PATH.sub("<path>", text)
        text = _URL_AUTHORITY.sub(lambda m: f"{m.group(1)}<address>", text)
        text = _IPV4.sub("<address>", text)
        text = _IPV6.sub("<address>", text)
        text = _HEX_ID.sub("<id>", text)
    return re.sub(r"[ \t]{2,}", " ", text).strip()


def failure_kind(exc: BaseException) -> BaseException:
    """The exception that says what went wrong: a Ray wrapper's ``cause`` when it has one."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def failure_summary(exc: BaseException, limit: int = MESSAGE_CHARS) -> str:
    """``"Kind: first line of the message"``, scrubbed and bounded, for a trace step or a log
    line a client may see. Enough for a reviewer to tell a timeout from a dead replica."""
    inner = failure_kind(exc)
    kind = type(inner).__name__
    lines = [line.strip() for line in scrubbed(str(inner)).splitlines() if line.strip()]
    message = cut(lines[0], limit) if lines else ""
    return f"{kind}: {message}" if message else kind
