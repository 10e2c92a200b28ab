"""The control-plane load test at a small size: a Prefect server (SQLite), the orchestrator, concurrent
buffer claimers over HTTP with fake renders — no job claimed twice, none lost, every job succeeded.
The full size (500 jobs, 20 claimers, SQLite and PostgreSQL) is `python -m benchmarks.control_plane`."""

from __future__ import annotations

import pytest

from benchmarks.control_plane import markdown_rows, run_load
from deployments.cli import build_parser

pytestmark = pytest.mark.integration


def _has_orchestrator_command() -> bool:
    try:
        build_parser().parse_args(["orchestrator", "--help"])
    except SystemExit as exc:
        return exc.code == 0
    return True


@pytest.mark.skipif(not _has_orchestrator_command(), reason="musetalk-flow has no orchestrator command yet")
def test_concurrent_claims_take_every_job_exactly_once() -> None:
    result = run_load("sqlite", jobs=16, claimers=4, timeout_s=600)
    assert result.duplicates == [], f"claimed twice: {result.duplicates}"
    assert result.lost == [], f"never claimed: {result.lost}"
    assert result.not_succeeded == {}, result.not_succeeded
    assert result.ok and result.jobs_per_s > 0 and result.claim_p99_ms >= result.claim_p50_ms > 0
    assert "| sqlite | 16 | 4 |" in markdown_rows([result])
