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
import time
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


_DUPLICATE_KEY = "duplicate object key; each key may appear once"


def _as_text(raw: bytes | str) -> str:
    """``raw`` as text; bytes must be UTF-8.

    Raises:
        MalformedJSON: the bytes are not UTF-8 (the message gives the offset of the first bad byte).
    """
    if isinstance(raw, bytes):
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedJSON(f"body is not valid UTF-8 (byte offset {exc.start})") from None
    return raw


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
    text = _as_text(raw)
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
                        raise UnfaithfulJSON(_path(root, (trail, key)), _DUPLICATE_KEY)
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


# --- the streaming check -------------------------------------------------------------------------
#
# check_document builds the whole document as Python objects first: many times the text's size for
# ``[{},{},...]``, and json's C decoder holds the GIL for all of it (seconds for a large body), so not
# even a worker thread keeps the event loop free. The scanner below checks the text in place: memory
# is the text plus the keys of the objects still open, and it gives the GIL up at least every few
# milliseconds, as no single regex match it runs covers more than about half a megabyte.

_WS = re.compile(r"[ \t\n\r]*")
_PLAIN = re.compile(r'[^"\\\x00-\x1f]{0,1048576}')
_ESCAPE = re.compile(r'\\(?:["\\/bfnrt]|u([0-9a-fA-F]{4}))')
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")
# A "simple" value: short, and nothing in it can break a fidelity rule.
_W = r"[ \t\n\r]*"
_SIMPLE_SCALAR = (
    r'"[^"\\\x00-\x1f]{0,1024}"'  # a string without escapes
    r"|-?(?:0|[1-9][0-9]{0,17})(?![0-9.eE])"  # an integer of up to 18 digits: within 64 bits
    r"|-?(?:0|[1-9][0-9]{0,200})(?:\.[0-9]{1,400}(?:[eE][-+]?[0-9]{1,2})?|[eE][-+]?[0-9]{1,2})"  # < 1e302
    r"|true|false|null"
)
_EMPTY_CONTAINER = rf"\{{{_W}\}}|\[{_W}\]"
_KEY = r'"([^"\\\x00-\x1f]{0,1024})"'
_RUN = 256
"""Most simple array elements or object members matched by one regex call (bounds a GIL hold)."""


def _item_patterns(member: bool, containers: bool) -> tuple[re.Pattern[str], re.Pattern[str]]:
    value = f"(?:{_SIMPLE_SCALAR}|{_EMPTY_CONTAINER})" if containers else f"(?:{_SIMPLE_SCALAR})"
    item = f"{_W}{_KEY}{_W}:{_W}{value}{_W}," if member else f"{_W}{value}{_W},"
    return re.compile(f"(?:{item}){{1,{_RUN}}}"), re.compile(item)


_RUNS = {
    (member, containers): _item_patterns(member, containers) for member in (False, True) for containers in (False, True)
}
"""``(in an object, empty containers allowed here) -> (a run of simple items, one item)``; the item
pattern's ``findall`` gives an object's keys (one group) or an array's elements."""
_LITERALS = ("true", "false", "null")


_YIELD_EVERY = 1023
"""Every 1024 steps (a value, or 1/32 of a run of simple items: well under a millisecond of work) the
scan gives the GIL up for a moment. A thread that only waits for the switch interval (5 ms) to pass
keeps the event loop thread waiting that long each time the loop released the GIL for a system call,
several times per loop iteration."""


class _Frame:
    """An open array (``keys is None``, ``step`` = index) or object (``step`` = current key)."""

    __slots__ = ("keys", "step")

    def __init__(self, keys: set[str] | None) -> None:
        self.keys = keys
        self.step: str | int = 0


class _Scanner:
    """One pass over a JSON text; see :func:`check_document_streaming`."""

    def __init__(self, text: str, root: str, max_depth: int, *, members: bool = False) -> None:
        self.text = text
        self.root = root
        self.max_depth = max_depth
        self.stack: list[_Frame] = []
        self.violation: UnfaithfulJSON | None = None
        self.members: dict[str, tuple[int, int]] | None = {} if members else None
        """With ``members``: where each value of the root object starts and ends in ``text``."""
        self._member_start: int | None = None
        self._steps = 0

    # -- reporting

    def malformed(self, message: str, pos: int) -> MalformedJSON:
        line = self.text.count("\n", 0, pos) + 1
        column = pos - self.text.rfind("\n", 0, pos)
        return MalformedJSON(f"{message} at line {line} column {column}")

    def unfaithful(self, reason: str, step: str | int | None) -> None:
        """Record the first rule broken (in document order); the scan goes on to check the syntax.

        ``step`` is where the offending value sits in the innermost open container (None: the root).
        """
        if self.violation is None:
            path = self.root
            steps = [frame.step for frame in self.stack[:-1]]
            if step is not None:
                steps.append(step)
            for item in steps:
                path = f"{path}[{item}]" if isinstance(item, int) else _member_path(path, item)
            self.violation = UnfaithfulJSON(path, reason)

    # -- tokens

    def string(self, pos: int) -> tuple[int, bool]:
        """Index after the string opening at ``pos``, and whether it holds a surrogate escape."""
        text = self.text
        i = pos + 1
        surrogate = False
        while True:
            i = _PLAIN.match(text, i).end()  # type: ignore[union-attr]  # matches the empty string
            if i >= len(text):
                raise self.malformed("Unterminated string starting", pos)
            char = text[i]
            if char == '"':
                return i + 1, surrogate
            if char != "\\":
                if char < " ":
                    raise self.malformed("Invalid control character", i)
                continue  # _PLAIN stopped at its length bound
            escape = _ESCAPE.match(text, i)
            if escape is None:
                raise self.malformed("Invalid \\escape", i)
            code = escape.group(1)
            if code is not None and code[0] in "dD" and code[1] in "89abcdefABCDEF":
                surrogate = True
            i = escape.end()

    def string_value(self, start: int, end: int, surrogate: bool) -> str:
        """The decoded text of the string token ``text[start:end]``."""
        if "\\" not in self.text[start:end]:
            return self.text[start + 1 : end - 1]
        value: str = json.decoder.scanstring(self.text, start + 1)[0]  # type: ignore[attr-defined]
        return value

    def number(self, pos: int, step: str | int | None) -> int:
        match = _NUMBER.match(self.text, pos)
        if match is None:
            raise self.malformed("Expecting value", pos)
        literal = match.group()
        if match.group(1) is None and match.group(2) is None:
            value = _parse_int(literal)
            if value is _OUT_OF_RANGE or not INT_MIN <= value <= INT_MAX:  # type: ignore[operator]
                self.unfaithful(_INT_RANGE, step)
        elif not math.isfinite(float(literal)):
            self.unfaithful(_NOT_A_DOUBLE, step)
        return match.end()

    # -- the scan

    def run(self) -> None:
        text = self.text
        stack = self.stack
        end = len(text)
        pos = _WS.match(text, 0).end()  # type: ignore[union-attr]
        step: str | int | None = None  # where the next value sits in its parent (None: the root)
        while True:
            self._steps += 1
            if not self._steps & _YIELD_EVERY:
                time.sleep(0)  # see _YIELD_EVERY
            # A value starts at pos.
            if pos >= end:
                raise self.malformed("Expecting value", pos)
            if self.members is not None and len(stack) == 1 and stack[0].keys is not None:
                self._member_start = pos
            char = text[pos]
            if char == "{" or char == "[":
                if len(stack) + 1 > self.max_depth:
                    self.unfaithful(f"nesting is deeper than {MAX_DEPTH} levels", step)
                frame = _Frame(set() if char == "{" else None)
                stack.append(frame)
                pos = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]
                if pos < end and text[pos] == ("}" if char == "{" else "]"):
                    stack.pop()
                    pos += 1
                else:
                    pos, step = self.first_item(frame, pos)
                    continue
            elif char == '"':
                start = pos
                pos, surrogate = self.string(pos)
                if surrogate and not _is_scalar_text(self.string_value(start, pos, surrogate)):
                    self.unfaithful(_LONE_SURROGATE, step)
            elif char == "-" or "0" <= char <= "9":
                if text.startswith("-Infinity", pos):
                    raise MalformedJSON("-Infinity is not a JSON value (RFC 8259 allows no NaN or Infinity)")
                pos = self.number(pos, step)
            elif text.startswith(_LITERALS, pos):
                pos += 4 if char != "f" else 5
            elif text.startswith(("NaN", "Infinity"), pos):
                name = "NaN" if char == "N" else "Infinity"
                raise MalformedJSON(f"{name} is not a JSON value (RFC 8259 allows no NaN or Infinity)")
            else:
                raise self.malformed("Expecting value", pos)
            # After a value: a comma, the end of its container(s), or the end of the text.
            while True:
                if self._member_start is not None and len(stack) == 1:
                    self.members[str(stack[0].step)] = (self._member_start, pos)  # type: ignore[index]
                    self._member_start = None
                pos = _WS.match(text, pos).end()  # type: ignore[union-attr]
                if not stack:
                    if pos != end:
                        raise self.malformed("Extra data", pos)
                    if self.violation is not None:
                        raise self.violation
                    return
                frame = stack[-1]
                char = text[pos] if pos < end else ""
                if char == ",":
                    pos, step = self.next_item(frame, pos + 1)
                    break
                if char == ("]" if frame.keys is None else "}"):
                    stack.pop()
                    pos += 1
                    continue
                raise self.malformed("Expecting ',' delimiter", pos)

    def first_item(self, frame: _Frame, pos: int) -> tuple[int, str | int]:
        if frame.keys is None:
            frame.step = -1
        return self.next_item(frame, pos)

    def next_item(self, frame: _Frame, pos: int) -> tuple[int, str | int]:
        """Skip runs of simple items after ``pos``; return where the next value starts and its step."""
        text = self.text
        keys = frame.keys
        containers_allowed = len(self.stack) + 1 <= self.max_depth
        run, item = _RUNS[keys is not None, containers_allowed]
        # The root object's members one by one when their spans are wanted.
        while self.members is None or len(self.stack) > 1 or keys is None:
            match = run.match(text, pos)
            if match is None:
                break
            found = item.findall(text, pos, match.end())
            self._steps += 32
            if not self._steps & _YIELD_EVERY:
                time.sleep(0)
            pos = match.end()
            if keys is None:
                frame.step = int(frame.step) + len(found)
            else:
                new = set(found)
                if len(new) != len(found) or not keys.isdisjoint(new):
                    self.duplicate(keys, found)
                keys.update(new)
                frame.step = found[-1]
        pos = _WS.match(text, pos).end()  # type: ignore[union-attr]
        if keys is None:
            frame.step = int(frame.step) + 1
            return pos, frame.step
        # A member: "key" : value
        if pos >= len(text) or text[pos] != '"':
            raise self.malformed("Expecting property name enclosed in double quotes", pos)
        start = pos
        pos, surrogate = self.string(pos)
        key = self.string_value(start, pos, surrogate)
        if surrogate and not _is_scalar_text(key):
            self.unfaithful(_LONE_SURROGATE, key)
        if key in keys:
            self.unfaithful(_DUPLICATE_KEY, key)
        keys.add(key)
        pos = _WS.match(text, pos).end()  # type: ignore[union-attr]
        if pos >= len(text) or text[pos] != ":":
            raise self.malformed("Expecting ':' delimiter", pos)
        pos = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]
        frame.step = key
        return pos, key

    def duplicate(self, keys: set[str], found: list[str]) -> None:
        """Report the first of ``found`` (keys about to join ``keys``) that is already there or repeats."""
        seen: set[str] = set()
        for key in found:
            if key in keys or key in seen:
                self.unfaithful(_DUPLICATE_KEY, key)
                return
            seen.add(key)


def check_document_streaming(raw: bytes | str, root: str = "$", *, max_depth: int = MAX_DEPTH) -> str:
    """Like :func:`check_document` (same arguments, result and errors), without building the document.

    Memory is the text plus the keys of the objects open at any one point; the work gives the GIL up
    at least every few milliseconds, so run in a worker thread it never holds the event loop for
    long, whatever the document's shape. Of several offending values it names the first in document
    order; a syntax error anywhere wins over them (400 before 422), as with :func:`check_document`.

    Raises:
        MalformedJSON: not UTF-8, or not JSON.
        UnfaithfulJSON: well-formed, but breaks a rule listed in the module docstring.
    """
    text = _as_text(raw)
    _Scanner(text, root, max_depth).run()
    return text


def check_envelope_streaming(raw: bytes, *, max_depth: int) -> tuple[str, dict[str, tuple[int, int]]]:
    """:func:`check_document_streaming` of a request body, and where its root object's member values are.

    Returns ``(text, {key: (start, end)})``, positions in ``text``, so the caller needs no second
    parse. The dict is empty when the root is not an object.

    Raises:
        MalformedJSON, UnfaithfulJSON: as :func:`check_document_streaming`.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedJSON(f"body is not valid UTF-8 (byte offset {exc.start})") from None
    scanner = _Scanner(text, "$", max_depth, members=True)
    scanner.run()
    return text, scanner.members or {}
