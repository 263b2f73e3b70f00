"""The public corpus through the real kernel program and pipeline (`leaktap
replay`'s path): every TCP TLS and QUIC server name Zeek and Suricata report
must come out of the replay for the same connection."""

from __future__ import annotations

import ipaddress
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

import pytest

from leaktap.controller.attribution.attributor import Attributor
from leaktap.controller.commands.replay import REPLAY_OPTIONS, Replayer, flow_records
from leaktap.controller.config import LeaktapConfig
from leaktap.controller.kernel import loader
from leaktap.controller.kernel.ringbuf import RingDrainer
from leaktap.controller.protocols.dns import TYPE_A, TYPE_AAAA, parse_dns_message
from tests.corpus import CORPUS, load_tsv, read_segments

pytestmark = pytest.mark.kernel

# transports whose hello the kernel samples (DTLS and TLS inside WebSocket are not)
TRANSPORTS = {"tcp", "quic"}
PRESENT = "<present-value-not-asserted>"  # the peer's test checks only that a name exists


@pytest.fixture(scope="module")
def replayer_parts() -> Iterator[tuple[Any, RingDrainer]]:
    probes = loader.load("tc", REPLAY_OPTIONS)
    drainer = RingDrainer(probes, lambda s: None)
    yield probes, drainer
    probes.close()


_cache: dict[str, list[dict[str, Any]]] = {}


def _replay(parts: tuple[Any, RingDrainer], path: str) -> list[dict[str, Any]]:
    if path not in _cache:
        probes, drainer = parts
        attributor = Attributor(LeaktapConfig(), live=False)
        result = Replayer(probes, attributor, drainer).run(path)
        _cache[path] = flow_records(result, attributor)
    return _cache[path]


def _ip(text: str) -> str | None:
    return None if text in ("", "-") else str(ipaddress.ip_address(text))


def _rows(name: str, src_col: str, dst_col: str, port_col: str) -> list[tuple[str, Any]]:
    groups: dict[tuple[str, Any, Any, Any], list[str]] = defaultdict(list)
    for row in load_tsv(name):
        if row["transport"] not in TRANSPORTS:
            continue
        port = row.get(port_col, "-")
        key = (row["pcap_path"], _ip(row.get(src_col, "-")), _ip(row.get(dst_col, "-")),
               None if port in ("", "-") else int(port))
        name = row["server_name"]
        if row.get("match") == "substring-rule":
            name = "~" + name  # only a rule content match is known: a substring
        groups[key].append(name)
    return [(f"{k[0].rsplit('/', 1)[-1]}:{k[2]}:{k[3]}", (k, v)) for k, v in groups.items()]


ZEEK = _rows("zeek/expected.tsv", "orig_h", "resp_h", "resp_p")
SURICATA = _rows("suricata/expected.tsv", "src_ip", "dest_ip", "dest_port")


def _check(parts: tuple[Any, RingDrainer], case: Any) -> None:
    (path, src, dst, port), names = case
    records = [
        r for r in _replay(parts, path)
        if (src is None or _ip(r["src"]) == src)
        and (dst is None or _ip(r["dst"]) == dst)
        and (port is None or r["dport"] == port)
    ]
    snis = [r["sni"] or "-" for r in records]
    got = Counter(snis)
    for name in set(names):
        if name == PRESENT:
            assert any(n != "-" for n in snis), (name, records)
        elif name.startswith("~"):
            assert any(name[1:] in n for n in snis), (name, snis)
    names = [n for n in names if n != PRESENT and not n.startswith("~")]
    # one expected row per TLS connection the peer logged; connections the peer
    # did not log as TLS may add "-" entries here
    # rows without addresses repeat per check of the peer's test: a set, not a multiset
    missing = Counter(names if src is not None else set(names)) - got
    assert not missing, (names, records)


@pytest.mark.parametrize("case", [c for _, c in ZEEK], ids=[i for i, _ in ZEEK])
def test_zeek_server_names(replayer_parts: Any, case: Any) -> None:
    _check(replayer_parts, case)


@pytest.mark.parametrize("case", [c for _, c in SURICATA], ids=[i for i, _ in SURICATA])
def test_suricata_server_names(replayer_parts: Any, case: Any) -> None:
    _check(replayer_parts, case)


# DNS answers the kernel sees: port 53 over plain IP. Tunnelled answers (Teredo,
# GRE in UDP) and mDNS (port 5353) are out of the kernel sampler's reach.
NOT_PORT_53 = ("teredo", "gre-over-udp", "mdns")


def _dns_cases() -> list[tuple[str, str, str]]:
    cases = set()
    for row in load_tsv("dns/expected.tsv"):
        if any(t in row["pcap"] for t in NOT_PORT_53):
            continue
        for answer in row["answers"].split(","):
            try:
                ip = str(ipaddress.ip_address(answer))
            except ValueError:
                continue
            cases.add((row["pcap_path"], row["query"], ip))
    return sorted(cases)


DNS_CASES = _dns_cases()


def _answered_queries(path: str) -> set[tuple[str, str]]:
    """(question, address) pairs of the answers whose query is in the capture (same
    transport, client and resolver ends, id and question, within 5 s), read with dpkt."""
    queries: dict[tuple[Any, ...], float] = {}
    pairs = set()
    for seg in read_segments(path):
        if 53 not in (seg.sport, seg.dport) or not seg.payload:
            continue
        msg = parse_dns_message(seg.payload, over_tcp=seg.proto == "tcp")
        if msg is None:
            continue
        ends = (seg.proto, _ip(seg.src), seg.sport, _ip(seg.dst), seg.dport)
        if not msg.is_response:
            queries[(*ends, msg.id, msg.qname, msg.qtype)] = seg.ts
            continue
        asked = queries.get((seg.proto, ends[3], ends[4], ends[1], ends[2], msg.id, msg.qname,
                             msg.qtype))
        if asked is not None and seg.ts - asked <= 5.0:
            pairs.update((msg.qname or "", _ip(a.value) or "") for a in msg.answers
                         if a.rtype in (TYPE_A, TYPE_AAAA))
    return pairs


_dns_replays: dict[tuple[str, bool], Attributor] = {}


def _dns_replay(parts: tuple[Any, RingDrainer], path: str, trust_unmatched: bool) -> Attributor:
    if (path, trust_unmatched) not in _dns_replays:
        probes, drainer = parts
        attributor = Attributor(LeaktapConfig(), live=False, trust_unmatched_dns=trust_unmatched)
        Replayer(probes, attributor, drainer).run(path)
        _dns_replays[path, trust_unmatched] = attributor
    return _dns_replays[path, trust_unmatched]


@pytest.mark.parametrize(
    "path,query,ip", DNS_CASES, ids=[f"{p.rsplit('/', 1)[-1]}:{q}:{i}" for p, q, i in DNS_CASES]
)
def test_dns_answers_name_addresses(replayer_parts: Any, path: str, query: str, ip: str) -> None:
    """An answer whose query is in the capture names its addresses; one without its
    query (the capture started later) only with --trust-unmatched-dns (issue 17.1)."""
    strict = _dns_replay(replayer_parts, path, trust_unmatched=False)
    trusting = _dns_replay(replayer_parts, path, trust_unmatched=True)
    if (query, ip) in _answered_queries(path):
        assert query in strict.dns.names_for(ip)
        assert strict.dns.stats.queries_matched > 0
    else:
        assert query not in strict.dns.names_for(ip)
        assert strict.dns.stats.rejected_no_query > 0
    assert query in trusting.dns.names_for(ip)


def test_dns_cases_cover_the_corpus() -> None:
    assert len(DNS_CASES) >= 20
    with_query = [c for c in DNS_CASES if (c[1], c[2]) in _answered_queries(c[0])]
    # both kinds of capture are exercised: with the queries, and answers only
    assert 0 < len(with_query) < len(DNS_CASES)


@pytest.fixture(scope="module")
def xdp_replayer_parts() -> Iterator[tuple[Any, RingDrainer]]:
    probes = loader.load("xdp", REPLAY_OPTIONS)
    drainer = RingDrainer(probes, lambda s: None)
    yield probes, drainer
    probes.close()


ALL_PCAPS = sorted(
    str(p) for p in CORPUS.glob("*/pcaps/*") if p.suffix in (".pcap", ".pcapng")
)


@pytest.mark.parametrize("path", ALL_PCAPS, ids=[p.rsplit("/", 1)[-1] for p in ALL_PCAPS])
def test_xdp_replay_equals_tc_replay(
    replayer_parts: Any, xdp_replayer_parts: Any, path: str
) -> None:
    """`replay --mode xdp` gives the same flows, names and byte counts as TC."""
    via_tc = _replay(replayer_parts, path)
    probes, drainer = xdp_replayer_parts
    attributor = Attributor(LeaktapConfig(), live=False)
    via_xdp = flow_records(Replayer(probes, attributor, drainer).run(path), attributor)
    assert via_xdp == via_tc
    assert via_tc, "every corpus capture has at least one flow"
