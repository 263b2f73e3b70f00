"""Stream inspection in user space: throughput and memory (issue 19), no kernel needed.

Rows:
  messages/s   4 KiB requests (HTTP/1.1 JSON bodies, each captured in two chunks
               with offsets as the kernel hands a large write over, and HTTP/2
               DATA), parsed, decoded and run through every detector, on one
               core (CPU time of the thread, so other load on the VM does not
               count); target >= 20,000/s. Twice: without and with a tenant
               field policy whose field appears ~35 times per body.
  memory       1,000 concurrent connections, each holding an unfinished 48 KiB
               body: bytes the parsers hold (bounded by plaintext.streams
               total_bytes_max) and the Python heap growth measured with
               tracemalloc.
Run directly (`python -m perf.bench_streams`) or from perf/bench_plaintext.py.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import tracemalloc

import hpack

from leaktap.analytics.plaintext.canary import Canary, CanaryMatcher
from leaktap.analytics.plaintext.fields import FieldPolicy
from leaktap.analytics.plaintext.inspector import (
    ContentInspector,
    StreamLimits,
    TenantPolicy,
    WriteContext,
)
from leaktap.analytics.plaintext.redact import KeyedHasher

logger = logging.getLogger("perf.bench_streams")

MESSAGE_BYTES = 4096
CHUNK_BYTES = 4096
CONNECTIONS = 1000
ROUNDS = 3
TARGET_PER_S = 20_000


def _inspector(limits: StreamLimits | None = None, fields: bool = True) -> ContentInspector:
    field_policy = FieldPolicy(["SSN__c", "Email"] if fields else [], ["enc:v1:"])
    return ContentInspector(
        KeyedHasher(b"b" * 32), CanaryMatcher([Canary("CANARY-BENCH-0000001", "acme", "r")]),
        {"acme": TenantPolicy(field_policy, ("salesforce:*",))}, limits=limits)


def _h1_message(i: int) -> bytes:
    rows: list[dict[str, str]] = []
    body = b""
    while True:  # whole JSON records, padded to exactly MESSAGE_BYTES
        rows.append({"Id": f"003{i:06d}{len(rows):06d}", "Email": "enc:v1:QUJDREVGR0g=",
                     "Description": "lorem ipsum dolor sit amet consectetur"})
        candidate = json.dumps({"records": rows, "pad": ""}).encode()
        if len(candidate) > MESSAGE_BYTES:
            rows.pop()
            body = json.dumps({"records": rows, "pad": ""}).encode()
            body = body[:-2] + b" " * (MESSAGE_BYTES - len(body)) + b'"}'
            break
    return (b"PATCH /services/data/v59.0/composite/sobjects HTTP/1.1\r\nHost: acme.my."
            b"salesforce.com\r\nAuthorization: Bearer 00D5g000004ABCD!AR8AQBenchToken%06d\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % (i, len(body)) + body)


def _frame(ftype: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + stream.to_bytes(4, "big")
            + payload)


def _h2_messages(n: int) -> list[bytes]:
    """The client preface, then one write per request: HEADERS and a 4 KiB DATA frame."""
    enc = hpack.Encoder()
    out = [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0, b"")]
    body = _h1_message(0).split(b"\r\n\r\n", 1)[1]
    for i in range(n):
        sid = 2 * i + 1
        block = enc.encode([(":method", "POST"), (":path", "/crm/v3/objects/contacts"),
                            (":scheme", "https"), (":authority", "api.hubapi.com"),
                            ("content-type", "application/json")])
        out.append(_frame(1, 4, sid, block) + _frame(0, 1, sid, body))
    return out


def messages_per_second(n: int = 6000, fields: bool = True) -> tuple[float, int]:
    """(messages/s, findings) over n messages, half HTTP/1.1 in chunks, half HTTP/2;
    with `fields`, every HTTP/1.1 body carries ~35 values of a must-be-encrypted field."""
    h1 = [_h1_message(i) for i in range(n // 2)]
    h2_writes = _h2_messages(n // 2)
    best, findings = 0.0, 0
    for _ in range(ROUNDS):
        ins = _inspector(fields=fields)
        ctx1 = WriteContext((1, 1), "acme", crm_vendor="salesforce", crm_instance="acme")
        ctx2 = WriteContext((1, 2), "acme", crm_vendor="hubspot")
        found = 0
        started = time.process_time()  # CPU time of this one thread: other load does not count
        for data in h1:
            for off in range(0, len(data), CHUNK_BYTES):
                found += len(ins.inspect(ctx1, data[off : off + CHUNK_BYTES], len(data),
                                         off).findings)
        for data in h2_writes:
            found += len(ins.inspect(ctx2, data, len(data)).findings)
        elapsed = time.process_time() - started
        best = max(best, n / elapsed)
        findings = found
    return best, findings


def memory_with_connections(limits: StreamLimits) -> dict[str, float]:
    ins = _inspector(limits)
    body = b'{"Description": "' + b"x" * (60_000) + b'"}'
    data = _h1_message(0).split(b"\r\n\r\n", 1)[0].replace(b"Content-Length: ",
                                                          b"X-Was: ") + (
        b"\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for c in range(CONNECTIONS):
        ctx = WriteContext((2, c), "acme", crm_vendor="salesforce")
        for off in range(0, 48 << 10, CHUNK_BYTES):
            ins.inspect(ctx, data[off : off + CHUNK_BYTES], len(data), off)
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"streams": len(ins.streams), "held_bytes": ins.streams.held_bytes,
            "bound_bytes": limits.total_bytes_max, "heap_growth_bytes": current - before,
            "heap_peak_bytes": peak - before, "spilled_windows": ins.stats["spilled_windows"],
            "evicted": sum(ins.streams.evicted.values())}


def report() -> None:
    for fields in (False, True):
        rate, findings = messages_per_second(fields=fields)
        logger.info("stream inspection, 4 KiB messages per second (one core, CPU time)%s: "
                    "%.0f (%d findings); target: >= 20000 %s",
                    ", ~35 encrypted-field values per body" if fields else "", rate, findings,
                    "PASS" if rate >= TARGET_PER_S else "MISS")
    for total in (8 << 20, 32 << 20):
        limits = StreamLimits(total_bytes_max=total)
        mem = memory_with_connections(limits)
        bounded = mem["held_bytes"] <= total
        logger.info("%d connections, total_bytes_max %.0f MiB: %d streams, parsers hold %.1f "
                    "MiB, heap growth %.1f MiB (peak %.1f MiB), %d windows spilled early, "
                    "%d evicted; target: held <= total_bytes_max %s", CONNECTIONS,
                    total / 2**20, mem["streams"], mem["held_bytes"] / 2**20,
                    mem["heap_growth_bytes"] / 2**20, mem["heap_peak_bytes"] / 2**20,
                    mem["spilled_windows"], mem["evicted"], "PASS" if bounded else "MISS")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
