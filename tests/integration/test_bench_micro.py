"""bench.micro runs end to end and reports what it measured (it asserts nothing about speed)."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import asyncpg
import pytest

from bench import store_calls
from bench.micro import main


def test_poll_overhead_reports_cpu_per_poll_over_at_least_the_polls_asked_for(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert 0 == main(["poll-overhead", "--polls", "2000"])

    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("poll-overhead")]
    assert 3 == len(lines)
    for line in lines:
        match = re.search(
            r"([\d,]+) polls .* ([\d.]+) us event-loop CPU per poll\s+([\d.]+) us process CPU", line
        )
        assert match is not None, line
        polls, loop_us, process_us = (
            int(match[1].replace(",", "")),
            float(match[2]),
            float(match[3]),
        )
        assert polls >= 2000
        # The event loop is one of the process's threads: its share can never exceed the whole.
        assert 0 < loop_us <= process_us, line


@pytest.mark.slow
def test_client_gets_a_200_for_every_get_in_both_loops(capsys: pytest.CaptureFixture[str]) -> None:
    assert 0 == main(["client", "--seconds", "0.5"])

    out = capsys.readouterr().out
    seen = []
    for line in out.splitlines():
        match = re.match(
            r"client (\w+)\s+([\d,]+) answers of ([\d,]+) GETs .* ([\d.]+) us CPU", line
        )
        if match:
            answered, sent = int(match[2].replace(",", "")), int(match[3].replace(",", ""))
            # The fake upstream answers every GET of a known-prefix task with a 200.
            assert 0 < answered == sent, line
            assert float(match[4]) > 0, line
            seen.append(match[1])
    assert ["bare", "relay", "relay", "bare"] == seen, out


@pytest.mark.slow
def test_ab_runs_two_trees_at_once_and_reports_each_ones_cpu_per_poll(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """This tree against itself: both relays poll, and the summary names both figures."""
    from bench.ab import main as ab_main
    from bench.procs import REPO_ROOT

    args = [str(REPO_ROOT), "--rounds", "2", "--window", "1", "--watches", "50", "--warmup", "1"]
    assert 0 == ab_main(args)

    out = capsys.readouterr().out
    windows = re.findall(r"A\s+([\d,]+) polls/s\s+([\d.]+) us/poll\s+B\s+([\d,]+) polls/s", out)
    assert 2 == len(windows), out
    for a_rate, a_us, b_rate in windows:
        assert int(a_rate.replace(",", "")) > 0, out
        assert int(b_rate.replace(",", "")) > 0, out
        assert float(a_us) > 0, out
    summary = re.search(
        r"CPU per poll: A ([\d.]+) us .* B ([\d.]+) us .*; B/A ([\d.]+)$", out, re.M
    )
    assert summary is not None, out
    assert float(summary[3]) == pytest.approx(float(summary[2]) / float(summary[1]), abs=1e-3)


def test_ab_refuses_a_directory_without_a_relay(tmp_path: Path) -> None:
    from bench.ab import main as ab_main

    with pytest.raises(SystemExit) as exc:
        ab_main([str(tmp_path)])
    assert 2 == exc.value.code


def test_store_calls_times_every_postgresql_call_and_leaves_no_schema(
    capsys: pytest.CaptureFixture[str],
) -> None:
    dsn = os.environ.get("RELAY_TEST_POSTGRES_DSN")
    if not dsn:
        pytest.skip("set RELAY_TEST_POSTGRES_DSN to run the PostgreSQL tests")

    assert 0 == store_calls.main(["--watches", "2000", "--dsn", dsn])

    out = capsys.readouterr().out
    schema = re.search(r"seeded 2,000 watches in [\d.]+ s \(schema (\w+)\)", out)
    assert schema is not None, out
    timed = re.findall(r"^\s+[\d.]+ ms  (.+) -> ", out, flags=re.MULTILINE)
    assert 19 == len(timed), out
    assert "purge_finished (500)" in timed
    # The first purge finds the 500 oldest finished watches of 1,000 (half are finished).
    assert re.search(r"purge_finished \(500\) -> 500$", out, flags=re.MULTILINE), out

    async def schema_exists() -> bool:
        conn = await asyncpg.connect(dsn)
        try:
            found = await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", schema[1])
        finally:
            await conn.close()
        return found is not None

    assert not asyncio.run(schema_exists())
