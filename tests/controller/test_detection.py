"""The live agent's feeding of the streaming detector (controller/detection.py)."""

from __future__ import annotations

import time
from pathlib import Path

from leaktap.analytics.incidents import Incident
from leaktap.controller.config import parse_config
from leaktap.controller.detection import LiveDetection
from leaktap.controller.storage import BucketKey, Store, Volume

CONFIG = """
tenants:
  - name: acme
    allow: ["salesforce:acme"]
"""
T0 = 1_800_000_000 - 1_800_000_000 % 60


def _wait(got: list[Incident], n: int) -> None:
    deadline = time.monotonic() + 10
    while len(got) < n and time.monotonic() < deadline:
        time.sleep(0.01)


def test_unsanctioned_pages_at_the_poll_and_the_detector_folds_into_it(tmp_path: Path) -> None:
    store = Store(tmp_path / "lt.db")
    got: list[Incident] = []
    live = LiveDetection(parse_config(CONFIG), store, got.append)
    live.start()
    try:
        ok = BucketKey(T0, "acme", "salesforce", "acme", "acme.my.salesforce.com")
        bad = BucketKey(T0, "acme", "salesforce", "rogue", "rogue.my.salesforce.com")
        live.add({ok: Volume(5000, 5, 100, 1)}, now=T0 + 1)
        assert got == []  # sanctioned
        live.add({bad: Volume(7000, 7, 0, 0)}, now=T0 + 2)
        assert [(i.kind, i.crm_instance, i.first_ts) for i in got] == [
            ("unsanctioned_destination", "rogue", T0)
        ]
        live.add({bad: Volume(10, 1, 0, 0)}, now=T0 + 3)
        assert len(got) == 1  # same episode: not paged again
        live.add({}, now=T0 + 61)  # the minute closes: the detector scores it
        _wait(got, 2)
        assert [i.kind for i in got] == ["unsanctioned_destination"] * 2
        assert got[1].dedup_key == got[0].dedup_key  # folds into the same alert
    finally:
        live.stop()
        store.close()


def test_warm_start_feeds_history_without_paging_it_again(tmp_path: Path) -> None:
    store = Store(tmp_path / "lt.db")
    rows = {
        BucketKey(T0 - 3600 + 60 * i, "acme", "salesforce", "rogue", "r.example"):
            Volume(1000, 1, 0, 0)
        for i in range(10)
    }
    store.write(rows, [])
    got: list[Incident] = []
    live = LiveDetection(parse_config(CONFIG), store, got.append)
    assert live.warm_start(now=T0 + 5) == 10
    assert got == []
    assert live.detector.series_count > 0
    store.close()


def test_an_unknown_instance_of_an_allowed_vendor_is_not_unsanctioned(tmp_path: Path) -> None:
    # the attribution leaves the instance unknown when several instances share an address
    store = Store(tmp_path / "lt.db")
    got: list[Incident] = []
    live = LiveDetection(parse_config(CONFIG), store, got.append)
    unknown = BucketKey(T0, "acme", "salesforce", None, "198.18.5.5")
    other_vendor = BucketKey(T0, "acme", "hubspot", None, "api.hubapi.com")
    live.add({unknown: Volume(9000, 9, 0, 0)}, now=T0 + 1)
    assert got == []
    live.add({other_vendor: Volume(9000, 9, 0, 0)}, now=T0 + 2)
    assert [(i.kind, i.crm_vendor) for i in got] == [("unsanctioned_destination", "hubspot")]
    store.close()
