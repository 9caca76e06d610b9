r"""Chosen export columns: parsing, validating and looking up the dot paths of ``columns``.

An export may name its columns (``columns`` on ``POST /v1/exports`` and single-job exports,
``--columns`` in the CLI). Each entry is either a **result path** or a **label column**.

Result paths use the escaped notation of the CSV headers (:func:`exports.formats._escape_key`): the
keys from the result's root down to the value, joined by ``.``; inside a key ``\`` is written ``\\``
and ``.`` is written ``\.``. ``metrics.duration_ms`` names ``{"metrics": {"duration_ms": ...}}``,
``a\.b`` names ``{"a.b": ...}``, ``c\\d`` names ``{"c\\d": ...}`` (the key ``c\d``).

Label columns are ``\labels.<key>`` (:data:`LABEL_PREFIX`), ``<key>`` a label key (1-63 characters
from ``a-z 0-9 . _ / -``, starting with a letter: the rule of labels on PUT), e.g.
``\labels.branch`` or ``\labels.ci.pipeline``. Written in a JSON body: ``"\\labels.branch"``.

Why a label column can never name a result path: in a result path every ``\`` starts a pair, ``\\``
or ``\.`` (:func:`exports.formats._escape_key` writes a key's ``\`` as ``\\`` and its ``.`` as
``\.``, and the joining ``.`` is never next to an unpaired ``\``). Read left to right, a result path
that starts with ``\`` therefore continues with ``\`` or ``.``; a label column continues with ``l``.
So no result key, however it is spelled, produces a path equal to a label column, and the same holds
for the headers of a CSV export that collects its columns (a test checks both with generated keys).

Rules (:func:`parse_columns`; each broken one is an :class:`InvalidColumn` naming the entry):

* 1 to :data:`MAX_COLUMNS` (1,000) entries, no entry twice (as written);
* an entry is at most :data:`MAX_PATH_CHARS` (1,024) characters, all entries together at most
  :data:`MAX_TOTAL_CHARS` (100,000), so a stored export record stays small;
* a result path has 1 to :data:`MAX_SEGMENTS` (64, the nesting limit of stored documents) keys, none
  of them empty (so ``""``, ``.a``, ``a.`` and ``a..b`` are refused: a key that is the empty string
  cannot be chosen); a ``\`` is followed by ``\`` or ``.`` (``a\`` and ``a\b`` are refused);
* a label column names a valid label key.

Overlapping entries are allowed: choosing ``metrics`` and ``metrics.ms`` gives both columns in CSV,
and ``metrics`` whole in JSON.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import msgspec

MAX_COLUMNS = 1000
"""Most entries in ``columns``."""
MAX_PATH_CHARS = 1024
"""Longest entry, in characters (code points)."""
MAX_TOTAL_CHARS = 100_000
"""Most characters over all entries together."""
MAX_SEGMENTS = 64
"""Most keys in one result path (stored documents nest at most 64 levels deep)."""
LABEL_PREFIX = "\\labels."
r"""What a label column starts with: ``\labels.``, then the label key."""
LABEL_KEY = re.compile(r"[a-z][a-z0-9._/-]{0,62}")
"""A label key (the rule of labels on PUT, issue 15): 1-63 of ``a-z 0-9 . _ / -``, starting with a letter."""


class InvalidColumn(ValueError):
    """An entry of ``columns`` breaks a rule; ``str()`` names the entry and the rule, safe to show clients.

    Attributes:
        column: the entry as given (cut to 100 characters when longer).
        reason: what is wrong with it.
    """

    def __init__(self, column: str, reason: str) -> None:
        shown = column if len(column) <= 100 else column[:100] + "..."
        super().__init__(f"column {shown!r}: {reason}")
        self.column = shown
        self.reason = reason


def split_path(path: str) -> tuple[str, ...]:
    r"""The keys of a result path, unescaped: ``a\.b.c`` -> ``("a.b", "c")``.

    Raises:
        InvalidColumn: an empty key, a ``\`` not followed by ``\`` or ``.``, or more than
            :data:`MAX_SEGMENTS` keys.
    """
    keys: list[str] = []
    key: list[str] = []
    index, end = 0, len(path)
    while index < end:
        char = path[index]
        if char == "\\":
            if index + 1 == end:
                raise InvalidColumn(path, "ends with a lone '\\'; write a '\\' in a key as '\\\\'")
            following = path[index + 1]
            if following not in ".\\":
                raise InvalidColumn(
                    path, f"'\\{following}' is not an escape; inside a key write '.' as '\\.' and '\\' as '\\\\'"
                )
            key.append(following)
            index += 2
            continue
        if char == ".":
            if not key:
                raise InvalidColumn(path, "has an empty key (a leading, trailing or doubled '.')")
            keys.append("".join(key))
            key = []
        else:
            key.append(char)
        index += 1
    if not key:
        raise InvalidColumn(path, "has an empty key (a leading, trailing or doubled '.')")
    keys.append("".join(key))
    if len(keys) > MAX_SEGMENTS:
        raise InvalidColumn(path, f"has {len(keys)} keys; at most {MAX_SEGMENTS} (the nesting limit)")
    return tuple(keys)


def label_column(key: str) -> str:
    r"""The column name of label ``key``: ``\labels.<key>``."""
    return LABEL_PREFIX + key


def is_label_column(column: str) -> bool:
    """Whether ``column`` is written as a label column (it may still name an invalid key)."""
    return column.startswith(LABEL_PREFIX)


class PathNode:
    """One key of the chosen result paths (:attr:`ColumnSelection.tree`).

    Attributes:
        chosen: the value at this key is chosen itself (taken whole).
        children: longer chosen paths below this key, by their next key.
    """

    __slots__ = ("children", "chosen")

    def __init__(self) -> None:
        self.chosen = False
        self.children: dict[str, PathNode] = {}


class ColumnSelection:
    """Validated ``columns``: what the writers of :mod:`exports.formats` need to pick them.

    Attributes:
        columns: the entries as given, in order (the CSV header after the three fixed columns).
        paths: per entry, the unescaped keys of a result path, or None for a label column.
        labels: per entry, the label key of a label column, or None for a result path.
        label_keys: the chosen label keys, in the order given.
        tree: the chosen result paths as a tree of :class:`PathNode` by key, from the result's root.
        has_paths: whether any entry is a result path (else the result need not be read at all).
    """

    __slots__ = ("columns", "has_paths", "label_keys", "labels", "paths", "tree")

    def __init__(self, columns: Sequence[str]) -> None:
        self.columns: tuple[str, ...] = tuple(columns)
        self.paths: list[tuple[str, ...] | None] = []
        self.labels: list[str | None] = []
        self.tree: dict[str, PathNode] = {}
        for column in self.columns:
            if is_label_column(column):
                key = column[len(LABEL_PREFIX) :]
                if not LABEL_KEY.fullmatch(key):
                    raise InvalidColumn(
                        column,
                        "a label column is '\\labels.' and a label key: 1-63 characters from a-z 0-9 . _ / -, "
                        "starting with a letter",
                    )
                self.paths.append(None)
                self.labels.append(key)
                continue
            keys = split_path(column)
            self.paths.append(keys)
            self.labels.append(None)
            level = self.tree
            node = None
            for key in keys:
                node = level.get(key)
                if node is None:
                    node = level[key] = PathNode()
                level = node.children
            assert node is not None
            node.chosen = True
        self.label_keys: tuple[str, ...] = tuple(key for key in self.labels if key is not None)
        self.has_paths = bool(self.tree)


def parse_columns(columns: Sequence[str]) -> ColumnSelection:
    """Check ``columns`` against the module's rules and prepare them for the writers.

    Raises:
        InvalidColumn: the first entry that breaks a rule (or, for the count and total length, the
            list as a whole, named ``columns``).
    """
    if not columns:
        raise InvalidColumn("columns", f"give 1 to {MAX_COLUMNS} columns, or leave columns out for all of them")
    if len(columns) > MAX_COLUMNS:
        raise InvalidColumn("columns", f"{len(columns)} columns given; at most {MAX_COLUMNS}")
    seen: set[str] = set()
    total = 0
    for column in columns:
        if len(column) > MAX_PATH_CHARS:
            raise InvalidColumn(column, f"is {len(column)} characters long; at most {MAX_PATH_CHARS}")
        if column in seen:
            raise InvalidColumn(column, "is given twice")
        seen.add(column)
        total += len(column)
    if total > MAX_TOTAL_CHARS:
        raise InvalidColumn("columns", f"{total} characters over all columns; at most {MAX_TOTAL_CHARS}")
    return ColumnSelection(columns)


def split_cli_list(text: str) -> list[str]:
    r"""The entries of the CLI's ``--columns a.b,c\.d``: split at ``,``; ``\,`` is a ``,`` inside an entry.

    Every other ``\`` pair is kept as written (``\\``, ``\.``, ``\l`` of a label column), so an entry
    reads as in the API. Empty entries are kept, for :func:`parse_columns` to refuse.
    """
    entries: list[str] = []
    current: list[str] = []
    index, end = 0, len(text)
    while index < end:
        char = text[index]
        if char == "\\" and index + 1 < end:
            following = text[index + 1]
            current.append("," if following == "," else char + following)
            index += 2
            continue
        if char == ",":
            entries.append("".join(current))
            current = []
        else:
            current.append(char)
        index += 1
    entries.append("".join(current))
    return entries


_MEMBERS = msgspec.json.Decoder(dict[str, msgspec.Raw])
_WHITESPACE = b" \t\r\n"
_OPEN_BRACE = ord("{")


def raw_members(raw: bytes | msgspec.Raw) -> dict[str, msgspec.Raw] | None:
    """The members of a JSON object as undecoded slices of ``raw``, in document order; None if not an object.

    Raises:
        msgspec.DecodeError: ``raw`` is not JSON.
    """
    view = memoryview(raw)
    index = 0
    while index < len(view) and view[index] in _WHITESPACE:
        index += 1
    if index == len(view) or view[index] != _OPEN_BRACE:
        return None
    members: dict[str, msgspec.Raw] = _MEMBERS.decode(raw)
    return members
