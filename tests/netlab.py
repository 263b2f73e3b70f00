"""Test hosts as network namespaces joined to the host by veth pairs.

Addresses come only from 198.18.0.0/15. The agent runs in the host
namespace, as in production, on the host end of the veth; the far end sits
in a namespace posing as the CRM. Everything made here is removed on exit.
"""

from __future__ import annotations

import contextlib
import ipaddress
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TEST_NET = ipaddress.ip_network("198.18.0.0/15")


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


@dataclass
class VethLab:
    host_if: str
    netns: str
    host_ip: str
    peer_ip: str

    def tx_bytes(self) -> int:
        return int(Path(f"/sys/class/net/{self.host_if}/statistics/tx_bytes").read_text())

    def in_ns(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *cmd]


@contextlib.contextmanager
def veth_lab(
    name: str, host_ip: str, peer_ip: str, prefix: int = 30, extra_host_ips: tuple[str, ...] = ()
) -> Iterator[VethLab]:
    for ip in (host_ip, peer_ip):
        assert ipaddress.ip_address(ip) in TEST_NET, f"{ip} is outside 198.18.0.0/15"
    host_if, peer_if, ns = f"{name}-h", f"{name}-p", f"{name}-ns"
    cleanup(name)  # a previous crashed run
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if)
        sh("ip", "link", "set", peer_if, "netns", ns)
        # no IPv6 chatter (ND, MLD) to blur byte comparisons
        sh("sysctl", "-qw", f"net.ipv6.conf.{host_if}.disable_ipv6=1")
        sh("ip", "addr", "add", f"{host_ip}/{prefix}", "dev", host_if)
        for extra in extra_host_ips:
            assert ipaddress.ip_address(extra) in TEST_NET
            sh("ip", "addr", "add", f"{extra}/32", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        lab = VethLab(host_if, ns, host_ip, peer_ip)
        sh(*lab.in_ns("sysctl", "-qw", f"net.ipv6.conf.{peer_if}.disable_ipv6=1"))
        sh(*lab.in_ns("ip", "addr", "add", f"{peer_ip}/{prefix}", "dev", peer_if))
        sh(*lab.in_ns("ip", "link", "set", peer_if, "up"))
        sh(*lab.in_ns("ip", "link", "set", "lo", "up"))
        yield lab
    finally:
        sh("ip", "link", "del", host_if, check=False)
        sh("ip", "netns", "del", ns, check=False)


def cleanup(name: str) -> None:
    """Remove what a crashed run of lab `name` left (only that lab's link and namespace)."""
    sh("ip", "link", "del", f"{name}-h", check=False)
    sh("ip", "netns", "del", f"{name}-ns", check=False)


def make_cert(directory: Path, cn: str) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
       "-subj", f"/CN={cn}", "-keyout", str(key), "-out", str(cert))
    return cert, key


# A TLS sink that reads until the peer closes (openssl s_server without a
# terminal closes early). The client announces its length in 8 bytes and the
# sink answers "ok" once it has everything, so the client knows the bytes crossed.
TLS_SINK = textwrap.dedent(
    """
    import socket, ssl, sys
    cert, key, host, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv = socket.create_server((host, port))
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls:
                buf = b""
                want = None
                while chunk := tls.recv(65536):
                    buf += chunk if want is None else b""
                    if want is None and len(buf) >= 8:
                        want, got = int.from_bytes(buf[:8], "big"), len(buf) - 8
                    elif want is not None:
                        got += len(chunk)
                    if want is not None and got >= want:
                        tls.sendall(b"ok")
                        want = None
                        buf = b""
        except (ssl.SSLError, OSError):
            pass
    """
)


@contextlib.contextmanager
def ns_server(lab: VethLab, script: str, *args: str) -> Iterator[None]:
    """Run a Python server script in the lab's namespace until the block ends;
    the script prints "ready" once it listens."""
    proc = subprocess.Popen(
        lab.in_ns(sys.executable, "-c", script, *args),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.stderr.read() if proc.stderr else line
        yield
    finally:
        proc.kill()
        proc.wait()


def tls_sink(
    lab: VethLab, cert: Path, key: Path, port: int = 443
) -> contextlib.AbstractContextManager[None]:
    return ns_server(lab, TLS_SINK, str(cert), str(key), lab.peer_ip, str(port))


def tls_upload(
    host: str, port: int, sni: str | None, nbytes: int, timeout: float = 20,
    source: str | None = None,
) -> None:
    """Send nbytes over TLS with the given SNI (None: no SNI extension); the
    certificate is not verified (a lab CA)."""
    import socket
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + timeout
    src = (source, 0) if source else None
    with socket.create_connection((host, port), timeout=timeout, source_address=src) as raw:
        with ctx.wrap_socket(raw, server_hostname=sni) as tls:
            tls.sendall(nbytes.to_bytes(8, "big"))
            block = b"x" * 65536
            sent = 0
            while sent < nbytes and time.monotonic() < deadline:
                n = min(len(block), nbytes - sent)
                tls.sendall(block[:n])
                sent += n
            assert sent == nbytes, f"sent {sent} of {nbytes} bytes before the deadline"
            assert tls.recv(2) == b"ok", "the sink did not confirm receipt"


# A DNS responder answering every A query with the configured address.
DNS_RESPONDER = textwrap.dedent(
    """
    import socket, sys
    import dpkt
    host, answer_ip = sys.argv[1], sys.argv[2]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 53))
    print("ready", flush=True)
    while True:
        data, peer = s.recvfrom(2048)
        q = dpkt.dns.DNS(data)
        r = dpkt.dns.DNS(id=q.id, qr=dpkt.dns.DNS_R, opcode=q.opcode, rd=q.rd, ra=1, qd=q.qd)
        for question in q.qd:
            rr = dpkt.dns.DNS.RR(name=question.name, type=dpkt.dns.DNS_A, cls=dpkt.dns.DNS_IN,
                                 ttl=300, rdata=socket.inet_aton(answer_ip))
            r.an.append(rr)
        s.sendto(bytes(r), peer)
    """
)


def dns_responder(lab: VethLab, answer_ip: str) -> contextlib.AbstractContextManager[None]:
    return ns_server(lab, DNS_RESPONDER, lab.peer_ip, answer_ip)


def dns_query(server: str, name: str, timeout: float = 5) -> bytes:
    """Ask `server` for the A record of `name`; returns the raw answer."""
    import socket

    import dpkt

    q = dpkt.dns.DNS(id=0x4C54, rd=1, qd=[dpkt.dns.DNS.Q(name=name, type=dpkt.dns.DNS_A)])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(bytes(q), (server, 53))
        return s.recv(2048)
