"""ssl_go.bpf.c against a real Go program (issue 13.1): the Go client built here
(stripped with -s -w, so its functions come from .gopclntab alone) makes three
HTTPS requests over one connection to a TLS server in a veth lab; its
pid-scoped probes deliver each tls.Conn.Write exactly once (the probe sits after
the stack-growth check, which a call that grows its stack runs twice) and what
each tls.Conn.Read returned, taken at Read's RET instructions and matched by
goroutine (no uretprobe), as read events of the same connection, with the
socket fd read from the Conn."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from leaktap.controller.kernel.loader import SslProbes, load_ssl
from leaktap.controller.plaintext import golang
from leaktap.controller.plaintext.events import SslEvent, SslEventDecoder, ssl_stat_names
from leaktap.controller.plaintext.sockets import SocketResolver
from tests.e2e.test_plaintext_tls import crm_tls_lab
from tests.golang_build import GO_CLIENT, STRIPPED, build

pytestmark = [pytest.mark.kernel, pytest.mark.netns]

HOST_IP, CRM_IP = "198.18.78.1", "198.18.78.2"
BODY = json.dumps({"Body": "CANARY-GO-READ-0d6a1c"})
REQUESTS = 3


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with crm_tls_lab(tmp_path_factory.mktemp("go-uprobe"), "lt-gord", HOST_IP, CRM_IP,
                     ()) as where:
        yield where


@pytest.fixture(scope="module")
def probes() -> Iterator[SslProbes]:
    p = load_ssl()
    try:
        yield p
    finally:
        p.close()


@pytest.fixture(scope="module")
def ring(probes: SslProbes) -> list[SslEvent]:
    """Every event the probes deliver (a ring buffer is opened once per program set)."""
    decoder = SslEventDecoder(probes.table("lt_ssl_scratch").sLeaf)
    events: list[SslEvent] = []
    probes.table("lt_ssl_events").open_ring_buffer(
        lambda _c, data, size: events.append(decoder.decode(ctypes.string_at(data, size))) or 0)
    return events


def stats(probes: SslProbes) -> dict[str, int]:
    table = probes.table("lt_ssl_stats")
    return {n: sum(int(v) for v in table[table.Key(i)]) for i, n in enumerate(ssl_stat_names())}


def test_go_writes_once_each_and_reads_at_their_returns(lab, probes, ring, tmp_path):
    binary = build(GO_CLIENT, tmp_path / "go_client", STRIPPED)
    found = golang.inspect_go_binary(str(binary))
    assert found is not None and found.inspected and found.table == ".gopclntab"
    events = ring
    before = stats(probes)
    p = subprocess.Popen([str(binary), f"https://{CRM_IP}/services/data/v59.0/sobjects/Note",
                          "acme.my.salesforce.com", BODY, str(REQUESTS)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, "GO_CLIENT_HOLD": "1"})
    assert p.stdin is not None and p.stdout is not None
    try:
        assert p.stdout.readline() == b"started\n"
        probes.addresses[str(binary)] = dict(found.probes)
        hooked = probes.attach(str(binary), p.pid)
        assert len(hooked) == len(found.probes) and "go:write" in hooked
        p.stdin.write(b"go\n")
        p.stdin.flush()
        lines = [p.stdout.readline().decode().strip() for _ in range(REQUESTS + 1)]
        assert lines == ["status 200 2"] * REQUESTS + ["held"], lines
        probes.bpf.ring_buffer_consume()
        writes = [e for e in events if e.tgid == p.pid and e.kind == "write"]
        # the fd the probe read from the Conn is the process's TCP socket to the CRM
        assert writes, "no write event"
        ends = SocketResolver().resolve(p.pid, writes[0].fd)
        assert ends is not None and ends.remote == (CRM_IP, 443), ends
        out, err = p.communicate(b"\n", timeout=30)
        assert p.returncode == 0, err.decode(errors="replace")
        probes.bpf.ring_buffer_consume()
    finally:
        probes.detach(str(binary), p.pid)
        if p.poll() is None:
            p.kill()
            p.wait()
    after = stats(probes)
    mine = [e for e in events if e.tgid == p.pid]
    writes = [e for e in mine if e.kind == "write"]
    reads = [e for e in mine if e.kind == "read"]

    # one event per request (each fits one chunk), each holding the whole request
    assert len(writes) == REQUESTS, [e.data[:40] for e in writes]
    for e in writes:
        assert e.data.startswith(b"POST /services/data/v59.0/sobjects/Note HTTP/1.1\r\n")
        assert e.data.endswith(BODY.encode()) and e.data_off == 0 and e.req_len == len(e.data)
    conn = writes[0].ssl_ptr
    assert {e.ssl_ptr for e in writes} == {conn}
    assert {e.fd for e in writes} == {writes[0].fd}
    assert after["ssl_cnt_go_fd"] - before["ssl_cnt_go_fd"] >= 1
    assert after["ssl_loss_go_fd"] == before["ssl_loss_go_fd"]

    # the responses, from the RETs of Read, on the same connection
    assert reads and {e.ssl_ptr for e in reads} == {conn}
    received = b"".join(e.data for e in reads)
    assert received.count(b"HTTP/1.1 200 OK\r\n") == REQUESTS
    assert received.endswith(b"\r\n\r\nok")
    assert after["ssl_cnt_bytes_read_captured"] - before["ssl_cnt_bytes_read_captured"] == len(
        received)
    assert after["ssl_loss_go_unmatched"] == before["ssl_loss_go_unmatched"]


def test_go_outside_the_known_layout_learns_its_socket_from_the_send(lab, probes, ring,
                                                                     tmp_path):
    """lt_go_write_nofd (a Go version whose struct offsets are not known): the fd is
    not read from memory but bound from the TLS record the write's thread sends."""
    binary = build(GO_CLIENT, tmp_path / "go_client_nofd", STRIPPED)
    found = golang.inspect_go_binary(str(binary))
    assert found is not None and found.inspected
    points = {("go:write_nofd" if label == "go:write" else label): addr
              for label, addr in found.probes}
    events = ring
    before = stats(probes)
    p = subprocess.Popen([str(binary), f"https://{CRM_IP}/services/data/v59.0/sobjects/Note",
                          "acme.my.salesforce.com", BODY, "2"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, "GO_CLIENT_HOLD": "1"})
    assert p.stdin is not None and p.stdout is not None
    try:
        assert p.stdout.readline() == b"started\n"
        probes.addresses[str(binary)] = points
        assert "go:write_nofd" in probes.attach(str(binary), p.pid)
        p.stdin.write(b"go\n")
        p.stdin.flush()
        assert [p.stdout.readline().strip() for _ in range(3)] == [b"status 200 2"] * 2 + [
            b"held"]
        probes.bpf.ring_buffer_consume()
        binds = [e for e in events if e.tgid == p.pid and e.kind == "bind"]
        writes = [e for e in events if e.tgid == p.pid and e.kind == "write"]
        assert len(binds) == 1 and len(writes) == 2
        ends = SocketResolver().resolve(p.pid, binds[0].fd)
        assert ends is not None and ends.remote == (CRM_IP, 443), ends
        assert binds[0].ssl_ptr == writes[0].ssl_ptr == writes[1].ssl_ptr
        # the first write did not know its fd yet; the second carries the binding
        assert [w.fd for w in writes] == [-1, binds[0].fd]
        p.communicate(b"\n", timeout=30)
    finally:
        probes.detach(str(binary), p.pid)
        if p.poll() is None:
            p.kill()
            p.wait()
    after = stats(probes)
    assert after["ssl_cnt_go_fd"] == before["ssl_cnt_go_fd"]
    assert after["ssl_cnt_bind"] - before["ssl_cnt_bind"] == 1
