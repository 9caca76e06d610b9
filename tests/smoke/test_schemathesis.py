"""Schemathesis against the service's own OpenAPI, on a real Granian server, with a valid key.

Every operation, a few hundred generated cases: no 5xx, and every status code, content type and body
as documented. What it found once is kept as regular tests (tests/api/test_health_and_docs.py).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.servers import Server, log_on_failure

pytestmark = pytest.mark.slow

SCHEMATHESIS = str(Path(sys.executable).parent / "schemathesis")


LONG_POLL_CONFIG = """
# A generated wait=N on an export that stays queued (this server runs no export worker) would hold the
# request N seconds (up to 60), past the request timeout: fix it at 1 s. Its checks have their own tests.
[[operations]]
include-name = "GET /v1/exports/{export_id}"
parameters = { "query.wait" = 1 }
"""


def test_schemathesis_finds_nothing(server: Server, api_token: str, tmp_path: Path) -> None:
    base, log = server.base_url, server.log
    config = tmp_path / "schemathesis.toml"
    config.write_text(LONG_POLL_CONFIG)
    with log_on_failure(log):
        done = subprocess.run(
            [
                SCHEMATHESIS,
                "--config-file",
                str(config),
                "run",
                f"{base}/schema/openapi.json",
                "--header",
                f"Authorization: Bearer {api_token}",
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
                "--phases",
                "examples,coverage,fuzzing",
                "--max-examples",
                "25",
                "--seed",
                "20261129",
                # One worker: CPython 3.11 before 3.11.8 keeps one AST recursion counter per
                # interpreter, and hypothesis parsing source in two threads at once can trip it
                # ("SystemError: AST constructor recursion depth mismatch", cpython gh-106905).
                "--workers",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        report = done.stdout + done.stderr
        assert done.returncode == 0, report[-6000:]
        generated = re.search(r"(\d+) generated", report)
        assert generated is not None, report[-2000:]
        assert int(generated.group(1)) >= 200, report[-2000:]
        operations = _operation_count()
        assert f"Selected: {operations}/{operations}" in report or f"Tested: {operations}" in report, report[-2000:]


def _operation_count() -> int:
    """How many operations the committed openapi.json documents (every one must be tested)."""
    spec = json.loads((Path(__file__).resolve().parents[2] / "openapi.json").read_text())
    return sum(len(item) for item in spec["paths"].values())
