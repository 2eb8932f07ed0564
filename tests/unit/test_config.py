"""Settings from the environment: defaults, parsing, problems listed together, secrets kept quiet."""

from __future__ import annotations

import base64
import ipaddress
from pathlib import Path

import pytest

from relay.config import ConfigError, Secret, Settings, parse_signing_secret, sqlite_path

SECRET_A = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SECRET_B = "whsec_" + base64.b64encode(bytes(range(32))).decode()


def whsec(length: int) -> str:
    return "whsec_" + base64.b64encode(b"k" * length).decode()


def problems(env: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    return caught.value.problems


def test_an_empty_environment_gives_the_defaults() -> None:
    """With no RELAY_* variable set, every setting has its documented default."""
    expected = Settings(
        host="127.0.0.1",
        port=8080,
        store_url="sqlite:///relay.db",
        upstream_url="http://127.0.0.1:8081",
        upstream_api_key=None,
        api_tokens=(),
        signing_keys=(),
        callback_allow_nets=(),
        poll_initial_s=2.0,
        poll_max_s=60.0,
        poll_factor=1.5,
        poll_jitter=0.2,
        retry_after_max_s=300.0,
        error_backoff_max_s=300.0,
        upstream_rps=50.0,
        upstream_concurrency=32,
        upstream_timeout_s=10.0,
        watch_timeout_s=86_400.0,
        not_found_grace_s=60.0,
        watch_retention_s=604_800.0,
        delivery_timeout_s=10.0,
        delivery_backoff_s=5.0,
        delivery_backoff_max_s=3_600.0,
        delivery_max_attempts=10,
        delivery_concurrency=32,
        poll_lease_s=60.0,
        delivery_lease_s=60.0,
        shutdown_timeout_s=20.0,
        sqlite_synchronous="NORMAL",
        log_level="INFO",
    )
    assert expected == Settings.from_env({})


def test_empty_values_count_as_unset() -> None:
    """A variable set to the empty string leaves the default in place."""
    assert Settings() == Settings.from_env({"RELAY_PORT": "", "RELAY_UPSTREAM_API_KEY": ""})


def test_unrelated_variables_are_ignored() -> None:
    """Only RELAY_* names are read."""
    assert Settings() == Settings.from_env({"PORT": "1", "HOME": "/root", "RELAY_UNKNOWN": "x"})


def test_every_variable_is_parsed() -> None:
    """Each RELAY_* variable lands, converted and normalised, in its own field."""
    env = {
        "RELAY_HOST": "0.0.0.0",
        "RELAY_PORT": "9090",
        "RELAY_STORE_URL": "postgresql://relay@db.internal/relay",
        "RELAY_UPSTREAM_URL": "https://api.example.com/base/",
        "RELAY_UPSTREAM_API_KEY": "  sk-upstream-key\n",
        "RELAY_API_TOKENS": "tok-one, tok-two ,,",
        "RELAY_SIGNING_SECRET": SECRET_A,
        "RELAY_CALLBACK_ALLOW_NETS": "10.1.2.3/8, ::1",
        "RELAY_POLL_INITIAL_S": "1.5",
        "RELAY_POLL_MAX_S": "90",
        "RELAY_POLL_FACTOR": "2",
        "RELAY_POLL_JITTER": "0",
        "RELAY_RETRY_AFTER_MAX_S": "600",
        "RELAY_ERROR_BACKOFF_MAX_S": "120",
        "RELAY_UPSTREAM_RPS": "12.5",
        "RELAY_UPSTREAM_CONCURRENCY": "4",
        "RELAY_UPSTREAM_TIMEOUT_S": "3",
        "RELAY_WATCH_TIMEOUT_S": "3600",
        "RELAY_NOT_FOUND_GRACE_S": "0",
        "RELAY_WATCH_RETENTION_S": "0",
        "RELAY_DELIVERY_TIMEOUT_S": "7",
        "RELAY_DELIVERY_BACKOFF_S": "1",
        "RELAY_DELIVERY_BACKOFF_MAX_S": "60",
        "RELAY_DELIVERY_MAX_ATTEMPTS": "3",
        "RELAY_DELIVERY_CONCURRENCY": "8",
        "RELAY_POLL_LEASE_S": "30",
        "RELAY_DELIVERY_LEASE_S": "8.5",
        "RELAY_SHUTDOWN_TIMEOUT_S": "0",
        "RELAY_SQLITE_SYNCHRONOUS": "full",
        "RELAY_LOG_LEVEL": "debug",
    }
    expected = Settings(
        host="0.0.0.0",
        port=9090,
        store_url="postgresql://relay@db.internal/relay",
        upstream_url="https://api.example.com/base",
        upstream_api_key=Secret("sk-upstream-key"),
        api_tokens=(Secret("tok-one"), Secret("tok-two")),
        signing_keys=(Secret(SECRET_A),),
        callback_allow_nets=(
            ipaddress.ip_network("10.0.0.0/8"),
            ipaddress.ip_network("::1/128"),
        ),
        poll_initial_s=1.5,
        poll_max_s=90.0,
        poll_factor=2.0,
        poll_jitter=0.0,
        retry_after_max_s=600.0,
        error_backoff_max_s=120.0,
        upstream_rps=12.5,
        upstream_concurrency=4,
        upstream_timeout_s=3.0,
        watch_timeout_s=3600.0,
        not_found_grace_s=0.0,
        watch_retention_s=0.0,
        delivery_timeout_s=7.0,
        delivery_backoff_s=1.0,
        delivery_backoff_max_s=60.0,
        delivery_max_attempts=3,
        delivery_concurrency=8,
        poll_lease_s=30.0,
        delivery_lease_s=8.5,
        shutdown_timeout_s=0.0,
        sqlite_synchronous="FULL",
        log_level="DEBUG",
    )
    assert expected == Settings.from_env(env)


@pytest.mark.parametrize(
    "store_url",
    [
        "sqlite:///relay.db",
        "sqlite:////var/lib/relay/relay.db",
        "postgresql://relay@db/relay",
        "postgres://relay@db:5432/relay",
    ],
)
def test_store_urls_of_both_kinds_are_accepted(store_url: str) -> None:
    """SQLite file URLs and PostgreSQL URLs are kept as given."""
    assert store_url == Settings.from_env({"RELAY_STORE_URL": store_url}).store_url


@pytest.mark.parametrize(
    ("store_url", "expected"),
    [("sqlite:///relay.db", "relay.db"), ("sqlite:////var/lib/relay.db", "/var/lib/relay.db")],
)
def test_sqlite_path_strips_the_scheme(store_url: str, expected: str) -> None:
    """Three slashes make a relative path, four an absolute one."""
    assert expected == sqlite_path(store_url)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("RELAY_PORT", "http", "RELAY_PORT: must be an integer, got 'http'"),
        ("RELAY_PORT", "70000", "RELAY_PORT: must be between 0 and 65535, got 70000"),
        ("RELAY_PORT", "-1", "RELAY_PORT: must be between 0 and 65535, got -1"),
        ("RELAY_STORE_URL", "sqlite://relay.db", "RELAY_STORE_URL: must look like sqlite:///relative.db or sqlite:////absolute/path.db"),
        ("RELAY_STORE_URL", "sqlite:///", "RELAY_STORE_URL: must look like sqlite:///relative.db or sqlite:////absolute/path.db"),
        ("RELAY_STORE_URL", "redis://cache", "RELAY_STORE_URL: must start with sqlite:/// or postgresql://"),
        ("RELAY_UPSTREAM_URL", "ftp://api.example.com", "RELAY_UPSTREAM_URL: must be an absolute http(s) URL, got 'ftp://api.example.com'"),
        ("RELAY_UPSTREAM_URL", "/v1/tasks", "RELAY_UPSTREAM_URL: must be an absolute http(s) URL, got '/v1/tasks'"),
        ("RELAY_API_TOKENS", " , ,", "RELAY_API_TOKENS: must list at least one token, comma-separated"),
        ("RELAY_CALLBACK_ALLOW_NETS", "10.0.0.0/8, intranet", "RELAY_CALLBACK_ALLOW_NETS: 'intranet' is not a CIDR network"),
        ("RELAY_CALLBACK_ALLOW_NETS", "10.0.0.0/33", "RELAY_CALLBACK_ALLOW_NETS: '10.0.0.0/33' is not a CIDR network"),
        ("RELAY_POLL_INITIAL_S", "0", "RELAY_POLL_INITIAL_S: must be greater than 0, got 0.0"),
        ("RELAY_POLL_INITIAL_S", "fast", "RELAY_POLL_INITIAL_S: must be a number, got 'fast'"),
        ("RELAY_POLL_MAX_S", "inf", "RELAY_POLL_MAX_S: must be a finite number, got 'inf'"),
        ("RELAY_POLL_MAX_S", "nan", "RELAY_POLL_MAX_S: must be a finite number, got 'nan'"),
        ("RELAY_POLL_FACTOR", "0.5", "RELAY_POLL_FACTOR: must be at least 1.0, got 0.5"),
        ("RELAY_POLL_JITTER", "1", "RELAY_POLL_JITTER: must be between 0.0 and 0.9, got 1.0"),
        ("RELAY_POLL_JITTER", "-0.1", "RELAY_POLL_JITTER: must be between 0.0 and 0.9, got -0.1"),
        ("RELAY_RETRY_AFTER_MAX_S", "-5", "RELAY_RETRY_AFTER_MAX_S: must be greater than 0, got -5.0"),
        ("RELAY_ERROR_BACKOFF_MAX_S", "0", "RELAY_ERROR_BACKOFF_MAX_S: must be greater than 0, got 0.0"),
        ("RELAY_UPSTREAM_RPS", "0", "RELAY_UPSTREAM_RPS: must be greater than 0, got 0.0"),
        ("RELAY_UPSTREAM_CONCURRENCY", "0", "RELAY_UPSTREAM_CONCURRENCY: must be between 1 and 10000, got 0"),
        ("RELAY_UPSTREAM_CONCURRENCY", "2.5", "RELAY_UPSTREAM_CONCURRENCY: must be an integer, got '2.5'"),
        ("RELAY_UPSTREAM_TIMEOUT_S", "-1", "RELAY_UPSTREAM_TIMEOUT_S: must be greater than 0, got -1.0"),
        ("RELAY_WATCH_TIMEOUT_S", "1 day", "RELAY_WATCH_TIMEOUT_S: must be a number, got '1 day'"),
        ("RELAY_NOT_FOUND_GRACE_S", "-1", "RELAY_NOT_FOUND_GRACE_S: must be 0 or more, got -1.0"),
        ("RELAY_WATCH_RETENTION_S", "-1", "RELAY_WATCH_RETENTION_S: must be 0 or more, got -1.0"),
        ("RELAY_WATCH_RETENTION_S", "a week", "RELAY_WATCH_RETENTION_S: must be a number, got 'a week'"),
        ("RELAY_DELIVERY_TIMEOUT_S", "0", "RELAY_DELIVERY_TIMEOUT_S: must be greater than 0, got 0.0"),
        ("RELAY_DELIVERY_BACKOFF_S", "x", "RELAY_DELIVERY_BACKOFF_S: must be a number, got 'x'"),
        ("RELAY_DELIVERY_BACKOFF_MAX_S", "-inf", "RELAY_DELIVERY_BACKOFF_MAX_S: must be a finite number, got '-inf'"),
        ("RELAY_DELIVERY_MAX_ATTEMPTS", "0", "RELAY_DELIVERY_MAX_ATTEMPTS: must be between 1 and 1000, got 0"),
        ("RELAY_DELIVERY_MAX_ATTEMPTS", "1001", "RELAY_DELIVERY_MAX_ATTEMPTS: must be between 1 and 1000, got 1001"),
        ("RELAY_DELIVERY_CONCURRENCY", "10001", "RELAY_DELIVERY_CONCURRENCY: must be between 1 and 10000, got 10001"),
        ("RELAY_POLL_LEASE_S", "0", "RELAY_POLL_LEASE_S: must be greater than 0, got 0.0"),
        ("RELAY_DELIVERY_LEASE_S", "soon", "RELAY_DELIVERY_LEASE_S: must be a number, got 'soon'"),
        ("RELAY_SHUTDOWN_TIMEOUT_S", "-0.5", "RELAY_SHUTDOWN_TIMEOUT_S: must be 0 or more, got -0.5"),
        ("RELAY_SQLITE_SYNCHRONOUS", "off", "RELAY_SQLITE_SYNCHRONOUS: must be one of NORMAL, FULL, got 'off'"),
        ("RELAY_LOG_LEVEL", "loud", "RELAY_LOG_LEVEL: must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got 'loud'"),
    ],
)  # fmt: skip
def test_a_bad_value_gives_one_problem_naming_its_variable(
    name: str, value: str, expected: str
) -> None:
    """Each bad variable is reported on its own line, starting with its name."""
    assert [expected] == problems({name: value})


def test_several_bad_variables_are_reported_together() -> None:
    """Every bad variable is listed in one error, one line each, in a stable order."""
    env = {
        "RELAY_PORT": "http",
        "RELAY_POLL_JITTER": "2",
        "RELAY_LOG_LEVEL": "loud",
        "RELAY_DELIVERY_MAX_ATTEMPTS": "0",
        "RELAY_HOST": "0.0.0.0",
    }
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    expected = [
        "RELAY_PORT: must be an integer, got 'http'",
        "RELAY_POLL_JITTER: must be between 0.0 and 0.9, got 2.0",
        "RELAY_DELIVERY_MAX_ATTEMPTS: must be between 1 and 1000, got 0",
        "RELAY_LOG_LEVEL: must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got 'loud'",
    ]
    assert expected == caught.value.problems
    assert "invalid configuration:\n" + "\n".join(f"  - {p}" for p in expected) == str(caught.value)


UPSTREAM_KEY = "sk-live-Upstream-7c1f9e"
API_TOKEN_1 = "tok-Alpha-3b8d21"
API_TOKEN_2 = "tok-Beta-9f0a44"
DB_PASSWORD = "Pw-Hunter2-db"
SHORT_SECRET = whsec(16)


def test_secrets_never_appear_in_a_config_error() -> None:
    """Problem lines name bad secrets and store URLs without echoing any secret value."""
    env = {
        "RELAY_UPSTREAM_API_KEY": UPSTREAM_KEY,
        "RELAY_API_TOKENS": f"{API_TOKEN_1},{API_TOKEN_2}",
        "RELAY_SIGNING_SECRET": f"{SECRET_A} {SHORT_SECRET}",
        "RELAY_STORE_URL": f"mysql://relay:{DB_PASSWORD}@db/relay",
        "RELAY_PORT": "nope",
    }
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    expected = [
        "RELAY_PORT: must be an integer, got 'nope'",
        "RELAY_STORE_URL: must start with sqlite:/// or postgresql://",
        "RELAY_SIGNING_SECRET: secret #2 must decode to 24-64 bytes, got 16",
    ]
    assert expected == caught.value.problems
    shown = str(caught.value) + repr(caught.value)
    leaked = [
        s
        for s in (UPSTREAM_KEY, API_TOKEN_1, API_TOKEN_2, SECRET_A, SHORT_SECRET, DB_PASSWORD)
        if s in shown
    ]
    assert [] == leaked


def test_secrets_never_appear_in_the_settings_repr() -> None:
    """The API key, the API tokens and the signing secrets print as stars."""
    settings = Settings.from_env(
        {
            "RELAY_UPSTREAM_API_KEY": UPSTREAM_KEY,
            "RELAY_API_TOKENS": f"{API_TOKEN_1},{API_TOKEN_2}",
            "RELAY_SIGNING_SECRET": f"{SECRET_A} {SECRET_B}",
        }
    )
    shown = repr(settings) + str(settings)
    leaked = [s for s in (UPSTREAM_KEY, API_TOKEN_1, API_TOKEN_2, SECRET_A, SECRET_B) if s in shown]
    assert [] == leaked
    assert "upstream_api_key=Secret('***')" in shown


def test_a_store_url_password_never_appears_in_the_settings_repr() -> None:
    """A valid PostgreSQL URL keeps its password out of the settings' repr."""
    settings = Settings.from_env({"RELAY_STORE_URL": f"postgresql://relay:{DB_PASSWORD}@db/relay"})
    assert DB_PASSWORD not in repr(settings)


def test_secret_prints_as_stars() -> None:
    """A Secret's str and repr hide the value, which stays readable as `.value`."""
    secret = Secret(UPSTREAM_KEY)
    assert ("***", "Secret('***')", UPSTREAM_KEY) == (str(secret), repr(secret), secret.value)


def test_the_upstream_key_is_read_from_a_file(tmp_path: Path) -> None:
    """RELAY_UPSTREAM_API_KEY_FILE supplies the key, surrounding whitespace stripped."""
    key_file = tmp_path / "upstream.key"
    key_file.write_text(f"{UPSTREAM_KEY}\n")
    settings = Settings.from_env({"RELAY_UPSTREAM_API_KEY_FILE": str(key_file)})
    assert Secret(UPSTREAM_KEY) == settings.upstream_api_key


def test_a_missing_key_file_is_a_problem(tmp_path: Path) -> None:
    """A key file that cannot be read is reported by variable name, not by a traceback."""
    missing = tmp_path / "absent.key"
    expected = ["RELAY_UPSTREAM_API_KEY_FILE: cannot read the file (No such file or directory)"]
    assert expected == problems({"RELAY_UPSTREAM_API_KEY_FILE": str(missing)})


def test_a_key_file_that_is_a_directory_is_a_problem(tmp_path: Path) -> None:
    """A directory in place of the key file is reported like a missing one."""
    expected = ["RELAY_UPSTREAM_API_KEY_FILE: cannot read the file (Is a directory)"]
    assert expected == problems({"RELAY_UPSTREAM_API_KEY_FILE": str(tmp_path)})


def test_a_key_file_that_is_not_text_is_a_problem(tmp_path: Path) -> None:
    """A key file with bytes that are not UTF-8 is reported as a problem."""
    key_file = tmp_path / "upstream.key"
    key_file.write_bytes(b"\xff\xfe\x00key")
    assert 1 == len(problems({"RELAY_UPSTREAM_API_KEY_FILE": str(key_file)}))


def test_setting_both_the_key_and_its_file_is_a_problem(tmp_path: Path) -> None:
    """The key comes from exactly one place."""
    key_file = tmp_path / "upstream.key"
    key_file.write_text(UPSTREAM_KEY)
    env = {"RELAY_UPSTREAM_API_KEY": UPSTREAM_KEY, "RELAY_UPSTREAM_API_KEY_FILE": str(key_file)}
    expected = ["RELAY_UPSTREAM_API_KEY and RELAY_UPSTREAM_API_KEY_FILE are both set; set one"]
    assert expected == problems(env)


def test_two_signing_secrets_give_two_keys_for_rotation() -> None:
    """Space-separated secrets are all kept, in order, each decoded to its key bytes."""
    settings = Settings.from_env({"RELAY_SIGNING_SECRET": f"  {SECRET_A}   {SECRET_B} "})
    assert (Secret(SECRET_A), Secret(SECRET_B)) == settings.signing_keys
    expected_keys = (
        base64.b64decode(SECRET_A.removeprefix("whsec_")),
        bytes(range(32)),
    )
    assert expected_keys == settings.signing_key_bytes


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "secret #1 must start with 'whsec_'"),
        ("WHSEC_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "secret #1 must start with 'whsec_'"),
        ("whsec_not*base64!", "secret #1 the part after 'whsec_' is not valid base64"),
        ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaS", "secret #1 the part after 'whsec_' is not valid base64"),
        ("whsec_", "secret #1 must decode to 24-64 bytes, got 0"),
        (whsec(23), "secret #1 must decode to 24-64 bytes, got 23"),
        (whsec(65), "secret #1 must decode to 24-64 bytes, got 65"),
        (f"{SECRET_A} whsec_!!", "secret #2 the part after 'whsec_' is not valid base64"),
    ],
)  # fmt: skip
def test_a_bad_signing_secret_is_a_problem(raw: str, expected: str) -> None:
    """Missing prefix, bad base64 and a wrong key length are each named, with the secret's position."""
    assert [f"RELAY_SIGNING_SECRET: {expected}"] == problems({"RELAY_SIGNING_SECRET": raw})


@pytest.mark.parametrize("length", [24, 32, 64])
def test_parse_signing_secret_accepts_24_to_64_byte_keys(length: int) -> None:
    """A whsec_ secret decodes to exactly the key bytes it encodes."""
    assert b"k" * length == parse_signing_secret(whsec(length))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", ()),
        (" , ,", ()),
        ("10.0.0.0/8", (ipaddress.ip_network("10.0.0.0/8"),)),
        ("192.168.1.7", (ipaddress.ip_network("192.168.1.7/32"),)),
        ("192.168.1.7/24", (ipaddress.ip_network("192.168.1.0/24"),)),
        (
            "127.0.0.0/8,::1,fd00::/8",
            (
                ipaddress.ip_network("127.0.0.0/8"),
                ipaddress.ip_network("::1/128"),
                ipaddress.ip_network("fd00::/8"),
            ),
        ),
    ],
)
def test_callback_allow_nets_are_parsed_as_networks(
    raw: str, expected: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
) -> None:
    """Comma-separated CIDRs; a bare address is its own /32 or /128, host bits are dropped."""
    assert expected == Settings.from_env({"RELAY_CALLBACK_ALLOW_NETS": raw}).callback_allow_nets


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"RELAY_POLL_INITIAL_S": "10", "RELAY_POLL_MAX_S": "5"},
            ["RELAY_POLL_MAX_S: must be at least RELAY_POLL_INITIAL_S"],
        ),
        (
            {"RELAY_POLL_MAX_S": "1"},
            ["RELAY_POLL_MAX_S: must be at least RELAY_POLL_INITIAL_S"],
        ),
        (
            {"RELAY_DELIVERY_BACKOFF_S": "60", "RELAY_DELIVERY_BACKOFF_MAX_S": "30"},
            ["RELAY_DELIVERY_BACKOFF_MAX_S: must be at least RELAY_DELIVERY_BACKOFF_S"],
        ),
        (
            {"RELAY_POLL_MAX_S": "1", "RELAY_DELIVERY_BACKOFF_MAX_S": "1"},
            [
                "RELAY_POLL_MAX_S: must be at least RELAY_POLL_INITIAL_S",
                "RELAY_DELIVERY_BACKOFF_MAX_S: must be at least RELAY_DELIVERY_BACKOFF_S",
            ],
        ),
    ],
)
def test_cross_field_rules_are_checked(env: dict[str, str], expected: list[str]) -> None:
    """A maximum below its starting value is refused, every such pair listed."""
    assert expected == problems(env)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"RELAY_POLL_INITIAL_S": "5", "RELAY_POLL_MAX_S": "5"}, (5.0, 5.0)),
        ({"RELAY_POLL_INITIAL_S": "0.5"}, (0.5, 60.0)),
    ],
)
def test_a_maximum_equal_to_or_above_its_start_is_accepted(
    env: dict[str, str], expected: tuple[float, float]
) -> None:
    """Equal bounds are a fixed interval, not an error."""
    settings = Settings.from_env(env)
    assert expected == (settings.poll_initial_s, settings.poll_max_s)


POLL_LEASE_PROBLEM = (
    "RELAY_POLL_LEASE_S: must be more than {work} s (3 x RELAY_UPSTREAM_TIMEOUT_S + 1 s margin)"
)
DELIVERY_LEASE_PROBLEM = (
    "RELAY_DELIVERY_LEASE_S: must be more than {work} s (RELAY_DELIVERY_TIMEOUT_S + 1 s margin)"
)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"RELAY_UPSTREAM_TIMEOUT_S": "20"}, [POLL_LEASE_PROBLEM.format(work=61)]),
        (
            {"RELAY_UPSTREAM_TIMEOUT_S": "10", "RELAY_POLL_LEASE_S": "31"},
            [POLL_LEASE_PROBLEM.format(work=31)],
        ),
        (
            {"RELAY_UPSTREAM_TIMEOUT_S": "0.5", "RELAY_POLL_LEASE_S": "1"},
            [POLL_LEASE_PROBLEM.format(work=2.5)],
        ),
        ({"RELAY_DELIVERY_TIMEOUT_S": "59"}, [DELIVERY_LEASE_PROBLEM.format(work=60)]),
        (
            {"RELAY_DELIVERY_TIMEOUT_S": "10", "RELAY_DELIVERY_LEASE_S": "10"},
            [DELIVERY_LEASE_PROBLEM.format(work=11)],
        ),
        (
            {"RELAY_POLL_LEASE_S": "5", "RELAY_DELIVERY_LEASE_S": "5"},
            [POLL_LEASE_PROBLEM.format(work=31), DELIVERY_LEASE_PROBLEM.format(work=11)],
        ),
    ],
)
def test_a_lease_must_outlast_the_work_it_covers(env: dict[str, str], expected: list[str]) -> None:
    """A poll lease outlasts three upstream timeouts, a delivery lease one delivery, plus 1 s."""
    assert expected == problems(env)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, (60.0, 60.0)),
        ({"RELAY_UPSTREAM_TIMEOUT_S": "10", "RELAY_POLL_LEASE_S": "31.5"}, (31.5, 60.0)),
        ({"RELAY_DELIVERY_TIMEOUT_S": "10", "RELAY_DELIVERY_LEASE_S": "11.5"}, (60.0, 11.5)),
        (
            {"RELAY_UPSTREAM_TIMEOUT_S": "100", "RELAY_POLL_LEASE_S": "302"},
            (302.0, 60.0),
        ),
    ],
)
def test_a_lease_just_longer_than_its_work_is_accepted(
    env: dict[str, str], expected: tuple[float, float]
) -> None:
    """Anything past the work plus the margin is a valid lease."""
    settings = Settings.from_env(env)
    assert expected == (settings.poll_lease_s, settings.delivery_lease_s)


def test_settings_built_in_code_are_checked_the_same_way() -> None:
    """`check()` applies the cross-field rules to settings not read from the environment."""
    settings = Settings(delivery_timeout_s=30.0, delivery_lease_s=30.0, poll_max_s=1.0)
    with pytest.raises(ConfigError) as caught:
        settings.check()
    expected = [
        "RELAY_POLL_MAX_S: must be at least RELAY_POLL_INITIAL_S",
        DELIVERY_LEASE_PROBLEM.format(work=31),
    ]
    assert expected == caught.value.problems


def test_a_key_with_a_line_break_or_nothing_in_it_is_a_problem_that_does_not_show_it(
    tmp_path: Path,
) -> None:
    """A key no HTTP header can carry (every poll would fail) is refused at start, unshown."""
    key_file = tmp_path / "upstream.key"
    key_file.write_text("first-half\nsecond-half\n")
    assert [
        "RELAY_UPSTREAM_API_KEY_FILE: the key holds a line break or another control character"
    ] == problems({"RELAY_UPSTREAM_API_KEY_FILE": str(key_file)})
    assert ["RELAY_UPSTREAM_API_KEY: the key holds a line break or another control character"] == (
        problems({"RELAY_UPSTREAM_API_KEY": "abc\x07def"})
    )
    key_file.write_text("  \n")
    assert ["RELAY_UPSTREAM_API_KEY_FILE: the key is empty"] == problems(
        {"RELAY_UPSTREAM_API_KEY_FILE": str(key_file)}
    )


@pytest.mark.parametrize(
    "name",
    [
        "RELAY_WATCH_TIMEOUT_S",
        "RELAY_POLL_MAX_S",
        "RELAY_SHUTDOWN_TIMEOUT_S",
        "RELAY_WATCH_RETENTION_S",
    ],
)
def test_a_duration_past_ten_years_is_a_problem(name: str) -> None:
    """Every deadline and due time must stay a date the API can print: 1e12 s once made every
    registration a 500, after its watch was committed."""
    assert [f"{name}: must be at most 315360000 s (10 years), got 1e+12"] == problems(
        {name: "1e12"}
    )
    assert 315_360_000.0 == getattr(Settings.from_env({name: "315360000"}), name[6:].lower())


@pytest.mark.parametrize(
    "url", ["http://user:s3cret-pw@127.0.0.1:8081", "ftp://user:s3cret-pw@127.0.0.1"]
)
def test_an_upstream_url_with_credentials_is_refused_without_showing_them(url: str) -> None:
    """They would be logged with the URL at start; the key has its own setting."""
    found = problems({"RELAY_UPSTREAM_URL": url})
    assert [
        "RELAY_UPSTREAM_URL: must not hold credentials (the key goes in RELAY_UPSTREAM_API_KEY)"
    ] == found
    assert "s3cret-pw" not in "".join(found)


def test_api_processes_need_a_fixed_port() -> None:
    """Each API process binds RELAY_PORT itself: port 0 would give each a port of its own."""
    assert [
        "RELAY_API_PROCESSES: needs a fixed RELAY_PORT (each API process binds that port;"
        " 0 would give each a port of its own)"
    ] == problems({"RELAY_API_PROCESSES": "2", "RELAY_PORT": "0"})
    assert 0 == Settings.from_env({"RELAY_PORT": "0"}).api_processes
    assert 2 == Settings.from_env({"RELAY_API_PROCESSES": "2"}).api_processes


@pytest.mark.parametrize("raw", ["-1", "65", "two", "1.5"])
def test_api_processes_outside_0_to_64_are_refused(raw: str) -> None:
    found = problems({"RELAY_API_PROCESSES": raw})
    assert 1 == len(found)
    assert found[0].startswith("RELAY_API_PROCESSES: ")
