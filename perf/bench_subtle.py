"""The patient exfiltrator (issue 18): detection of throttled exfiltration on unseen seeds.

Scenario: tests/analytics/scenario.py, subtle profile (drips 1.3-1.8x for 6-12 h,
bursts 3-6x for 4-15 min, a weekly batch carrying 60 % more or running 45 minutes
longer; tenants with log-noise up to 0.9 and growth up to 4 %/day), 3 weeks of minute
buckets, events in the last week. Seeds: scenario.HELD_OUT_SEEDS by default, never used
while tuning (scenario.TUNING_SEEDS were).

Prints recall per kind and per magnitude bucket, false incidents per tenant-week, burst
minutes to alert, and a recall-versus-false-alarm table over the bank's main threshold
(`detection.volume.scale_alpha`) so an operator can choose.

Measured, third round (20 tenants x 3 weeks, 5 events per kind per seed; defaults frozen
before the held-out seeds 401-410 were evaluated, once; figures from the same evaluation):
  held-out 401-410: slow_drip 0.64 (1.30-1.45x 6/16, 1.45-1.60x 10/15, 1.60-1.80x 16/19),
  short_burst 0.98, batch_more 1.00, batch_longer 0.98, false 0.030 per tenant-week,
  burst median 3 min (p90 4); scale_alpha 1e-5 / 1e-4 / 1e-3: false 0.018 / 0.030 / 0.048,
  drips 0.62 / 0.64 / 0.72, bursts 0.94 / 0.98 / 0.98.
  held-out 501-510 (fourth round, looked at once; no detection change since 401-410):
  slow_drip 0.72 (1.30-1.45x 7/15, 1.45-1.60x 13/15, 1.60-1.80x 16/20), short_burst 0.84,
  batch_more 1.00, batch_longer 0.93, false 0.028, burst median 3 min (p90 4); scale_alpha
  1e-4 / 3e-4 / 1e-3: false 0.028 / 0.028 / 0.043, drips 0.72 / 0.72 / 0.78, bursts 0.84 /
  0.88 / 0.88.
  tuning 201-208, 211-214: slow_drip 0.78, short_burst 0.92, batch_more 1.00, batch_longer
  0.96, false 0.029, burst median 2 min. Before this round (201-204): drips 0.40, bursts
  0.80, batch_more 0.45, batch_longer 1.00, false 0.044.
What moved them (201-204 unless said): per-hour-of-day window scales instead of the
level-noise floor (drips 0.40 -> 0.75); the batch test (batch_more 0.45 -> 1.00); no 60-min
window, burst CUSUM h 7 (false 0.100 -> 0.050); share-of-tenant bank with per-hour scales
(201-208: drips 0.78 -> 0.85, false unchanged); a 10-min window (bursts 0.85 -> 0.90).
Tried and left off: the series' own record as a bar (scale_record_margin), relearning the
scales when the fit matures, a slower or faster running level.
Fifth round (tuning 201-206 and 207-208, 211-214 run apart, 30 drips and bursts each):
  idle minutes counted at the clip's floor, the clip at -1.5 (was -3), a quarter-hour
  profile of each series' usual residual taken off first, the share bank's scales per hour
  (they were all-day: its hour was never passed): drips 47 -> 52 of 60, bursts 55 -> 57,
  batch_longer 54 -> 55 of 56, false 14 -> 11 in 480 tenant-weeks. The clip alone: drips
  49, bursts 56, false 10.
  held-out 701-710 (looked at once, these defaults): slow_drip 0.90 (1.30-1.45x 11/15,
  1.45-1.60x 16/16, 1.60-1.80x 18/19), short_burst 0.86 (3-4x 14/17, 4-5x 14/17, 5-6x
  15/16), batch_more 1.00, batch_longer 0.91, false 0.020, burst median 2 min (p90 4);
  scale_alpha 1e-4 / 3e-4 / 1e-3: drips 0.90 / 0.92 / 0.94, bursts 0.86 / 0.86 / 0.88,
  false 0.020 / 0.023 / 0.045.
  held-out 601-610 (looked at once, the clip change alone): drips 0.70, bursts 0.94,
  batch_more 1.00, batch_longer 0.98, false 0.038.
  Tried and left off (tuning seeds): a lower floor_bytes_per_minute (4096: no drip gained,
  a false incident more), scale_short_min_ratio 2.3 (bursts unchanged, false 10 -> 22),
  scoring the banks against the level of the last refit instead of the hourly one (drips
  49 -> 47, false 10 -> 13).
Sixth round: the bank tests each destination's out/in mix too (two columns per series in
  one step); the share bank off by default. Tuning 201-206 / 207-208, 211-214, with the mix
  gated at 1.5x on every window: drips 52 -> 56 of 60, bursts 57 -> 60, batch_longer 55 ->
  54, false 11 -> 11 in 480 tenant-weeks (the mix as a bank of its own, share bank on:
  drips 57, bursts 60, false 11). Held out, looked at once with that gate: 801-810 drips
  0.96, bursts 0.96, batch_more 0.98, batch_longer 0.96, false 0.020 (scale_alpha 3e-4 /
  1e-3: false 0.028 / 0.040, the same recall); 901-910 drips 0.88 (1.30-1.45x 13/19),
  bursts 1.00, false 0.028. The long mix windows then gated at scale_min_ratio (1.2x), on
  tuning seeds: drips 60 of 60, bursts 60, false 13.
  held-out 1001-1010 (looked at once, these defaults): slow_drip 0.98 (1.30-1.45x 11/11,
  1.45-1.60x 16/17, 1.60-1.80x 22/22), short_burst 0.98 (3-4x 15/15, 4-5x 13/14, 5-6x
  21/21), batch_more 1.00, batch_longer 0.98, false 0.025, burst median 2 min (p90 3);
  scale_alpha 1e-4 / 3e-4 / 1e-3: drips 0.98 / 0.98 / 0.98, bursts 0.98 / 0.98 / 0.94,
  false 0.025 / 0.033 / 0.040. 801-810 / 901-910 again with these defaults (seen before):
  drips 0.98 / 0.96, bursts 0.96 / 1.00, false 0.022 / 0.028.
Usage: python perf/bench_subtle.py [--seeds 401,402] [--tenants 40] [--events 6]
       [--alphas 0.001,0.01,0.1] [--tuning] [--no-share] [--set scale_clip_low=-1.5]
The machine is shared (2 cores): one seed of 40 tenants takes a minute or two per alpha.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from leaktap.analytics.incidents import Incident  # noqa: E402
from leaktap.analytics.settings import DetectionSettings, VolumeSettings  # noqa: E402
from leaktap.analytics.stream import StreamingDetector  # noqa: E402
from tests.analytics import scenario  # noqa: E402

MAGNITUDE_BUCKETS = {
    "slow_drip": (1.3, 1.45, 1.6, 1.8),
    "short_burst": (3.0, 4.0, 5.0, 6.0),
}


def say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def run(scen: scenario.Scenario, settings: DetectionSettings) -> list[Incident]:
    detector = StreamingDetector(settings, scen.allow)
    for bucket in scen.buckets():
        detector.observe(bucket)
    detector.flush()
    return detector.close_all()


@dataclass
class Tally:
    caught: dict[str, int] = field(default_factory=dict)
    injected: dict[str, int] = field(default_factory=dict)
    buckets: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    false: int = 0
    tenant_weeks: float = 0.0
    to_alert: list[float] = field(default_factory=list)

    def add(self, scen: scenario.Scenario, incidents: list[Incident], verbose: bool) -> None:
        result = scenario.evaluate(scen, incidents)
        missed = {id(e) for e in result.missed}
        for kind, count in result.injected.items():
            self.injected[kind] = self.injected.get(kind, 0) + count
            self.caught[kind] = self.caught.get(kind, 0) + result.caught[kind]
        for event in scen.events:
            edges = MAGNITUDE_BUCKETS.get(event.kind)
            if edges is None:
                continue
            b = int(np.clip(np.searchsorted(edges, event.factor, side="right") - 1, 0,
                            len(edges) - 2))
            tally = self.buckets.setdefault((event.kind, b), [0, 0])
            tally[0] += id(event) not in missed
            tally[1] += 1
        self.false += len(result.false_incidents)
        self.tenant_weeks += result.tenant_weeks
        self.to_alert += result.burst_minutes_to_alert
        if verbose:
            noise = {t.name: t.sigma_minute for t in scen.tenants}
            for event in result.missed:
                say(f"   missed {event.kind} {event.tenant} x{event.factor:.2f} "
                    f"{(event.end_ts - event.start_ts) // 60 + 1} min, "
                    f"log-noise {noise[event.tenant]:.2f}")
            for incident in result.false_incidents:
                say(f"   false {incident.tenant} {incident.crm_instance}: {incident.summary}")

    @property
    def false_rate(self) -> float:
        return self.false / self.tenant_weeks if self.tenant_weeks else float("nan")

    def recall(self, kind: str) -> float:
        return self.caught.get(kind, 0) / max(self.injected.get(kind, 0), 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default=",".join(map(str, scenario.HELD_OUT_SEEDS[:2])))
    parser.add_argument("--tuning", action="store_true", help="the tuning seeds instead")
    parser.add_argument("--tenants", type=int, default=40)
    parser.add_argument("--events", type=int, default=6, help="events per kind and seed")
    parser.add_argument("--alphas", default="", help="scale_alpha values for the table")
    parser.add_argument("-v", "--verbose", action="store_true", help="list misses and false")
    parser.add_argument("--no-share", action="store_true",
                        help="without the share-of-tenant bank (detection.volume.share_enabled)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override a detection.volume setting (JSON value), repeatable")
    args = parser.parse_args()
    seeds = scenario.TUNING_SEEDS if args.tuning else tuple(int(s) for s in args.seeds.split(","))
    if not args.tuning and set(seeds) & set(scenario.TUNING_SEEDS):
        say("warning: tuning seeds given; figures on them are not held-out figures")
    default = DetectionSettings().volume.scale_alpha
    overrides = {}
    for item in args.set:
        name, _, value = item.partition("=")
        overrides[name] = json.loads(value)
    if overrides:
        say(f"overrides: {overrides}")
    alphas = sorted({default, *(float(a) for a in args.alphas.split(",") if a)})
    scens = [scenario.generate(s, n_tenants=args.tenants, weeks=3, events_per_kind=args.events,
                               subtle=True) for s in seeds]
    say(f"== subtle exfiltration: seeds {seeds}, {args.tenants} tenants x 3 weeks, "
        f"{args.events} events per kind, {sum(len(s) for s in scens):,} buckets")
    table = []
    for alpha in alphas:
        base = DetectionSettings()
        settings = base.model_copy(update={"volume": VolumeSettings(
            **{**base.volume.model_dump(), **overrides, "scale_alpha": alpha,
               "share_enabled": overrides.get("share_enabled", base.volume.share_enabled)
               and not args.no_share})})
        tally = Tally()
        for scen in scens:
            tally.add(scen, run(scen, settings), args.verbose and alpha == default)
        table.append((alpha, tally))
        if alpha != default:
            continue
        say(f"-- scale_alpha {alpha} (the default)")
        for kind in scenario.SUBTLE_KINDS:
            say(f"recall {kind:13s} {tally.caught.get(kind, 0)}/{tally.injected.get(kind, 0)}"
                f" = {tally.recall(kind):.2f}")
        for (kind, b), (hit, total) in sorted(tally.buckets.items()):
            lo, hi = MAGNITUDE_BUCKETS[kind][b], MAGNITUDE_BUCKETS[kind][b + 1]
            say(f"   {kind:13s} {lo:.2f}-{hi:.2f}x: {hit}/{total}")
        say(f"false incidents per tenant-week: {tally.false}/{tally.tenant_weeks:.0f} = "
            f"{tally.false_rate:.3f}")
        if tally.to_alert:
            say(f"burst minutes to alert: median {statistics.median(tally.to_alert):.1f}, "
                f"p90 {np.percentile(tally.to_alert, 90):.1f}, max {max(tally.to_alert):.0f}")
    if len(table) > 1:
        say("-- recall versus false alarms (scale_alpha = false alarms per series-week the "
            "window bank may raise)")
        say("scale_alpha  " + "  ".join(f"{k:>12s}" for k in scenario.SUBTLE_KINDS)
            + "  false/tenant-week")
        for alpha, tally in table:
            say(f"{alpha:<11g}  " + "  ".join(f"{tally.recall(k):12.2f}"
                                              for k in scenario.SUBTLE_KINDS)
                + f"  {tally.false_rate:17.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
