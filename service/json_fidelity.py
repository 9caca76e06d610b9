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


_DECODER = json.JSONDecoder(object_pairs_hook=_Pairs, parse_constant=_reject_constant)


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


def _walk(value: object, root: str, max_depth: int, *, check_strings: bool) -> None:
    # Iterative, so a deep document cannot exhaust the Python stack here.
    stack: list[tuple[object, str, int]] = [(value, root, 0)]
    while stack:
        node, path, depth = stack.pop()
        if isinstance(node, _Pairs | list):
            depth += 1
            if depth > max_depth:
                raise UnfaithfulJSON(path, f"nesting is deeper than {MAX_DEPTH} levels")
            if isinstance(node, _Pairs):
                seen: set[str] = set()
                for key, child in node:
                    child_path = _member_path(path, key)
                    if key in seen:
                        raise UnfaithfulJSON(child_path, "duplicate object key; each key may appear once")
                    seen.add(key)
                    if check_strings:
                        _check_string(key, child_path)
                    stack.append((child, child_path, depth))
            else:
                stack.extend((child, f"{path}[{index}]", depth) for index, child in enumerate(node))
        elif isinstance(node, bool) or node is None:
            continue
        elif isinstance(node, int):
            if not INT_MIN <= node <= INT_MAX:
                raise UnfaithfulJSON(
                    path, "integer out of range; integers must lie in -2^63 .. 2^64-1 to be stored exactly"
                )
        elif isinstance(node, float):
            if not math.isfinite(node):
                raise UnfaithfulJSON(path, "number out of range for an IEEE 754 double")
        elif check_strings and isinstance(node, str):
            _check_string(node, path)


def _check_string(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UnfaithfulJSON(
            path, "string contains a lone UTF-16 surrogate escape; only Unicode scalar values are allowed"
        ) from None


def _member_path(path: str, key: str) -> str:
    if _IDENTIFIER.fullmatch(key):
        return f"{path}.{key}"
    return f"{path}[{json.dumps(key)}]"
