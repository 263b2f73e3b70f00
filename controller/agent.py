"""`leaktap run`: the agent.

Loads the programs of its mode (TC on a node, XDP on a gateway; maps pinned so
a restart resumes counting), attaches them to the watched interfaces, drains
the ring buffer on a thread and the flow map once a second into
conversations, minute buckets and the database, feeds the detectors and the
alert pipeline, and serves the API. SIGTERM and Ctrl-C detach every probe
(uvicorn turns both into a lifespan shutdown).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import ipaddress
import logging
import os
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from leaktap.analytics.alerts import AlertManager, SinkRoute
from leaktap.analytics.incidents import UNSANCTIONED_DESTINATION
from leaktap.analytics.outbox import OutboxDispatcher
from leaktap.analytics.sinks import SinkConfigError, build_sink
from leaktap.controller.attribution.attributor import Attributor
from leaktap.controller.attribution.flows import (
    FF_SYN,
    NO_UID,
    Conversation,
    ConversationTable,
    conversation_id,
)
from leaktap.controller.attribution.live import (
    LiveConversations,
    NameSets,
    TrackedAttributor,
    destination_of,
)
from leaktap.controller.attribution.losses import UserspaceLossMonitor
from leaktap.controller.attribution.resume import ResumableFlows
from leaktap.controller.attribution.tenants import TenantResolver
from leaktap.controller.config import (
    DEFAULT_DB,
    LeaktapConfig,
    TlsConfig,
    load_config,
    parse_listen,
    with_database,
)
from leaktap.controller.detection import LiveDetection
from leaktap.controller.enforcement.enforcer import Enforcement
from leaktap.controller.errors import ConfigError
from leaktap.controller.kernel import loader
from leaktap.controller.kernel.cgroups import CgroupAccounting, CgroupReaper, cgroup_ids
from leaktap.controller.kernel.flow_batch import FlowBatch, FlowDrain
from leaktap.controller.kernel.hostfs import find_cgroup2_mount
from leaktap.controller.kernel.loss import LossMonitor
from leaktap.controller.kernel.maps import FlowCounters, MapReader
from leaktap.controller.kernel.ringbuf import RingDrainer, Sample
from leaktap.controller.series import OTHER, SeriesCap
from leaktap.controller.storage import BucketKey, StorageError, Store, Volume, minute_of

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 1.0
# conversations idle this long leave memory (their row stays in the database)
CONVERSATION_IDLE_S = 300.0
PRUNE_EVERY_S = 3600.0
# (tenant, vendor, instance) label sets of the egress metrics; later ones count as other
EGRESS_SERIES_MAX = 1000
OTHER_DESTINATION = (OTHER, OTHER, OTHER)
# a ClientHello still incomplete after this long will not complete
HELLO_MAX_AGE_S = 10.0
# polls a new TCP conversation's volume waits for its server name before it is
# attributed by DNS alone (its hello may still be in the ring buffer)
NAMING_WAIT_POLLS = 2
# flow rows written per transaction (bounds a poll's transient memory, see _write)
FLOW_WRITE_CHUNK = 2048
# flow rows whose counters a poll of the poll loop refreshes, least recently written
# first (new and renamed rows are always written): 100,000 busy conversations would
# cost 0.3-1.5 s of SQLite a second (the last_seen index); with this, each row is at
# most 10 s behind at that load. An explicit or final poll writes every row
FLOW_ROW_UPDATES_PER_POLL = 10_000
IPPROTO_TCP = 6
# drained rows folded into the conversations at a time (bounds a poll's numpy temporaries)
POLL_SLICE_ROWS = 16384
# "columns" (numpy, controller/attribution/live.py) or "objects" (the earlier drain,
# one ConversationTable object per conversation: kept for perf/bench_agent_memory's
# before/after)
FLOW_DRAIN_ENV = "LT_FLOW_DRAIN"


def default_route_interface(route_file: Path = Path("/proc/net/route")) -> str:
    """The interface of the IPv4 default route (the uplink to watch by default)."""
    try:
        for line in route_file.read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) > 2 and fields[1] == "00000000":
                return fields[0]
    except OSError as e:
        raise ConfigError(f"cannot read {route_file}: {e}") from e
    raise ConfigError("no default route: name the interface to watch with --iface")


class Agent:
    """The running monitor: probes, drains, conversations and counters."""

    def __init__(
        self, config: LeaktapConfig, interfaces: list[str], store: Store, pin: bool = True
    ) -> None:
        if not interfaces:
            raise ConfigError("no interface to watch")
        self.config = config
        self.config_tenant_names = {t.name for t in config.tenants}
        self.store = store
        self.interfaces = interfaces
        self.pin = pin
        inside = config.inside if config.mode == "xdp" else None
        self.columnar = os.environ.get(FLOW_DRAIN_ENV, "columns") != "objects"
        self.table: Any = LiveConversations(inside) if self.columnar else ConversationTable(
            inside)
        self.flow_drain: FlowDrain | None = None  # set at start (columns)
        self.name_sets = NameSets()
        # rows of conversations waiting for a server name: (slot, sent by a, bytes, packets,
        # polls waited)
        self._unnamed_rows: list[tuple[int, bool, int, int, int]] = []
        self.lock = threading.Lock()
        self.loss = LossMonitor()
        self.userspace_loss = UserspaceLossMonitor()
        self.stats: dict[str, int] = {}
        self.totals: dict[int, tuple[int, int]] = {}
        self.cgroup_totals: dict[int, tuple[int, int]] = {}
        self.attributed_bytes = 0
        self.flow_entries_drained = 0  # kernel flow entries taken by the polls
        # (tenant, vendor, instance) -> (bytes, packets) out since start, for /metrics;
        # replaced, never mutated, so readers need no lock
        self.egress_by_destination: dict[tuple[str, str, str], tuple[int, int]] = {}
        self.egress_series: SeriesCap[tuple[str, str, str]] = SeriesCap(EGRESS_SERIES_MAX)
        # per-cgroup egress for /metrics: vanished cgroups reaped (set at start)
        self.cgroup_accounting = CgroupAccounting(None)
        self.alerts: AlertManager | None = None
        self.detection: LiveDetection | None = None
        self.plaintext: Any = None  # PlaintextMonitor when plaintext.enabled
        self.fingerprints: Any = None  # FingerprintWatcher, with plaintext
        self.dataflows: Any = None  # DataFlowMap of paired CRM calls, with plaintext
        self.coverage: Any = None  # CoverageTracker: who talks to CRMs, inspected or not
        self.outbox: OutboxDispatcher | None = None
        # opt-in per tenant (tenants[].enforce); reloaded with SIGHUP / POST /v1/config/reload
        self.enforcement: Enforcement | None = None
        self.config_path: str | None = None  # the file a reload re-reads
        self._baseline_totals = 0
        self._baseline_attributed = 0
        self.last_poll_monotonic = 0.0
        self._last_prune = 0.0
        self._last_hello_expiry = 0.0
        self._unnamed: list[tuple[Conversation, FlowCounters, int]] = []
        # flow rows of conversations open when the previous run stopped (set at start)
        self.resumable = ResumableFlows([], CONVERSATION_IDLE_S)
        self.started_monotonic = 0.0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._exit = contextlib.ExitStack()
        self.probes: Any = None
        self.attached = False

    # -- lifecycle ---------------------------------------------------------------

    def load_probes(self) -> None:
        """Compile (in a short-lived child) and load the programs; start() does it if needed.

        `leaktap run` calls it before serving, so a failure is one line and exit 2."""
        if self.probes is not None:
            return
        k = self.config.kernel
        options = loader.KernelOptions(
            flows_max=k.flows_max,
            ringbuf_pages=k.ringbuf_pages,
            hello_segs_max=k.hello_segments_max,
            dedup=self.config.mode == "xdp" and self.config.dedup,
            pin=self.pin,
            pin_root=k.pin_root or str(loader.PIN_ROOT),
        )
        self.probes = loader.load(self.config.mode, options)
        self._exit.callback(self.probes.close)

    def start(self) -> None:
        self._start_alerting()
        self._start_detection()
        self.load_probes()
        # runs after the detach, before the close: counts since the last poll are kept
        self._exit.callback(self._final_poll)
        self.reader = MapReader(self.probes)
        if self.columnar:
            self.flow_drain = FlowDrain(self.probes.table("lt_flows"), _front_cache(self.probes))
        cgroup_mount = find_cgroup2_mount()
        self.attributor = (TrackedAttributor if self.columnar else Attributor)(
            self.config, cgroup_mount=cgroup_mount)
        # a plaintext write before the poll drains its hello's name reads it in place
        self.attributor.peek_kernel_name = self.reader.peek_name
        if cgroup_mount is not None:
            self.cgroup_accounting = CgroupAccounting(
                CgroupReaper(lambda: cgroup_ids(cgroup_mount)))
        self.drainer = RingDrainer(self.probes, self._on_sample)
        self._start_enforcement(cgroup_mount)
        self._track_dns_learning()
        self.resumable = ResumableFlows(
            self.store.live_flows(time.time() - CONVERSATION_IDLE_S), CONVERSATION_IDLE_S)
        self._start_plaintext()
        self._start_coverage()
        # volume counted before this start (pinned maps of a previous run) is
        # not ours to call unattributed; flows left in the map are, and are drained now
        self._baseline_totals = self._all_totals(self.reader.totals())
        self.poll_once()
        self._baseline_attributed = self.attributed_bytes
        self._exit.enter_context(loader.attached(self.probes, self.interfaces))
        self.attached = True
        self._exit.callback(self._mark_detached)
        self.drainer.start()
        self._exit.callback(self.drainer.stop)
        poller = threading.Thread(target=self._poll_loop, name="lt-poll", daemon=True)
        poller.start()
        self._threads.append(poller)
        self.started_monotonic = time.monotonic()
        logger.info("watching %s", ", ".join(self.interfaces))

    def _start_alerting(self) -> None:
        """The alert lifecycle and the outbox dispatcher, stopped last (after the final poll)."""
        try:
            sinks = [build_sink(s) for s in self.config.sinks]
        except SinkConfigError as e:
            raise ConfigError(f"sinks: {e}") from e
        self.outbox = OutboxDispatcher(self.store.path, sinks, self.config.alerts.outbox)
        self.alerts = AlertManager(
            self.store.path,
            [SinkRoute(s.sink_name, s.min_severity) for s in self.config.sinks],
            self.config.alerts,
            environment=self.config.environment,
            on_change=self.outbox.notify,
        )
        self.outbox.start()
        self._exit.callback(self._stop_alerting)

    def _start_detection(self) -> None:
        """The streaming detector, warmed with the stored minutes, fed each poll."""
        self.detection = LiveDetection(self.config, self.store, self._on_incident)
        self.detection.warm_start(time.time())
        self.detection.start()
        self._exit.callback(self.detection.stop)

    def _on_incident(self, incident: Any) -> None:
        if getattr(incident, "kind", None) == UNSANCTIONED_DESTINATION:
            # what enforcement did about it: blocked | would_block | observed
            evidence = incident.evidence
            if "action" not in evidence:
                evidence["action"] = self.enforcement.action_for(
                    incident.tenant, incident.crm_vendor, incident.crm_instance,
                ) if self.enforcement is not None else "observed"
        if self.alerts is not None:
            self.alerts.record(incident)

    def _start_enforcement(self, cgroup_mount: Path | None) -> None:
        """The kernel policy in the maps and the connect programs attached before the
        probes attach (no packet goes unjudged); stopped with the probes (fail open)."""
        self.enforcement = Enforcement(
            self.config, self.store.path, cgroup_mount, self.attributor.cgroups.path,
            self._on_incident, self.config.kernel.pin_root or str(loader.PIN_ROOT),
        )
        self._exit.callback(self.enforcement.stop)
        self.enforcement.start(self.probes, self.drainer)
        enforcement, dns = self.enforcement, self.attributor.dns
        # under the agent's lock (on_sample): the answer's address judged at once
        dns.on_learn = lambda ip, _names: enforcement.on_dns_learned(ip, dns.bindings_of(ip))

    def _dns_bindings(self) -> dict[str, list[tuple[str, ...]]]:
        with self.lock:
            return self.attributor.dns.live_bindings()

    def reload_config(self) -> dict[str, Any]:
        """Re-read the config file: tenants, allow lists and enforcement change in the
        running agent (probes and counts stay). ConfigError: nothing changed."""
        if self.config_path is None:
            raise ConfigError("no configuration file to reload (leaktap run without --config)")
        new = load_config(self.config_path)
        summary = reload_summary(self.config, new)
        config = self.config.model_copy(
            update={"tenants": new.tenants, "enforcement": new.enforcement})
        with self.lock:
            bindings = self.attributor.dns.live_bindings()
        if self.enforcement is not None:
            self.enforcement.reload(config, bindings)  # raises before changing anything
        with self.lock:
            self.config = config
            self.config_tenant_names = {t.name for t in config.tenants}
            self.attributor.tenants = TenantResolver(config.tenants)
            if self.columnar:
                self.table.forget_names()
        if self.detection is not None:
            self.detection.set_allow({t.name: frozenset(t.allow) for t in config.tenants})
        if self.fingerprints is not None:
            self.plaintext.inspector.fingerprints.allow = {
                t.name: tuple(t.allow) for t in config.tenants}
        logger.info("configuration reloaded from %s: %s", self.config_path, summary)
        return summary

    def _start_plaintext(self) -> None:
        """TLS plaintext inspection of the selected processes, when enabled."""
        if not self.config.plaintext.enabled:
            return
        from leaktap.controller.plaintext.monitor import PlaintextMonitor

        self.plaintext = PlaintextMonitor(
            self.config, self.attributor, on_finding=self._on_incident,
            on_audit=lambda call: self.store.add_audit_call(call.as_dict()),
        )
        self.restore_canaries()
        self._watch_fingerprints()
        self._start_dataflows()
        self.plaintext.start()
        self._exit.callback(self.plaintext.stop)

    def _start_coverage(self) -> None:
        """The coverage report (/v1/coverage): owners of CRM connections and their TLS."""
        from leaktap.controller.plaintext.coverage import CoverageTracker

        self.coverage = CoverageTracker(self.plaintext).start()
        self._exit.callback(self.coverage.stop)

    def _start_dataflows(self) -> None:
        """The CRM data-flow map (issue 14): the plaintext read side hands each paired
        request and response to every sink in `inspector.exchange_sinks` (on_exchange).
        The map resumes from the stored rows (totals go on, known flows stay known) and
        is written on the polls past plaintext.dataflows.flush_interval_s, and at stop
        (the callback runs after the monitor's stop: no call is lost in between)."""
        from leaktap.analytics.plaintext.dataflows import DataFlowMap, DataFlowSettings

        settings = DataFlowSettings.from_settings(self.config.plaintext.dataflows)
        self.dataflows = DataFlowMap(
            settings, on_finding=self._on_incident,
            on_audits=lambda calls: self.store.add_audit_calls([c.as_dict() for c in calls]),
            write=self.store.put_dataflows)
        self.dataflows.load(self.store.dataflows(
            since=time.time() - self.store.retention_s, limit=settings.keys_max))
        sinks = getattr(self.plaintext.inspector, "exchange_sinks", None)
        if sinks is not None:  # the read side pairs requests with responses
            sinks.append(self.dataflows)
        self._exit.callback(self._flush_dataflows)

    def _flush_dataflows(self) -> None:
        try:
            self.dataflows.flush()
        except Exception:  # noqa: BLE001 - kept in memory, written on a later poll
            logger.exception("writing the data-flow map")

    def _watch_fingerprints(self) -> None:
        """Fingerprint sets (leaktap fingerprint add, POST /v1/fingerprints) are
        reloaded within a second of a change to the store."""
        from leaktap.controller.fingerprint_store import FingerprintWatcher

        matcher = self.plaintext.inspector.fingerprints
        # a set's owner writing to its own sanctioned instance is no alert
        matcher.allow = {t.name: tuple(t.allow) for t in self.config.tenants}
        self.fingerprints = FingerprintWatcher(self.store.path, matcher).start()
        self._exit.callback(self.fingerprints.stop)

    def restore_canaries(self) -> int:
        """Canaries registered through the API in earlier runs watch again."""
        stored = self.store.canaries()
        for c in stored:
            self.plaintext.add_canary(c["token"], c["tenant"], c["record"], c["environment"])
        return len(stored)

    def _stop_alerting(self) -> None:
        if self.outbox is not None:
            self.outbox.stop()
        if self.alerts is not None:
            self.alerts.close()

    def _final_poll(self) -> None:
        try:
            self.poll_once(final=True)
        except Exception:  # noqa: BLE001 - stopping anyway; pinned maps keep the rest
            logger.exception("final poll")

    def _mark_detached(self) -> None:
        self.attached = False

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        self._exit.close()  # stops the drain, detaches, closes the programs
        logger.info("detached from %s", ", ".join(self.interfaces))

    # -- work --------------------------------------------------------------------

    def _on_sample(self, sample: Sample) -> None:
        with self.lock:
            self.attributor.on_sample(sample)

    def _poll_loop(self) -> None:
        # one poll a second, counted from the start of the previous one: a poll taking
        # 0.6 s must not stretch the period to 1.6 s (each drain would then take more
        # entries than a second makes and the drain rate would fall behind)
        next_poll = time.monotonic() + POLL_INTERVAL_S
        while not self._stop.wait(max(0.0, next_poll - time.monotonic())):
            next_poll = max(next_poll + POLL_INTERVAL_S, time.monotonic())
            try:
                self.poll_once(row_budget=FLOW_ROW_UPDATES_PER_POLL)
            except Exception:  # noqa: BLE001 - keep polling; the error is logged
                logger.exception("polling the kernel maps")
            _return_freed_heap()
            try:
                if self.alerts is not None:
                    self.alerts.tick()
            except Exception:  # noqa: BLE001 - as above
                logger.exception("auto-resolving alerts")

    @staticmethod
    def _all_totals(totals: dict[int, tuple[int, int]]) -> int:
        return sum(b for b, _ in totals.values())

    def poll_once(self, final: bool = False, row_budget: int | None = None) -> None:
        """Drain the flow map into conversations, minute buckets and the database.

        `final`: the last poll before stopping attributes everything, waiting for nothing.
        `row_budget`: flow rows whose counters are refreshed at most (None: all)."""
        if self.columnar:
            self._poll_columns(final, row_budget)
            return
        flows = self.reader.drain_flows()
        # server names the kernel read (issue 12): in batches, after the flows they name
        kernel_names = self.reader.drain_name_rows()
        stats, totals, cgroups = self._read_totals()
        now = time.time()
        with self.lock:
            buckets: dict[BucketKey, Volume] = {}
            touched: dict[int, Conversation] = {}
            egress = dict(self.egress_by_destination)
            minute = minute_of(now)
            pending, self._unnamed = self._unnamed, []
            self.attributor.on_kernel_names(kernel_names)
            for counters in flows:
                self._resume(counters, now)
                conv = self.table.add(counters)
                touched[id(conv)] = conv
                self.attributed_bytes += counters.tx_bytes
                self.flow_entries_drained += 1
                pending.append((conv, counters, 0))
            for conv, counters, polls in pending:
                names = self.attributor.names(conv)
                if not final and polls < NAMING_WAIT_POLLS and self._awaiting_hello(conv, names):
                    # its server name is a poll away: attributing by DNS now could
                    # name another instance behind the same address
                    self._unnamed.append((conv, counters, polls + 1))
                    continue
                conv.named = True
                outbound = conv.is_outbound(counters.key)
                local, far, _, _ = conv.oriented(prefer_local=True)
                destination = destination_of(names, far[0])
                self._add_volume(buckets, egress, minute, names, destination, outbound,
                                 counters.tx_bytes, counters.tx_packets)
                if outbound and names.crm_vendor and self.coverage is not None and (
                        counters.tx_bytes):
                    self.coverage.observe(conv.family, local, far, names.crm_vendor,
                                          names.crm_instance, names.tenant, names.cgroup,
                                          counters.tx_bytes)
            self.stats, self.totals, self.cgroup_totals = stats, totals, cgroups
            self.egress_by_destination = egress
        self._write(buckets, list(touched.values()))
        del flows, touched, pending  # a poll of 100,000 flows: free them before scoring
        self._finish_poll(buckets, stats, now)

    def _read_totals(self) -> tuple[dict[str, int], dict[int, tuple[int, int]],
                                    dict[int, tuple[int, int]]]:
        """The kernel's stats, its totals by direction and the cgroup totals (the
        reaper's removals folded in), read after a drain of the flows."""
        stats = self.reader.stats()
        totals = self.reader.totals()
        cgroups = self.cgroup_accounting.update(self.reader.cgroup_totals(),
                                                self.reader.remove_cgroups)
        return stats, totals, cgroups

    def _finish_poll(self, buckets: dict[BucketKey, Volume], stats: dict[str, int],
                     now: float) -> None:
        """What follows the flow drain: scoring, expiry, losses, enforcement, pruning."""
        if self.detection is not None:
            self.detection.add(buckets, now)
        if self.plaintext is not None:
            self.plaintext.check_loss()
        if self.dataflows is not None and self.dataflows.due(now):
            self._flush_dataflows()
        with self.lock:
            idle = time.monotonic_ns() - int(CONVERSATION_IDLE_S * 1e9)
            for conv in self.table.expire(idle):
                self.attributor.forget(conv)
            if self.resumable:
                self.resumable.expire(now)
            self.last_poll_monotonic = time.monotonic()
        self.loss.check(stats)
        self.userspace_loss.check(self.attributor)
        if self.enforcement is not None:
            self.enforcement.poll(self._dns_bindings)
        if now - self._last_hello_expiry > HELLO_MAX_AGE_S:
            self._last_hello_expiry = now
            stale = self.reader.expire_hellos(int(HELLO_MAX_AGE_S * 1e9))
            if stale:
                logger.info("dropped %d ClientHello(s) never completed within %.0f s",
                            stale, HELLO_MAX_AGE_S)
        if now - self._last_prune > PRUNE_EVERY_S:
            self._last_prune = now
            self.store.prune(now)
            if self.columnar:
                with self.lock:
                    self.name_sets.compact(self.table.cols["names_id"],
                                           self.table.cols["row_names_id"])
            if self.dataflows is not None:
                self.dataflows.prune(now - self.store.retention_s)
            if self.enforcement is not None:
                self.enforcement.log.prune(now - self.store.retention_s)
            if self.alerts is not None:
                self.alerts.prune(now - self.store.retention_s)

    # -- the columnar flow drain (issue 16.5) -------------------------------------

    def _track_dns_learning(self) -> None:
        """Conversations with an address DNS just named are named again (TrackedAttributor)."""
        tracked = getattr(self.attributor, "dns_learned", None)
        if tracked is None:
            return
        dns = self.attributor.dns
        previous = dns.on_learn

        def learned(ip: str, names: tuple[str, ...]) -> None:
            tracked(ip)
            if previous is not None:
                previous(ip, names)

        dns.on_learn = learned

    def _poll_columns(self, final: bool, row_budget: int | None) -> None:
        """poll_once with the flow map drained into columns (LiveConversations): objects
        are made only for new conversations, those waiting for a name and those whose
        names may have changed; everything else is folded in with array operations."""
        # the flow map is read chunk by chunk as it is folded in (never held whole),
        # after the server names the kernel read (a hello names its flow in this poll)
        parts: Iterator[FlowBatch] = self.flow_drain.chunks() if self.flow_drain else iter(
            [FlowBatch.from_counters(self.reader.drain_flows())])
        kernel_names = self.reader.drain_name_rows()
        now = time.time()
        buckets: dict[BucketKey, Volume] = {}
        with self.lock:
            egress = dict(self.egress_by_destination)
            minute = minute_of(now)
            self.attributor.on_kernel_names(kernel_names)
            waiting: list[tuple[Any, ...]] = []
            for part in parts:
                for start in range(0, len(part), POLL_SLICE_ROWS):  # bounded temporaries
                    waiting.append(self._fold(part.rows(start, start + POLL_SLICE_ROWS), now,
                                              minute, buckets, egress))
            pending, self._unnamed_rows = self._unnamed_rows, []
            self._attribute_pending(pending, final, minute, buckets, egress)
            # rows of conversations not named yet (new ones), a chunk of objects at a time
            for slots, sent_by_a, nbytes, npackets in waiting:
                for start in range(0, len(slots), FLOW_WRITE_CHUNK):
                    rows = slice(start, start + FLOW_WRITE_CHUNK)
                    self._attribute_pending(list(zip(
                        slots[rows].tolist(), sent_by_a[rows].tolist(),
                        nbytes[rows].tolist(), npackets[rows].tolist(),
                        [0] * len(slots[rows]), strict=True)), final, minute, buckets, egress)
            del waiting
        # read after the flows: what they counted is in these totals
        stats, totals, cgroups = self._read_totals()
        with self.lock:
            self.stats, self.totals, self.cgroup_totals = stats, totals, cgroups
            self.egress_by_destination = egress
        self._write_columns(buckets, row_budget)
        self._finish_poll(buckets, stats, now)

    def _fold(self, batch: FlowBatch, now: float, minute: int,
              buckets: dict[BucketKey, Volume],
              egress: dict[tuple[str, str, str], tuple[int, int]]) -> tuple[Any, ...]:
        """Fold drained rows into their conversations and attribute those of named ones;
        returns (slots, sent by a, bytes, packets) of the rows still to be named."""
        table: LiveConversations = self.table
        slots, sent_by_a, created = table.locate(batch)
        if self.resumable:
            for i in created:
                self._resume_slot(int(slots[i]), batch.counters(i), now)
        changed = table.accumulate(batch, slots, sent_by_a)
        self.attributed_bytes += int(batch.tx_bytes.sum())
        self.flow_entries_drained += len(batch)
        self._rename(changed)
        named = table.cols["named"][slots]
        self._attribute_named(batch, np.flatnonzero(named), slots, sent_by_a, minute,
                              buckets, egress)
        rows = np.flatnonzero(~named)
        return slots[rows], sent_by_a[rows], batch.tx_bytes[rows], batch.tx_packets[rows]

    def _resume_slot(self, slot: int, counters: FlowCounters, now: float) -> None:
        """_resume for a conversation the columns have just opened."""
        claimed = self.resumable.claim(counters, now)
        if claimed is None:
            return
        conv, names = claimed
        self.table.store(slot, conv)
        self.attributor.resume(conv, names)
        name_id = self.name_sets.intern(names, conv.oriented(prefer_local=True)[1][0])
        self.table.cols["names_id"][slot] = self.table.cols["row_names_id"][slot] = name_id

    def _rename(self, changed: Any) -> None:
        """Name again the named conversations whose names may have changed: their owner or
        orientation (`changed`), a hello or plaintext refinement, a DNS answer for them."""
        table: LiveConversations = self.table
        names_id = table.cols["names_id"]
        names_id[changed] = -1
        take = getattr(self.attributor, "take_renamed", None)
        if take is not None:
            cids, addrs = take()
            for cid in cids:
                slot = table.slot_of(cid)
                if slot is not None:
                    names_id[slot] = -1
            if addrs:
                names_id[table.slots_with_addresses(addrs)] = -1
        n = table.size
        stale = np.flatnonzero(table.cols["live"][:n] & table.cols["named"][:n]
                               & (names_id[:n] < 0))
        for slot in stale.tolist():
            conv = table.conversation(slot)
            names = self.attributor.names(conv)
            names_id[slot] = self.name_sets.intern(names, conv.oriented(prefer_local=True)[1][0])

    def _attribute_named(self, batch: FlowBatch, rows: Any, slots: Any, sent_by_a: Any,
                         minute: int, buckets: dict[BucketKey, Volume],
                         egress: dict[tuple[str, str, str], tuple[int, int]]) -> None:
        """The rows of named conversations, summed per (names, direction) in arrays."""
        if not len(rows):
            return
        table: LiveConversations = self.table
        row_slots = slots[rows]
        ids = table.cols["names_id"][row_slots].astype(np.int64)
        outbound = table.outbound(row_slots, sent_by_a[rows])
        groups, inverse = np.unique(ids * 2 + outbound, return_inverse=True)
        nbytes = np.zeros(len(groups), np.uint64)
        npackets = np.zeros(len(groups), np.uint64)
        np.add.at(nbytes, inverse, batch.tx_bytes[rows])
        np.add.at(npackets, inverse, batch.tx_packets[rows])
        items = self.name_sets.items
        for group, b, p in zip(groups.tolist(), nbytes.tolist(), npackets.tolist(), strict=True):
            names, destination = items[group >> 1]
            self._add_volume(buckets, egress, minute, names, destination, bool(group & 1), b, p)
        if self.coverage is None:
            return
        crm = np.array([bool(items[i][0].crm_vendor) for i in range(len(items))], bool)
        observed = np.flatnonzero(crm[ids] & outbound & (batch.tx_bytes[rows] > 0))
        local_a = table.local_a(row_slots[observed])
        for at, is_a in zip(observed.tolist(), local_a.tolist(), strict=True):
            slot = int(row_slots[at])
            end_a, end_b = table.ends(slot)
            local, far = (end_a, end_b) if is_a else (end_b, end_a)
            names = items[int(ids[at])][0]
            self.coverage.observe(int(table.cols["family"][slot]), local, far, names.crm_vendor,
                                  names.crm_instance, names.tenant, names.cgroup,
                                  int(batch.tx_bytes[rows[at]]))

    def _attribute_pending(self, pending: list[tuple[int, bool, int, int, int]], final: bool,
                           minute: int, buckets: dict[BucketKey, Volume],
                           egress: dict[tuple[str, str, str], tuple[int, int]]) -> None:
        """Rows of conversations not named yet: named now, or after their hello."""
        table: LiveConversations = self.table
        live, named, names_id = (table.cols[c] for c in ("live", "named", "names_id"))
        for slot, sent_by_a, nbytes, npackets, polls in pending:
            if not live[slot]:
                continue
            conv = table.conversation(slot)
            names = self.attributor.names(conv)
            if not final and polls < NAMING_WAIT_POLLS and self._awaiting_hello(conv, names):
                # its server name is a poll away: attributing by DNS now could
                # name another instance behind the same address
                self._unnamed_rows.append((slot, sent_by_a, nbytes, npackets, polls + 1))
                continue
            named[slot] = True
            local, (remote, _), _, _ = conv.oriented(prefer_local=True)
            name_id = names_id[slot] = self.name_sets.intern(names, remote)
            destination = self.name_sets.items[name_id][1]
            outbound = (conv.a if sent_by_a else conv.b) == local
            self._add_volume(buckets, egress, minute, names, destination, outbound, nbytes,
                             npackets)
            if outbound and names.crm_vendor and self.coverage is not None and nbytes:
                far = conv.b if local == conv.a else conv.a
                self.coverage.observe(conv.family, local, far, names.crm_vendor,
                                      names.crm_instance, names.tenant, names.cgroup, nbytes)

    def _add_volume(self, buckets: dict[BucketKey, Volume],
                    egress: dict[tuple[str, str, str], tuple[int, int]], minute: int,
                    names: Any, destination: str, outbound: bool, nbytes: int,
                    npackets: int) -> None:
        vol = buckets.setdefault(BucketKey(minute, names.tenant, names.crm_vendor,
                                           names.crm_instance, destination), Volume())
        if not outbound:
            vol.bytes_in += nbytes
            vol.packets_in += npackets
            return
        vol.bytes_out += nbytes
        vol.packets_out += npackets
        dest = (names.tenant, names.crm_vendor or "", names.crm_instance or "")
        if dest not in egress and not self.egress_series.admits(dest):
            dest = OTHER_DESTINATION
        b, p = egress.get(dest, (0, 0))
        egress[dest] = (b + nbytes, p + npackets)

    def _write_columns(self, buckets: dict[BucketKey, Volume], row_budget: int | None) -> None:
        """The buckets, then the rows of new and renamed conversations in full, then the
        counters of the other changed rows (at most `row_budget`, least recently written
        first), FLOW_WRITE_CHUNK rows per transaction."""
        table: LiveConversations = self.table
        c = table.cols
        with self.lock:
            n = table.size
            ids = c["names_id"][:n]
            full = np.flatnonzero(c["live"][:n] & ((c["row_id"][:n] == 0) | (
                (ids >= 0) & (ids != c["row_names_id"][:n]))))
        for start in range(0, max(len(full), 1), FLOW_WRITE_CHUNK):
            chunk = full[start : start + FLOW_WRITE_CHUNK].tolist()
            with self.lock:
                chunk = [s for s in chunk if c["live"][s]]
                records = [self._slot_record(s) for s in chunk]
            new_ids = self.store.write(buckets if start == 0 else {}, [r for r, _ in records])
            with self.lock:
                now_ns = time.monotonic_ns()
                for slot, (rec, name_id) in zip(chunk, records, strict=True):
                    if c["row_id"][slot] == 0:
                        c["row_id"][slot] = new_ids.get(id(rec), 0)
                    c["row_names_id"][slot] = name_id
                    c["dirty"][slot], c["written_ns"][slot] = False, now_ns
        with self.lock:
            n = table.size
            due = np.flatnonzero(c["live"][:n] & c["dirty"][:n] & (c["row_id"][:n] > 0))
            if row_budget is not None and len(due) > row_budget:
                due = due[np.argpartition(c["written_ns"][due], row_budget)[:row_budget]]
        for start in range(0, len(due), FLOW_WRITE_CHUNK * 4):
            with self.lock:
                rows = self._counter_rows(due[start : start + FLOW_WRITE_CHUNK * 4])
            self.store.update_flow_counters(rows)

    def _slot_record(self, slot: int) -> tuple[dict[str, Any], int]:
        """_record of a slot, with the names id its row will hold."""
        conv = self.table.conversation(slot)
        name_id = int(self.table.cols["names_id"][slot])
        if name_id < 0:  # not named yet: the names known now
            name_id = self.name_sets.intern(self.attributor.names(conv),
                                            conv.oriented(prefer_local=True)[1][0])
        return self._record(conv, self.name_sets.items[name_id][0]), name_id

    def _counter_rows(self, slots: Any) -> list[tuple[Any, ...]]:
        """Store.FLOW_COUNTER_FIELDS and the row id of each slot, oriented from this host;
        the slots count as written."""
        table: LiveConversations = self.table
        c = table.cols
        out_side = np.where(table.local_a(slots), 0, 1)
        in_side = 1 - out_side
        first = c["first"][slots].astype(np.float64)
        first[first == 0] = np.inf
        earliest = first.min(axis=1)
        last = c["last"][slots].max(axis=1).astype(np.float64)
        now_ns, now = time.monotonic_ns(), time.time()

        def epoch(ns: Any) -> list[float]:
            # kernel timestamps are CLOCK_MONOTONIC (_epoch); 0 (never) stays 0
            values: list[float] = np.where(np.isfinite(ns) & (ns > 0),
                                           now - (now_ns - ns) / 1e9, 0.0).tolist()
            return values

        uid = c["uid"][slots, out_side]
        rows = list(zip(
            c["bytes"][slots, out_side].tolist(), c["packets"][slots, out_side].tolist(),
            c["bytes"][slots, in_side].tolist(), c["packets"][slots, in_side].tolist(),
            epoch(earliest), epoch(last),
            c["flags"][slots, out_side].tolist(), c["flags"][slots, in_side].tolist(),
            [None if u == NO_UID else u for u in uid.tolist()],
            c["row_id"][slots].tolist(), strict=True))
        c["dirty"][slots] = False
        c["written_ns"][slots] = now_ns
        return rows

    def _write(self, buckets: dict[BucketKey, Volume], touched: list[Conversation]) -> None:
        """Store the buckets and the touched conversations' rows, FLOW_WRITE_CHUNK rows per
        transaction: a poll of 100,000 flows never holds all its row dicts (~1.5 KB each)."""
        for start in range(0, max(len(touched), 1), FLOW_WRITE_CHUNK):
            chunk = touched[start : start + FLOW_WRITE_CHUNK]
            with self.lock:
                records = [self._record(c) for c in chunk]
            new_ids = self.store.write(buckets if start == 0 else {}, records)
            with self.lock:
                for conv, rec in zip(chunk, records, strict=True):
                    if conv.row_id is None:
                        conv.row_id = new_ids.get(id(rec))

    def _resume(self, counters: FlowCounters, now: float) -> None:
        """Re-bind a conversation open before this start to its flow row and names."""
        if not self.resumable or conversation_id(counters.key) in self.table.conversations:
            return
        claimed = self.resumable.claim(counters, now)
        if claimed is not None:
            conv, names = claimed
            self.table.adopt(conv)
            self.attributor.resume(conv, names)

    def _record(self, conv: Conversation, names: Any = None) -> dict[str, Any]:
        """A conversation as a flow row, oriented from this host (named now, or `names`)."""
        (src, sport), (dst, dport), o, i = conv.oriented(prefer_local=True)
        if names is None:
            names = self.attributor.names(conv)
        first = min(x for x in (o.first_seen_ns, i.first_seen_ns) if x) if (
            o.first_seen_ns or i.first_seen_ns) else 0
        return {
            "id": conv.row_id, "family": conv.family,
            "proto": {6: "tcp", 17: "udp"}.get(conv.proto, str(conv.proto)),
            "src": src, "sport": sport, "dst": dst, "dport": dport,
            "sni": names.sni, "dns_names": names.dns_names,
            "crm_vendor": names.crm_vendor, "crm_instance": names.crm_instance,
            "shared": names.shared, "crm_region": names.crm_region, "named_by": names.named_by,
            "tenant": names.tenant, "cgroup": names.cgroup,
            "uid": o.uid if o.uid != NO_UID else None,
            "bytes_out": o.bytes, "packets_out": o.packets,
            "bytes_in": i.bytes, "packets_in": i.packets,
            "first_seen": _epoch(first), "last_seen": _epoch(max(o.last_seen_ns, i.last_seen_ns)),
            "flags_out": o.flags, "flags_in": i.flags,
        }

    @staticmethod
    def _awaiting_hello(conv: Conversation, names: Any) -> bool:
        """A TCP conversation this side opened whose ClientHello is not parsed yet."""
        if conv.named or names.sni is not None or conv.proto != IPPROTO_TCP:
            return False
        _, _, out, _ = conv.oriented(prefer_local=True)
        return bool(out.flags & FF_SYN)

    @property
    def unattributed_bytes(self) -> int:
        """Volume counted in the never-evicted totals but in no flow record."""
        counted = self._all_totals(self.totals) - self._baseline_totals
        attributed = self.attributed_bytes - self._baseline_attributed
        return max(0, counted - attributed)

    def ready(self) -> tuple[bool, str]:
        if not self.attached:
            return False, "probes not attached"
        now = time.monotonic()
        if now - self.last_poll_monotonic > 5 * POLL_INTERVAL_S:
            return False, "flow map not polled for 5 s"
        if now - self.drainer.last_poll_monotonic > 5:
            return False, "ring buffer not drained for 5 s"
        if self.plaintext is not None:
            ready: tuple[bool, str] = self.plaintext.ready()
            return ready
        return True, "ok"

    def flow_records(self, **filters: Any) -> list[dict[str, Any]]:
        return self.store.flows(**filters)


def reload_summary(old: LeaktapConfig, new: LeaktapConfig) -> dict[str, Any]:
    """What a reload changes (tenants, allow lists, enforcement) and what it cannot."""
    before = {t.name: t for t in old.tenants}
    after = {t.name: t for t in new.tenants}
    changed = {}
    for name in sorted(before.keys() & after.keys()):
        b, a = before[name], after[name]
        diff: dict[str, Any] = {}
        if set(a.allow) != set(b.allow):
            diff["allow_added"] = sorted(set(a.allow) - set(b.allow))
            diff["allow_removed"] = sorted(set(b.allow) - set(a.allow))
        if a.enforce != b.enforce:
            diff["enforce"] = [b.enforce, a.enforce]
        if a.match != b.match:
            diff["match"] = True
        if diff:
            changed[name] = diff
    ignored = sorted(k for k in type(new).model_fields
                     if k not in ("tenants", "enforcement") and getattr(old, k) != getattr(new, k))
    return {
        "tenants_added": sorted(after.keys() - before.keys()),
        "tenants_removed": sorted(before.keys() - after.keys()),
        "tenants_changed": changed,
        "enforcement_changed": old.enforcement != new.enforcement,
        "restart_required": ignored,  # other keys are read at start only
    }


def _front_cache(probes: Any) -> Any:
    """The drain of the kernel's front cache of established flows, when the programs
    have one (lt_fcache): the columnar drain takes it with lt_flows."""
    try:
        probes.table("lt_fcache")
    except KeyError:
        return None
    module = importlib.import_module("leaktap.controller.kernel.front_cache")
    return module.FrontCache(probes)


def _reload_logged(agent: Agent) -> None:
    try:
        agent.reload_config()
    except ConfigError as e:
        logger.error("configuration not reloaded, the running policy is kept: %s", e)
    except Exception:  # noqa: BLE001 - a failed reload must not end the agent
        logger.exception("configuration not reloaded, the running policy is kept")


def _return_freed_heap() -> None:
    """Hand the heap a poll freed back to the OS: glibc keeps freed pages below the top
    of its heap (a poll of 100,000 flows frees tens of MB) unless asked."""
    try:
        _LIBC.malloc_trim(0)
    except AttributeError:
        pass  # not glibc


_LIBC = ctypes.CDLL(None)
# glibc's mallopt parameter; the unit sets MALLOC_ARENA_MAX=2 as well
M_ARENA_MAX = -8
MALLOC_ARENAS = 2


def _limit_malloc_arenas() -> None:
    """At most MALLOC_ARENAS heaps: glibc otherwise gives busy threads (poll, ring
    drain, uvicorn, outbox) an arena each, up to 8 per CPU, and freed memory scattered
    over them is rarely returned (tens of MB under 100,000 flows/s)."""
    try:
        _LIBC.mallopt(M_ARENA_MAX, MALLOC_ARENAS)
    except AttributeError:
        pass  # not glibc


def _epoch(monotonic_ns: int) -> float:
    """Kernel timestamps are CLOCK_MONOTONIC; the API speaks epoch seconds."""
    if not monotonic_ns:
        return 0.0
    return time.time() - (time.monotonic_ns() - monotonic_ns) / 1e9


def _api_tokens(config: LeaktapConfig, state_dir: Path) -> tuple[list[str], list[str]]:
    """Reader and admin tokens: from the config, token files, or a generated one."""
    readers, admins = list(config.tokens.reader), list(config.tokens.admin)
    for kind, files in (("reader", config.token_files.reader), ("admin", config.token_files.admin)):
        for f in files:
            try:
                token = Path(f).read_text().strip()
            except OSError as e:
                raise ConfigError(f"token_files.{kind}: cannot read {f}: {e.strerror}") from e
            (readers if kind == "reader" else admins).append(token)
    if not readers and not admins:
        path = state_dir / "api-token"
        try:
            if path.exists():
                admins.append(path.read_text().strip())
            else:
                token = secrets.token_urlsafe(32)
                state_dir.mkdir(parents=True, exist_ok=True)
                path.touch(mode=0o600)
                path.write_text(token + "\n")
                admins.append(token)
        except OSError as e:  # a message at start, not a traceback
            raise StorageError(
                f"no API tokens configured and the generated one in {path} cannot be "
                f"used: {e.strerror or e}") from e
        logger.warning("no API tokens configured: using the admin token in %s", path)
    return readers, admins


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name may resolve anywhere


# The dashboard, a Prometheus scraper and a few scripts need a handful.
API_MAX_CONNECTIONS = 64
API_MAX_HEAD_BYTES = 16 * 1024
# a new or kept-alive connection must send a complete request head within this
API_HEAD_TIMEOUT_S = 5


def api_server(app: Any, host: str, port: int, tls: TlsConfig | None) -> Any:
    """The uvicorn server for the API; HTTPS with `tls`, a warning when the bind is
    reachable from elsewhere without it."""
    import uvicorn

    from leaktap.controller.api.connections import HeadTimeoutH11Protocol

    if tls is None and not is_loopback(host):
        logger.warning(
            "the API listens on %s:%d without TLS: bearer tokens and alerts cross the network "
            "in clear; set tls.certfile and tls.keyfile", host, port,
        )
    return uvicorn.Server(
        uvicorn.Config(
            app, host=host, port=port, log_level="warning", access_log=False, lifespan="on",
            ssl_certfile=tls.certfile if tls else None, ssl_keyfile=tls.keyfile if tls else None,
            # bounded memory whoever connects: h11 (not httptools, whatever is installed)
            # caps a request head at API_MAX_HEAD_BYTES and, with a deadline, at
            # API_HEAD_TIMEOUT_S (api/connections.py); connections beyond
            # API_MAX_CONNECTIONS get 503; bodies are capped by api/guard.py
            http=HeadTimeoutH11Protocol, h11_max_incomplete_event_size=API_MAX_HEAD_BYTES,
            timeout_keep_alive=API_HEAD_TIMEOUT_S, limit_concurrency=API_MAX_CONNECTIONS,
        )
    )


def main(args: Any) -> int:
    _limit_malloc_arenas()  # before the threads start
    from leaktap.controller.api.main import create_app

    config = load_config(args.config)
    if getattr(args, "mode", None):
        config = config.model_copy(update={"mode": args.mode})
    if config.mode == "xdp" and not config.inside:
        raise ConfigError("mode xdp needs `inside:` networks (the tenant side of the gateway)")
    ifaces = args.iface or list(config.interfaces) or [default_route_interface()]
    try:
        host, port = parse_listen(args.listen or config.listen)
    except ValueError as e:
        raise ConfigError(f"--listen: {e}") from e
    config = with_database(config, args.db)
    db = Path(config.storage.path or DEFAULT_DB)
    readers, admins = _api_tokens(config, db.parent)
    store = Store(db, retention_days=config.storage.retention_days,
                  group=config.storage.group)
    agent = Agent(config, ifaces, store)
    agent.config_path = args.config
    # SIGHUP re-reads the config file (as POST /v1/config/reload); off the signal frame
    signal.signal(signal.SIGHUP, lambda *_: threading.Thread(
        target=_reload_logged, args=(agent,), name="lt-reload", daemon=True).start())
    app = create_app(agent, readers=readers, admins=admins)
    server = api_server(app, host, port, config.tls)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT (the lifespan detaches the
    # probes), then re-raises the signal with the previous handler: make that a
    # no-op for SIGTERM so a clean stop exits 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        agent.load_probes()  # before serving: a compile error is one line, exit 2
        server.run()
    finally:
        store.close()
    return 0 if not getattr(app.state, "startup_error", None) else 1
