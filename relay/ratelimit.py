"""A token bucket driven by an explicit clock, so tests step it exactly."""

from __future__ import annotations

# At epoch-sized clocks (1.7e9 s) a float step is ~2.4e-7 s, so refills land a hair short of a
# whole token (1e-5 of one at 50/s); a thousandth of a token is a harmless tolerance.
_EPSILON = 1e-3


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up; every method takes `now` (seconds)."""

    def __init__(self, rate: float, *, burst: float | None = None, now: float) -> None:
        self.rate = rate
        self.burst = max(1.0, rate if burst is None else burst)
        self._tokens = self.burst
        self._updated = now

    def set_rate(self, rate: float, *, burst: float, now: float) -> None:
        """Change the rate (a replica's share of the deployment's budget) from `now` on."""
        self._refill(now)
        self.rate = rate
        self.burst = max(1.0, burst)
        self._tokens = min(self._tokens, self.burst)

    def _refill(self, now: float) -> None:
        if now > self._updated:
            self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
            self._updated = now

    def available(self, now: float) -> int:
        """Whole tokens that may be spent now."""
        self._refill(now)
        return int(self._tokens + _EPSILON)

    def take(self, now: float, count: int = 1) -> None:
        self._refill(now)
        self._tokens -= count

    def give_back(self, count: int) -> None:
        """Return tokens taken but not spent (a reservation larger than its use)."""
        self._tokens = min(self.burst, self._tokens + count)

    def wait_s(self, now: float) -> float:
        """Seconds until one whole token is available (0 if one is)."""
        self._refill(now)
        return max(0.0, (1.0 - self._tokens) / self.rate)
