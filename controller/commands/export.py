"""`leaktap export-buckets --db PATH`: the stored minute buckets as JSONL.

One line per (minute, tenant, vendor, instance, destination), in time order, in
the form `leaktap analyze --buckets` reads: `crm_instance` is null for an
instance leaktap could not name (a shared vendor host, an ambiguous address),
`crm_vendor` null for non-CRM traffic.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from leaktap.controller.errors import LeaktapError
from leaktap.controller.storage import Store

EXPORT_FIELDS = ("ts", "tenant", "crm_vendor", "crm_instance", "destination", "bytes_out",
                 "bytes_in")


def export_buckets(store: Store, out: TextIO, since: float = 0.0,
                   until: float | None = None) -> int:
    """Write the buckets in [since, until) to `out`; returns the rows written."""
    rows = store.buckets(since, until if until is not None else time.time() + 60)
    for row in rows:
        out.write(json.dumps({k: row[k] for k in EXPORT_FIELDS}, separators=(",", ":")) + "\n")
    return len(rows)


def main(args: Any, out: TextIO | None = None) -> int:
    out = out if out is not None else sys.stdout  # looked up now: tests swap stdout
    if not Path(args.db).is_file():
        raise LeaktapError(f"{args.db}: no such database")
    store = Store(args.db)
    try:
        export_buckets(store, out, args.since, args.until)
    finally:
        store.close()
    out.flush()
    return 0
