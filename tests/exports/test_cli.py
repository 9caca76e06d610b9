"""`jobresults import` and `jobresults export`: same validation and pipeline as the API."""

from __future__ import annotations

import csv
import io
import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REALDATA
from tests.support.servers import JOBRESULTS, service_env

pytestmark = pytest.mark.slow  # each test runs the CLI in processes of its own
csv.field_size_limit(2**31 - 1)


def run(database_url: str, exports_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = service_env({"database_url": database_url, "exports_dir": exports_dir})
    return subprocess.run([JOBRESULTS, *args], env=env, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def inputs(tmp_path: Path, job_id: str) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / f"{job_id}-ok.json").write_text('{"metrics": {"ms": 5}, "big": 18446744073709551615}')
    (folder / f"{job_id}-dup.json").write_text('{"a": 1, "a": 2}')
    (folder / f"{job_id}-huge-int.json").write_text('{"n": [1, 18446744073709551616]}')
    (folder / "bad name.json").write_text("{}")
    (folder / f"{job_id}-broken.json").write_text('{"a": ')
    return folder


def test_import_reports_what_it_refused_and_why(database_url: str, tmp_path: Path, inputs: Path, job_id: str) -> None:
    done = run(database_url, tmp_path / "exports", "import", str(inputs))
    assert done.returncode == 1
    assert f"created: {job_id}-ok" in done.stdout
    assert "1 imported, 4 refused" in done.stdout
    refused = {line.split(": ", 2)[1]: line for line in done.stderr.splitlines() if line.startswith("refused:")}
    assert "duplicate object key" in refused[str(inputs / f"{job_id}-dup.json")]
    assert "$.n[1]" in refused[str(inputs / f"{job_id}-huge-int.json")]
    assert "not a valid job id" in refused[str(inputs / "bad name.json")]
    assert "not one JSON document" in refused[str(inputs / f"{job_id}-broken.json")]
    again = run(database_url, tmp_path / "exports", "import", str(inputs / f"{job_id}-ok.json"), "--job-id", job_id)
    assert again.returncode == 0
    assert f"created: {job_id}" in again.stdout


def test_import_real_data_then_export_with_the_cli(database_url: str, tmp_path: Path) -> None:
    files = sorted(p for p in REALDATA.glob("*/*.json") if p.name != "govulncheck-json-stream.json")[:6]
    if not files:
        pytest.skip(f"no real data at {REALDATA}; set JOBRESULTS_REALDATA")
    done = run(database_url, tmp_path / "exports", "import", *map(str, files), "--status", "failed")
    assert done.returncode == 0, done.stderr
    assert f"{len(files)} imported, 0 refused" in done.stdout

    out = tmp_path / "one.json"
    single = run(
        database_url, tmp_path / "exports", "export", "--format", "json", "--job", files[0].stem, "--out", str(out)
    )
    assert single.returncode == 0, single.stderr
    assert json.loads(out.read_bytes())["result"] == json.loads(files[0].read_bytes())

    out_csv = tmp_path / "range.csv"
    ranged = run(
        database_url,
        tmp_path / "exports",
        "export",
        "--format",
        "csv",
        "--from",
        "2000-01-01T00:00:00Z",
        "--to",
        "2100-01-01T00:00:00Z",
        "--status",
        "failed",
        "--out",
        str(out_csv),
    )
    assert ranged.returncode == 0, ranged.stderr
    assert "rows" in ranged.stderr  # the progress bar
    rows = list(csv.reader(io.StringIO(out_csv.read_text(encoding="utf-8"), newline="")))
    exported = {row[0] for row in rows[1:]}
    assert {p.stem for p in files} <= exported
    summary = ranged.stdout.strip()
    assert summary.startswith("export ")
    assert f"{len(rows) - 1} rows" in summary


def test_export_refuses_bad_arguments(database_url: str, tmp_path: Path) -> None:
    bad_time = run(
        database_url, tmp_path, "export", "--format", "json", "--from", "yesterday", "--out", str(tmp_path / "x")
    )
    assert bad_time.returncode == 2
    assert "RFC 3339" in bad_time.stderr
    missing = run(
        database_url, tmp_path, "export", "--format", "json", "--job", "no-such-job-xyz", "--out", str(tmp_path / "y")
    )
    assert missing.returncode == 1
    assert "no job result" in missing.stderr
    assert not (tmp_path / "y").exists()


def test_import_refuses_two_files_with_one_job_id(database_url: str, tmp_path: Path, job_id: str) -> None:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / f"{job_id}.json").write_text(f'{{"from": "{folder}"}}')
    done = run(database_url, tmp_path / "exports", "import", str(tmp_path / "a"), str(tmp_path / "b"))
    assert done.returncode == 1
    assert "1 imported, 1 refused" in done.stdout
    assert "also comes from" in done.stderr


def test_export_with_columns(database_url: str, tmp_path: Path, job_id: str) -> None:
    folder = tmp_path / "cols"
    folder.mkdir()
    (folder / f"{job_id}-x.json").write_text('{"m": {"ms": 5, "n": 1}, "a,b": 18446744073709551615, "k.j": "=1"}')
    assert run(database_url, tmp_path / "exports", "import", str(folder)).returncode == 0
    out = tmp_path / "cols.csv"
    ranged = run(
        database_url,
        tmp_path / "exports",
        "export",
        "--format",
        "csv",
        "--from",
        "2000-01-01T00:00:00Z",
        "--to",
        "2100-01-01T00:00:00Z",
        "--columns",
        "k\\.j,a\\,b",
        "--columns",
        "m.ms,\\labels.branch",
        "--out",
        str(out),
    )
    assert ranged.returncode == 0, ranged.stderr
    rows = list(csv.reader(io.StringIO(out.read_text(encoding="utf-8"), newline="")))
    assert rows[0] == ["job_id", "status", "created_at", "k\\.j", "a,b", "m.ms", "\\labels.branch"]
    assert [r[3:] for r in rows[1:] if r[0] == f"{job_id}-x"] == [["'=1", "18446744073709551615", "5", ""]]

    single = tmp_path / "one.ndjson"
    done = run(
        database_url,
        tmp_path / "exports",
        "export",
        "--format",
        "ndjson",
        "--job",
        f"{job_id}-x",
        "--columns",
        "m.n,a\\,b",
        "--out",
        str(single),
    )
    assert done.returncode == 0, done.stderr
    assert b'"result":{"m":{"n":1},"a,b":18446744073709551615}}\n' in single.read_bytes()

    bad = run(
        database_url, tmp_path, "export", "--format", "csv", "--job", f"{job_id}-x", "--columns", "a..b", "--out", "z"
    )
    assert bad.returncode == 2
    assert "--columns: column 'a..b': has an empty key" in bad.stderr


def test_import_with_labels_then_export_filtered(database_url: str, tmp_path: Path, job_id: str) -> None:
    for tool in ("pytest", "jest"):
        folder = tmp_path / tool
        folder.mkdir()
        for n in range(2):
            (folder / f"{job_id}-{tool}-{n}.json").write_text(json.dumps({"tool": tool, "n": n}))
        done = run(
            database_url, tmp_path / "exports", "import", str(folder), "--label", f"tool={tool}", "--label", "ci=x:y"
        )
        assert done.returncode == 0, done.stderr
    out = tmp_path / "filtered.ndjson"
    done = run(
        database_url,
        tmp_path / "exports",
        "export",
        "--format",
        "ndjson",
        "--from",
        "2020-01-01T00:00:00Z",
        "--to",
        "2999-01-01T00:00:00Z",
        "--label",
        "tool:jest",
        "--label",
        "ci:x:y",
        "--status",
        "succeeded",
        "--job-id-prefix",
        job_id,
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    items = [json.loads(line) for line in out.read_text().splitlines()]
    assert [i["job_id"] for i in items] == [f"{job_id}-jest-0", f"{job_id}-jest-1"]
    assert all(i["labels"] == {"tool": "jest", "ci": "x:y"} for i in items)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["import", "--label", "Tool=x", "nothing.json"], "label key"),
        (["import", "--label", "tool", "nothing.json"], "key=value"),
        (["export", "--format", "json", "--from", "2020-01-01T00:00:00Z", "--label", "a b", "--out", "x"], "label key"),
    ],
)
def test_bad_cli_labels_exit_2(database_url: str, tmp_path: Path, args: list[str], fragment: str) -> None:
    done = run(database_url, tmp_path / "exports", *args)
    assert done.returncode == 2, done.stderr
    assert fragment in done.stderr
