"""`leaktap analyze --buckets FILE.jsonl [--config FILE] [--strict]`: one JSON line
per incident.

Streams the file through the same StreamingDetector the live agent uses; an
incident is written when its episode ends (or at end of input), so its
first_ts/last_ts span the whole episode while raised_ts says when it paged.
Bad rows are skipped and summarised on stderr, one line per reason; with
--strict any bad row makes the exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable
from typing import TextIO

from leaktap.analytics.buckets import RowReport, read_buckets
from leaktap.analytics.incidents import Incident
from leaktap.analytics.settings import DetectionSettings
from leaktap.analytics.stream import StreamingDetector

logger = logging.getLogger(__name__)


def analyze_lines(
    lines: Iterable[str],
    settings: DetectionSettings,
    allow: dict[str, list[str]] | None = None,
    source: str = "<buckets>",
    out: TextIO | None = None,
    report: RowReport | None = None,
) -> list[Incident]:
    """Run the detector over JSONL lines; write each incident to `out` as it closes.
    `report` receives the rows read, skipped (per reason) and not analysed."""
    detector = StreamingDetector(settings, allow)
    written: list[Incident] = []

    def emit(incidents: list[Incident]) -> None:
        for incident in incidents:
            written.append(incident)
            if out is not None:
                out.write(json.dumps(incident.to_dict(), separators=(",", ":")) + "\n")

    # episodes end only when minutes close: hand them over as each new minute starts
    detector.observe_all(read_buckets(lines, source, report),
                         lambda: emit(detector.pop_closed()))
    detector.flush()
    emit(detector.close_all())
    logger.info("%s: %d rows, %d series, %d incidents", source, detector.rows_seen,
                detector.series_count, len(written))
    return written


def main(args: argparse.Namespace) -> int:
    settings = DetectionSettings()
    allow: dict[str, list[str]] = {}
    if args.config:
        from leaktap.controller.config import load_config

        config = load_config(args.config)
        settings = config.detection
        allow = {tenant.name: list(tenant.allow) for tenant in config.tenants}
    try:
        # undecodable bytes become a bad row (reported), not a crash
        handle = open(args.buckets, encoding="utf-8", errors="replace")  # noqa: SIM115
    except OSError as e:
        from leaktap.controller.errors import LeaktapError

        raise LeaktapError(f"{args.buckets}: cannot read: {e.strerror or e}") from e
    report = RowReport()
    with handle:
        analyze_lines(handle, settings, allow, source=args.buckets, out=sys.stdout, report=report)
    sys.stdout.flush()
    if getattr(args, "strict", False) and report.bad_rows:
        sys.stderr.write(f"leaktap analyze: --strict: {report.bad_rows} bad row(s) "
                         f"in {args.buckets}\n")
        return 2
    return 0
