"""The one JSON reader for files lowbit loads (quantization.json, Plan JSON, config.json, checkpoint headers),
and typed access to their fields.

``json.loads`` alone lets a hostile file through in three ways: nesting deep enough to exhaust the stack
(``RecursionError``), ``NaN`` / ``Infinity`` that later crash an ``int()`` (``OverflowError``), and fields
of the wrong type that fail far from the file. :func:`parse_json` rejects the first two; :func:`field`
checks a field's type where it is read. Every failure is one :class:`JSONFileError` naming the file and the
field.

>>> parse_json('{"a": [1, 2]}', "x.json")
{'a': [1, 2]}
>>> parse_json('{"a": Infinity}', "x.json")
Traceback (most recent call last):
lowbit.core.jsonio.JSONFileError: x.json: not valid JSON (Infinity is not a number JSON allows)
>>> field({"n": "3"}, "n", int, "x.json")
Traceback (most recent call last):
lowbit.core.jsonio.JSONFileError: x.json: field 'n' must be an integer, got '3'
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError, first_line

MAX_DEPTH = 64  # lowbit's own files nest 5 deep; config.json files under 10
MAX_JSON_BYTES = 100_000_000

_MISSING = object()
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
               dict: "an object", type(None): "null"}


class JSONFileError(LowbitError, ValueError):
    """A JSON file (or JSON text inside a file) that is malformed, too deep, or has a field of the wrong type."""


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"{text[:20]} is too large a number")
    return v


def _depth_ok(doc: Any, limit: int) -> bool:
    stack = [(doc, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            if d > limit:
                return False
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return True


def parse_json(text: str | bytes, where: str | os.PathLike, max_depth: int = MAX_DEPTH) -> Any:
    """``text`` as JSON, refusing NaN/Infinity, integers longer than Python's limit and nesting past ``max_depth``.

    >>> parse_json("[" * 100 + "]" * 100, "deep.json")
    Traceback (most recent call last):
    lowbit.core.jsonio.JSONFileError: deep.json: not valid JSON (nested more than 64 deep)
    """
    try:
        doc = json.loads(text, parse_constant=_constant, parse_float=_float)
    except RecursionError:
        raise JSONFileError(f"{where}: not valid JSON (nested more than {max_depth} deep)") from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, bad constants, over-long integers
        raise JSONFileError(f"{where}: not valid JSON ({first_line(e)})") from None
    if not _depth_ok(doc, max_depth):
        raise JSONFileError(f"{where}: not valid JSON (nested more than {max_depth} deep)")
    return doc


def read_json(path: str | os.PathLike, max_depth: int = MAX_DEPTH) -> Any:
    """The JSON document in ``path`` (see :func:`parse_json`); a missing, unreadable or huge file is one error."""
    p = Path(path)
    try:
        if p.stat().st_size > MAX_JSON_BYTES:
            raise JSONFileError(f"{p}: {p.stat().st_size} bytes, more than any JSON file lowbit reads")
        raw = p.read_bytes()
    except FileNotFoundError:
        raise JSONFileError(f"{p}: no such file") from None
    except OSError as e:
        raise JSONFileError(f"{p}: unreadable ({e.strerror or e})") from None
    return parse_json(raw, p, max_depth)


def _is(value: Any, t: type) -> bool:
    if t is int:
        return type(value) is int  # JSON true is no size
    if t is float:
        return type(value) in (int, float) and math.isfinite(value)
    return isinstance(value, t)


def field(doc: Any, key: str, types: type | tuple[type, ...], where: str | os.PathLike, default: Any = _MISSING,
          what: str = "") -> Any:
    """``doc[key]`` checked to be one of ``types`` (``int`` excludes booleans, ``float`` takes ints and refuses
    nothing non-finite); ``default`` when absent, else absence is an error. ``what`` prefixes the field's name
    (``"layer 'x': "``).

    >>> field({"k": 1.5}, "k", float, "x.json"), field({}, "k", (int, type(None)), "x.json", default=None)
    (1.5, None)
    """
    if not isinstance(doc, dict):
        raise JSONFileError(f"{where}: {what}expected an object, got {_short(doc)}")
    if key not in doc:
        if default is _MISSING:
            raise JSONFileError(f"{where}: {what}field {key!r} is missing")
        return default
    value = doc[key]
    ts = types if isinstance(types, tuple) else (types,)
    if not any(_is(value, t) for t in ts):
        want = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in ts)
        raise JSONFileError(f"{where}: {what}field {key!r} must be {want}, got {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
