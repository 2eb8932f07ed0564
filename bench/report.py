"""The machine, the targets of issue 5 with a verdict each, the printed table, the JSON files."""

from __future__ import annotations

import math
import os
import platform
import sqlite3
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.procs import REPO_ROOT

RESULTS_DIR = REPO_ROOT / "bench" / "results"
KIB = 1024


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpuinfo("model name"),
        "mem_total_bytes": _meminfo("MemTotal"),
        "kernel": platform.release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "sqlite": sqlite3.sqlite_version,
        "aiohttp": aiohttp.__version__,
        "uvloop": _version("uvloop"),
        "loadavg_at_start": list(os.getloadavg()),
        "git": _git(),
    }


def _cpuinfo(key: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None


def _meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name == key:
                    return int(value.split()[0]) * KIB
    except OSError:
        pass
    return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git() -> dict[str, Any]:
    def run(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=False
        )
        return done.stdout.strip()

    try:
        return {"commit": run("rev-parse", "HEAD"), "dirty": bool(run("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


# --- targets --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    key: str
    text: str  # the target as issue 5 states it
    measured: float | None
    shown: str  # the measured figure as printed
    met: bool | None  # None: not measured in this run


def _get(results: dict[str, Any], *path: str | int) -> Any:
    node: Any = results
    for step in path:
        try:
            node = node[step]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _size(results: dict[str, Any], watches: int) -> dict[str, Any] | None:
    for entry in _get(results, "scale", "sizes") or []:
        if entry.get("watches") == watches:
            return entry  # type: ignore[no-any-return]
    return None


def _target(
    key: str, text: str, value: Any, shown: Callable[[float], str], ok: Callable[[float], bool]
) -> Target:
    if not isinstance(value, int | float) or math.isnan(value):
        return Target(key, text, None, "not measured", None)
    return Target(key, text, float(value), shown(value), ok(value))


def _best_polls_ratio(results: dict[str, Any]) -> float | None:
    """The relay's best configuration answers the target: in-process or with poll workers."""
    ratios = [_get(results, name, "ratio_to_ceiling") for name in ("polls", "polls-workers")]
    measured = [r for r in ratios if isinstance(r, int | float) and not math.isnan(r)]
    return max(measured) if measured else None


def _best_registration(results: dict[str, Any]) -> str:
    """The configuration (in-process, or with API processes) that registered the most per s;
    its latency answers the p99 target with its rate."""
    rates = {
        name: _get(results, name, "watches_per_s")
        for name in ("registration", "registration-processes")
    }
    measured = {k: v for k, v in rates.items() if isinstance(v, int | float) and not math.isnan(v)}
    return max(measured, key=measured.__getitem__) if measured else "registration"


def _durability_gap(results: dict[str, Any]) -> tuple[int, int, int] | None:
    """(rows - 201s, rows, 201s) of the worse measured registration configuration."""
    gaps = []
    for name in ("registration", "registration-processes"):
        created = _get(results, name, "created_201")
        rows = _get(results, name, "rows_in_store")
        if created is not None and rows is not None:
            gaps.append((rows - created, rows, created))
    return min(gaps) if gaps else None


def targets(results: dict[str, Any]) -> list[Target]:
    """Issue 5's targets, each with the figure of this run that answers it."""
    million = _size(results, 1_000_000) or {}
    hundred_k = _size(results, 100_000) or {}
    interval_ms = 1000 * (_get(results, "notify", "poll_interval_s") or math.nan)
    received = _get(results, "notify", "received")
    every_callback = received is not None and received == _get(results, "notify", "expected")
    best = _best_registration(results)
    gap = _durability_gap(results)
    return [
        _target("memory_per_watch_1m", "1M active watches: < 1 KiB RSS per watch",
                million.get("rss_bytes_per_watch"), lambda v: f"{v:,.0f} B/watch",
                lambda v: v < KIB),
        _target("polls_vs_ceiling", "polls/s >= 70% of the bare-client ceiling",
                _best_polls_ratio(results), lambda v: f"{100 * v:.0f}%",
                lambda v: v >= 0.70),
        _target("registrations_per_s", "registrations >= 5,000/s",
                _get(results, best, "watches_per_s"), lambda v: f"{v:,.0f}/s ({best})",
                lambda v: v >= 5000),
        _target("registration_p99", "registration p99 < 50 ms",
                _get(results, best, "latency_ms", "p99"), lambda v: f"{v:.1f} ms ({best})",
                lambda v: v < 50),
        _target("registration_durable", "every 201 is a committed row",
                None if gap is None else gap[0],
                lambda v: "-" if gap is None else f"{gap[1]:,} rows / {gap[2]:,} 201s",
                lambda v: v >= 0),
        _target("notify_p99", f"notification p99 <= interval + 100 ms ({interval_ms + 100:,.0f} ms)",
                _get(results, "notify", "latency_ms", "p99"), lambda v: f"{v:,.0f} ms",
                lambda v: every_callback and v <= interval_ms + 100),
        _target("scheduler_lag_p99_100k", "scheduler lag p99 < 100 ms at 100k watches",
                hundred_k.get("scheduler_lag_p99_s"), _seconds,
                lambda v: v < 0.1),
    ]  # fmt: skip


# --- the table ------------------------------------------------------------------------------------


def _seconds(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if math.isinf(value):
        return "> 60 s"
    return f"{value * 1000:,.1f} ms" if value < 10 else f"{value:,.1f} s"


def _bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("GiB", KIB**3), ("MiB", KIB**2), ("KiB", KIB)):
        if abs(value) >= size:
            return f"{value / size:,.1f} {unit}"
    return f"{value:,.0f} B"


def _cores(cpu: dict[str, float], *names: str) -> str:
    """Average cores each process used, then everything else (the harness and other work)."""
    listed = [cpu.get(f"{name}_cores", 0.0) for name in names]
    other = cpu["machine_busy_cores"] - sum(listed)
    return " / ".join(f"{value:.2f}" for value in [*listed, other])


def _ms(summary: dict[str, Any] | None, *keys: str) -> str:
    if not summary:
        return "-"
    return " / ".join(f"{summary[k]:,.1f}" for k in keys) + " ms"


Add = Callable[..., None]
KEEPS_UP = 0.95  # achieved/demanded polls below this: the backlog, and so the lag, only grows


def rows(doc: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(scenario, figure, measured, target, verdict) lines for every figure of the run."""
    by_key = {t.key: t for t in doc["targets_detail"]}
    out: list[tuple[str, str, str, str, str]] = []

    def add(
        scenario: str, figure: str, measured: str, key: str | None = None, value: Any = None
    ) -> None:
        target = by_key.get(key or "")
        if target is not None and value is not None and value != target.measured:
            target = None  # another row of this run answers the target (see _best_polls_ratio)
        if target is None:
            out.append((scenario, figure, measured, "", ""))
            return
        word = {True: "met", False: "NOT MET", None: "not measured"}[target.met]
        out.append((scenario, figure, measured, target.text, word))

    for name, result in doc["scenarios"].items():
        if "error" in result:
            add(name, "ERROR", result["error"].splitlines()[0][:60])
        else:
            _ROWS[name](result, add)
    return out


def _ceiling_rows(c: dict[str, Any], add: Add) -> None:
    add("ceiling", "bare aiohttp GET/s (c=64, uvloop)", f"{c['requests_per_s']:,.0f}/s")
    add("", "latency p50 / p99", _ms(c["latency_ms"], "p50", "p99"))
    add("", "client / upstream CPU per 1,000 GETs",
        f"{c['client_cpu_s_per_1k']:.3f} / {c['upstream_cpu_s_per_1k']:.3f} s")  # fmt: skip
    add("", "cores used: client / upstream / rest", _cores(c["cpu"], "client", "upstream"))


def _registration_rows(r: dict[str, Any], add: Add) -> None:
    processes = r.get("api_processes")
    add("registration" if processes is None else f"registration, {processes} API processes",
        "POST /watch per s (c=64)", f"{r['watches_per_s']:,.0f}/s",
        "registrations_per_s")  # fmt: skip
    add("", "latency p50 / p99", _ms(r["latency_ms"], "p50", "p99"), "registration_p99")
    add("", "201s durable in the file", f"{r['rows_in_store']:,} rows", "registration_durable")
    add("", "relay CPU per 1,000", f"{r['relay_cpu_s_per_1k']:.3f} s")
    add("", "cores used: relay / client / rest", _cores(r["cpu"], "relay", "client"))
    floor = r.get("floor")
    if floor is not None:  # runs written before the floor was measured have none
        ratio = r["ratio_to_floor"]
        add("", "bare aiohttp POST /watch, measured after",
            f"{floor['requests_per_s']:,.0f}/s (relay at "
            f"{'-' if ratio is None else f'{100 * ratio:.0f}%'})")  # fmt: skip
        add("", "bare handler CPU per 1,000", f"{floor['cpu_s_per_1k']:.3f} s")


def _polls_rows(p: dict[str, Any], add: Add) -> None:
    workers = p.get("poll_processes")
    concurrency = p["config"]["relay"]["RELAY_UPSTREAM_CONCURRENCY"]
    add("polls" if workers is None else f"polls, {workers} poll processes",
        f"sustained polls/s (budget lifted, c={concurrency})", f"{p['polls_per_s']:,.0f}/s")  # fmt: skip
    ratio = p["ratio_to_ceiling"]
    add("", "ratio to the ceiling measured right after",
        "-" if ratio is None else f"{100 * ratio:.0f}% of {p['ceiling_per_s']:,.0f}/s",
        "polls_vs_ceiling", ratio)  # fmt: skip
    add("", "relay CPU per 1,000 polls", f"{p['relay_cpu_s_per_1k_polls']:.3f} s")
    add("", "cores used: relay / upstream / rest", _cores(p["cpu"], "relay", "upstream"))
    add("", "mean poll duration", f"{p['poll_duration_mean_ms']:.1f} ms")


def _notify_rows(n: dict[str, Any], add: Add) -> None:
    add("notify", "flip -> 2xx p50 / p99 / max", _ms(n["latency_ms"], "p50", "p99", "max"),
        "notify_p99")  # fmt: skip
    add("", "interval in force (jitter shortens to)",
        f"{n['poll_interval_s']:g} s ({n['poll_interval_min_with_jitter_s']:g} s)")  # fmt: skip
    add("", "received / expected (duplicates)",
        f"{n['received']} / {n['expected']} ({n['duplicates']})")  # fmt: skip
    add("", "cores used: relay / upstream / rest", _cores(n["cpu"], "relay", "upstream"))


def _notify_blocked_rows(n: dict[str, Any], add: Add) -> None:
    add(
        "notify, a receiver hangs",
        "flip -> 2xx p50 / p99 / max",
        _ms(n["latency_ms"], "p50", "p99", "max"),
    )
    add("", "the hanging receiver: callbacks waiting",
        f"{n['blocked_callbacks']:,} (attempts time out after {n['blocked_attempt_timeout_s']:g} s;"
        f" {n['blocked_attempts_in_window']:,} made)")  # fmt: skip
    add("", "deferred in the window: receiver at its 8 in flight",
        f"{n['deferred_receiver_busy']:,.0f}")  # fmt: skip
    add("", "received / expected (duplicates)",
        f"{n['received']} / {n['expected']} ({n['duplicates']})")  # fmt: skip
    add("", "cores used: relay / upstream / rest", _cores(n["cpu"], "relay", "upstream"))


def _burst_rows(n: dict[str, Any], add: Add) -> None:
    drained = n["all_delivered_after_s"]
    add("burst", f"{n['expected']:,} tasks end at once, one receiver",
        f"all delivered after {drained:.2f} s ({n['received'] / drained:,.0f} callbacks/s)")  # fmt: skip
    add("", "flip -> 2xx p50 / p99 / max", _ms(n["latency_ms"], "p50", "p99", "max"))
    add("", "received / expected (duplicates)",
        f"{n['received']} / {n['expected']} ({n['duplicates']})")  # fmt: skip
    add("", "deferred: receiver at its 8 in flight", f"{n['deferred_receiver_busy']:,.0f}")
    add("", "cores used: relay / upstream / rest", _cores(n["cpu"], "relay", "upstream"))


def _scale_rows(s: dict[str, Any], add: Add) -> None:
    add("scale", "baseline relay RSS (0 watches)", _bytes(s["baseline"]["rss_bytes"]))
    for size in s["sizes"]:
        watches = size["watches"]
        behind = size["polls_per_s"] < KEEPS_UP * size["demanded_polls_per_s"]
        add(f"scale {watches:,}", "demanded / achieved polls/s",
            f"{size['demanded_polls_per_s']:,.0f} / {size['polls_per_s']:,.0f}"
            f" (interval {size['interval_s']:g} s){', FALLS BEHIND' if behind else ''}")  # fmt: skip
        add("", "scheduler lag p50 / p99",
            f"{_seconds(size['scheduler_lag_p50_s'])} / {_seconds(size['scheduler_lag_p99_s'])}",
            "scheduler_lag_p99_100k" if watches == 100_000 else None)  # fmt: skip
        if "tasks_ended" in size:  # runs before the ended tasks have none
            add("", "tasks ended: seen / delivered per s (seen -> 2xx)",
                f"{size['ended_seen_per_s']:,.1f} / {size['callbacks_delivered_per_s']:,.1f}"
                f" ({size['seen_to_delivered_mean_ms']:,.1f} ms mean;"
                f" 1 task in {size['config']['ended_every']} ended)")  # fmt: skip
        add("", "RSS (beyond baseline, per watch)",
            f"{_bytes(size['rss_bytes'])} ({size['rss_bytes_per_watch']:,.0f} B/watch)",
            "memory_per_watch_1m" if watches == 1_000_000 else None)  # fmt: skip
        add("", "SQLite file + WAL",
            f"{_bytes(size['sqlite_bytes'])} + {_bytes(size['sqlite_wal_bytes'])}"
            f" ({size['sqlite_bytes_per_watch']:,.0f} B/watch)")  # fmt: skip
        add("", "cores used: relay / upstream / rest", _cores(size["cpu"], "relay", "upstream"))
        add("", "relay ready after start", f"{size['relay_ready_s']:.1f} s")


def _replicas_rows(r: dict[str, Any], add: Add) -> None:
    if "skipped" in r:
        add("replicas", "several relays on PostgreSQL", f"skipped: {r['skipped']}")
        return
    for run in r["runs"]:
        add(f"replicas x{run['replicas']}", "polls/s, all replicas (budget lifted)",
            f"{run['polls_per_s']:,.0f}/s")  # fmt: skip
        add("", "cores used: relays / postgres",
            f"{run['relay_cores']:.2f} / {run['postgres_cores']:.2f}")  # fmt: skip
        add("", "CPU per 1,000 polls: relays / postgres",
            f"{run['relay_cpu_s_per_1k_polls']:.3f} s / {run['postgres_cpu_s_per_1k_polls']:.3f} s")  # fmt: skip


_ROWS: dict[str, Callable[[dict[str, Any], Add], None]] = {
    "ceiling": _ceiling_rows,
    "registration": _registration_rows,
    "registration-processes": _registration_rows,
    "polls": _polls_rows,
    "polls-workers": _polls_rows,
    "notify": _notify_rows,
    "burst": _burst_rows,
    "notify-blocked": _notify_blocked_rows,
    "scale": _scale_rows,
    "replicas": _replicas_rows,
}


def table(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [
        f"hiapi-relay benchmark, {doc['mode']} run, {doc['started_at']}, {doc['duration_s']:.0f} s",
        f"machine: {m['nproc']} cores {m['cpu_model']}, {m['python']}, SQLite {m['sqlite']},"
        f" aiohttp {m['aiohttp']}; relay, fake upstream, receiver and load client share the cores",
        "",
    ]
    busy = busy_windows(doc["scenarios"])
    if busy:
        lines.insert(2, "WARNING: other work used the cores during " + ", ".join(busy) +
                     "; those figures understate the relay")  # fmt: skip
    header = ("scenario", "figure", "measured", "target", "verdict")
    body = rows(doc)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(5)]
    for row in [header, tuple("-" * w for w in widths), *body]:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


BUSY_CORES = 0.25


def busy_windows(results: dict[str, Any]) -> list[str]:
    """Measured windows during which processes outside the benchmark used the cores."""
    windows = []
    for name, result in results.items():
        cpus = [(name, result.get("cpu"))]
        if name == "scale":
            cpus = [(f"scale {s['watches']:,}", s.get("cpu")) for s in result.get("sizes", [])]
        for label, cpu in cpus:
            if cpu and cpu.get("other_cores", 0.0) > BUSY_CORES:
                windows.append(f"{label} ({cpu['other_cores']:.2f} cores)")
    return windows


def write(doc: dict[str, Any], path: Path | None) -> list[Path]:
    """`path` if given, else results/<UTC timestamp>.json and results/latest.json."""
    data = orjson.dumps(_finite(doc), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
    if path is not None:
        targets_ = [path]
    else:
        stamp = doc["started_at"].replace(":", "").replace("-", "")
        targets_ = [RESULTS_DIR / f"{stamp}.json", RESULTS_DIR / "latest.json"]
    for target in targets_:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data + b"\n")
    return targets_


def _finite(value: Any) -> Any:
    """JSON has no NaN or Infinity: NaN becomes null, infinity a string."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
