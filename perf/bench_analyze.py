"""Detection quality and speed of `leaktap analyze`, measured side by side in one run.

1. Evaluation on seeds never used for tuning (the defaults were tuned on seeds 1-3):
   recall per injected kind, false incidents per tenant-week after warm-up, minutes
   from burst start to raised_ts.
2. Speed: `leaktap analyze` (streaming, causal) on a ~2 million bucket JSONL file,
   against a batch pandas pass over the same file (read, hour-of-week median/MAD,
   z-scores, rolling sums): buckets/s of each and their ratio.
3. Live agent: one minute of 10,000 (tenant, destination) series scored (rows in,
   minute closed), and one baseline refit of those series with 3 weeks of history.

Caveats: the machine is shared (2 cores); timings are best of a few repeats where
cheap and single runs otherwise. Usage: python perf/bench_analyze.py [--quick]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

# the repository root, so the test scenarios import as the package they are
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from leaktap.analytics.baseline import HOURS_PER_WEEK, SUM_IN, SUM_OUT  # noqa: E402
from leaktap.analytics.buckets import Bucket  # noqa: E402
from leaktap.analytics.settings import DetectionSettings  # noqa: E402
from leaktap.analytics.stream import StreamingDetector  # noqa: E402
from tests.analytics import scenario  # noqa: E402

logger = logging.getLogger("bench_analyze")
UNSEEN_SEEDS = (101, 102, 103)


def say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def evaluate_seeds(seeds: tuple[int, ...], tenants: int, events: int) -> None:
    say(f"== evaluation: {tenants} tenants x 4 weeks, {events} events per kind, seeds {seeds}")
    settings = DetectionSettings()
    caught: dict[str, int] = {}
    injected: dict[str, int] = {}
    false_count, tenant_weeks, to_alert = 0, 0.0, []
    for seed in seeds:
        scen = scenario.generate(seed, n_tenants=tenants, weeks=4, events_per_kind=events,
                                 allow_fraction=0.25)
        detector = StreamingDetector(settings, scen.allow)
        for bucket in scen.buckets():
            detector.observe(bucket)
        detector.flush()
        incidents = detector.close_all()
        result = scenario.evaluate(scen, incidents, settings.warmup_days)
        for kind in scenario.KINDS:
            caught[kind] = caught.get(kind, 0) + result.caught[kind]
            injected[kind] = injected.get(kind, 0) + result.injected[kind]
        false_count += len(result.false_incidents)
        tenant_weeks += result.tenant_weeks
        to_alert += result.burst_minutes_to_alert
        say(f"seed {seed}: {len(scen):,} buckets, {len(incidents)} incidents, "
            f"{len(result.false_incidents)} false, missed {len(result.missed)}")
        for event in result.missed:
            say(f"   missed: {event}")
        for incident in result.false_incidents:
            say(f"   false: {incident.kind} {incident.tenant} {incident.crm_instance} "
                f"raised {(incident.raised_ts - scen.start_ts) / 86400:.2f} d: {incident.summary}")
    for kind in scenario.KINDS:
        say(f"recall {kind:16s} {caught[kind]}/{injected[kind]} = "
            f"{caught[kind] / max(injected[kind], 1):.3f}")
    say(f"false incidents per tenant-week: {false_count}/{tenant_weeks:.0f} = "
        f"{false_count / tenant_weeks:.4f}")
    say(f"burst minutes to alert: median {statistics.median(to_alert):.1f}, "
        f"p90 {np.percentile(to_alert, 90):.1f}, max {max(to_alert):.0f} (n={len(to_alert)})")


def batch_pandas_pass(path: str, floor: float) -> int:
    """Non-causal batch analysis of the same file: what the streaming path competes with."""
    frame = pd.read_json(path, lines=True)
    frame["series"] = frame["tenant"] + "|" + frame["crm_vendor"] + "|" + frame["crm_instance"]
    frame["slot"] = (frame["ts"] // 3600 + 72) % HOURS_PER_WEEK
    frame["log_out"] = np.log(frame["bytes_out"] + floor)
    by_slot = frame.groupby(["series", "slot"])["log_out"]
    median = by_slot.transform("median")
    deviation = (frame["log_out"] - median).abs()
    mad = deviation.groupby([frame["series"], frame["slot"]]).transform("median")
    frame["z"] = (frame["log_out"] - median) / (1.4826 * mad + 0.05)
    frame["time"] = pd.to_datetime(frame["ts"], unit="s")
    rolled = frame.set_index("time").groupby("series")["bytes_out"].rolling("60min").sum()
    return int((frame["z"] > 6).sum()) + int(rolled.shape[0] > 0)


def speed(tenants: int) -> None:
    scen = scenario.generate(7, n_tenants=tenants, weeks=4, events_per_kind=4)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "buckets.jsonl")
        scen.write_jsonl(path)
        size = os.path.getsize(path)
        rows = len(scen)
        say(f"== speed: {rows:,} buckets ({size / 2**20:.0f} MiB JSONL), "
            f"{len(scen.series_name)} series, {scen.weeks * 10080:,} minutes")
        settings = DetectionSettings()
        # The real command in its own process. Its peak memory comes from /usr/bin/time:
        # a child's ru_maxrss seen from here would include this (large) process's image.
        del scen
        command = [sys.executable, "-m", "leaktap.controller.commands.cli", "analyze",
                   "--buckets", path]
        timer = shutil.which("time", path="/usr/bin:/bin")  # GNU time, not the shell keyword
        start = time.perf_counter()
        done = subprocess.run(
            [timer, "-f", "%M", *command] if timer else command,
            capture_output=True, text=True, check=True,
        )
        streaming = time.perf_counter() - start
        peak = f"{int(done.stderr.split()[-1]) / 1024:.0f} MiB" if timer else "n/a"
        incidents = len(done.stdout.splitlines())
        say(f"leaktap analyze (streaming, causal): {streaming:6.1f} s  "
            f"{rows / streaming:9,.0f} buckets/s  ({incidents} incidents, peak RSS {peak})")
        start = time.perf_counter()
        batch_pandas_pass(path, float(settings.volume.floor_bytes_per_minute))
        batch = time.perf_counter() - start
        say(f"batch pandas pass (non-causal):     {batch:6.1f} s  {rows / batch:9,.0f} buckets/s")
        say(f"streaming / batch time: {streaming / batch:.2f}")


def live(series: int) -> None:
    say(f"== live agent: {series:,} series")
    settings = DetectionSettings()
    detector = StreamingDetector(settings, capacity=series * 2)
    rng = np.random.default_rng(5)
    keys = [(f"tenant{i // 4:05d}", "salesforce", f"org{i % 4}") for i in range(series)]
    t0 = scenario.MONDAY
    for key in keys:  # first minute creates every series (and each tenant's total)
        detector.observe(Bucket(t0, *key, 1000, 1000))
    detector.advance(t0 + 60)
    # three weeks of hourly history, then a real refit, so the full seasonal path runs
    n = detector.series_count
    history = detector._history  # noqa: SLF001 - benchmark fills history directly
    hours = np.arange(t0 // 3600 - history.depth, t0 // 3600)
    history.hour_ids[hours % history.depth] = hours
    base = rng.uniform(1e5, 1e7, n).astype(np.float32)
    for pos in range(history.depth):
        noise = rng.lognormal(0, 0.2, (5, n)).astype(np.float32)
        history.stats[pos, :, :n] = base * noise * np.array([[1], [1.5], [3], [60], [60]])
    history.stats[:, SUM_IN, :n] = history.stats[:, SUM_OUT, :n] * 2
    start = time.perf_counter()
    detector.refit()
    refit = time.perf_counter() - start
    say(f"baseline refit (pandas), {n:,} series x 3 weeks of hours: {refit:.2f} s")
    minutes = 30
    per_minute = []
    for m in range(1, minutes + 1):
        ts = t0 + 60 * m
        values = rng.lognormal(np.log(1e6), 0.3, len(keys))
        start = time.perf_counter()
        for key, value in zip(keys, values.astype(np.int64).tolist(), strict=True):
            detector.observe(Bucket(ts, *key, value, 2 * value))
        detector.advance(ts + 60)
        per_minute.append(time.perf_counter() - start)
    say(f"one minute, {len(keys):,} rows in + scoring {n:,} series: median "
        f"{1000 * statistics.median(per_minute):.0f} ms, max {1000 * max(per_minute):.0f} ms "
        f"(target < 1000 ms)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs")
    parser.add_argument("--only", choices=["eval", "speed", "live"], help="one part only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.only in (None, "eval"):
        evaluate_seeds(UNSEEN_SEEDS[:1] if args.quick else UNSEEN_SEEDS,
                       20 if args.quick else 40, 6 if args.quick else 10)
    if args.only in (None, "speed"):
        speed(8 if args.quick else 28)
    if args.only in (None, "live"):
        live(10_000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
