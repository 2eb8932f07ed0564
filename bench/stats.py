"""Pure arithmetic on samples and on Prometheus text: percentiles, histogram quantiles, deltas."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from prometheus_client.parser import text_string_to_metric_families

# (sample name, sorted label pairs) -> value
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of `values`, linearly interpolated between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = q * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean of durations given in seconds, in milliseconds."""
    if not seconds:
        return {"count": 0, "p50": math.nan, "p90": math.nan, "p99": math.nan,
                "max": math.nan, "mean": math.nan}  # fmt: skip
    return {
        "count": len(seconds),
        "p50": percentile(seconds, 0.50) * 1000,
        "p90": percentile(seconds, 0.90) * 1000,
        "p99": percentile(seconds, 0.99) * 1000,
        "max": max(seconds) * 1000,
        "mean": sum(seconds) / len(seconds) * 1000,
    }


def parse_samples(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, keyed by name and labels."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of every `name` sample whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def histogram_delta(
    before: Samples, after: Samples, name: str, **labels: str
) -> list[tuple[float, float]]:
    """Cumulative (upper bound, count) pairs of `name`'s buckets gained between two scrapes."""
    return sorted(
        (bound, count - _buckets(before, name, labels).get(bound, 0.0))
        for bound, count in _buckets(after, name, labels).items()
    )


def _buckets(samples: Samples, name: str, labels: dict[str, str]) -> dict[float, float]:
    wanted = set(labels.items())
    found = {}
    for (n, ls), value in samples.items():
        if n == f"{name}_bucket" and wanted <= set(ls):
            found[float(dict(ls)["le"])] = value
    return found


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile: linear within the bucket; +inf past the last finite one."""
    pairs = sorted(buckets)
    if not pairs or pairs[-1][1] <= 0:
        return math.nan
    rank = q * pairs[-1][1]
    prev_bound, prev_count = 0.0, 0.0
    for bound, cumulative in pairs:
        if cumulative >= rank:
            if math.isinf(bound):
                return math.inf
            if cumulative == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (
                cumulative - prev_count
            )
        prev_bound, prev_count = bound, cumulative
    return math.inf


def share_at_most(bound: float, buckets: Iterable[tuple[float, float]]) -> float:
    """Fraction of observations at most `bound` (which must be a bucket bound)."""
    pairs = sorted(buckets)
    if not pairs or pairs[-1][1] <= 0:
        return math.nan
    under = next((c for b, c in pairs if b == bound), math.nan)
    return under / pairs[-1][1]


def profile_summary(collapsed: str, top: int = 12) -> dict[str, object]:
    """Hottest functions of a py-spy collapsed-stack profile: by own samples and by inclusive
    samples (a function counted once per stack), each as a share of all samples."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        frames = [_frame_name(f) for f in stack.split(";")]
        frames = [f for f in frames if f]
        if not frames:
            continue
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count

    def ranked(counts: dict[str, int]) -> list[tuple[str, float]]:
        best = sorted(counts.items(), key=lambda kv: kv[1], reverse=True)[:top]
        return [(name, round(n / samples, 4)) for name, n in best]

    return {"samples": samples, "own": ranked(own), "inclusive": ranked(inclusive)}


def _frame_name(frame: str) -> str:
    """`fetch (relay/upstream.py:80)` -> `fetch (relay/upstream.py)`; process and thread
    pseudo-frames are dropped."""
    frame = frame.strip()
    if frame.startswith(("process ", "thread ")):
        return ""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rpartition(":")[0] or where.rstrip(")")
    for marker in ("site-packages/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})" if path else name
