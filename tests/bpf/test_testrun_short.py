"""testrun.tc_refuses predicts exactly which short frames a TC test run rejects (issue 17.7).

`leaktap replay` counts those frames itself instead of running them, so the
prediction is pinned to the running kernel: every IPv4/IPv6/other frame length
around the IP header size, run for real.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP
from scapy.layers.inet6 import IPv6

from leaktap.controller.kernel import testrun
from tests.bpf.lt_frames import eth

pytestmark = pytest.mark.kernel

FULL = {
    "ipv4": bytes(eth() / IP(src="198.18.0.1", dst="198.19.0.2")) + b"\0" * 20,
    "ipv6": bytes(eth() / IPv6(src="2001:db8::1", dst="2001:db8:1::2")) + b"\0" * 20,
    "arp": bytes(eth(type=0x0806)) + b"\0" * 60,
}


@pytest.mark.parametrize("kind", FULL)
def test_tc_refuses_matches_the_kernel(tc, kind):
    fd = tc.probes.fd("egress")
    wrong = []
    for n in range(testrun.ETH_HLEN, 70):
        frame = FULL[kind][:n]
        try:
            testrun.run_frame(fd, frame)
            refused = False
        except OSError:
            refused = True
        if refused != testrun.tc_refuses(frame):
            wrong.append((n, refused))

    assert wrong == []
