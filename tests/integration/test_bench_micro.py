"""bench.micro runs end to end and reports figures (it asserts nothing about speed)."""

from __future__ import annotations

import re

import pytest

from bench.micro import main

FIGURE = r"([\d,]+) (?:polls|GET)/s\s+.*?([\d.]+) us CPU per"


def figures(text: str, prefix: str) -> list[tuple[float, float]]:
    found = []
    for line in text.splitlines():
        if line.startswith(prefix):
            match = re.search(FIGURE, line)
            assert match is not None, line
            found.append((float(match[1].replace(",", "")), float(match[2])))
    return found


def test_poll_overhead_reports_the_relays_own_cpu_per_poll(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert 0 == main(["poll-overhead", "--polls", "2000"])

    measured = figures(capsys.readouterr().out, "poll-overhead")
    assert 3 == len(measured)
    assert all(rate > 0 and cpu > 0 for rate, cpu in measured)


@pytest.mark.slow
def test_client_compares_the_bare_loop_with_the_relays_http_path(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert 0 == main(["client", "--seconds", "0.5"])

    out = capsys.readouterr().out
    for name in ("client bare", "client relay"):
        measured = figures(out, name)
        assert 2 == len(measured), out
        assert all(rate > 0 and cpu > 0 for rate, cpu in measured)
