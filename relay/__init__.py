"""hiapi-relay: turns the hiapi task API's polling into signed webhook callbacks."""

from __future__ import annotations

__version__ = "0.1.0"
