"""Why a subtle event was missed (issue 18): the window bank's view of each missed one.

For every missed event of the subtle profile (tests/analytics/scenario.py) prints the
series' noise and, per window length of the bank, the highest z reached during the event
against its threshold, what the z was divided by (the learned scale or the level-noise
floor, whichever was larger), how far the running level moved during the event (a baseline
absorbing the drip) and the bytes ratio gate. Run on the tuning seeds only (the default):
diagnosing the held-out seeds would tune to them.

Usage: python perf/diagnose_subtle.py [--seeds 201,202] [--tenants 20] [--events 5]
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from leaktap.analytics.scales import ScaleBank  # noqa: E402
from leaktap.analytics.settings import DetectionSettings  # noqa: E402
from leaktap.analytics.stream import StreamingDetector  # noqa: E402
from tests.analytics import scenario  # noqa: E402

FIELDS = ("z", "deviation", "scale", "floor", "tested", "out", "exp", "exp_wide", "reference")


def say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def diagnose(seed: int, tenants: int, events: int, settings: DetectionSettings) -> None:
    scen = scenario.generate(seed, n_tenants=tenants, weeks=3, events_per_kind=events,
                             subtle=True)
    detector = StreamingDetector(settings, scen.allow)
    volume = detector._volume
    # per test: its bank and the bank's column of a series (the volume bank keeps a
    # series' volume at 2i and its out/in mix at 2i + 1)
    banks: dict[str, tuple[ScaleBank | None, Callable[[int], int]]] = {
        "level": (volume.bank, lambda i: 2 * i), "mix": (volume.bank, lambda i: 2 * i + 1),
        "share": (volume.share_bank, lambda i: i)}
    watched: dict[int, list[tuple[int, int, scenario.Event, bool]]] = {}
    records: dict[tuple[str, int, int], list[dict[str, np.ndarray]]] = {}
    levels: dict[tuple[str, int, int], list[float]] = {}

    def tracer(bank: ScaleBank) -> Callable[[int, dict[str, np.ndarray]], None]:
        tests = [(name, column) for name, (b, column) in banks.items() if b is bank]

        def trace(minute_index: int, view: dict[str, np.ndarray]) -> None:
            ts = detector._open_ts
            assert ts is not None
            for index, spans in watched.items():
                for number, (start, end, _, _) in enumerate(spans):
                    if not start - 3600 <= ts <= end + scenario.GRACE_MINUTES * 60:
                        continue
                    for name, column in tests:
                        at = column(index)
                        key = (name, index, number)
                        records.setdefault(key, []).append(
                            {f: np.array(view[f][..., at]) for f in FIELDS}
                            | {"ref": np.array(view["ref"][at]), "ts": np.array(ts)})
                        levels.setdefault(key, []).append(float(volume.level[index]))
        return trace

    traced = False
    last_week = scen.start_ts + (scen.weeks - 1) * scenario.WEEK_MINUTES * 60
    for bucket in scen.buckets():
        if not traced and bucket[0] >= last_week - 86_400:
            for event in scen.events:
                for key in ((event.tenant, event.vendor, event.instance),
                            (event.tenant, None, None)):
                    index = detector._index.get(key)
                    if index is not None:
                        watched.setdefault(index, []).append(
                            (event.start_ts, event.end_ts, event, key[1] is None))
            for bank, _ in banks.values():
                if bank is not None:
                    bank.trace = tracer(bank)
            traced = True
        detector.observe(bucket)
    detector.flush()
    result = scenario.evaluate(scen, detector.close_all())
    noise = {t.name: t for t in scen.tenants}
    say(f"== seed {seed}: missed {len(result.missed)} of {len(scen.events)}")
    for event in result.missed:
        if event.kind not in ("slow_drip", "batch_more", "short_burst"):
            continue
        model = noise[event.tenant]
        minutes = (event.end_ts - event.start_ts) // 60 + 1
        say(f"-- {event.kind} {event.tenant} {event.vendor}:{event.instance} "
            f"x{event.factor:.2f} {minutes} min; tenant log-noise {model.sigma_minute:.2f} "
            f"day {model.sigma_day:.2f} growth {model.growth_per_day:.3f}/day, "
            f"{len(model.destinations)} destination(s)")
        for index, spans in watched.items():
            for number, (start, _, ev, is_total) in enumerate(spans):
                if ev is not event:
                    continue
                for name, (bank, _) in banks.items():
                    rows = records.get((name, index, number), [])
                    if bank is None or not rows:
                        continue
                    report(rows, levels[(name, index, number)], start, bank.windows, bank.h,
                           f"{name} bank, " + ("total" if is_total else "destination"),
                           math.log(event.factor))


def report(rows: list[dict[str, np.ndarray]], levels: list[float], start: int,
           windows: list[int], h: np.ndarray, label: str, shift: float) -> None:
    ts = np.array([int(r["ts"]) for r in rows])
    during = ts >= start
    z = np.stack([r["z"] for r in rows])[during]  # (minutes, windows)
    dev = np.stack([r["deviation"] for r in rows])[during]
    scale = np.stack([r["scale"] for r in rows])[during]
    floor = np.stack([r["floor"] for r in rows])[during]
    tested = np.stack([r["tested"] for r in rows])[during]
    out = np.stack([r["out"] for r in rows])[during]
    exp = np.stack([r["exp"] for r in rows])[during]
    ref = np.array([float(r["ref"]) for r in rows])
    level = np.array(levels)
    pre = ref[~during][-1] if (~during).any() else float("nan")
    say(f"   {label}: running level u {pre:+.2f} before -> {ref[during][-1]:+.2f} at the end; "
        f"growth level {level[~during][-1] if (~during).any() else float('nan'):+.3f} -> "
        f"{level[during][-1]:+.3f} (log shift injected {shift:.2f})")
    for k, w in enumerate(windows):
        col = np.where(tested[:, k], z[:, k], -np.inf)
        at = int(np.argmax(col))
        if not np.isfinite(col[at]):
            say(f"     w={w:5d}: never tested (window not full or scale not learned)")
            continue
        binding = "floor" if floor[at, k] > scale[at, k] else "learned"
        raw = dev[at, k] / scale[at, k]
        ratio = out[at, k] / max(exp[at, k], 1.0)
        say(f"     w={w:5d}: max z {col[at]:5.2f} / h {h[k]:.2f}; deviation {dev[at, k]:+.3f}"
            f" / scale {max(scale[at, k], floor[at, k]):.3f} ({binding}; learned "
            f"{scale[at, k]:.3f} -> z {raw:.2f}); bytes x{ratio:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default=",".join(map(str, scenario.TUNING_SEEDS)))
    parser.add_argument("--tenants", type=int, default=20)
    parser.add_argument("--events", type=int, default=5)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if set(seeds) & set(scenario.HELD_OUT_SEEDS):
        say("refused: diagnosing held-out seeds would tune to them")
        return 2
    for seed in seeds:
        diagnose(seed, args.tenants, args.events, DetectionSettings())
    return 0


if __name__ == "__main__":
    sys.exit(main())
