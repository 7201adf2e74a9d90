"""What reaches the terminal: text from files made safe to print, and bnfold's own stderr kept
apart from what libraries print there."""
from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

# C0 and C1 controls (ESC starts colour, cursor and OSC 8 link sequences; a newline would split
# a one-line error), DEL, Unicode's bidirectional overrides and invisible marks (text that reads
# differently from what it is), line separators, and lone surrogates (a file name that is not
# UTF-8: the terminal's encoder would fail on them).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: object) -> str:
    """`text` with every control character shown as its escape (\\x1b, \\n, \\u202e), so names
    from a model or a file name reach the terminal as text, never as instructions to it."""
    return _UNSAFE.sub(_escape, str(text))


def _escape(match: re.Match) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


_own_stderr: TextIO | None = None


def own_stderr() -> TextIO:
    """Where bnfold's own messages go: the process's stderr, also while libraries_silenced has
    pointed sys.stderr elsewhere."""
    return _own_stderr if _own_stderr is not None else sys.stderr


@contextmanager
def libraries_silenced(debug: bool = False) -> Iterator[None]:
    """While a command runs, nothing a library logs, warns or prints to stderr is shown: torch
    logs its own traceback for a malformed .pt2 and prints the whole partial graph when
    torch.export fails; torch and onnx warn about deprecations (torch's C++ warnings arrive as
    Python warnings too). bnfold's one line says what matters; `debug` (BNFOLD_DEBUG=1) lets
    everything through."""
    global _own_stderr
    if debug:
        yield
        return
    before = logging.root.manager.disable
    sink = open(os.devnull, "w")
    _own_stderr, sys.stderr = sys.stderr, sink
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(before)
        sys.stderr, _own_stderr = _own_stderr, None
        sink.close()
