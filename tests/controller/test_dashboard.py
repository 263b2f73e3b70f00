"""The dashboard in a real browser: Debian's chromium driven by Playwright against a
uvicorn server on 127.0.0.1, over a real Store with eight days of minute buckets for
two tenants, the live detector warmed on them (its baselines in the volume response),
and alerts the detector raised on the last hour, recorded by a real AlertManager.

Never `playwright install`: it downloads a browser build; the test uses
/usr/bin/chromium (scripts/setup.sh installs it)."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient

from leaktap.analytics.alert_settings import AlertsSettings
from leaktap.analytics.alerts import AlertManager, Finding
from leaktap.analytics.buckets import Bucket
from leaktap.controller.api.main import create_app
from leaktap.controller.config import parse_config
from leaktap.controller.detection import LiveDetection
from leaktap.controller.storage import BucketKey, Store, Volume, minute_of
from tests.prerequisites import missing

READER = "reader-token-0123456789"
ADMIN = "admin-token-0123456789ab"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOTS = Path("/tmp")
DAYS = 8
LIVE_MINUTES = 60  # the last hour is scored live, after the warm start
BURST_AGO = 40  # acme's exfiltration: minutes before the end, for BURST_MINUTES
BURST_MINUTES = 8
ROGUE_AGO = 15  # globex starts sending to an instance outside its allow list

CONFIG = """
tenants:
  - name: acme
    match: {sni: "{tenant}.my.salesforce.com"}
    allow: ["salesforce:acme"]
  - name: globex
    match: {sni: "{tenant}.hubspot.com"}
    allow: ["hubspot:globex"]
"""


def _browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e .[test])"
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing (apt-get install chromium; scripts/setup.sh does)"
    return None


class AgentView:
    """What the routes read from a running Agent, without the kernel."""

    def __init__(self, store: Store, alerts: AlertManager, detection: LiveDetection) -> None:
        self.config = parse_config(CONFIG)
        self.config_tenant_names = {t.name for t in self.config.tenants}
        self.store, self.alerts, self.detection = store, alerts, detection
        self.outbox = None
        self.plaintext = None
        self.stats = {"cnt_flow_new": 5120, "cnt_hello": 812, "loss_ringbuf_full": 3,
                      "loss_flow_insert": 0, "loss_truncated": 0}
        self.totals = {0: (9_000_000, 9000), 1: (2_000_000, 4000)}
        self.cgroup_totals: dict[int, tuple[int, int]] = {}
        self.unattributed_bytes = 0
        self.table: list[object] = []
        self.interfaces = ["lt-test0"]
        self.attached = True
        self.probes = SimpleNamespace(attach_modes={"lt-test0": "tc"})
        self.egress_by_destination: dict[tuple[str, str, str], tuple[int, int]] = {}

    def ready(self) -> tuple[bool, str]:
        return True, "ok"


def _demo_rows(end: int) -> list[tuple[BucketKey, Volume]]:
    """Eight days per minute: a daily cycle with log-normal noise for acme (Salesforce and
    some non-CRM traffic) and globex (HubSpot), acme's burst and globex's rogue instance."""
    rng = np.random.default_rng(8)
    minutes = np.arange(end - DAYS * 86400, end + 60, 60)
    hours = (minutes % 86400) / 3600
    cycle = 1 + 0.6 * np.sin(2 * math.pi * (hours - 9) / 24)
    series = [
        ("acme", "salesforce", "acme", "acme.my.salesforce.com", 180_000),
        ("acme", None, None, "198.18.9.9", 30_000),
        ("globex", "hubspot", "globex", "globex.hubspot.com", 70_000),
    ]
    rows = []
    for tenant, vendor, instance, dest, scale in series:
        out = scale * cycle * rng.lognormal(0, 0.15, len(minutes))
        if dest == "acme.my.salesforce.com":
            start = end - BURST_AGO * 60
            burst = (minutes >= start) & (minutes < start + BURST_MINUTES * 60)
            out[burst] = 3 * 2**20 * rng.lognormal(0, 0.05, int(burst.sum()))
        for ts, b in zip(minutes.tolist(), out.tolist(), strict=True):
            rows.append((BucketKey(ts, tenant, vendor, instance, dest),
                         Volume(int(b), int(b) // 1400 + 1, int(b) // 8, int(b) // 9000 + 1)))
    for ts in range(end - ROGUE_AGO * 60, end + 60, 60):
        rows.append((BucketKey(ts, "globex", "salesforce", "initech", "initech.my.salesforce.com"),
                     Volume(400_000, 290, 20_000, 20)))
    return rows


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentView]:
    tmp = tmp_path_factory.mktemp("dashboard")
    store = Store(tmp / "lt.db")
    end = minute_of(time.time()) - 60  # the last closed minute
    rows = _demo_rows(end)
    store.write(dict(rows), [])
    alerts = AlertManager(store.path, [], AlertsSettings())
    config = parse_config(CONFIG)
    raised: list[Any] = []
    detection = LiveDetection(config, store, on_incident=raised.append)
    live_from = end - LIVE_MINUTES * 60
    detection.warm_start(live_from)
    # the last hour as the agent would score it, minute by minute
    for key, vol in sorted(rows, key=lambda r: r[0].ts):
        if key.ts >= live_from and key.crm_vendor is not None:
            raised += detection.detector.observe(Bucket(
                key.ts, key.tenant, key.crm_vendor, key.crm_instance, vol.bytes_out, vol.bytes_in))
    raised += detection.detector.advance(end + 60)
    for incident in raised:
        alerts.record(incident, now=incident.raised_ts)
    alerts.record(Finding(
        kind="canary_token", tenant="globex", severity="critical", crm_vendor="hubspot",
        crm_instance="globex", summary="canary record CANARY-7f3a sent to hubspot:globex",
        ts=end - 5 * 60, evidence={"canary": "CANARY-7f3a", "snippet": "…\"Email\":\"[redacted]\"…",
                                   "content_hmac": "9b1f0c2e55d1a7c4", "pid": 4242}))
    yield AgentView(store, alerts, detection)
    alerts.close()
    store.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve(agent: AgentView) -> Iterator[str]:
    """The API and dashboard of `agent` on a real uvicorn server; yields its base URL."""
    app = create_app(agent, readers=[READER], admins=[ADMIN], manage=False)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                        access_log=False))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def server(agent: AgentView) -> Iterator[str]:
    with serve(agent) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    reason = _browser_missing()
    if reason:
        missing(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


class Session:
    """A browser context signed in with one token, recording every request it makes."""

    def __init__(self, browser: Any, base: str) -> None:
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.page = self.context.new_page()
        self.hosts: set[str] = set()
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.hosts.add(urlsplit(r.url).hostname or r.url))
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.base = base

    def sign_in(self, token: str) -> Any:
        response = self.page.goto(self.base + "/")
        assert response.status == 401  # nothing but the form without a session
        # its inline style is allowed by hash in the CSP: a wrong hash leaves it unstyled
        button = "b => getComputedStyle(b).backgroundColor"
        assert self.page.eval_on_selector("button", button) == "rgb(37, 99, 235)"
        self.errors.clear()  # the browser logs that 401
        self.page.fill("#token", token)
        self.page.click("button[type=submit]")
        self.page.wait_for_selector("body[data-ready=true]", timeout=10_000)
        return self.page


@pytest.fixture
def session(browser: Any, server: str) -> Iterator[Session]:
    s = Session(browser, server)
    yield s
    s.context.close()


def test_reader_sees_volume_against_its_baseline_and_the_alerts(session: Session) -> None:
    page = session.sign_in(READER)
    assert page.text_content("#role") == "reader"

    cards = page.locator(".tenant-card")
    assert sorted(cards.evaluate_all("cs => cs.map(c => c.dataset.tenant)")) == ["acme", "globex"]
    acme = page.locator(".tenant-card[data-tenant=acme]")
    box = acme.locator("canvas").bounding_box()
    assert box is not None and box["width"] > 600 and box["height"] > 150
    # x, CRM egress, all egress, expected, band low, band high
    assert acme.locator(".u-legend .u-series").count() == 6
    assert "no baseline" not in acme.locator(".chart-alerts").text_content()
    assert int(acme.get_attribute("data-alerts")) >= 1  # the burst's alert is on the chart
    # hovering a minute fills the legend with that minute's values
    over = acme.locator(".u-over").bounding_box()
    page.mouse.move(over["x"] + over["width"] * 0.5, over["y"] + over["height"] * 0.5)
    values = acme.locator(".u-legend .u-series .u-value").all_text_contents()
    assert any(v.endswith("KiB") or v.endswith("MiB") for v in values[1:4]), values

    def alert_row(kind: str, tenant: str) -> Any:
        return (page.locator("tr.alert")
                .filter(has=page.locator("td.kind", has_text=kind))
                .filter(has=page.locator("td.tenant", has_text=tenant)))

    burst = alert_row("volume_anomaly", "acme")  # raised by the detector on the burst
    assert burst.is_visible() and "salesforce:acme" in burst.text_content()
    assert alert_row("unsanctioned_destination", "globex").is_visible()
    assert alert_row("canary_token", "globex").is_visible()
    burst.click()  # its evidence unfolds below it
    evidence = page.locator("tr.detail:visible .evidence")
    assert "observed_bytes" in evidence.text_content()

    assert page.locator("button.ack, button.resolve").count() == 0  # a reader cannot act
    assert page.locator("#losses tr.lost").count() == 1
    assert "raise kernel.ringbuf_pages" in page.text_content("#losses")
    page.screenshot(path=str(SCREENSHOTS / "leaktap-dashboard-reader.png"), full_page=True)
    assert _overlapping_tick_labels(page) == []  # the default range, across a day change
    assert session.hosts == {"127.0.0.1"}
    assert session.errors == []  # CSP violations and script errors land here


def test_admin_can_acknowledge_from_the_page(session: Session, agent: AgentView) -> None:
    page = session.sign_in(ADMIN)
    assert page.text_content("#role") == "admin"
    row = page.locator("tr.alert.open").first
    alert_id = int(row.get_attribute("data-alert-id"))
    assert row.locator("button.ack").is_visible() and row.locator("button.resolve").is_visible()
    page.screenshot(path=str(SCREENSHOTS / "leaktap-dashboard-admin.png"), full_page=True)
    row.locator("button.ack").click()
    page.wait_for_selector(f"tr.alert.acknowledged[data-alert-id='{alert_id}']")
    assert agent.alerts.get(alert_id)["status"] == "acknowledged"
    assert session.errors == []
    page.click("#sign-out")
    page.wait_for_selector("#token")  # back to the form (a 401): the session is gone
    assert page.evaluate("fetch('/v1/whoami').then(r => r.status)") == 401
    assert session.hosts == {"127.0.0.1"}


# what a poll of the agent writes once it drained a 12 MB upload to acme's instance
UPLOAD = 12_000_000
UPLOAD_KEY = ("acme", "salesforce", "acme", "acme.my.salesforce.com")

# The x-axis tick labels of every chart as uPlot drew them on its canvas: each label's
# horizontal extent (centred on its tick), measured with the axis font.
TICK_LABEL_BOXES = """() => [...state.charts.values()].map((h) => {
  const u = h.plot, axis = u.axes[0];
  const ctx = document.createElement("canvas").getContext("2d");
  ctx.font = Array.isArray(axis.font) ? axis.font[0] : axis.font;
  return axis._splits.map((v, i) => [v, axis._values[i]])
    .filter(([, t]) => t !== null && t !== undefined && String(t) !== "")
    .map(([v, t]) => {
      const w = Math.max(...String(t).split("\\n").map((l) => ctx.measureText(l).width));
      const x = u.valToPos(v, "x", true);
      return [x - w / 2, x + w / 2, String(t)];
    });
})"""


def _overlapping_tick_labels(page: Any) -> list[tuple[str, str]]:
    """Pairs of neighbouring x-axis labels that overlap (or touch: under 4 px apart)."""
    charts = page.evaluate(TICK_LABEL_BOXES)
    assert charts and all(len(boxes) >= 4 for boxes in charts), charts
    return [(a[2], b[2]) for boxes in map(sorted, charts)
            for a, b in itertools.pairwise(boxes) if b[0] - a[1] < 4]


@pytest.fixture
def just_sent(tmp_path: Path) -> Iterator[tuple[AgentView, str]]:
    """An agent whose only traffic is an upload drained in the open minute, and its server."""
    store = Store(tmp_path / "lt.db")
    alerts = AlertManager(store.path, [], AlertsSettings())
    agent = AgentView(store, alerts, LiveDetection(parse_config(CONFIG), store, lambda i: None))
    with serve(agent) as url:
        yield agent, url
    alerts.close()
    store.close()


def _drain_upload(store: Store) -> int:
    """Write the upload into the open minute as the agent's poll does; its minute."""
    minute = minute_of(time.time())
    store.write({BucketKey(minute, *UPLOAD_KEY): Volume(UPLOAD, UPLOAD // 1400, 40_000, 300)},
                [])
    return minute


def test_volume_includes_the_open_minute_marked_partial(
    just_sent: tuple[AgentView, str],
) -> None:
    agent, base = just_sent
    for _ in range(2):  # a second try only if the minute turned between write and read
        minute = _drain_upload(agent.store)
        request = urllib.request.Request(f"{base}/v1/tenants/acme/volume",
                                          headers={"Authorization": f"Bearer {READER}"})
        with urllib.request.urlopen(request, timeout=5) as response:
            series = json.loads(response.read())["series"]
        if minute_of(time.time()) == minute:
            break
    (point,) = series
    assert (point["ts"], point["crm_bytes_out"], point["partial"]) == (minute, UPLOAD, True)
    # a closed minute is whole
    agent.store.write({BucketKey(minute - 60, *UPLOAD_KEY): Volume(1000, 1, 0, 0)}, [])
    with urllib.request.urlopen(request, timeout=5) as response:
        series = json.loads(response.read())["series"]
    assert [p["partial"] for p in series] == [False, True]


def test_dashboard_shows_what_was_just_sent_with_readable_time_labels(
    browser: Any, just_sent: tuple[AgentView, str],
) -> None:
    agent, base = just_sent
    session = Session(browser, base)
    try:
        minute, uploads = _drain_upload(agent.store), 1
        page = session.sign_in(READER)
        if minute_of(time.time()) != minute:  # the minute turned before the page read it
            minute, uploads = _drain_upload(agent.store), 2
            page.reload()
            page.wait_for_selector("body[data-ready=true]", timeout=10_000)
        acme = page.locator(".tenant-card[data-tenant=acme]")
        totals = acme.locator(".totals").text_content()
        # 12 MB is 11.4 MiB, in the open minute
        assert "(11.4 MiB of it this minute, still counting)" in totals, totals
        assert int(acme.get_attribute("data-crm-bytes")) == uploads * UPLOAD
        assert totals.startswith(" · 11.4 MiB to CRMs" if uploads == 1 else " · 22.9 MiB"), totals
        page.screenshot(path=str(SCREENSHOTS / "leaktap-dashboard-just-sent.png"), full_page=True)
        for seconds in ("21600", "3600", "86400"):  # the default range first
            page.select_option("#range", seconds)
            page.wait_for_function(
                f"() => [...state.charts.values()].every((h) => "
                f"h.plot.scales.x.max - h.plot.scales.x.min >= {int(seconds) - 120})")
            assert _overlapping_tick_labels(page) == [], seconds
        assert session.errors == []
    finally:
        session.context.close()


# -- the same contract without a browser ------------------------------------------


@pytest.fixture(scope="module")
def client(agent: AgentView) -> Iterator[TestClient]:
    app = create_app(agent, readers=[READER], admins=[ADMIN], manage=False)
    with TestClient(app, base_url="http://127.0.0.1:8470") as c:
        yield c


def test_volume_carries_the_detectors_band(client: TestClient, agent: AgentView) -> None:
    body = client.get("/v1/tenants/acme/volume", headers={"Authorization": f"Bearer {READER}"},
                      params={"since": time.time() - 6 * 3600}).json()
    points = body["series"]
    # the band is the detector's: what it expected when it raised the burst's alert
    (alert,) = agent.alerts.list_alerts(tenant="acme", kind="volume_anomaly")
    (at_raise,) = [p for p in points if p["ts"] == alert["first_seen"]]
    assert at_raise["baseline"]["expected"] == pytest.approx(
        alert["evidence"]["expected_bytes"], rel=0.05)
    assert body["band_sigmas"] == 2.0 and all(p["baseline"] for p in points)
    inside = [p["baseline"]["low"] <= p["crm_bytes_out"] <= p["baseline"]["high"]
              for p in points if p["crm_bytes_out"] < 2**20]
    assert sum(inside) / len(inside) > 0.9
    burst = [p for p in points if p["crm_bytes_out"] > 2**21]
    assert len(burst) == BURST_MINUTES
    assert all(p["crm_bytes_out"] > 3 * p["baseline"]["high"] for p in burst)
    assert all(p["bytes_out"] > p["crm_bytes_out"] for p in points)  # non-CRM traffic too
    filtered = client.get("/v1/tenants/acme/volume?vendor=salesforce",
                          headers={"Authorization": f"Bearer {READER}"}).json()
    assert filtered["series"][0]["baseline"] is None  # the band is of the tenant's total


def test_session_cookie_is_http_only_strict_and_origin_bound(client: TestClient) -> None:
    assert client.get("/ui/app.js").status_code == 401
    refused = client.post("/v1/session", data={"token": "not-a-token"})
    assert refused.status_code == 401 and "not valid" in refused.text
    signed = client.post("/v1/session", data={"token": ADMIN}, follow_redirects=False)
    assert signed.status_code == 303 and signed.headers["location"] == "/"
    cookie = signed.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and ADMIN.lower() not in cookie
    client.cookies.set("lt_session", signed.cookies["lt_session"])
    try:
        assert client.get("/v1/whoami").json() == {"role": "admin"}
        assert client.get("/ui/app.js").headers["content-type"].startswith("text/javascript")
        assert client.get("/ui/../api/main.py").status_code == 404
        # same-site is not same-origin: another port of this host is refused
        foreign = client.post("/v1/alerts/1/resolve", headers={"Origin": "http://127.0.0.1:9"})
        assert foreign.status_code == 403
        assert client.post("/v1/alerts/1/resolve").status_code == 403  # no Origin at all
        own = client.post("/v1/alerts/1/resolve", headers={"Origin": "http://127.0.0.1:8470"})
        assert own.status_code == 200
        client.delete("/v1/session", headers={"Origin": "http://127.0.0.1:8470"})
        assert client.get("/v1/whoami").status_code == 401
    finally:
        client.cookies.clear()


def test_dashboard_shows_data_flows_by_tenant_object_and_instance(
        session: Session, agent: AgentView) -> None:
    """Issue 14.3's view: tenant -> object -> instance with requests and records, from
    the map fed the vendor fixtures (acme twice, globex once through a shared host)."""
    from leaktap.analytics.plaintext.dataflows import DataFlowMap, DataFlowSettings
    from tests.analytics.crm_fixtures import ALL_CALLS, exchange

    now = time.time()
    fmap = DataFlowMap(DataFlowSettings(warmup_s=0), write=agent.store.put_dataflows)
    for round_ in range(2):
        for call in ALL_CALLS:
            fmap.on_exchange(exchange(call, ts=now - 60 + round_))
    for call in ALL_CALLS:
        fmap.on_exchange(exchange(call, tenant="globex", instance=None, ts=now - 30))
    fmap.flush()
    page = session.sign_in(READER)
    groups = {(c.vendor, c.object) for c in ALL_CALLS}
    rows = page.locator("#dataflows tbody tr")
    assert rows.count() == 2 * len(groups)
    contact = page.locator("#dataflows tr[data-tenant=acme][data-object=Contact]")
    assert contact.locator("td.requests").text_content() == "4"  # query and read, twice
    assert contact.locator("td.records").text_content() == "8"
    assert "query ←" in contact.text_content() and "read ←" in contact.text_content()
    assert "email" in contact.text_content() and "crm-sync" in contact.text_content()
    lead = page.locator("#dataflows tr[data-tenant=acme][data-object=Lead] td.lost")
    assert lead.text_content() == "2"  # refused twice
    shared = page.locator("#dataflows tr[data-tenant=globex][data-object=Account]")
    assert "(shared host)" in shared.text_content()
    assert page.locator("#dataflows tr.first").count() == 2  # one group per tenant
    assert session.errors == []
