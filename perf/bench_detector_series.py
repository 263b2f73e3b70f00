"""Per-minute cost of the streaming detector with 2,000 live series, before and after
bounded series state (issue 17.5: idle series dropped, least recently active evicted at
the cap, freed slots cleared before reuse).

"before" is analytics/ of a git commit (default: the parent of the commit that added the
bounds) extracted to a temporary directory; "after" is the working tree. Each run is a
child process that builds 2,000 series (500 tenants x 3 destinations + 500 tenant totals,
the live agent's DETECTOR_SERIES_MAX), gives them three weeks of hourly history and a
real refit so the seasonal path runs, then times minutes of rows in + scoring (observe
for every row, then advance). The two versions alternate round by round; the table gives
medians over the rounds of each run's median and 95th percentile minute (CPU time of the
process: other work on the shared machine moves wall time far more).

"after, churn" is the case the bounds are for: the table full at the cap (1,900 steady
series plus short-lived ones) and 35 new destinations a minute, each evicting the least
recently active one and clearing its slot. Before, the live agent never admitted them
(they were folded into their vendor's unknown instance), so it has no "before" figure.

Usage: python perf/bench_detector_series.py [--rounds 5] [--minutes 120] [--before REV]
No root needed; prints figures only (the machine is shared: no timing is asserted).

Measured (2 cores shared with other work, 6 rounds x 120 minutes, CPU ms per minute):
before 1.28 (p95 1.86), after 1.32 (p95 2.20), after with churn 2.40 (p95 3.40).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MONDAY = 1_704_067_200
SERIES = 2000
CHURN_PER_MINUTE = 35


def say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def measure(minutes: int, churn: bool) -> dict[str, float]:
    """One child's run: per-minute seconds (median, p95) after the history and refit."""
    import inspect

    import numpy as np

    from leaktap.analytics.baseline import SUM_IN, SUM_OUT
    from leaktap.analytics.buckets import Bucket
    from leaktap.analytics.settings import DetectionSettings
    from leaktap.analytics.stream import StreamingDetector

    kwargs: dict[str, int] = {}
    if "max_series" in inspect.signature(StreamingDetector).parameters:
        kwargs["max_series"] = SERIES
    detector = StreamingDetector(DetectionSettings(), capacity=SERIES, **kwargs)
    rng = np.random.default_rng(5)
    steady = 1900 if churn else SERIES
    tenants = steady // 4  # 3 destinations and a total each
    keys = [(f"tenant{i // 3:04d}", "salesforce", f"org{i % 3}") for i in range(3 * tenants)]
    for key in keys:
        detector.observe(Bucket(MONDAY, *key, 1000, 1000))
    born = 0
    churn_keys: list[tuple[str, str, str]] = []
    if churn:  # fill the table to the cap with short-lived destinations of 10 tenants
        while len(keys) + tenants + len(churn_keys) + 10 < SERIES:
            churn_keys.append((f"churn{born % 10}", "salesforce", f"w{born}"))
            born += 1
        for key in churn_keys:
            detector.observe(Bucket(MONDAY, *key, 1000, 1000))
    detector.advance(MONDAY + 60)
    n = detector._keys.__len__()  # noqa: SLF001 - slots in use (series, before any drop)
    history = detector._history  # noqa: SLF001 - the benchmark fills history directly
    hours = np.arange(MONDAY // 3600 - history.depth, MONDAY // 3600)
    history.hour_ids[hours % history.depth] = hours
    base = rng.uniform(1e5, 1e7, n).astype(np.float32)
    for pos in range(history.depth):
        noise = rng.lognormal(0, 0.2, (5, n)).astype(np.float32)
        history.stats[pos, :, :n] = base * noise * np.array([[1], [1.5], [3], [60], [60]])
    history.stats[:, SUM_IN, :n] = history.stats[:, SUM_OUT, :n] * 2
    detector.refit()
    per_minute = []
    for m in range(1, minutes + 1):
        ts = MONDAY + 60 * m
        values = rng.lognormal(np.log(1e6), 0.3, len(keys)).astype(np.int64).tolist()
        rows = [Bucket(ts, *key, value, 2 * value)
                for key, value in zip(keys, values, strict=True)]
        for _ in range(CHURN_PER_MINUTE if churn else 0):
            rows.append(Bucket(ts, f"churn{born % 10}", "salesforce", f"w{born}", 5000, 100))
            born += 1
        start = time.process_time()  # CPU time: the machine is shared
        for bucket in rows:
            detector.observe(bucket)
        detector.advance(ts + 60)
        per_minute.append(time.process_time() - start)
    per_minute.sort()
    evicted = getattr(detector, "evicted", {})
    return {
        "median": statistics.median(per_minute),
        "p95": per_minute[int(0.95 * (len(per_minute) - 1))],
        "series": float(detector.series_count),
        "evicted": float(sum(evicted.values())),
    }


def extract(rev: str, into: Path) -> Path:
    """analytics/ of `rev` as the package leaktap.analytics under `into`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "analytics"],
                             check=True, capture_output=True).stdout
    package = into / "leaktap"
    package.mkdir()
    (package / "__init__.py").write_text("")
    with tarfile.open(fileobj=BytesIO(archive)) as tar:  # our own repository's archive
        tar.extractall(package)  # noqa: S202
    return into


def child(pythonpath: Path | None, minutes: int, churn: bool) -> dict[str, float]:
    env = dict(os.environ)
    if pythonpath is not None:  # ahead of the editable install's finder
        env["PYTHONPATH"] = str(pythonpath)
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(minutes)] + (["--churn"] if churn else []),
        check=True, capture_output=True, text=True, env=env, cwd=str(ROOT),
    ).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", 5)))
    parser.add_argument("--minutes", type=int, default=120)
    parser.add_argument("--before", default=None,
                        help="git revision of the 'before' analytics/ (default: the parent "
                             "of the commit that added max_series)")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--churn", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.stdout.write(json.dumps(measure(args.child, args.churn)) + "\n")
        return 0
    before = args.before or subprocess.run(
        ["git", "-C", str(ROOT), "log", "-1", "--format=%H^", "-S", "max_series: int | None",
         "--", "analytics/stream.py"], check=True, capture_output=True, text=True,
    ).stdout.strip()
    before = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", before],
                            check=True, capture_output=True, text=True).stdout.strip()
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": [], "after, churn": []}
    with tempfile.TemporaryDirectory(prefix="lt-bench-series-") as tmp:
        old = extract(before, Path(tmp))
        for round_ in range(args.rounds):
            order = [("before", old), ("after", None)]
            for name, path in order if round_ % 2 == 0 else order[::-1]:
                runs[name].append(child(path, args.minutes, churn=False))
            runs["after, churn"].append(child(None, args.minutes, churn=True))
    say(f"== streaming detector, {SERIES:,} series, one minute = rows in + scoring "
        f"({args.rounds} rounds x {args.minutes} minutes; before = {before})")
    say(f"{'CPU per minute':14} {'median ms':>10} {'p95 ms':>8} {'series':>7} {'evicted':>8}")
    for name, results in runs.items():
        median = 1000 * statistics.median(r["median"] for r in results)
        p95 = 1000 * statistics.median(r["p95"] for r in results)
        say(f"{name:14} {median:10.2f} {p95:8.2f} {results[-1]['series']:7.0f} "
            f"{results[-1]['evicted']:8.0f}")
    ratio = statistics.median(r["median"] for r in runs["after"]) / statistics.median(
        r["median"] for r in runs["before"])
    say(f"after / before (steady table): {ratio:.2f}; target: <= 1.10 "
        f"{'PASS' if ratio <= 1.10 else 'MISS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
