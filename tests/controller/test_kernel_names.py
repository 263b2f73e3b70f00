"""Kernel-read server names (lt_names, drained in batches) name conversations (issue 12.4)."""

from __future__ import annotations

from leaktap.controller.attribution import losses
from leaktap.controller.attribution.attributor import Attributor
from leaktap.controller.config import LeaktapConfig
from leaktap.controller.kernel.maps import FlowKey, KernelName

KEY = FlowKey(0, 4, 6, 0, "198.18.0.1", "198.19.0.2", 40000, 443)


def kernel_name(name: str | None, outcome: str = "named") -> KernelName:
    return KernelName(KEY, name, outcome, False, 1000, 1, 0, 2)


def test_a_kernel_name_names_the_connection_and_its_crm() -> None:
    a = Attributor(LeaktapConfig(), live=True)

    a.on_kernel_name(kernel_name("acme.my.salesforce.com"))

    sni, _, crm = a.destination(4, ("198.18.0.1", 40000), ("198.19.0.2", 443))
    assert sni == "acme.my.salesforce.com"
    assert crm is not None and (crm.vendor, crm.instance) == ("salesforce", "acme")
    assert a.samples["kernel_name"] == 1


def test_an_unnamed_reading_leaves_the_flow_to_the_ring_event() -> None:
    a = Attributor(LeaktapConfig(), live=True)

    a.on_kernel_name(kernel_name(None, "malformed"))

    assert a.destination(4, ("198.18.0.1", 40000), ("198.19.0.2", 443))[0] is None


def test_every_kernel_reading_is_counted_by_outcome_and_exported_with_a_remedy() -> None:
    a = Attributor(LeaktapConfig(), live=True)

    for name, outcome in [("acme.my.salesforce.com", "named"), (None, "no_name"),
                          (None, "malformed"), (None, "limit"), (None, "unknown_9")]:
        a.on_kernel_name(kernel_name(name, outcome))

    stats = a.kernel_names.stats
    assert (stats.named, stats.no_name) == (1, 1)  # outcomes, not drops
    drops = {k: v for k, v in losses.drops(a).items() if k[0] == "kernel_names"}
    assert drops == {("kernel_names", "malformed"): 1, ("kernel_names", "limit"): 1,
                     ("kernel_names", "unknown_outcome"): 1}
    for _, reason in drops:
        assert losses.remedy("kernel_names", reason) != losses.DEFAULT_REMEDY["kernel_names"]


def test_flows_to_one_host_share_one_hello_stand_in() -> None:
    a = Attributor(LeaktapConfig(), live=True)
    other = FlowKey(0, 4, 6, 0, "198.18.0.1", "198.19.0.2", 40001, 443)

    a.on_kernel_name(kernel_name("acme.my.salesforce.com"))
    a.on_kernel_name(KernelName(other, "acme.my.salesforce.com", "named", False, 1000, 1, 0, 2))

    first = a.destination(4, ("198.18.0.1", 40000), ("198.19.0.2", 443))
    second = a.destination(4, ("198.18.0.1", 40001), ("198.19.0.2", 443))
    assert first[0] == second[0] == "acme.my.salesforce.com"
    assert len(a.kernel_names._hellos) == 1


def test_a_drained_batch_names_as_one_reading_at_a_time_does() -> None:
    rows = [(4, 6, "198.18.0.1", 40000 + i, "198.19.0.2", 443, name, outcome, False, 0, 0,
             1000, 1, 2, 3)
            for i, (name, outcome) in enumerate([("acme.my.salesforce.com", "named"),
                                                 (None, "malformed"), (None, "no_name")])]
    batch, single = Attributor(LeaktapConfig(), live=True), Attributor(LeaktapConfig(), live=True)

    named = batch.on_kernel_names(rows)
    for r in rows:
        single.on_kernel_name(KernelName(FlowKey(0, 4, 6, 0, r[2], r[4], r[3], r[5]), r[6], r[7],
                                         r[8], 1000, 1, 2, 3))

    assert named == [(4, 6, ("198.18.0.1", 40000), ("198.19.0.2", 443))]
    for port in (40000, 40001, 40002):
        ends = (("198.18.0.1", port), ("198.19.0.2", 443))
        assert batch.destination(4, *ends) == single.destination(4, *ends)
    assert batch.kernel_names.stats == single.kernel_names.stats
    assert batch.samples["kernel_name"] == 3
