"""Pieces of one-line error messages: an error's first line and a value's repr, both bounded.

Library errors (torch's allocator, onnx, YAML) can run to paragraphs and a user's value to hundreds of megabytes
(a YAML alias bomb), while every refusal of this tool is one line.

>>> first_line(RuntimeError("out of memory\\n  at frame 1\\n  at frame 2"))
'out of memory'
>>> first_line(KeyError())
'KeyError'
>>> short_repr({"a": "x" * 100}, limit=30)
"{'a': 'xxxxxxxxxxxxxxxxx......"
>>> short_repr(list(range(100)))
'[0, 1, 2, 3, 4, 5, ...]'
"""

from __future__ import annotations

import reprlib
from typing import Any

_REPR = reprlib.Repr()
# nested two deep, eight items, 40 characters of a string: enough to recognise a value, never the whole of it
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxstring, _REPR.maxother = 2, 8, 6, 40, 40


def first_line(err: BaseException, limit: int = 160) -> str:
    """The first line of ``err``'s text (its type's name when it has none), cut to ``limit`` characters."""
    text = str(err).strip()
    text = text.splitlines()[0] if text else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)`` on one line, bounded: ``reprlib`` never builds the whole text of a huge value."""
    text = " ".join(_REPR.repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = ["first_line", "short_repr"]
