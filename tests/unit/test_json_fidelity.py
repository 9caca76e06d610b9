"""The fidelity check names the JSONPath of the first offending value, in document order.

Both checks run every case: ``check_document`` (small bodies, on the event loop) and
``check_document_streaming`` (large bodies, in a worker thread) must agree.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from service.json_fidelity import UnfaithfulJSON, check_document, check_document_streaming

Checker = Callable[..., str]


@pytest.fixture(params=[check_document, check_document_streaming], ids=["tree", "streaming"])
def check(request: pytest.FixtureRequest) -> Checker:
    checker: Checker = request.param
    return checker


@pytest.mark.parametrize(
    ("document", "path", "reason"),
    [
        ('{"a": [1, {"b": 1, "b": 2}]}', "$.a[1].b", "duplicate object key"),
        ('{"odd key": {"x": 1, "x": 1}}', '$["odd key"].x', "duplicate object key"),
        ("[1, 18446744073709551616, -9223372036854775809]", "$[1]", "integer out of range"),
        ('{"n": [0, 1e400]}', "$.n[1]", "IEEE 754 double"),
        ('{"s": ["ok", "\\ud800"]}', "$.s[1]", "lone UTF-16 surrogate"),
        ('{"\\udc00": 1}', '$["\\udc00"]', "lone UTF-16 surrogate"),
        ("18446744073709551616", "$", "integer out of range"),
        ("[0, " + "9" * 5000 + "]", "$[1]", "integer out of range"),
        ('{"k": 1, "big": -' + "1" * 4400 + "}", "$.big", "integer out of range"),
    ],
)
def test_offending_value_is_named(check: Checker, document: str, path: str, reason: str) -> None:
    with pytest.raises(UnfaithfulJSON) as caught:
        check(document)
    assert caught.value.path == path
    assert reason in caught.value.reason


def test_nesting_limit_counts_the_root_as_level_one(check: Checker) -> None:
    assert check("[" * 64 + "]" * 64) == "[" * 64 + "]" * 64
    with pytest.raises(UnfaithfulJSON) as caught:
        check('{"a": ' + "[" * 64 + "]" * 64 + "}")
    assert caught.value.path == "$.a" + "[0]" * 63
    assert "nesting" in caught.value.reason


def test_integer_limits_are_exact(check: Checker) -> None:
    assert check("[18446744073709551615, -9223372036854775808]")
    for literal in ("18446744073709551616", "-9223372036854775809", "-18446744073709551615"):
        with pytest.raises(UnfaithfulJSON):
            check(f"[{literal}]")


def test_faithful_document_is_returned_unchanged(check: Checker) -> None:
    text = '{ "a" : [1, 2.50, -0, "\\u00e9\\ud83d\\ude00", null, true], "b": {"c": {}} }'
    assert check(text.encode()) == text
