"""A background loop that dies stops the relay like SIGTERM does, and the exit status says it
failed: a supervisor that restarts only on failure (systemd `Restart=on-failure`, compose
`on-failure`) must restart it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.processes import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]

# The gauge refresher, one of the relay's loops, raises 0.2 s after the start.
_DYING_RELAY = """
import asyncio, sys
import relay.app
from relay import cli

async def dying(app, stopping):
    await asyncio.sleep(0.2)
    raise RuntimeError("a bug in a loop")

relay.app._refresh_gauges = dying
sys.exit(cli.main(["serve"]))
"""


def test_a_loop_that_dies_makes_the_relay_exit_with_a_failure(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env |= {
        "RELAY_HOST": "127.0.0.1",
        "RELAY_PORT": str(free_port()),
        "RELAY_STORE_URL": f"sqlite:///{tmp_path / 'relay.db'}",
        "RELAY_UPSTREAM_URL": f"http://127.0.0.1:{free_port()}",
        "RELAY_SHUTDOWN_TIMEOUT_S": "2",
    }
    done = subprocess.run(
        [sys.executable, "-c", _DYING_RELAY],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert 1 == done.returncode, done.stderr[-2000:]
    assert '"event":"loop_died"' in done.stderr
