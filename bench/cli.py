"""Run the scenarios in order, always stop every child, print the table and write the JSON."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench import report
from bench.scenarios import FULL, QUICK, SCENARIOS, Bench

# All waiting for other work on the machine to stop, over the whole run, is bounded by this.
QUIET_BUDGET_S = 240.0
# Upper bounds per scenario; a scenario past its bound is cancelled (its children are stopped).
SCENARIO_TIMEOUT_S = {"quick": 45.0, "full": 480.0}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short windows and small counts (< 1 min); asserts nothing on speed",
    )
    parser.add_argument(
        "--json", type=Path, metavar="PATH", help="write the JSON here instead of bench/results/"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=list(SCENARIOS),
        metavar="SCENARIO",
        help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        metavar="SECONDS",
        help="first wait up to this long for other work on the machine to stop"
        " (default: 120 for the full run, 0 with --quick)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record the relay with py-spy during each measured window"
        " (collapsed stacks in DIR; the hottest functions go in the JSON)",
    )
    parser.add_argument("--keep", action="store_true",
                        help="keep the scratch directory (SQLite files, process logs)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        return asyncio.run(_main(args, sys.argv if argv is None else ["bench", *argv]))
    except (KeyboardInterrupt, asyncio.CancelledError):
        _progress("interrupted; every child process was stopped, no JSON written")
        return 130


async def _main(args: argparse.Namespace, command: list[str]) -> int:
    task = asyncio.current_task()
    assert task is not None
    # SIGTERM and SIGINT unwind the run: every child is stopped on the way out.
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
    mode = "quick" if args.quick else "full"
    plan = QUICK if args.quick else FULL
    names = [n for n in SCENARIOS if not args.only or n in args.only]
    started = datetime.now(UTC)
    t0 = time.monotonic()
    doc: dict[str, Any] = {
        "schema": 1,
        "mode": mode,
        "command": " ".join(command),
        "started_at": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": report.machine(),
        "plan": asdict(plan),
        "profiled": args.profile is not None,
        "scenarios": {},
    }
    wait_s = args.wait_idle if args.wait_idle is not None else (0.0 if args.quick else 60.0)
    workdir = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    failed = False
    try:
        async with AsyncExitStack() as stack:
            session = await stack.enter_async_context(
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
            )
            bench = Bench(
                plan=plan,
                workdir=workdir,
                session=session,
                stack=stack,
                profile_dir=args.profile,
                quiet_wait_s=wait_s,
                quiet_budget_s=QUIET_BUDGET_S if wait_s > 0 else 0.0,
                progress=_progress,
            )
            for name in names:
                _progress(f"{name} ...")
                quiet = await bench.wait_quiet()
                began = time.monotonic()
                try:
                    result = await asyncio.wait_for(
                        SCENARIOS[name](bench), SCENARIO_TIMEOUT_S[mode]
                    )
                except Exception as exc:
                    failed = True
                    reason = "timed out" if isinstance(exc, TimeoutError) else repr(exc)
                    result = {"error": reason, "traceback": traceback.format_exc()}
                    _progress(f"{name} failed: {reason}")
                result["elapsed_s"] = time.monotonic() - began
                result["machine_before"] = quiet
                doc["scenarios"][name] = result
                _progress(f"{name} done in {result['elapsed_s']:.1f} s")
    finally:
        if failed or args.keep:
            _progress(f"scratch directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    doc["finished_at"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    doc["duration_s"] = time.monotonic() - t0
    detail = report.targets(doc["scenarios"])
    doc["targets"] = [
        {"key": t.key, "target": t.text, "measured": t.measured, "shown": t.shown, "met": t.met}
        for t in detail
    ]
    print(report.table({**doc, "targets_detail": detail}))
    for path in report.write(doc, args.json):
        _progress(f"wrote {path}")
    return 1 if failed else 0


def _progress(line: str) -> None:
    print(f"[bench] {line}", file=sys.stderr, flush=True)
