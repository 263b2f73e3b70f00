"""Go crypto/tls plaintext end to end (issue 13.1): a Go connector built from source
here with the distribution's toolchain (tests/e2e/go_client), normally, with
`-ldflags="-s -w"` and fully static (CGO_ENABLED=0), posts a canary over TLS from
a tenant cgroup to a local TLS server posing as a CRM; the monitor finds
crypto/tls.(*Conn).Write in the binary's own function table, probes it and
raises `canary_token` within 5 s, joined to the CRM connection's socket. A Go
binary whose tables are gone is reported with its reason ("go without symbol
tables"), not probed by guess; one rebuilt in place is probed at its new
addresses; its reads are its from_crm stream.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from leaktap.analytics.plaintext.crm_calls import CrmExchange
from leaktap.controller.plaintext import golang
from leaktap.controller.plaintext.monitor import PlaintextMonitor
from tests.e2e.test_plaintext_tls import (
    Collected,
    crm_tls_lab,
    in_cgroup,
    lab_config,
    running_monitor,
)
from tests.golang_build import GO_CLIENT, STRIPPED, build

pytestmark = [pytest.mark.kernel, pytest.mark.netns]

REPO = Path(__file__).resolve().parents[2]
HOST_IP, CRM_IP = "198.18.77.1", "198.18.77.2"
LIBSSL = "/lib/x86_64-linux-gnu/libssl.so.3"
CANARY = "CANARY-GOLANG-5e0c93b7aa"
CGROUP = "lt-go-acme"
HOST = "acme.my.salesforce.com"
URL = f"https://{CRM_IP}/services/data/v59.0/sobjects/Note"

CONFIG = f"""
tenants:
  - name: acme
    match: {{cgroup: "/{CGROUP}*"}}
    environment: prod
plaintext:
  enabled: true
  select: {{cgroups: ["/{CGROUP}*"]}}
  canaries:
    - {{token: "{CANARY}", tenant: acme, record: "Account/001GOLANG", environment: prod}}
"""


@pytest.fixture(scope="module")
def go_clients(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("goclient")
    plain = build(GO_CLIENT, tmp / "go_client")
    stripped = build(GO_CLIENT, tmp / "go_client_sw", STRIPPED)
    # as in a scratch container image: no libc, no dynamic section at all
    static = build(GO_CLIENT, tmp / "go_client_static", STRIPPED, cgo=False)
    # the runtime finds its table through moduledata, not the section name: the
    # program still runs, but nothing names its functions any more
    hidden = tmp / "go_client_hidden"
    subprocess.run(["objcopy", "--rename-section", ".gopclntab=.lt_hidden", str(stripped),
                    str(hidden)], check=True, capture_output=True)
    # the same connector rebuilt with more code: its functions at other addresses
    shift = tmp / "shift"
    shift.mkdir()
    shutil.copy(GO_CLIENT, shift / "main.go")
    (shift / "extra.go").write_text(SHIFT_TLS)
    rebuilt = build(shift / "main.go", shift / "go_client", extra=(shift / "extra.go",))
    return {"plain": plain, "stripped": stripped, "static": static, "hidden": hidden,
            "rebuilt": rebuilt}


# linked in, these packages move crypto/tls to other addresses: a rebuilt connector
SHIFT_TLS = """package main

import (
	"archive/tar"
	"archive/zip"
	"bytes"
)

var _ = tar.NewReader(bytes.NewReader(nil))
var _ = zip.NewWriter(&bytes.Buffer{})
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with crm_tls_lab(tmp_path_factory.mktemp("plaintext-go"), "lt-gotls", HOST_IP, CRM_IP,
                     (CGROUP,)) as where:
        yield where


@pytest.fixture(scope="module")
def monitor(lab: dict[str, Any]) -> Iterator[tuple[PlaintextMonitor, Collected]]:
    with running_monitor(lab, lab_config(lab, CONFIG)) as running:
        yield running


@pytest.fixture
def collected(monitor: tuple[PlaintextMonitor, Collected]) -> Collected:
    monitor[1].clear()
    return monitor[1]


def start_client(lab: dict[str, Any], binary: Path, body: str,
                 count: int = 1) -> subprocess.Popen[bytes]:
    p = subprocess.Popen(in_cgroup(lab["mount"], CGROUP, [str(binary), URL, HOST, body,
                                                          str(count)]),
                         cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline() == b"started\n"
    return p


def wait_go_probed(mon: PlaintextMonitor, pid: int, collected: Collected) -> None:
    assert collected.wait(lambda: [1] if any(
        "go_client" in path for path in mon.probed_pids().get(pid, [])) else [],
        timeout=10), f"pid {pid}'s Go executable was never probed: {mon.probed_pids()}"


def finish(p: subprocess.Popen[bytes], count: int = 1) -> list[str]:
    out, err = p.communicate(b"go\n", timeout=30)
    assert p.returncode == 0, err.decode(errors="replace")[-2000:]
    lines = out.decode().splitlines()
    assert lines == ["status 200 2"] * count, lines
    return lines


@pytest.mark.parametrize("build_kind", ["plain", "stripped", "static"])
def test_go_client_canary_over_tls(lab, monitor, collected, go_clients, build_kind):
    mon, _ = monitor
    joined = mon.counters["joined_writes"]
    p = start_client(lab, go_clients[build_kind], json.dumps({"Body": f"see {CANARY} here"}))
    wait_go_probed(mon, p.pid, collected)
    finish(p)

    (f,) = collected.finding("canary_token")
    assert f.tenant == "acme" and f.crm_vendor == "salesforce"
    assert f.evidence["canary_record"] == "Account/001GOLANG"
    assert f.evidence["pid"] == p.pid and f.evidence["comm"] == go_clients[build_kind].name[:15]
    # the socket came from the Conn (net.TCPConn -> netFD -> Sysfd): joined to the flow
    assert mon.counters["joined_writes"] > joined
    assert [c.destination for c in mon.coverage.values() if c.pid == p.pid] == [f"{CRM_IP}:443"]
    found = mon.go_processes[p.pid]
    assert found.inspected and found.table == ".gopclntab"
    assert mon.kernel_stats()["ssl_cnt_go_fd"] >= 1


def test_go_binary_without_tables_is_reported_not_guessed(lab, monitor, collected, go_clients):
    mon, _ = monitor
    p = start_client(lab, go_clients["hidden"], json.dumps({"Body": CANARY}))
    try:
        assert collected.wait(lambda: [1] if p.pid in mon.go_processes else [], timeout=10)
        found = mon.go_processes[p.pid]
        assert found.reason == golang.REASON_NO_TABLES == "go without symbol tables"
        assert not found.inspected and found.probes == ()
        assert not any("go_client" in path for path in mon.probed_pids().get(p.pid, []))
        assert mon.stats()["plaintext_go_not_inspectable"] >= 1
    finally:
        finish(p)  # it still runs: the runtime does not look tables up by section name
    assert collected.findings == []


def test_go_binary_rebuilt_in_place_is_probed_at_its_new_addresses(lab, monitor, collected,
                                                                  go_clients, tmp_path):
    """A connector redeployed at the same path (a new inode) has crypto/tls elsewhere:
    probes left at the old addresses would trap mid-instruction or miss its writes."""
    mon, _ = monitor
    old = golang.inspect_go_binary(str(go_clients["plain"]))
    new = golang.inspect_go_binary(str(go_clients["rebuilt"]))
    assert old is not None and new is not None and old.write and new.write
    assert old.write.entry != new.write.entry
    deployed = tmp_path / "go_client"
    for version in ("plain", "rebuilt"):
        collected.clear()
        staged = tmp_path / "staged"
        shutil.copy(go_clients[version], staged)
        os.replace(staged, deployed)  # as a deployment does: a new file at the same path
        p = start_client(lab, deployed, json.dumps({"Body": CANARY}))
        wait_go_probed(mon, p.pid, collected)
        finish(p)
        (f,) = collected.finding("canary_token")
        assert f.evidence["pid"] == p.pid, version


class Exchanges:
    """An inspector exchange sink: the request/response pairs of the from_crm side."""

    def __init__(self) -> None:
        self.got: list[CrmExchange] = []

    def on_exchange(self, exchange: CrmExchange) -> None:
        self.got.append(exchange)


def test_go_client_reads_are_its_from_crm_stream(lab, monitor, collected, go_clients):
    """What tls.Conn.Read returned (taken at Read's RETs, matched by goroutine) is the
    connection's from_crm stream: each request is paired with its 200 answer."""
    mon, _ = monitor
    sink = Exchanges()
    mon.inspector.exchange_sinks.append(sink)
    before = mon.stats()
    try:
        p = start_client(lab, go_clients["stripped"], json.dumps({"Body": "no canary"}), count=2)
        wait_go_probed(mon, p.pid, collected)
        finish(p, count=2)
        assert collected.wait(lambda: [e for e in sink.got if e.pid == p.pid][1:]), sink.got
    finally:
        mon.inspector.exchange_sinks.remove(sink)
    after = mon.stats()
    mine = [e for e in sink.got if e.pid == p.pid]
    assert [(e.method, e.status, e.response_body) for e in mine] == [("POST", 200, b"ok")] * 2
    assert {(e.tenant, e.vendor) for e in mine} == {("acme", "salesforce")}
    # two answers, each "HTTP/1.1 200 OK" + headers + "ok", counted as read bytes
    read = after["plaintext_captured_read_bytes"] - before.get("plaintext_captured_read_bytes", 0)
    assert read > 2 * len("HTTP/1.1 200 OK\r\n\r\nok")
    assert after["ssl_loss_go_unmatched"] == before["ssl_loss_go_unmatched"]
