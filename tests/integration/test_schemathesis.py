"""Schemathesis (property-based API testing) against GET /api/openapi.json on local mode.

Every check (`--checks all`: server errors, status codes, content types, response schemas and headers,
positive and negative data, missing auth, unsupported methods, use after free, ...) over every phase:
examples, coverage, fuzzing, and stateful sequences that follow the document's links (create a chat →
read, rename, delete it, add messages, create a generation → read, cancel it; register → refresh).
A bounded number of examples per operation keeps the run under a minute; a fixed seed makes it repeatable.
No hooks narrow what Schemathesis generates: every rule the API applies is in the document (cursors have
a pattern any value of which is a position; every pair of days is a usage range), so
`positive_data_acceptance` holds for whatever the schema allows.

    MINICHAT_SCHEMATHESIS_EXAMPLES=200 MINICHAT_SCHEMATHESIS_SEED=7 \\
        pytest tests/integration/test_schemathesis.py

The same run by hand, against `python -m minichat_local --port 8000`:

    schemathesis run http://127.0.0.1:8000/api/openapi.json --checks all --max-examples 20 \\
        -H "Authorization: Bearer $TOKEN"
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from schemathesis.core.warnings import SchemathesisWarning

from helpers import Api

EXAMPLES = os.environ.get("MINICHAT_SCHEMATHESIS_EXAMPLES", "20")
SEED = os.environ.get("MINICHAT_SCHEMATHESIS_SEED", "1")
# Schemathesis's default warnings (low_valid_rate is opt-in) but missing_auth: see below.
WARNINGS = [
    kind.value
    for kind in SchemathesisWarning
    if kind not in (SchemathesisWarning.MISSING_AUTH, SchemathesisWarning.LOW_VALID_RATE)
]


def _wait_until_no_stream_runs(db: Any, timeout: float = 30) -> None:
    """Generations Schemathesis started finish before the next test truncates the tables under them."""
    deadline = time.monotonic() + timeout
    while db.execute("SELECT count(*) FROM generations WHERE status = 'streaming'").fetchone()[0]:
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    api: Api, db: Any, tmp_path: Path
) -> None:
    user = api.register()
    document = api.http.get("/api/openapi.json").json()
    command = [
        sys.executable,
        "-c",
        "import sys; from schemathesis.cli import schemathesis; sys.exit(schemathesis())",
        "run",
        f"{api.base_url}/api/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        EXAMPLES,
        "--seed",
        SEED,
        "--header",
        f"Authorization: Bearer {user.access}",
        "--request-timeout",
        "20",
        "--generation-database",
        "none",
        "--no-color",
        # The default warnings but one: DELETE /api/auth/me needs the account's password, which a fuzzer
        # cannot know (and must not: the run's own account would be gone), so it only ever sees 401 there.
        # test_accounts.py deletes accounts.
        "--warnings",
        ",".join(WARNINGS),
        "--report",
        "junit",
        "--report-junit-path",
        str(tmp_path / "junit.xml"),
    ]
    env = {key: value for key, value in os.environ.items() if key != "SCHEMATHESIS_HOOKS"}
    try:
        run = subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
        )
    finally:
        _wait_until_no_stream_runs(db)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-30_000:]
    assert "No issues found" in output, output[-30_000:]
    # Every documented operation was exercised (but this document's own, which Schemathesis skips).
    report = ET.parse(tmp_path / "junit.xml")  # noqa: S314 - Schemathesis's own report of this run
    tested = {case.get("name") for case in report.iter("testcase")}
    documented = {
        f"{method.upper()} {path}"
        for path, item in document["paths"].items()
        for method in item
        if method != "parameters" and path != "/api/openapi.json"
    }
    assert documented <= tested, (documented - tested, output[-5000:])
