"""A large document escaped in pieces (``EscapedText``) is the same literal as escaped whole."""

from __future__ import annotations

import pytest

from repositories.database import escape_text
from repositories.job_results import EscapedText


@pytest.mark.parametrize("size", [0, 10, 1 << 20, (1 << 20) + 1, 3 * (1 << 20) + 7])
def test_pieces_make_the_same_literal(size: int) -> None:
    pattern = "a\"\\\n\r\x00\x1a'é😀"
    text = (pattern * (size // len(pattern) + 1))[:size]
    assert EscapedText(text).literal == escape_text(text)
