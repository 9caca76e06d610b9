"""``escape_text`` (the escaping of large query parameters) produces exactly PyMySQL's escaping."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from pymysql.converters import escape_string

from repositories.database import escape_text

SPECIALS = "\\\x00\n\r\x1a'\"%\t"


@given(st.text(alphabet=st.one_of(st.sampled_from(SPECIALS), st.characters()), max_size=60))
def test_same_literal_as_pymysql(text: str) -> None:
    assert escape_text(text) == f"'{escape_string(text)}'"
