"""Kernel-read server names (lt_names, drained in batches) name conversations (issue 12.4)."""

from __future__ import annotations

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
