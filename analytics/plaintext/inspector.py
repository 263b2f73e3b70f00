"""One captured TLS write in, findings and audit records out.

The inspector follows each connection (HTTP/1.1 or HTTP/2 state, the host it
talks to) and runs every detector over what the write contains:
canary_token, oauth_token_reuse, bulk_export (plus an audit record per call),
unencrypted_field and model_artifact. The plaintext is only read here; the
results carry finding types, offsets, keyed hashes and masked excerpts.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from leaktap.analytics.alerts import Finding
from leaktap.analytics.plaintext import artifacts, bulk, credentials
from leaktap.analytics.plaintext.canary import CanaryMatcher
from leaktap.analytics.plaintext.fields import FieldPolicy
from leaktap.analytics.plaintext.http import BodyChunk, HttpConnection, Request
from leaktap.analytics.plaintext.redact import KeyedHasher, dedup_key, mask_token

CONNECTIONS_MAX = 8192
# model weights are only looked for in bodies this large (a float run needs volume)
ARTIFACT_MIN_BYTES = 512

HostResolver = Callable[[str], tuple[str, str | None] | None]


@dataclass(frozen=True, slots=True)
class WriteContext:
    """Who wrote and where to, as the controller attributed the write."""

    conn: Hashable  # one TLS connection, e.g. (tgid, ssl pointer)
    tenant: str
    environment: str | None = None
    crm_vendor: str | None = None  # from the joined flow (SNI/DNS), if any
    crm_instance: str | None = None
    destination: str | None = None  # server name, else address:port
    pid: int = 0
    comm: str = ""
    ts: float = field(default_factory=time.time)


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    fields: FieldPolicy = field(default_factory=lambda: FieldPolicy(()))
    allowed_bulk: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class BulkAudit:
    """One bulk-export or mass-operation call, for the audit log."""

    ts: float
    tenant: str
    crm_vendor: str | None
    crm_instance: str | None
    destination: str | None
    operation: str
    action: str
    method: str
    path: str  # without the query string (it may carry tokens)
    request_bytes: int  # Content-Length, else the write's length
    allowed: bool
    protocol: str
    pid: int
    comm: str

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


@dataclass(slots=True)
class Inspection:
    findings: list[Finding] = field(default_factory=list)
    audits: list[BulkAudit] = field(default_factory=list)
    protocol: str = "unknown"
    requests: int = 0
    undecodable_headers: int = 0


@dataclass(slots=True)
class _Connection:
    http: HttpConnection = field(default_factory=HttpConnection)
    host: str | None = None


@dataclass(frozen=True, slots=True)
class _Where:
    crm_vendor: str | None
    crm_instance: str | None
    destination: str | None
    attribution: str  # flow | host | none


class ContentInspector:
    """Runs the detectors; not thread-safe (one drain thread feeds it)."""

    def __init__(
        self,
        hasher: KeyedHasher,
        canaries: CanaryMatcher | None = None,
        policies: Mapping[str, TenantPolicy] | None = None,
        resolve_host: HostResolver | None = None,
        connections_max: int = CONNECTIONS_MAX,
    ) -> None:
        self.hasher = hasher
        self.canaries = canaries or CanaryMatcher()
        self.policies = dict(policies or {})
        self.resolve_host = resolve_host
        self.tokens = credentials.TokenReuseTracker()
        self._conns: OrderedDict[Hashable, _Connection] = OrderedDict()
        self._conns_max = connections_max

    def forget(self, conn: Hashable) -> None:
        self._conns.pop(conn, None)

    def forget_where(self, predicate: Callable[[Hashable], bool]) -> int:
        gone = [k for k in self._conns if predicate(k)]
        for k in gone:
            del self._conns[k]
        return len(gone)

    def _connection(self, key: Hashable) -> _Connection:
        conn = self._conns.get(key)
        if conn is None:
            conn = self._conns[key] = _Connection()
            if len(self._conns) > self._conns_max:
                self._conns.popitem(last=False)
        else:
            self._conns.move_to_end(key)
        return conn

    def _where(self, ctx: WriteContext, host: str | None) -> _Where:
        if ctx.crm_vendor:
            return _Where(ctx.crm_vendor, ctx.crm_instance, ctx.destination, "flow")
        if host and self.resolve_host is not None:
            crm = self.resolve_host(host)
            if crm is not None:
                return _Where(crm[0], crm[1], host, "host")
        return _Where(None, None, ctx.destination or host, "host" if host else "none")

    def inspect(self, ctx: WriteContext, data: bytes, total_len: int) -> Inspection:
        """Scan one write's captured bytes (`total_len` is the whole write's length)."""
        conn = self._connection(ctx.conn)
        parsed = conn.http.feed(data, total_len)
        out = Inspection(protocol=parsed.protocol, requests=len(parsed.requests),
                         undecodable_headers=parsed.undecodable_headers)
        for request in parsed.requests:
            host = request.host
            if host:
                conn.host = host
        where = self._where(ctx, conn.host)
        policy = self.policies.get(ctx.tenant)

        self._canaries(ctx, where, data, parsed.requests, out)
        bodies_by_request: dict[int, list[BodyChunk]] = {}
        for chunk in parsed.bodies:
            bodies_by_request.setdefault(id(chunk.request), []).append(chunk)
        for request in parsed.requests:
            self._credentials(ctx, where, request, out)
            body = b"".join(c.data for c in bodies_by_request.get(id(request), ()))
            self._bulk(ctx, where, request, body, total_len, policy, out)
        for chunk in parsed.bodies:
            if policy is not None and policy.fields:
                self._fields(ctx, where, chunk, policy.fields, out)
            if len(chunk.data) >= ARTIFACT_MIN_BYTES:
                self._artifact(ctx, where, chunk.data, chunk.offset, out)
        if parsed.protocol == "opaque" and len(data) >= ARTIFACT_MIN_BYTES:
            self._artifact(ctx, where, data, 0, out)
        return out

    # -- detectors ---------------------------------------------------------------

    def _finding(self, kind: str, ctx: WriteContext, where: _Where, severity: str, summary: str,
                 key: str, evidence: dict[str, Any]) -> Finding:
        evidence = {"finding": kind, "pid": ctx.pid, "comm": ctx.comm,
                    "attribution": where.attribution, **evidence}
        return Finding(
            kind=kind, tenant=ctx.tenant, severity=severity, summary=summary,
            crm_vendor=where.crm_vendor, crm_instance=where.crm_instance,
            destination=where.destination, ts=ctx.ts, evidence=evidence, dedup_key=key,
        )

    def _canaries(self, ctx: WriteContext, where: _Where, data: bytes,
                  requests: list[Request], out: Inspection) -> None:
        hits = self.canaries.scan(data)
        for request in requests:
            if request.protocol == "h2":  # HPACK may have Huffman-coded the value
                text = "\n".join(f"{k}: {v}" for k, v in request.headers).encode("latin-1")
                hits.extend(self.canaries.scan(text, base_offset=request.offset))
        seen: set[str] = set()
        for hit in hits:
            c = hit.canary
            if c.token in seen:
                continue
            seen.add(c.token)
            out.findings.append(self._finding(
                "canary_token", ctx, where, "critical",
                f"canary {c.label} ({hit.form}) left for {where.destination or 'an unknown host'}",
                dedup_key("canary_token", self.hasher.hash(c.token), ctx.tenant,
                          where.destination or ""),
                {"canary_tenant": c.tenant, "canary_record": c.record,
                 "canary_environment": c.environment, "form": hit.form, "offset": hit.offset,
                 "canary_hash": self.hasher.hash(c.token),
                 "excerpt": f"{hit.form} canary {mask_token(c.token)}"},
            ))

    def _credentials(self, ctx: WriteContext, where: _Where, request: Request,
                     out: Inspection) -> None:
        for cred in credentials.extract_credentials(request, self.hasher):
            reuse = self.tokens.observe(cred.token_hash, ctx.tenant, ctx.environment, ctx.ts)
            if reuse is None:
                continue
            scope = ("tenants" if reuse.first_tenant != reuse.tenant else "environments")
            out.findings.append(self._finding(
                "oauth_token_reuse", ctx, where, "critical",
                f"{cred.kind} token of {reuse.first_tenant}"
                f"{'/' + reuse.first_environment if reuse.first_environment else ''} used by "
                f"{reuse.tenant}{'/' + reuse.environment if reuse.environment else ''} "
                f"(two {scope})",
                dedup_key("oauth_token_reuse", cred.token_hash),
                {"token_hash": cred.token_hash, "token_kind": cred.kind, "source": cred.source,
                 "excerpt": f"{cred.source}: {cred.masked}", "offset": request.offset,
                 "first_tenant": reuse.first_tenant,
                 "first_environment": reuse.first_environment, "first_seen": reuse.first_seen,
                 "environment": reuse.environment, "scope": scope},
            ))

    def _bulk(self, ctx: WriteContext, where: _Where, request: Request, body: bytes,
              total_len: int, policy: TenantPolicy | None, out: Inspection) -> None:
        call = bulk.classify(request, body)
        if call is None:
            return
        allowed_ops = policy.allowed_bulk if policy is not None else ()
        ok = bulk.allowed(call.operation, allowed_ops)
        try:
            size = int(request.header("content-length") or total_len)
        except ValueError:
            size = total_len
        path = request.path.split("?", 1)[0][:512]
        vendor = where.crm_vendor or call.vendor
        out.audits.append(BulkAudit(
            ts=ctx.ts, tenant=ctx.tenant, crm_vendor=vendor, crm_instance=where.crm_instance,
            destination=where.destination, operation=call.operation, action=call.action,
            method=request.method, path=path, request_bytes=size, allowed=ok,
            protocol=request.protocol, pid=ctx.pid, comm=ctx.comm,
        ))
        if ok:
            return
        finding = self._finding(
            "bulk_export", ctx, where, "high",
            f"{call.operation} ({call.action}) by {ctx.tenant} is not an allowed bulk operation",
            dedup_key("bulk_export", ctx.tenant, call.operation, where.destination or ""),
            {"operation": call.operation, "action": call.action, "method": request.method,
             "path": path, "request_bytes": size, "offset": request.offset,
             "allowed_operations": list(allowed_ops)},
        )
        if finding.crm_vendor is None:
            finding.crm_vendor = call.vendor
        out.findings.append(finding)

    def _fields(self, ctx: WriteContext, where: _Where, chunk: BodyChunk, policy: FieldPolicy,
                out: Inspection) -> None:
        hits = policy.scan(chunk.data, chunk.request.content_type, self.hasher)
        reported: set[tuple[str, str]] = set()
        for hit in hits:
            if (hit.field, hit.kind) in reported:
                continue
            reported.add((hit.field, hit.kind))
            offset = chunk.offset + hit.offset if hit.offset >= 0 else chunk.offset
            out.findings.append(self._finding(
                "unencrypted_field", ctx, where, "high",
                f"{hit.field} sent in clear ({hit.kind}) by {ctx.tenant}",
                dedup_key("unencrypted_field", ctx.tenant, hit.field.lower(),
                          where.destination or ""),
                {"field": hit.field, "value_kind": hit.kind, "offset": offset,
                 "value_hash": hit.value_hash, "excerpt": f'"{hit.field}": "{hit.masked}"',
                 "method": chunk.request.method, "path": chunk.request.path.split("?", 1)[0]},
            ))

    def _artifact(self, ctx: WriteContext, where: _Where, data: bytes, base: int,
                  out: Inspection) -> None:
        hit = artifacts.detect(data)
        if hit is None:
            return
        severity = "high" if where.crm_vendor else "medium"
        out.findings.append(self._finding(
            "model_artifact", ctx, where, severity,
            f"{hit.format} model data leaving for {where.destination or 'an unknown host'}",
            dedup_key("model_artifact", ctx.tenant, hit.format, where.destination or ""),
            {"format": hit.format, "detail": hit.detail, "offset": base + hit.offset},
        ))
