"""Naming at line rate (issue 12): a single-segment hello the kernel names leaves the ring.

The default build names the common single-segment ClientHello in the kernel and
hands user space only its lt_names record; the ring keeps what the kernel does
not name (no valid name, malformed, the tail program missing) with the exact
bytes, and split hellos as before. Every frame goes through the compiled TC
egress program with BPF_PROG_TEST_RUN.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from leaktap.controller.attribution.attributor import Attributor
from leaktap.controller.attribution.flows import ConversationTable
from leaktap.controller.config import LeaktapConfig
from leaktap.controller.kernel.loader import KernelOptions
from leaktap.controller.protocols.tls import HelloReassembler, parse_client_hello
from tests.bpf.harness import Harness, Kernel
from tests.bpf.lt_frames import SNI, tcp4, tcp6
from tests.controller.test_tls import _corrupt, make_hello

pytestmark = pytest.mark.kernel

NAMED = make_hello(SNI.encode(), seed=2, padding=0)
# a build of its own: the test empties its tail-call slot
NO_TAIL = KernelOptions(flows_max=2048)


@pytest.mark.parametrize("frame_of", [tcp4, tcp6], ids=["ipv4", "ipv6"])
def test_named_hello_reaches_user_space_as_its_name_and_not_on_the_ring(
        tc: Harness, frame_of: Callable[..., bytes]) -> None:
    out = tc.run(frame_of(NAMED, sport=47001, seq=777))

    assert out.hello_samples() == []
    assert out.changed() == {"cnt_flow_new": 1, "cnt_sni_named": 1}
    [name] = out.names
    assert (name.name, name.outcome, name.seq, name.key.sport) == (SNI, "named", 777, 47001)
    # the attribution pipeline names the conversation from the record alone
    attributor = Attributor(LeaktapConfig(), live=False)
    attributor.on_kernel_name(name)
    table = ConversationTable()
    names = attributor.names(table.add(out.flow()))
    assert (names.sni, names.crm_vendor, names.crm_instance) == (SNI, "salesforce", "acme")
    assert attributor.kernel_names.stats.named == 1


@pytest.mark.parametrize(
    ("record", "outcome", "user_sni"),
    [
        (make_hello(None, seed=5), "no_name", None),
        (make_hello(b"server4:443", seed=6), "no_name", None),
        (_corrupt(NAMED, NAMED.index(SNI.encode()) - 2, b"\x00\x04"), "malformed", None),
    ],
    ids=["no_sni", "invalid_name", "malformed"],
)
def test_unnamed_hello_goes_to_the_ring_with_its_exact_bytes_counted_by_reason(
        tc: Harness, record: bytes, outcome: str, user_sni: str | None) -> None:
    out = tc.run(tcp4(record, sport=47002, seq=5000))

    [sample] = out.hello_samples()
    assert (sample.seq, sample.data) == (5000, record)
    [name] = out.names
    assert (name.name, name.outcome) == (None, outcome)
    reason = {"no_name": "cnt_sni_no_name", "malformed": "sni_malformed"}[outcome]
    assert out.changed() == {"cnt_flow_new": 1, reason: 1, "cnt_sni_to_ring": 1,
                             "cnt_ev_hello": 1}
    hello = parse_client_hello(record)
    assert (hello.sni if hello is not None else None) == user_sni
    attributor = Attributor(LeaktapConfig(), live=False)
    attributor.on_kernel_name(name)
    assert getattr(attributor.kernel_names.stats, outcome) == 1


def test_split_hello_still_goes_through_the_ring_and_is_named_too(tc: Harness) -> None:
    cut = 100
    out = tc.run([tcp4(NAMED[:cut], sport=47003, seq=9000),
                  tcp4(NAMED[cut:], sport=47003, seq=9000 + cut)])

    assert [(s.seq, len(s.data)) for s in out.hello_samples()] == [
        (9000, cut), (9000 + cut, len(NAMED) - cut)]
    r = HelloReassembler()
    hellos = [r.feed("f", s.seq, s.data) for s in out.hello_samples()]
    assert hellos[-1] is not None and hellos[-1].sni == SNI
    assert [(n.name, n.outcome) for n in out.names] == [(SNI, "named")]
    assert "cnt_sni_to_ring" not in out.changed()


def test_hello_whose_tail_program_is_missing_goes_to_the_ring_counted(
        kernels: Callable[[KernelOptions], Kernel], pinned_cpu: int) -> None:
    h = Harness(kernels(NO_TAIL))
    progs = h.probes.table("lt_progs")
    del progs[progs.Key(0)]

    out = h.run(tcp4(NAMED, sport=47004, seq=1234))

    assert [(s.seq, s.data) for s in out.hello_samples()] == [(1234, NAMED)]
    assert out.names == []
    assert out.changed() == {"cnt_flow_new": 1, "loss_sni_tail": 1, "cnt_sni_to_ring": 1,
                             "cnt_ev_hello": 1}
