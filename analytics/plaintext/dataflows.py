"""The CRM data-flow map: which objects each tenant's processes read and write.

`DataFlowMap` is the `ExchangeSink` the plaintext read side hands every paired
CRM call to (`on_exchange`). Each call is parsed by the vendor's REST grammar
(crm_api) into (object, operation, direction), its records counted (crm_records)
and the classes of data in its fields named (crm_data_classes), then added to
the totals of (tenant, exe, vendor, instance, object, operation, direction):
requests, records, bytes, outcomes by status class, first/last seen, data
classes (plus those the inspector named in the request: "fingerprint:<owner>/<set>"
when a tenant writes its own fingerprinted records to its sanctioned instance) and up
to TEMPLATES_MAX path templates. Totals are held in memory and
written to the store in batches (`flush`, from the agent's poll), never one row
write per call; nothing of a body, a field value or a query-string value is kept.

Findings:
- `crm_admin_action`: a call to an administrative endpoint (users, profiles,
  permission sets, roles, OAuth apps, metadata deploys); high for writes, low
  for reads.
- `new_data_flow`: after an executable's warm-up, a (vendor, object, operation,
  direction) it never touched before (restored from the store at start).
- `crm_access_refused`: `refused_storm_count` answers 401/403 to one process
  within `refused_storm_window_s`.
A call answered 4xx/5xx or not at all is an attempted transfer: an `ExchangeAudit`
for /v1/audit (outcome refused | failed | unanswered), handed to `on_audit` at
once, or to `on_audits` in a batch at each flush (the agent's choice: a refused
storm then costs no database write per call).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from leaktap.analytics.alerts import Finding
from leaktap.analytics.plaintext import crm_api, crm_records
from leaktap.analytics.plaintext.crm_calls import CrmExchange
from leaktap.analytics.plaintext.crm_data_classes import csv_rows, data_classes
from leaktap.analytics.plaintext.redact import dedup_key

logger = logging.getLogger(__name__)

CRM_ADMIN_ACTION = "crm_admin_action"
NEW_DATA_FLOW = "new_data_flow"
CRM_ACCESS_REFUSED = "crm_access_refused"
TEMPLATES_MAX = 4  # distinct path templates kept per data flow
PROCESSES_MAX = 4096  # processes whose refused answers are tracked at once
REFS_MAX = 4096  # Bulk 2.0 jobs and query locators whose object is remembered
# attempted transfers held between flushes; past it (a storm) they are counted, not kept
ATTEMPTS_MAX = 10_000
REFUSED = frozenset({401, 403})
# the bodies parsed for data classes: every call until a flow has seen this many,
# then one in SAMPLE_EVERY (a flow's fields are the same from call to call)
CLASSIFY_FIRST = 32
SAMPLE_EVERY = 16

FlowKey = tuple[str, str, str, str, str, str, str]
# tenant, exe, vendor, instance ('' unknown), object, operation, direction


@dataclass(frozen=True, slots=True)
class DataFlowSettings:
    """plaintext.dataflows in the config."""

    warmup_s: float = 86400.0  # an executable's first day of calls is learned silently
    refused_storm_count: int = 20
    refused_storm_window_s: float = 60.0
    flush_interval_s: float = 10.0
    keys_max: int = 50_000  # data flows held (each a row); past it calls are counted only

    @classmethod
    def from_settings(cls, s: Any) -> DataFlowSettings:
        return cls(warmup_s=s.warmup_s, refused_storm_count=s.refused_storm_count,
                   refused_storm_window_s=s.refused_storm_window_s,
                   flush_interval_s=s.flush_interval_s, keys_max=s.keys_max)


@dataclass(slots=True)
class FlowTotals:
    first_seen: float
    last_seen: float
    requests: int = 0
    records: int = 0
    records_unknown: int = 0
    request_bytes: int = 0
    response_bytes: int = 0
    status: Counter[str] = field(default_factory=Counter)  # 2xx 3xx 4xx 5xx none
    data_classes: set[str] = field(default_factory=set)
    templates: list[str] = field(default_factory=list)

    def row(self, key: FlowKey) -> dict[str, Any]:
        tenant, exe, vendor, instance, obj, operation, direction = key
        return {
            "tenant": tenant, "exe": exe, "crm_vendor": vendor, "crm_instance": instance,
            "object": obj, "operation": operation, "direction": direction,
            "requests": self.requests, "records": self.records,
            "records_unknown": self.records_unknown, "request_bytes": self.request_bytes,
            "response_bytes": self.response_bytes,
            **{f"status_{c}": self.status[c] for c in ("2xx", "3xx", "4xx", "5xx", "none")},
            "data_classes": sorted(self.data_classes), "templates": list(self.templates),
            "first_seen": self.first_seen, "last_seen": self.last_seen,
        }

    @classmethod
    def from_row(cls, r: dict[str, Any]) -> FlowTotals:
        t = cls(first_seen=r["first_seen"], last_seen=r["last_seen"], requests=r["requests"],
                records=r["records"], records_unknown=r["records_unknown"],
                request_bytes=r["request_bytes"], response_bytes=r["response_bytes"],
                data_classes=set(r["data_classes"]), templates=list(r["templates"]))
        for c in ("2xx", "3xx", "4xx", "5xx", "none"):
            t.status[c] = r[f"status_{c}"]
        return t


@dataclass(frozen=True, slots=True)
class ExchangeAudit:
    """An attempted transfer (answered 4xx/5xx or unanswered), for the audit log."""

    ts: float
    tenant: str
    crm_vendor: str | None
    crm_instance: str | None
    destination: str | None
    operation: str  # vendor:operation.object, e.g. salesforce:query.Contact
    action: str  # the outcome again, for readers of the bulk rows' column
    method: str
    path: str  # the path template: no ids, no query values
    request_bytes: int
    allowed: bool
    protocol: str
    pid: int
    comm: str
    status: int | None
    outcome: str  # refused | failed | unanswered

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


def status_class(status: int | None) -> str:
    if status is None:
        return "none"
    if 200 <= status < 300:
        return "2xx"
    if 300 <= status < 400:
        return "3xx"
    if 400 <= status < 500:
        return "4xx"
    return "5xx" if status >= 500 else "2xx"  # 1xx are not final answers


def outcome_of(status: int | None) -> str | None:
    """refused (401/403) | failed (other 4xx, 5xx) | unanswered | None (transferred)."""
    if status is None:
        return "unanswered"
    if status in REFUSED:
        return "refused"
    if status >= 400:
        return "failed"
    return None


OnFinding = Callable[[Finding], None]
OnAudit = Callable[[ExchangeAudit], Any]
OnAudits = Callable[[list[ExchangeAudit]], Any]
WriteRows = Callable[[list[dict[str, Any]]], Any]


class DataFlowMap:
    """Aggregates paired CRM calls; `on_exchange` from the drain thread, `flush` and
    `prune` from the poll thread (one lock)."""

    def __init__(self, settings: DataFlowSettings | None = None,
                 on_finding: OnFinding | None = None, on_audit: OnAudit | None = None,
                 write: WriteRows | None = None,
                 clock: Callable[[], float] = time.time,
                 on_audits: OnAudits | None = None) -> None:
        self.settings = settings or DataFlowSettings()
        self.on_finding = on_finding
        self.on_audit = on_audit  # each attempt at once
        self.on_audits = on_audits  # or the attempts in a batch at each flush
        self.write = write
        self.clock = clock
        self.flows: dict[FlowKey, FlowTotals] = {}
        self._dirty: set[FlowKey] = set()
        # (tenant, exe) -> first call; (tenant, exe, vendor, object, operation, direction)
        self._exe_first: dict[tuple[str, str], float] = {}
        self._touched: set[tuple[str, str, str, str, str, str]] = set()
        self._refused: OrderedDict[tuple[str, int], deque[float]] = OrderedDict()
        # (tenant, vendor, instance, job id or query locator) -> the object it is about
        self._refs: OrderedDict[tuple[str, str, str, str], str] = OrderedDict()
        self._attempts: list[ExchangeAudit] = []  # handed to on_audit at each flush
        self._last_flush = clock()
        self._lock = threading.Lock()
        # one flush at a time: an older snapshot must not land after a newer one
        self._flush_lock = threading.Lock()
        self.stats: Counter[str] = Counter()

    # -- state ---------------------------------------------------------------------

    def load(self, rows: Iterable[dict[str, Any]]) -> int:
        """The stored map (Store.dataflows()) as the starting point, so totals go on and
        a restart does not make every flow new."""
        n = 0
        with self._lock:
            for r in rows:
                key: FlowKey = (r["tenant"], r["exe"], r["crm_vendor"], r["crm_instance"] or "",
                                r["object"], r["operation"], r["direction"])
                self.flows[key] = FlowTotals.from_row(r)
                self._learn(key, r["first_seen"])
                n += 1
        return n

    def _learn(self, key: FlowKey, first_seen: float) -> None:
        tenant, exe, vendor, _, obj, operation, direction = key
        exe_key = (tenant, exe)
        if first_seen < self._exe_first.get(exe_key, float("inf")):
            self._exe_first[exe_key] = first_seen
        self._touched.add((tenant, exe, vendor, obj, operation, direction))

    def rows(self) -> list[dict[str, Any]]:
        with self._lock:
            return [t.row(k) for k, t in self.flows.items()]

    def due(self, now: float | None = None) -> bool:
        now = self.clock() if now is None else now
        return now - self._last_flush >= self.settings.flush_interval_s

    def flush(self) -> int:
        """Write the flows changed since the last flush (one transaction)."""
        with self._flush_lock:
            return self._flush()

    def _flush(self) -> int:
        with self._lock:
            rows = [self.flows[k].row(k) for k in self._dirty if k in self.flows]
            self._dirty.clear()
            self._last_flush = self.clock()
            attempts, self._attempts = self._attempts, []
        if attempts and self.on_audits is not None:
            self._deliver(self.on_audits, attempts)
        if rows and self.write is not None:
            try:
                self.write(rows)
            except Exception:
                with self._lock:  # written next time
                    self._dirty.update(
                        (r["tenant"], r["exe"], r["crm_vendor"], r["crm_instance"],
                         r["object"], r["operation"], r["direction"]) for r in rows)
                self.stats["flush_errors"] += 1
                raise
        self.stats["rows_flushed"] += len(rows)
        return len(rows)

    def prune(self, cutoff: float) -> int:
        """Forget flows last seen before `cutoff` (the store prunes its rows alike), and
        what was learned from them: new_data_flow compares with the retained flows."""
        with self._lock:
            old = [k for k, t in self.flows.items() if t.last_seen < cutoff]
            for k in old:
                del self.flows[k]
                self._dirty.discard(k)
            if old:
                self._touched.clear()
                self._exe_first.clear()
                for k, t in self.flows.items():
                    self._learn(k, t.first_seen)
        return len(old)

    # -- input ---------------------------------------------------------------------

    def on_exchange(self, exchange: CrmExchange) -> None:
        x = exchange
        self.stats["exchanges"] += 1
        calls = crm_api.classify(x.vendor, x.method, x.target, x.request_body, self.stats)
        sclass = status_class(x.status)
        with self._lock:
            calls = [self._resolve(x, c) if c.ref and c.object == crm_api.OTHER else c
                     for c in calls]
        answered = sclass == "2xx"
        wants_response = answered and any(not c.write for c in calls)
        response_doc = (crm_records.parse_json(x.response_body)
                        if wants_response and not x.response_truncated else None)
        request_cut = x.request_bytes > len(x.request_body)
        wants_request = any(c.write for c in calls) and bool(x.request_body)
        request_doc = (crm_records.parse_json(x.request_body)
                       if wants_request and not request_cut else None)
        if (response_doc is None and answered and not x.response_truncated
                and any(c.operation in (crm_api.BULK, crm_api.ADMIN) for c in calls)
                and len(x.response_body) <= 65536):
            response_doc = crm_records.parse_json(x.response_body)  # a job's id and object
        findings: list[Finding] = []
        instance = x.instance or ""
        with self._lock:
            exe_key = (x.tenant, x.exe)
            exe_first = self._exe_first.setdefault(exe_key, x.ts)
            warm = x.ts - exe_first >= self.settings.warmup_s
            single = len(calls) == 1
            for call in calls:
                key: FlowKey = (x.tenant, x.exe, x.vendor, instance, call.object,
                                call.operation, call.direction)
                totals = self.flows.get(key)
                if totals is None:
                    if len(self.flows) >= self.settings.keys_max:
                        self.stats["dropped_keys_over_bound"] += 1
                        continue
                    totals = self.flows[key] = FlowTotals(first_seen=x.ts, last_seen=x.ts)
                    self.stats["flows_new"] += 1
                self._add(x, call, totals, sclass, single, request_doc, response_doc,
                          request_cut)
                self._dirty.add(key)
                touched = (x.tenant, x.exe, x.vendor, call.object, call.operation,
                           call.direction)
                if touched not in self._touched:
                    self._touched.add(touched)
                    if warm and call.operation != crm_api.ADMIN:
                        findings.append(self._new_flow(x, call, exe_first))
                if call.operation == crm_api.ADMIN:
                    findings.append(self._admin(x, call))
            if answered and isinstance(response_doc, dict):
                self._remember_refs(x, calls, response_doc)
            if x.status in REFUSED:
                storm = self._refused_storm(x, calls[0])
                if storm is not None:
                    findings.append(storm)
        outcome = outcome_of(x.status)
        if outcome is not None and self.on_audits is not None:
            attempt = self._attempt(x, calls[0], outcome)
            with self._lock:
                if len(self._attempts) < ATTEMPTS_MAX:
                    self._attempts.append(attempt)
                else:
                    self.stats["attempts_dropped_over_bound"] += 1
        elif outcome is not None and self.on_audit is not None:
            self._deliver(self.on_audit, self._attempt(x, calls[0], outcome))
        for f in findings:
            self.stats[f"finding_{f.kind}"] += 1
            if self.on_finding is not None:
                self._deliver(self.on_finding, f)

    def _add(self, x: CrmExchange, call: crm_api.ApiCall, totals: FlowTotals, sclass: str,
             single: bool, request_doc: Any, response_doc: Any, request_cut: bool) -> None:
        totals.requests += 1
        totals.last_seen = max(totals.last_seen, x.ts)
        totals.first_seen = min(totals.first_seen, x.ts)
        totals.status[sclass] += 1
        if single:  # a composite call's bytes are the call's, not one sub-request's
            totals.request_bytes += x.request_bytes
            totals.response_bytes += x.response_bytes
        if call.template not in totals.templates and len(totals.templates) < TEMPLATES_MAX:
            totals.templates.append(call.template)
        if sclass != "2xx":
            return  # nothing transferred (refused, failed, unanswered): outcomes say so
        if x.data_classes and (call.write or single):
            totals.data_classes |= x.data_classes  # named by the inspector, every call
        count: crm_records.Count = crm_records.UNKNOWN
        doc: Any = request_doc if call.write else response_doc
        if call.records is not None:  # counted by the grammar (composite bodies, job calls)
            count = crm_records.Count(call.records)
        elif call.write and single:
            count = crm_records.count_request(x.vendor, x.method, x.request_body, request_cut,
                                              request_doc)
        elif single:
            count = crm_records.count_response(x.vendor, x.response_body,
                                               x.response_truncated, response_doc)
        if count.records is not None:
            totals.records += count.records
            if count.partial:
                self.stats["records_partial"] += 1
        else:
            totals.records_unknown += 1
        if doc is None and single:  # CSV (Bulk uploads and results): the first rows
            body = x.request_body if call.write else x.response_body
            doc = csv_rows(body) if body[:1] not in (b"{", b"[", b"") else None
        if doc is not None and (totals.requests <= CLASSIFY_FIRST
                                or totals.requests % SAMPLE_EVERY == 0):
            totals.data_classes |= data_classes(doc)

    # -- calls that continue an earlier one ---------------------------------------

    def _resolve(self, x: CrmExchange, call: crm_api.ApiCall) -> crm_api.ApiCall:
        """A job's upload or results, a query's next page: the object of the call that
        started it, when this map saw that call."""
        obj = self._refs.get((x.tenant, x.vendor, x.instance or "", call.ref or ""))
        if obj is None:
            self.stats["refs_unknown"] += 1
            return call
        operation = crm_api.ADMIN if obj.lower() in crm_api.SF_ADMIN else call.operation
        return dataclasses.replace(call, object=obj, operation=operation)

    def _remember_refs(self, x: CrmExchange, calls: list[crm_api.ApiCall],
                       doc: dict[str, Any]) -> None:
        for call in calls[:1]:
            ref, obj = None, None
            if call.operation in (crm_api.BULK, crm_api.ADMIN) and isinstance(
                    doc.get("id"), str) and isinstance(doc.get("object"), str):
                ref, obj = doc["id"], crm_api.sf_object(doc["object"])  # Bulk 2.0 job info
            elif isinstance(doc.get("nextRecordsUrl"), str) and call.object != crm_api.OTHER:
                ref = doc["nextRecordsUrl"].rstrip("/").rsplit("/", 1)[-1].split("-", 1)[0]
                obj = call.object
            if ref and obj and obj != crm_api.OTHER:
                key = (x.tenant, x.vendor, x.instance or "", ref[:64])
                self._refs[key] = obj
                self._refs.move_to_end(key)
                if len(self._refs) > REFS_MAX:
                    self._refs.popitem(last=False)

    # -- findings ------------------------------------------------------------------

    @staticmethod
    def _process(x: CrmExchange) -> str:
        return os.path.basename(x.exe) or f"pid {x.pid}"

    def _finding(self, kind: str, x: CrmExchange, severity: str, summary: str, key: str,
                 evidence: dict[str, Any]) -> Finding:
        return Finding(
            kind=kind, tenant=x.tenant, severity=severity, summary=summary,
            crm_vendor=x.vendor, crm_instance=x.instance, destination=x.host, ts=x.ts,
            evidence={"finding": kind, "pid": x.pid, "exe": x.exe, **evidence},
            dedup_key=key,
        )

    def _admin(self, x: CrmExchange, call: crm_api.ApiCall) -> Finding:
        access = "write" if call.write else "read"
        return self._finding(
            CRM_ADMIN_ACTION, x, "high" if call.write else "low",
            f"{self._process(x)} of {x.tenant} {'changed' if call.write else 'read'} "
            f"{x.vendor} {call.object} ({x.method} {call.template})",
            dedup_key(CRM_ADMIN_ACTION, x.tenant, x.exe, x.vendor, x.instance or "",
                      call.object, access),
            {"object": call.object, "access": access, "method": x.method,
             "path": call.template, "status": x.status,
             "outcome": outcome_of(x.status) or "completed"},
        )

    def _new_flow(self, x: CrmExchange, call: crm_api.ApiCall, exe_first: float) -> Finding:
        verb = "writing" if call.write else "reading"
        since = time.strftime("%Y-%m-%d", time.gmtime(exe_first))
        return self._finding(
            NEW_DATA_FLOW, x, "medium",
            f"{self._process(x)} of {x.tenant} started {verb} {x.vendor} {call.object} "
            f"({call.operation}), not touched since it was first seen ({since})",
            dedup_key(NEW_DATA_FLOW, x.tenant, x.exe, x.vendor, call.object, call.operation,
                      call.direction),
            {"object": call.object, "operation": call.operation, "direction": call.direction,
             "method": x.method, "path": call.template, "status": x.status,
             "process_first_seen": exe_first},
        )

    def _refused_storm(self, x: CrmExchange, call: crm_api.ApiCall) -> Finding | None:
        s = self.settings
        key = (x.tenant, x.pid)
        times = self._refused.get(key)
        if times is None:
            times = self._refused[key] = deque(maxlen=max(s.refused_storm_count, 1))
            if len(self._refused) > PROCESSES_MAX:
                self._refused.popitem(last=False)
        else:
            self._refused.move_to_end(key)
        times.append(x.ts)
        if len(times) < s.refused_storm_count or x.ts - times[0] > s.refused_storm_window_s:
            return None
        span = x.ts - times[0]
        times.clear()  # the next storm counts afresh; the alert lifecycle joins repeats
        return self._finding(
            CRM_ACCESS_REFUSED, x, "high",
            f"{self._process(x)} of {x.tenant} refused {s.refused_storm_count} times by "
            f"{x.vendor} within {span:.0f} s (last: {call.object} {call.operation})",
            dedup_key(CRM_ACCESS_REFUSED, x.tenant, x.exe, x.vendor, x.instance or ""),
            {"refused": s.refused_storm_count, "window_s": s.refused_storm_window_s,
             "span_s": span, "last_status": x.status, "last_object": call.object,
             "last_operation": call.operation, "last_path": call.template},
        )

    def _attempt(self, x: CrmExchange, call: crm_api.ApiCall, outcome: str) -> ExchangeAudit:
        return ExchangeAudit(
            ts=x.ts, tenant=x.tenant, crm_vendor=x.vendor, crm_instance=x.instance,
            destination=x.host, operation=f"{x.vendor}:{call.operation}.{call.object}",
            action=outcome, method=x.method, path=call.template,
            request_bytes=x.request_bytes, allowed=False, protocol="https", pid=x.pid,
            comm=self._process(x)[:64], status=x.status, outcome=outcome,
        )

    def _deliver(self, callback: Callable[[Any], None], item: Any) -> None:
        try:
            callback(item)
        except Exception:  # noqa: BLE001 - a failing sink must not stop the map
            self.stats["callback_errors"] += 1
            logger.exception("delivering a data-flow %s", type(item).__name__)
