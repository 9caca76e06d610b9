r"""Checks that a JSON document can be stored in MySQL or MariaDB and read back unchanged.

MySQL parses JSON into its own binary form, MariaDB keeps the text; both lose something silently:

* integers outside [-2**63, 2**64 - 1] become doubles on MySQL;
* duplicate object keys: MySQL keeps the last, MariaDB keeps both (RFC 8259 section 4 leaves the
  behaviour undefined);
* a lone UTF-16 surrogate escape such as ``"\ud800"`` is not a Unicode scalar value and has no
  UTF-8 encoding (RFC 8259 section 8.2);
* numbers beyond the double range (``1e400``) are refused by MySQL;
* nesting: MySQL refuses more than 100 levels, so the service's limit is 64.

Documents that hit one of these are refused with :class:`UnfaithfulJSON`, which names the JSON path
of the offending value, so nothing is stored that would come back different.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable

MAX_DEPTH = 64
"""Deepest accepted nesting of arrays and objects; the document root counts as level 1."""
INT_MIN = -(2**63)
"""Smallest integer stored exactly (MySQL's JSON INT64)."""
INT_MAX = 2**64 - 1
"""Largest integer stored exactly (MySQL's JSON UINT64)."""

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class MalformedJSON(ValueError):
    """The text is not JSON (RFC 8259) at all, or not UTF-8: a client error (400)."""


class UnfaithfulJSON(ValueError):
    """Well-formed JSON that cannot be stored faithfully (422).

    Attributes:
        path: JSONPath of the offending value, e.g. ``$.result.runs[0].id``.
        reason: what is wrong and what is allowed.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class _Pairs(list[tuple[str, object]]):
    """A JSON object as its (key, value) pairs in document order, duplicates kept."""


def _reject_constant(name: str) -> object:
    raise MalformedJSON(f"{name} is not a JSON value (RFC 8259 allows no NaN or Infinity)")


class _OutOfRange:
    """Stands in for an integer literal of more than 20 digits: beyond 64 bits whatever its value."""

    __slots__ = ()


_OUT_OF_RANGE = _OutOfRange()


def _parse_int(literal: str) -> int | _OutOfRange:
    # A literal of thousands of digits would otherwise make int() raise ValueError (CPython's
    # int_max_str_digits, 4300 by default; CVE-2020-10735) or cost quadratic time. The walk reports
    # the stand-in with its JSONPath.
    if len(literal) > 21:  # 2**64 - 1 has 20 digits; a minus sign makes 21 characters
        return _OUT_OF_RANGE
    return int(literal)


_DECODER = json.JSONDecoder(object_pairs_hook=_Pairs, parse_constant=_reject_constant, parse_int=_parse_int)


def check_document(raw: bytes | str, root: str = "$", *, max_depth: int = MAX_DEPTH) -> str:
    """Return ``raw`` as text if it is one JSON value that MySQL and MariaDB both keep unchanged.

    Args:
        raw: the JSON text, UTF-8 if bytes.
        root: JSONPath prefix for error messages, e.g. ``$.result``.
        max_depth: deepest nesting allowed; a request envelope around the document adds one level.

    Raises:
        MalformedJSON: not UTF-8, or not JSON.
        UnfaithfulJSON: well-formed, but breaks a rule listed in the module docstring.
    """
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedJSON(f"body is not valid UTF-8 (byte offset {exc.start})") from None
    else:
        text = raw
    try:
        value = _DECODER.decode(text)
    except RecursionError:
        raise UnfaithfulJSON(root, f"nesting is deeper than {MAX_DEPTH} levels") from None
    except OverflowError:  # pragma: no cover - float() of huge literals gives inf, not this; kept safe
        raise UnfaithfulJSON(root, "number out of range") from None
    except json.JSONDecodeError as exc:
        raise MalformedJSON(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
    _walk(value, root, max_depth, check_strings=_SURROGATE_ESCAPE.search(text) is not None)
    return text


_Trail = tuple["_Trail | None", "str | int"]
"""Where a value sits: (the parent's trail, its key or index); ``None`` is the document root."""

_INT_RANGE = "integer out of range; integers must lie in -2^63 .. 2^64-1 to be stored exactly"
_NOT_A_DOUBLE = "number out of range for an IEEE 754 double"
_LONE_SURROGATE = "string contains a lone UTF-16 surrogate escape; only Unicode scalar values are allowed"


def _walk(value: object, root: str, max_depth: int, *, check_strings: bool) -> None:
    # Iterative, so a deep document cannot exhaust the Python stack here. Only containers go on the
    # stack, scalars are checked in place, and the JSONPath of a value is built only when it breaks
    # a rule (from its trail): this walk sees every value of every stored document.
    if not isinstance(value, list):  # a scalar document (_Pairs is a list too)
        _check_scalar(value, root, None, check_strings=check_strings)
        return
    stack: list[tuple[list[object], _Trail | None, int]] = [(value, None, 1)]
    while stack:
        node, trail, depth = stack.pop()
        if depth > max_depth:
            raise UnfaithfulJSON(_path(root, trail), f"nesting is deeper than {MAX_DEPTH} levels")
        items: Iterable[tuple[str | int, object]]
        if isinstance(node, _Pairs):
            keys = [key for key, _ in node]
            if len(set(keys)) != len(keys):
                seen: set[str] = set()
                for key in keys:
                    if key in seen:
                        raise UnfaithfulJSON(
                            _path(root, (trail, key)), "duplicate object key; each key may appear once"
                        )
                    seen.add(key)
            if check_strings:
                for key in keys:
                    if not _is_scalar_text(key):
                        raise UnfaithfulJSON(_path(root, (trail, key)), _LONE_SURROGATE)
            items = node
        else:
            items = enumerate(node)
        for step, child in items:
            if isinstance(child, list):
                stack.append((child, (trail, step), depth + 1))
            elif child is None or child is True or child is False:
                continue
            else:
                _check_scalar(child, root, (trail, step), check_strings=check_strings)


def _check_scalar(value: object, root: str, trail: _Trail | None, *, check_strings: bool) -> None:
    if isinstance(value, bool) or value is None:
        return
    if value is _OUT_OF_RANGE:
        raise UnfaithfulJSON(_path(root, trail), _INT_RANGE)
    if isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:
            raise UnfaithfulJSON(_path(root, trail), _INT_RANGE)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise UnfaithfulJSON(_path(root, trail), _NOT_A_DOUBLE)
    elif check_strings and isinstance(value, str) and not _is_scalar_text(value):
        raise UnfaithfulJSON(_path(root, trail), _LONE_SURROGATE)


def _is_scalar_text(text: str) -> bool:
    """False if ``text`` holds a lone surrogate (no UTF-8 encoding exists for it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _path(root: str, trail: _Trail | None) -> str:
    """The JSONPath of the value at ``trail``, e.g. ``$.result.runs[0]["odd key"]``."""
    steps: list[str | int] = []
    while trail is not None:
        trail, step = trail
        steps.append(step)
    path = root
    for step in reversed(steps):
        path = f"{path}[{step}]" if isinstance(step, int) else _member_path(path, step)
    return path


def _member_path(path: str, key: str) -> str:
    if _IDENTIFIER.fullmatch(key):
        return f"{path}.{key}"
    return f"{path}[{json.dumps(key)}]"
