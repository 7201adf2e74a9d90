"""The one reader of JSON that comes from a file or an option: safetensors headers, the JSON
entries of a `.pt2` archive (before torch parses them), --arch-kwargs.

Python's json module recurses once per nesting level (a document of 100,000 `[` is a
RecursionError) and refuses integers over 4300 digits with a ValueError; torch's deserializers
walk what it returns recursively too. So a document is bounded before it is parsed — its size,
and how deep its arrays and objects nest — and while it is parsed, the length of every integer.
Any breach is one line naming the document: bad input, never a crash.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .errors import BadInput, BnfoldError

MAX_DEPTH = 64  # torch.export's model.json nests 9 deep, a safetensors header 3
MAX_DIGITS = 40  # int64 needs 19 digits, uint64 20; a 128-bit integer 39
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


class _IntegerTooLong(Exception):
    def __init__(self, digits: int):
        super().__init__(digits)
        self.digits = digits


def read_json(text: bytes | str, what: str, path: str | Path | None = None, *, max_bytes: int,
              error: type[BnfoldError] = BadInput):
    """`text` parsed, or `error` naming `what` (e.g. "safetensors header") and the bound it broke."""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    if len(data) > max_bytes:
        raise error(f"{what} is {len(data)} bytes, more than the {max_bytes} bnfold reads", path)
    depth = _too_deep(data)
    if depth is not None:
        raise error(f"{what} nests arrays or objects {depth} levels deep (at most {MAX_DEPTH})", path)
    try:
        return json.loads(data.decode("utf-8"), parse_int=_bounded_int)
    except UnicodeDecodeError as exc:
        raise error(f"{what} is not UTF-8 text ({exc.reason} at byte {exc.start})", path) from None
    except _IntegerTooLong as exc:
        raise error(f"{what} holds an integer of {exc.digits} digits (at most {MAX_DIGITS})", path) from None
    except ValueError as exc:  # JSONDecodeError, and numbers Python will not convert
        raise error(f"{what} is not valid JSON ({str(exc)[:120]})", path) from None


def _too_deep(data: bytes) -> int | None:
    """How deep [ and { nest outside strings where that is over MAX_DEPTH, else None; found
    without recursion (an unbalanced document is left for the parser to refuse). Counting
    the brackets inside strings too can only overstate the depth, so the exact count, which
    skips strings, is needed only when that is over the bound."""
    if _bracket_depth(data) <= MAX_DEPTH:
        return None
    depth = _bracket_depth(_STRING.sub(b'""', data))
    return depth if depth > MAX_DEPTH else None


def _bracket_depth(data: bytes) -> int:
    brackets = np.frombuffer(data.translate(None, _NOT_BRACKETS), dtype=np.uint8)
    steps = np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1)
    return int(np.cumsum(steps).max(initial=0))


def _bounded_int(digits: str) -> int:
    length = len(digits.lstrip("-"))
    if length > MAX_DIGITS:
        raise _IntegerTooLong(length)
    return int(digits)
