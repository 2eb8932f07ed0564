"""A/B: two relay trees poll at the same time against one fake upstream; CPU per poll of each.

    git worktree add /tmp/base main       # the commit to compare against (not one with the change)
    python -m bench.ab /tmp/base [--rounds 4] [--window 15] [--watches 2000]

These VMs' speed drifts by a quarter within minutes, more than most changes are worth: runs one
after the other (`make bench`, twice) cannot tell a 5 % change from the drift. Here the two
relays run at once, over the same windows on the same cores, each on its own SQLite file with the
`polls` scenario's settings (every stream always due, budget lifted, 64 requests in flight):
whatever the machine does, it does to both. A is the tree given, B this one. Their CPU per poll
compares (the cores are shared three ways, so it is higher than in `make bench`, and the rates
lower). The same tree against itself gives the noise floor: B/A within 0.97-1.03 on the VM of
2026-12-07. Prints a line per window and the totals; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp

from bench.procs import REPO_ROOT, Child, CpuMeter
from bench.scenarios import FULL, UNUSED_CALLBACK, Bench, fixed_interval_settings
from bench.stats import delta


async def compare(
    base: Path, *, rounds: int, window_s: float, watches: int, warmup_s: float
) -> float:
    """Run the comparison; print per window; return B's CPU per poll over A's."""
    async with aiohttp.ClientSession() as session, AsyncExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-ab-")))
        bench = Bench(plan=FULL, workdir=workdir, session=session, stack=stack)
        settings = fixed_interval_settings(FULL, FULL.polls_interval_s)
        relays: dict[str, Child] = {}
        for name, tree in (("A", base), ("B", REPO_ROOT)):
            relays[name], _ = await bench.relay(stack, f"ab-{name}", settings, tree)
        for name, relay in relays.items():
            ids = f"tk-hiapi-slow-ab-{name}-{bench.tag}-"
            await bench.register(relay, f"ab-{name}-register", ids, watches, UNUSED_CALLBACK)
        await asyncio.sleep(warmup_s)
        polls = dict.fromkeys(relays, 0.0)
        cpu = dict.fromkeys(relays, 0.0)
        for n in range(rounds):
            before = {name: await bench.scrape(relay) for name, relay in relays.items()}
            meter = CpuMeter(dict(relays))
            await asyncio.sleep(window_s)
            used = meter.stop()
            line = []
            for name, relay in relays.items():
                made = delta(before[name], await bench.scrape(relay), "relay_upstream_polls_total")
                spent = used[f"{name}_cores"] * used["seconds"]
                polls[name] += made
                cpu[name] += spent
                per_poll = 1e6 * spent / made if made else float("nan")
                line.append(
                    f"{name} {made / used['seconds']:7,.0f} polls/s {per_poll:6.1f} us/poll"
                )
            print(f"window {n + 1}: " + "   ".join(line), flush=True)
    a, b = (1e6 * cpu[name] / polls[name] if polls[name] else float("nan") for name in "AB")
    print(f"CPU per poll: A {a:.1f} us ({base}), B {b:.1f} us ({REPO_ROOT}); B/A {b / a:.3f}")
    return b / a


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("base", type=Path, help="the tree to compare this one against (A)")
    parser.add_argument("--rounds", type=int, default=4, help="measured windows")
    parser.add_argument("--window", type=float, default=15.0, help="seconds per window")
    parser.add_argument("--watches", type=int, default=FULL.polls_watches, help="per relay")
    parser.add_argument("--warmup", type=float, default=FULL.polls_warmup_s, help="seconds")
    args = parser.parse_args(argv)
    if not (args.base / "relay" / "__main__.py").is_file():
        parser.error(f"{args.base} holds no relay/ (a checkout of this repository is needed)")
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(
        compare(
            args.base.resolve(),
            rounds=args.rounds,
            window_s=args.window,
            watches=args.watches,
            warmup_s=args.warmup,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
