"""Answer confidence from the token logprobs of the answer's own tokens.

Only the tokens that spell the answer value count (not the JSON braces and key, which the
schema forces anyway). With structured outputs, vLLM reports logprobs after the grammar mask,
so for a closed answer set ``exp(sum)`` is the probability the model gave to this answer among
those the schema allowed. For free text the per-token geometric mean is used instead, so a long
reading is not penalised for its length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    utf8: bytes | None = None  # the token's bytes as the server reports them (None: not sent)

    @property
    def byte_length(self) -> int:
        return len(self.utf8 if self.utf8 is not None else self.token.encode("utf-8"))


def span_confidence(
    content: str,
    tokens: Sequence[TokenLogprob],
    span: tuple[int, int],
    mode: Literal["joint", "per_token"],
) -> float | None:
    """Confidence of ``content[span[0]:span[1]]`` from the tokens overlapping it, in [0, 1].

    None when there are no logprobs or no token overlaps the span. An empty value (``""``) is
    scored by the token that closes the string, i.e. the decision to stop there.
    """
    if not tokens:
        return None
    start = len(content[: span[0]].encode("utf-8"))
    end = len(content[: span[1]].encode("utf-8"))
    if end == start:
        end = start + 1  # the closing quote
    picked: list[float] = []
    offset = 0
    for token in tokens:
        length = token.byte_length
        overlaps = offset < end and offset + length > start
        inside_empty = length == 0 and start <= offset < end  # partial UTF-8 pieces carry no bytes
        if (overlaps or inside_empty) and math.isfinite(token.logprob):
            picked.append(token.logprob)
        offset += length
    if not picked:
        return None
    total = sum(picked) if mode == "joint" else sum(picked) / len(picked)
    return float(min(1.0, math.exp(total)))
