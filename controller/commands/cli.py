"""The `leaktap` command line: doctor, run, replay, analyze, export-buckets, fingerprint.

Each subcommand's implementation is imported only when it is chosen, so that
`leaktap analyze` works on a machine without BCC and `--help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

logger = logging.getLogger(__name__)

# subcommand -> module whose main(args) -> int implements it
_COMMANDS = {
    "doctor": "leaktap.controller.commands.doctor",
    "run": "leaktap.controller.agent",
    "replay": "leaktap.controller.commands.replay",
    "analyze": "leaktap.analytics.cli",
    "demo": "leaktap.controller.commands.demo",
    "export-buckets": "leaktap.controller.commands.export",
    "fingerprint": "leaktap.controller.commands.fingerprint",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leaktap", description="eBPF egress-leak monitor for CRM traffic"
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    doctor = sub.add_parser("doctor", help="check that this host can run the agent")
    doctor.add_argument("--mode", choices=["tc", "xdp"], help="also check gateway-mode needs")
    doctor.add_argument("--iface", action="append", metavar="IF",
                        help="interface to check for native XDP (with --mode xdp)")
    doctor.add_argument("--config", metavar="FILE",
                        help="also check what this configuration asks for (plaintext probes)")

    run = sub.add_parser("run", help="run the agent")
    run.add_argument("--config", metavar="FILE", help="YAML configuration file")
    run.add_argument(
        "--iface", action="append", default=None, metavar="IF",
        help="interface to watch (repeatable; default: the default route's)",
    )
    run.add_argument("--listen", metavar="HOST:PORT", help="API address (default 127.0.0.1:8470)")
    run.add_argument("--db", metavar="PATH", help="SQLite database path")
    run.add_argument("--mode", choices=["tc", "xdp"], help="attach mode (default tc)")

    replay = sub.add_parser(
        "replay", help="push a pcap through the kernel program, print one JSON line per flow"
    )
    replay.add_argument("pcap", metavar="PCAP", help="pcap or pcapng file")
    replay.add_argument("--config", metavar="FILE", help="YAML configuration file")
    replay.add_argument(
        "--mode", choices=["tc", "xdp"], default="tc",
        help="program to replay through: tc (egress, default) or xdp (gateway)",
    )
    replay.add_argument(
        "--trust-unmatched-dns", action="store_true",
        help="a DNS answer names addresses only when the capture holds the query it "
        "answers (same client and resolver address and port, id and question, within "
        "dns.query_window_s, 5 s by default); with this option an answer with no query "
        "at all (a capture that started after the query) names them too. Answers "
        "contradicting a query in the capture (another resolver, id or question, too "
        "late) never do",
    )

    demo = sub.add_parser(
        "demo", help="a namespace lab: normal tenant traffic, then leaks and their alerts"
    )
    demo.add_argument("--port", type=int, default=8470, help="API and dashboard port")

    analyze = sub.add_parser("analyze", help="run the detectors over minute buckets")
    analyze.add_argument("--buckets", required=True, metavar="FILE.jsonl", help="minute buckets")
    analyze.add_argument("--config", metavar="FILE", help="YAML configuration file")
    analyze.add_argument("--strict", action="store_true",
                         help="exit 2 when any row is bad (they are summarised either way)")

    export = sub.add_parser(
        "export-buckets", help="write the agent database's minute buckets as JSONL for analyze"
    )
    export.add_argument("--db", required=True, metavar="PATH", help="SQLite database path")
    export.add_argument("--since", type=float, default=0.0, metavar="EPOCH",
                        help="first minute (epoch seconds, default: all)")
    export.add_argument("--until", type=float, default=None, metavar="EPOCH",
                        help="end (exclusive; default: now)")
    _fingerprint_parser(sub)
    return parser


def _fingerprint_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fp = sub.add_parser("fingerprint", help="exact-data-match sets of a tenant's records")
    actions = fp.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (("add", "build a set from a CSV or JSONL export"),
                         ("list", "list the sets"), ("remove", "remove a set")):
        p = actions.add_parser(action, help=text)
        p.add_argument("--config", metavar="FILE", help="YAML configuration file")
        p.add_argument("--db", metavar="PATH", help="SQLite database path (as for run)")
        if action != "list":
            p.add_argument("--tenant", required=True, help="the tenant that owns the records")
            p.add_argument("--name", required=True, help="the set's name, e.g. contacts")
        if action == "add":
            p.add_argument("file", metavar="FILE", help="CSV with a header row, or JSONL")
            p.add_argument("--columns", metavar="A,B,...",
                           help="columns to fingerprint (default: all)")
            p.add_argument("--min-matches", type=int, default=3, metavar="N",
                           help="values of the set in one write that raise an alert")
            p.add_argument("--format", choices=("csv", "jsonl"),
                           help="input format (default: from the name or content)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(_COMMANDS[args.command])
    try:
        return int(module.main(args))
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's last line of defence
        from leaktap.controller.errors import ConfigError, LeaktapError

        if isinstance(e, LeaktapError):
            # a configuration problem starts with the file and line that cause it
            prefix = "" if isinstance(e, ConfigError) else f"leaktap {args.command}: "
            sys.stderr.write(f"{prefix}{e}\n")
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
