"""`python -m bench [--quick] [--json PATH] [--only SCENARIO]`."""

from __future__ import annotations

import sys

from bench.cli import main

sys.exit(main())
