"""Typed settings, built once from the environment; every value is checked here and nowhere else."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from yarl import URL

T = TypeVar("T")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

UPSTREAM_ATTEMPTS = 3  # one request plus two immediate retries of a dropped connection
LEASE_MARGIN_S = 1.0


class ConfigError(Exception):
    """Raised with one line per bad setting; never includes a secret's value."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Secret:
    """A string that never prints itself."""

    value: str = field(repr=False)

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"


def parse_signing_secret(raw: str) -> bytes:
    """Decode one `whsec_<base64>` secret into its key bytes."""
    if not raw.startswith("whsec_"):
        raise ValueError("must start with 'whsec_'")
    try:
        key = base64.b64decode(raw[len("whsec_") :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the part after 'whsec_' is not valid base64") from None
    if not 24 <= len(key) <= 64:
        raise ValueError(f"must decode to 24-64 bytes, got {len(key)}")
    return key


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    store_url: str = field(default="sqlite:///relay.db", repr=False)  # may hold a password
    upstream_url: str = "http://127.0.0.1:8081"
    upstream_api_key: Secret | None = None
    api_tokens: tuple[Secret, ...] = ()
    signing_keys: tuple[Secret, ...] = ()  # each the `whsec_...` string as configured
    callback_allow_nets: tuple[IPNetwork, ...] = ()
    poll_initial_s: float = 2.0
    poll_max_s: float = 60.0
    poll_factor: float = 1.5
    poll_jitter: float = 0.2
    retry_after_max_s: float = 300.0
    error_backoff_max_s: float = 300.0
    upstream_rps: float = 50.0
    upstream_concurrency: int = 32
    upstream_timeout_s: float = 10.0
    # 0: polls run in the relay process; N: their HTTP runs in N child processes (pollworkers.py).
    poll_processes: int = 0
    # 0: the HTTP API runs in the relay process; N: also in N child processes sharing the port
    # (apiprocs.py), each asking this process for what needs the store.
    api_processes: int = 0
    watch_timeout_s: float = 86_400.0
    not_found_grace_s: float = 60.0
    # How long a finished watch (delivered, failed, cancelled) stays readable (and, delivered or
    # failed, redeliverable) before the retention sweep deletes it; 0 keeps every one forever.
    watch_retention_s: float = 7 * 86_400.0
    delivery_timeout_s: float = 10.0
    delivery_backoff_s: float = 5.0
    delivery_backoff_max_s: float = 3_600.0
    delivery_max_attempts: int = 10
    delivery_concurrency: int = 32
    delivery_per_host: int = 8
    # A claim is a lease: the row stays invisible to other claimers this long. It must outlast
    # the work it covers, or the same poll or callback would run twice at once.
    poll_lease_s: float = 60.0
    delivery_lease_s: float = 60.0
    shutdown_timeout_s: float = 20.0
    sqlite_synchronous: str = "NORMAL"
    # How long a write waits for a lock another process holds before the store answers 503.
    sqlite_busy_timeout_ms: int = 5_000
    postgres_schema: str = "public"
    log_level: str = "INFO"
    event_loop: str = "uvloop"

    @property
    def signing_key_bytes(self) -> tuple[bytes, ...]:
        return tuple(parse_signing_secret(s.value) for s in self.signing_keys)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read every `RELAY_*` variable; raise ConfigError listing every bad one."""
        env = os.environ if env is None else env
        problems: list[str] = []
        values: dict[str, object] = {}

        def take(name: str, attr: str, convert: Callable[[str], T]) -> None:
            raw = env.get(name)
            if raw is None or raw == "":
                return
            try:
                values[attr] = convert(raw)
            except ValueError as exc:
                problems.append(f"{name}: {exc}")

        take("RELAY_HOST", "host", str)
        take("RELAY_PORT", "port", _int_between(0, 65535))
        take("RELAY_STORE_URL", "store_url", _store_url)
        take("RELAY_UPSTREAM_URL", "upstream_url", _http_url)
        take("RELAY_API_TOKENS", "api_tokens", _tokens)
        take("RELAY_SIGNING_SECRET", "signing_keys", _signing_secrets)
        take("RELAY_CALLBACK_ALLOW_NETS", "callback_allow_nets", _networks)
        take("RELAY_POLL_INITIAL_S", "poll_initial_s", _duration)
        take("RELAY_POLL_MAX_S", "poll_max_s", _duration)
        take("RELAY_POLL_FACTOR", "poll_factor", _float_at_least(1.0))
        take("RELAY_POLL_JITTER", "poll_jitter", _float_between(0.0, 0.9))
        take("RELAY_RETRY_AFTER_MAX_S", "retry_after_max_s", _duration)
        take("RELAY_ERROR_BACKOFF_MAX_S", "error_backoff_max_s", _duration)
        take("RELAY_UPSTREAM_RPS", "upstream_rps", _positive_float)
        take("RELAY_UPSTREAM_CONCURRENCY", "upstream_concurrency", _int_between(1, 10_000))
        take("RELAY_UPSTREAM_TIMEOUT_S", "upstream_timeout_s", _duration)
        take("RELAY_POLL_PROCESSES", "poll_processes", _int_between(0, 64))
        take("RELAY_API_PROCESSES", "api_processes", _int_between(0, 64))
        take("RELAY_WATCH_TIMEOUT_S", "watch_timeout_s", _duration)
        take("RELAY_NOT_FOUND_GRACE_S", "not_found_grace_s", _duration_or_zero)
        take("RELAY_WATCH_RETENTION_S", "watch_retention_s", _duration_or_zero)
        take("RELAY_DELIVERY_TIMEOUT_S", "delivery_timeout_s", _duration)
        take("RELAY_DELIVERY_BACKOFF_S", "delivery_backoff_s", _duration)
        take("RELAY_DELIVERY_BACKOFF_MAX_S", "delivery_backoff_max_s", _duration)
        take("RELAY_DELIVERY_MAX_ATTEMPTS", "delivery_max_attempts", _int_between(1, 1000))
        take("RELAY_DELIVERY_CONCURRENCY", "delivery_concurrency", _int_between(1, 10_000))
        take("RELAY_DELIVERY_PER_HOST", "delivery_per_host", _int_between(1, 10_000))
        take("RELAY_POLL_LEASE_S", "poll_lease_s", _duration)
        take("RELAY_DELIVERY_LEASE_S", "delivery_lease_s", _duration)
        take("RELAY_SHUTDOWN_TIMEOUT_S", "shutdown_timeout_s", _duration_or_zero)
        take("RELAY_POSTGRES_SCHEMA", "postgres_schema", _identifier)
        take("RELAY_SQLITE_SYNCHRONOUS", "sqlite_synchronous", _one_of("NORMAL", "FULL"))
        take("RELAY_SQLITE_BUSY_TIMEOUT_MS", "sqlite_busy_timeout_ms", _int_between(0, 600_000))
        take("RELAY_LOG_LEVEL", "log_level", _log_level)
        take("RELAY_EVENT_LOOP", "event_loop", _event_loop)

        key = env.get("RELAY_UPSTREAM_API_KEY")
        key_file = env.get("RELAY_UPSTREAM_API_KEY_FILE")
        if key and key_file:
            problems.append(
                "RELAY_UPSTREAM_API_KEY and RELAY_UPSTREAM_API_KEY_FILE are both set; set one"
            )
        elif key:
            _take_api_key("RELAY_UPSTREAM_API_KEY", key, values, problems)
        elif key_file:
            try:
                text = Path(key_file).read_text()
            except OSError as exc:
                problems.append(
                    f"RELAY_UPSTREAM_API_KEY_FILE: cannot read the file ({exc.strerror})"
                )
            except UnicodeDecodeError:
                problems.append("RELAY_UPSTREAM_API_KEY_FILE: the file is not UTF-8 text")
            else:
                _take_api_key("RELAY_UPSTREAM_API_KEY_FILE", text, values, problems)

        if problems:
            raise ConfigError(problems)
        settings = cls(**values)  # type: ignore[arg-type]
        settings.check()
        return settings

    def check(self) -> None:
        """Cross-field rules; raises ConfigError."""
        problems = []
        if self.poll_max_s < self.poll_initial_s:
            problems.append("RELAY_POLL_MAX_S: must be at least RELAY_POLL_INITIAL_S")
        if self.delivery_backoff_max_s < self.delivery_backoff_s:
            problems.append(
                "RELAY_DELIVERY_BACKOFF_MAX_S: must be at least RELAY_DELIVERY_BACKOFF_S"
            )
        # One poll is up to three requests (two immediate retries), each bounded by the timeout.
        poll_work = self.upstream_timeout_s * UPSTREAM_ATTEMPTS + LEASE_MARGIN_S
        if self.poll_lease_s <= poll_work:
            problems.append(
                f"RELAY_POLL_LEASE_S: must be more than {poll_work:g} s"
                f" ({UPSTREAM_ATTEMPTS} x RELAY_UPSTREAM_TIMEOUT_S + {LEASE_MARGIN_S:g} s margin)"
            )
        delivery_work = self.delivery_timeout_s + LEASE_MARGIN_S
        if self.delivery_lease_s <= delivery_work:
            problems.append(
                f"RELAY_DELIVERY_LEASE_S: must be more than {delivery_work:g} s"
                f" (RELAY_DELIVERY_TIMEOUT_S + {LEASE_MARGIN_S:g} s margin)"
            )
        if self.api_processes and self.port == 0:
            problems.append(
                "RELAY_API_PROCESSES: needs a fixed RELAY_PORT (each API process binds that port;"
                " 0 would give each a port of its own)"
            )
        if problems:
            raise ConfigError(problems)


def _take_api_key(name: str, raw: str, values: dict[str, object], problems: list[str]) -> None:
    """The key as an HTTP header carries it: one line of printable text. Never echoed."""
    key = raw.strip()
    if not key:
        problems.append(f"{name}: the key is empty")
    elif any(ord(c) < 0x20 or ord(c) == 0x7F for c in key):
        problems.append(f"{name}: the key holds a line break or another control character")
    else:
        values["upstream_api_key"] = Secret(key)


def _int_between(low: int, high: int) -> Callable[[str], int]:
    def convert(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"must be an integer, got {raw!r}") from None
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    return convert


def _float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {raw!r}")
    return value


def _positive_float(raw: str) -> float:
    value = _float(raw)
    if value <= 0:
        raise ValueError(f"must be greater than 0, got {value}")
    return value


def _non_negative_float(raw: str) -> float:
    value = _float(raw)
    if value < 0:
        raise ValueError(f"must be 0 or more, got {value}")
    return value


# Longer than any task or retry plan, and short enough that every deadline and due time stays
# a date the API can print (a timeout of 1e12 s once answered every registration with a 500).
MAX_DURATION_S = 10 * 365 * 24 * 3600.0


def _duration(raw: str) -> float:
    return _capped_duration(_positive_float(raw))


def _duration_or_zero(raw: str) -> float:
    return _capped_duration(_non_negative_float(raw))


def _capped_duration(value: float) -> float:
    if value > MAX_DURATION_S:
        raise ValueError(f"must be at most {MAX_DURATION_S:.0f} s (10 years), got {value:g}")
    return value


def _float_at_least(low: float) -> Callable[[str], float]:
    def convert(raw: str) -> float:
        value = _float(raw)
        if value < low:
            raise ValueError(f"must be at least {low}, got {value}")
        return value

    return convert


def _float_between(low: float, high: float) -> Callable[[str], float]:
    def convert(raw: str) -> float:
        value = _float(raw)
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    return convert


def _one_of(*choices: str) -> Callable[[str], str]:
    def convert(raw: str) -> str:
        value = raw.upper()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {raw!r}")
        return value

    return convert


def _identifier(raw: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", raw):
        raise ValueError(f"must be a plain SQL identifier (letters, digits, _), got {raw!r}")
    return raw


def _event_loop(raw: str) -> str:
    value = raw.lower()
    if value not in ("asyncio", "uvloop"):
        raise ValueError(f"must be asyncio or uvloop, got {raw!r}")
    return value


def _log_level(raw: str) -> str:
    value = raw.upper()
    if value not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {raw!r}")
    logging.getLevelName(value)
    return value


def _http_url(raw: str) -> str:
    url = URL(raw)
    if url.user is not None or url.password is not None:
        # Checked first: the message below repeats the value, and must not repeat a password.
        raise ValueError("must not hold credentials (the key goes in RELAY_UPSTREAM_API_KEY)")
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"must be an absolute http(s) URL, got {raw!r}")
    return raw.rstrip("/")


def _store_url(raw: str) -> str:
    if raw.startswith("sqlite://"):
        if not raw.startswith("sqlite:///") or raw == "sqlite:///":
            raise ValueError("must look like sqlite:///relative.db or sqlite:////absolute/path.db")
        return raw
    if raw.startswith(("postgresql://", "postgres://")):
        return raw
    # Never echo the value: a database URL may carry a password.
    raise ValueError("must start with sqlite:/// or postgresql://")


def _tokens(raw: str) -> tuple[Secret, ...]:
    tokens = tuple(Secret(t.strip()) for t in raw.split(",") if t.strip())
    if not tokens:
        raise ValueError("must list at least one token, comma-separated")
    return tokens


def _signing_secrets(raw: str) -> tuple[Secret, ...]:
    secrets = raw.split()
    for position, secret in enumerate(secrets, start=1):
        try:
            parse_signing_secret(secret)
        except ValueError as exc:
            raise ValueError(f"secret #{position} {exc}") from None
    return tuple(Secret(s) for s in secrets)


def _networks(raw: str) -> tuple[IPNetwork, ...]:
    nets = []
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        try:
            nets.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"{part!r} is not a CIDR network") from None
    return tuple(nets)


def sqlite_path(store_url: str) -> str:
    """`sqlite:///relay.db` -> `relay.db`; `sqlite:////var/lib/relay.db` -> `/var/lib/relay.db`."""
    return store_url[len("sqlite:///") :]
