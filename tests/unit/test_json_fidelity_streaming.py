"""The streaming fidelity check (large PUT bodies) agrees with the tree check on every verdict, also
where it skips runs of simple values in one step, and checks any shape without building it."""

from __future__ import annotations

import json
import random

import pytest

from service.json_fidelity import MalformedJSON, UnfaithfulJSON, check_document, check_document_streaming
from tests.conftest import REALDATA


def _verdict(checker: object, document: str | bytes) -> tuple[str, ...]:
    try:
        checker(document)  # type: ignore[operator]
    except UnfaithfulJSON as exc:
        return ("422", exc.path, exc.reason)
    except MalformedJSON:
        return ("400",)
    return ("ok",)


SINGLE_FAULTS = [
    "[" + "0," * 1000 + "18446744073709551616]",
    "[" + "0," * 300 + "[" + "1.5," * 700 + "1e400]]",
    "[" + '"x",' * 513 + '"\\ud800"]',
    "{" + "".join(f'"k{i}": {i},' for i in range(700)) + '"k699": 0}',
    "{" + "".join(f'"k{i}": null,' for i in range(300)) + '"k7": null, "z": 1}',
    '{"a": 1, "\\u0061": 2}',
    '{"s": "' + "x" * 5000 + '", "s": 1}',
    "[" + "{}," * 600 + '{"a": [' + "[]," * 600 + "18446744073709551616]}]",
    "[" + "[]," * 300 + "[" * 64 + "]" * 64 + "]",
]
MALFORMED = [
    "",
    "[1,]",
    '{"a" 1}',
    "[1 2]",
    '"\\x"',
    '"a\nb"',
    "[01]",
    "[NaN]",
    "[-Infinity]",
    "[" + "0," * 1000 + "]",
    "{" + '"a": 1,' * 300 + "}",
    "[] x",
    "[" * 100,
    '"' + "x" * 2_000_000,
]


@pytest.mark.parametrize("document", SINGLE_FAULTS + MALFORMED)
def test_same_verdict_and_path(document: str) -> None:
    assert _verdict(check_document_streaming, document) == _verdict(check_document, document)


def _random_document(rnd: random.Random, depth: int = 0) -> str:
    leaves = ["1", "-0", "1.5", "2e5", "18446744073709551615", "18446744073709551616", '"x"', '"a,b"', '"\\ud800"']
    leaves += ['"\\u0041"', "true", "null", "{}", "[]", "1e999", "-9223372036854775809", '"\\n"']
    roll = rnd.random()
    if depth > 4 or roll < 0.4:
        return rnd.choice(leaves)
    if roll < 0.7:
        return "[" + ",".join(_random_document(rnd, depth + 1) for _ in range(rnd.randint(0, 6))) + "]"
    keys = [rnd.choice(["a", "b", "\\u0061", "k,1", "d"]) for _ in range(rnd.randint(0, 4))]
    return "{" + ", ".join(f'"{key}": {_random_document(rnd, depth + 1)}' for key in keys) + "}"


def test_same_status_on_random_documents() -> None:
    """Of several offending values the two may name different ones; the status is always the same."""
    rnd = random.Random(12)
    for _ in range(3000):
        document = _random_document(rnd)
        assert _verdict(check_document_streaming, document)[0] == _verdict(check_document, document)[0], document


@pytest.mark.parametrize("path", sorted(REALDATA.glob("*/*.json")), ids=lambda path: path.name)
def test_real_documents(path: object) -> None:
    raw = path.read_bytes()  # type: ignore[attr-defined]
    assert _verdict(check_document_streaming, raw) == _verdict(check_document, raw)


@pytest.mark.parametrize("item", [b"{}", b"[]", b"0", b"1.5", b'"a"', b"null", b'"\\n\\"x"', b'"\\ud83d\\ude00"'])
def test_large_arrays_of_any_shape_pass(item: bytes) -> None:
    body = b'{"status":"succeeded","result":[' + b",".join([item] * 200_000) + b"]}"
    assert check_document_streaming(body, max_depth=65) == body.decode()
    assert json.loads(body)["result"][-1] == json.loads(item)
