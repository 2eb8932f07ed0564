"""`python -m bench --quick` runs every scenario end to end and writes numeric figures (no speed
assertion: speed belongs in the benchmark, not in tests)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 120.0
SCENARIOS = [
    "burst", "ceiling", "notify", "notify-blocked", "polls", "polls-workers", "registration",
    "registration-processes", "replicas", "scale",
]  # fmt: skip


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _figures(doc: dict[str, Any]) -> dict[str, Any]:
    s = doc["scenarios"]
    size = s["scale"]["sizes"][0]
    return {
        "ceiling.requests_per_s": s["ceiling"]["requests_per_s"],
        "registration.watches_per_s": s["registration"]["watches_per_s"],
        "registration.latency_ms.p50": s["registration"]["latency_ms"]["p50"],
        "registration.latency_ms.p99": s["registration"]["latency_ms"]["p99"],
        "registration.floor.requests_per_s": s["registration"]["floor"]["requests_per_s"],
        "registration.ratio_to_floor": s["registration"]["ratio_to_floor"],
        "registration-processes.watches_per_s": s["registration-processes"]["watches_per_s"],
        "registration-processes.relay_cpu_s_per_1k": s["registration-processes"][
            "relay_cpu_s_per_1k"
        ],
        "polls.polls_per_s": s["polls"]["polls_per_s"],
        "polls.relay_cpu_s_per_1k_polls": s["polls"]["relay_cpu_s_per_1k_polls"],
        "polls.ratio_to_ceiling": s["polls"]["ratio_to_ceiling"],
        "polls-workers.polls_per_s": s["polls-workers"]["polls_per_s"],
        "polls-workers.relay_cpu_s_per_1k_polls": s["polls-workers"]["relay_cpu_s_per_1k_polls"],
        "notify.latency_ms.p50": s["notify"]["latency_ms"]["p50"],
        "notify.latency_ms.p99": s["notify"]["latency_ms"]["p99"],
        "notify.latency_ms.max": s["notify"]["latency_ms"]["max"],
        "notify.poll_interval_s": s["notify"]["poll_interval_s"],
        "notify-blocked.latency_ms.p99": s["notify-blocked"]["latency_ms"]["p99"],
        "notify-blocked.blocked_attempts_in_window": s["notify-blocked"][
            "blocked_attempts_in_window"
        ],
        "burst.all_delivered_after_s": s["burst"]["all_delivered_after_s"],
        "burst.latency_ms.p99": s["burst"]["latency_ms"]["p99"],
        "scale.baseline.rss_bytes": s["scale"]["baseline"]["rss_bytes"],
        "scale.watches": size["watches"],
        "scale.scheduler_lag_p99_s": size["scheduler_lag_p99_s"],
        "scale.rss_bytes_per_watch": size["rss_bytes_per_watch"],
        "scale.sqlite_bytes": size["sqlite_bytes"],
    }


@pytest.mark.timeout(RUN_TIMEOUT_S + 30)
def test_quick_bench_reports_every_scenario_with_numeric_figures(tmp_path: Path) -> None:
    """--quick exits 0 and its JSON holds every scenario, machine info and numeric figures."""
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    assert 0 == done.returncode, done.stderr[-4000:]
    doc = orjson.loads(out.read_bytes())

    assert SCENARIOS == sorted(doc["scenarios"])
    assert [] == [name for name, result in doc["scenarios"].items() if "error" in result]
    assert 10_000 == doc["scenarios"]["scale"]["sizes"][0]["watches"]
    figures = _figures(doc)
    assert {} == {name: value for name, value in figures.items() if not _number(value)}
    machine = doc["machine"]
    assert {} == {
        key: machine.get(key)
        for key in ("nproc", "cpu_model", "python", "sqlite", "aiohttp")
        if not machine.get(key)
    }
    assert 7 == len(doc["targets"])
    assert "scale 10,000" in done.stdout
    assert "poll processes" in done.stdout
