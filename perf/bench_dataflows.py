"""Paired request/response inspection for the data-flow map (issue 14.6), no kernel.

Rows:
  calls/s      CrmExchange objects through DataFlowMap.on_exchange on one core
               (CPU time of the thread): the REST grammar, the record count of the
               response (or request), the data classes of the fields and the
               aggregation, with the store flush every FLUSH_EVERY calls into a
               real SQLite file. Two mixes: the per-vendor fixtures of the tests
               (29 calls of six CRMs, JSON bodies of 0.1-2 KiB) and 4 KiB Salesforce
               query responses (~12 records each). Target >= 10,000/s.
  from bytes   the same fixture calls as HTTP/1.1 bytes, request written and response
               read, paired by ContentInspector (the read side) and mapped: the whole
               paired request/response inspection in user space.
  side by side the existing single-message path: 4 KiB requests through
               ContentInspector (perf/bench_streams.py, no field policy), same run.
Run: .venv/bin/python perf/bench_dataflows.py
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from leaktap.analytics.plaintext.crm_calls import CrmExchange  # noqa: E402
from leaktap.analytics.plaintext.dataflows import DataFlowMap, DataFlowSettings  # noqa: E402
from leaktap.controller.storage import Store  # noqa: E402
from perf import bench_streams  # noqa: E402 - run as a script, perf/ is not a package path
from tests.analytics.crm_fixtures import ALL_CALLS, exchange, sf_record  # noqa: E402

logger = logging.getLogger("perf.bench_dataflows")

ROUNDS = 3
N = 30_000
FLUSH_EVERY = 5_000
TARGET_PER_S = 10_000


def fixture_mix(n: int) -> list[CrmExchange]:
    base = [exchange(c) for c in ALL_CALLS]
    return [dataclasses.replace(base[i % len(base)], ts=1_767_000_000.0 + i, pid=1000 + i % 7)
            for i in range(n)]


def query_4k_mix(n: int) -> list[CrmExchange]:
    records = []
    while len(json.dumps({"totalSize": len(records), "done": True,
                          "records": records}).encode()) < 4096:
        records.append(sf_record("Contact", len(records)))
    records.pop()
    body = json.dumps({"totalSize": len(records), "done": True, "records": records}).encode()
    x = CrmExchange(ts=1_767_000_000.0, tenant="acme", pid=1, exe="/usr/bin/crm-sync",
                    vendor="salesforce", instance="acme", host="acme.my.salesforce.com",
                    method="GET", target="/services/data/v59.0/query?q=SELECT+Id,Email+FROM+"
                    "Contact+WHERE+LastModifiedDate+%3E+YESTERDAY", request_body=b"",
                    request_bytes=0, status=200, response_body=body,
                    response_bytes=len(body), response_truncated=False)
    return [dataclasses.replace(x, ts=x.ts + i) for i in range(n)]


def calls_per_second(exchanges: list[CrmExchange]) -> tuple[float, int]:
    best, rows = 0.0, 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(ROUNDS):
            store = Store(Path(tmp) / f"bench{r}.db")
            fmap = DataFlowMap(DataFlowSettings(warmup_s=0), write=store.put_dataflows)
            started = time.process_time()  # CPU time of this thread: other load does not count
            for i, x in enumerate(exchanges):
                fmap.on_exchange(x)
                if i % FLUSH_EVERY == FLUSH_EVERY - 1:
                    fmap.flush()
            fmap.flush()
            elapsed = time.process_time() - started
            best = max(best, len(exchanges) / elapsed)
            rows = len(store.dataflows())
            store.close()
    return best, rows


def through_inspector_per_second(n: int = 6000) -> tuple[float, int]:
    """Calls/s from the bytes: each fixture call's HTTP/1.1 request written and its
    response read on one keep-alive connection per vendor, paired by ContentInspector
    (the read side) and handed to the map."""
    from leaktap.analytics.plaintext.inspector import (
        FROM_CRM,
        TO_CRM,
        ContentInspector,
        WriteContext,
    )
    from leaktap.analytics.plaintext.redact import KeyedHasher

    wire = []
    for call in ALL_CALLS:
        head = f"{call.method} {call.target} HTTP/1.1\r\nHost: acme.example\r\n"
        if call.request:
            head += f"Content-Length: {len(call.request)}\r\n"
        request = (head + "\r\n").encode() + call.request
        response = (f"HTTP/1.1 {call.status} X\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(call.response)}\r\n\r\n").encode() + call.response
        wire.append((call.vendor, request, response))
    best, exchanges = 0.0, 0
    for _ in range(ROUNDS):
        fmap = DataFlowMap(DataFlowSettings(warmup_s=0))
        ins = ContentInspector(KeyedHasher(b"b" * 32))
        ins.exchange_sinks.append(fmap)
        contexts = {(v, d): WriteContext((1, v), "acme", crm_vendor=v, crm_instance="acme",
                                         pid=1, comm="crm-sync", direction=d,
                                         exe="/usr/bin/crm-sync")
                    for v in {w[0] for w in wire} for d in (TO_CRM, FROM_CRM)}
        started = time.process_time()
        for i in range(n):
            vendor, request, response = wire[i % len(wire)]
            ins.inspect(contexts[(vendor, TO_CRM)], request, len(request))
            ins.inspect(contexts[(vendor, FROM_CRM)], response, len(response))
        elapsed = time.process_time() - started
        best = max(best, n / elapsed)
        exchanges = fmap.stats["exchanges"]
    return best, exchanges


def report() -> float:
    worst = float("inf")
    for name, mix in (("fixture mix, six CRMs", fixture_mix(N)),
                      ("4 KiB Salesforce query responses", query_4k_mix(N))):
        rate, rows = calls_per_second(mix)
        worst = min(worst, rate)
        logger.info("paired-exchange inspection (%s), calls/s on one core (CPU time): %.0f "
                    "(%d data-flow rows); target: >= %d %s", name, rate, rows, TARGET_PER_S,
                    "PASS" if rate >= TARGET_PER_S else "MISS")
    rate, exchanges = through_inspector_per_second()
    logger.info("from the bytes: request written and response read, paired by "
                "ContentInspector and mapped, calls/s on one core (CPU time): %.0f "
                "(%d exchanges in the last round); target: >= %d %s", rate, exchanges,
                TARGET_PER_S, "PASS" if rate >= TARGET_PER_S else "MISS")
    single, _ = bench_streams.messages_per_second(n=6000, fields=False)
    logger.info("side by side: single-message stream inspection (4 KiB requests through "
                "ContentInspector), messages/s on one core: %.0f", single)
    return worst


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("leaktap.controller.storage").setLevel(logging.WARNING)
    report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
