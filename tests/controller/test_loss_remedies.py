"""Every kernel loss reason is exported with a remedy (issue 11.3: the split-hello give-ups)."""

from __future__ import annotations

from leaktap.controller.api.routes.metrics import LOSS_RING
from leaktap.controller.kernel import abi
from leaktap.controller.kernel.loss import REMEDIES, LossMonitor


def test_every_kernel_loss_reason_has_a_remedy() -> None:
    losses = {name for name in abi.stat_names() if name.startswith("loss_")}

    assert {"loss_hello_walk", "loss_hello_gap", "loss_hello_segs"} <= losses
    assert losses - set(REMEDIES) == set()


def test_hello_give_ups_are_reported_against_the_hello_map() -> None:
    for reason in ("loss_hello_pending", "loss_hello_walk", "loss_hello_gap"):
        assert LOSS_RING[reason] == "lt_hello"


def test_every_kernel_name_give_up_has_a_remedy_and_is_logged_when_it_rises(caplog) -> None:
    give_ups = {name for name in abi.stat_names() if name.startswith("sni_giveup_")}
    monitor = LossMonitor()
    monitor.check({"sni_giveup_names_full": 0, "cnt_sni_named": 0})

    rises = monitor.check({"sni_giveup_names_full": 7, "cnt_sni_named": 50})

    assert "sni_giveup_names_full" in give_ups and give_ups - set(REMEDIES) == set()
    assert rises == {"sni_giveup_names_full": 7}  # a name-outcome counter is no loss
    assert "LT_NAMES_MAX" in caplog.text
