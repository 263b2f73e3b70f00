"""The corpus' TCP and QUIC ClientHellos as the kernel captures them (issue 16.6).

Each capture's frames run through the compiled TC program with
BPF_PROG_TEST_RUN, as `leaktap replay` runs them; the hello samples the
kernel delivers are reassembled and parsed by the controller. Nothing here
models what the kernel captures: if the kernel misses a hello, these fail.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator

import pytest

from leaktap.controller.protocols.tls import ClientHello
from tests.corpus import CORPUS, KernelCapture, load_tsv

pytestmark = pytest.mark.kernel

# Zeek rows whose hello the kernel does not capture by design: (capture, name) ->
# (rows, reason). An SSLv2-compatible CLIENT-HELLO has no extensions, hence never a
# server name to attribute by: the kernel captures TLS handshake records only.
NOT_CAPTURED = {
    ("zeek/pcaps/tls__ssl.v3.pcap", "-"): (1, "one of its 3 connections opens with SSLv2"),
}


@pytest.fixture(scope="module")
def kernel() -> Iterator[KernelCapture]:
    capture = KernelCapture()
    yield capture
    capture.close()


def _name(hello: ClientHello) -> str:
    return hello.sni if hello.sni is not None else "-"


def _grouped(tsv: str, transport: str = "tcp") -> dict[str, list[dict[str, str]]]:
    groups: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in load_tsv(tsv):
        if row["transport"] == transport:
            groups[row["pcap_path"]].append(row)
    return dict(groups)


def _relative(path: str) -> str:
    return str(CORPUS.joinpath(path).relative_to(CORPUS))


@pytest.mark.parametrize(
    ("pcap", "rows"), sorted(_grouped("zeek/expected.tsv").items()),
    ids=lambda v: v.rsplit("/", 1)[-1] if isinstance(v, str) else "",
)
def test_corpus_zeek_tcp(kernel: KernelCapture, pcap: str, rows: list[dict[str, str]]) -> None:
    """One hello per Zeek ssl.log row; the multiset of server names is Zeek's."""
    got = Counter(_name(h) for _, h in kernel.hellos(pcap))
    want = Counter(row["server_name"] for row in rows)
    for (path, name), (count, _reason) in NOT_CAPTURED.items():
        if path == _relative(pcap):
            want[name] -= count
    assert got == +want


@pytest.mark.parametrize(
    ("pcap", "rows"), sorted(_grouped("suricata/expected.tsv").items()),
    ids=lambda v: v.rsplit("/", 1)[-1] if isinstance(v, str) else "",
)
def test_corpus_suricata_tcp(kernel: KernelCapture, pcap: str, rows: list[dict[str, str]]
                             ) -> None:
    """Every name Suricata asserts is seen; an exact eve match means the whole name."""
    got = [_name(h) for _, h in kernel.hellos(pcap)]
    assert got and "-" not in got
    for row in rows:
        if row["match"] == "substring-rule":
            assert any(row["server_name"] in name for name in got), row
        else:
            assert row["server_name"] in got, row
    exact = {row["server_name"] for row in rows if row["match"] == "exact-eve"}
    assert not exact or set(got) == exact
    # one event per connection: Suricata's count without version/feature filters
    plain = [r for r in rows if r["match"] == "exact-eve" and "[filter" not in r["version"]]
    for row in plain:
        assert got.count(row["server_name"]) == int(row["expected_event_count"]), row


def test_corpus_multi_segment_hello(kernel: KernelCapture) -> None:
    """Suricata's MTU-300 capture: the kernel follows the hello over three TCP segments."""
    path = CORPUS / "suricata/pcaps/tls__tls-client-hello-frag-01__dump_mtu300.pcap"

    samples = [s for s in kernel.samples(path) if s.kind == "tls_hello" and s.dport == 443]

    assert len({s.seq for s in samples}) >= 3
    [(_, hello)] = kernel.hellos(path)
    assert hello.sni == "www.google.com"


def _ids(v: object) -> str:
    return v.rsplit("/", 1)[-1] if isinstance(v, str) else ""


@pytest.mark.parametrize(
    ("pcap", "rows"), sorted(_grouped("zeek/expected.tsv", "quic").items()), ids=_ids
)
def test_corpus_zeek_quic(kernel: KernelCapture, pcap: str, rows: list[dict[str, str]]) -> None:
    hellos = kernel.quic_hellos(pcap)
    got = Counter(h.sni if h.sni is not None else (h.sni_raw or "-") for h in hellos)
    assert got == Counter(row["server_name"] for row in rows)
    for h in hellos:
        if h.sni is None and h.sni_raw is not None:
            # quic-go's interop client sends "server4:443": reported raw, not a host name
            assert h.sni_raw == "server4:443"


@pytest.mark.parametrize(
    ("pcap", "rows"), sorted(_grouped("suricata/expected.tsv", "quic").items()), ids=_ids
)
def test_corpus_suricata_quic(kernel: KernelCapture, pcap: str, rows: list[dict[str, str]]
                              ) -> None:
    got = [h.sni for h in kernel.quic_hellos(pcap)]
    for row in rows:
        if row["server_name"] == "<present-value-not-asserted>":
            assert got and all(g is not None for g in got)
        elif row["match"] == "substring-rule":
            # quic-alerts: Google QUIC Q046, SNI from the plaintext CHLO; Suricata's two
            # alerts are two packets of the one connection
            assert got == [row["server_name"]], row
        else:
            assert got.count(row["server_name"]) == int(row["expected_event_count"]), row
