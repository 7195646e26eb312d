"""The panel in a real headless Chromium (Debian's, driven by Playwright) against a real stack.

Redis, two services, a gateway and HAProxy in front of it are started the
way the other integration tests start them; the panel runs as its own
process. The test drives the page as a person would: it must list the
running instances and HAProxy's server, show calls made through HAProxy in
the live flow, narrow them to one client connection with a ``where`` filter,
and draw the two-hop waterfall of a call's trace when its trace id is
clicked or typed. A screenshot is saved in the test's tmp dir (and, when the
directory exists, copied to ``MESHKIT_PANEL_SCREENSHOT``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from haproxykit import Sync, running_sync
from lineclient import LineClient, line_clients
from panelkit import PanelProcess, taps_open

from meshkit import Settings
from meshkit.testing import ServiceProcess, StartService, find_program, wait_until

pytestmark = pytest.mark.integration

FRONT = "tests.integration.services.panelhops:PanelFront"
BACK = "tests.integration.services.panelhops:PanelBack"
GATEWAY = "meshkit.gateway:Gateway"
WAIT = 15.0
WAIT_MS = WAIT * 1000


@pytest.fixture
def clients() -> Iterator[Callable[[str], LineClient]]:
    yield from line_clients()


@pytest.fixture
def haproxy(mesh_settings: Settings, tmp_path: Path) -> Iterator[Sync]:
    with running_sync(mesh_settings, tmp_path) as runner:
        yield runner


def test_the_panel_in_a_browser_shows_the_mesh_the_live_flow_filtered_and_a_waterfall(
        start_service: StartService, mesh_settings: Settings, haproxy: Sync,
        clients: Callable[[str], LineClient], tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    [back] = start_service(BACK)
    [front] = start_service(FRONT)
    [gateway] = start_service(GATEWAY)
    haproxy.start()
    wait_until(lambda: any(s.up for s in haproxy.servers().values()), WAIT, "the gateway to be up in HAProxy")
    panel = PanelProcess(mesh_settings, haproxy.paths.config_file.parent, tmp_path / "panel.log")
    try:
        url = panel.wait_ready()
        # Playwright's sync API runs an event loop in this thread from here on (see panelkit.taps_open).
        with sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=find_program("chromium"),
                                             args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            try:
                drive(browser, url, (back, front, gateway), haproxy, clients, mesh_settings, tmp_path)
            finally:
                browser.close()
    finally:
        assert panel.stop() == 0, panel.log()


def drive(browser: Any, url: str, procs: tuple[ServiceProcess, ...], haproxy: Sync,
          clients: Callable[[str], LineClient], mesh_settings: Settings, tmp_path: Path) -> None:
    """What a person does with the panel, checked at every step."""
    from playwright.sync_api import expect

    back, front, gateway = procs
    page = browser.new_page(viewport={"width": 1500, "height": 1300})
    page.goto(url)
    expect(page.locator("#status")).to_have_text("live", timeout=WAIT_MS)

    # The running instances, and HAProxy's server for the gateway.
    for proc in (back, front, gateway):
        assert proc.record is not None
        row = page.locator(f'tr.instance[data-instance="{proc.record.instance_id}"]')
        expect(row).to_contain_text("up", timeout=WAIT_MS)
    assert gateway.record is not None
    expect(page.locator(f'tr.server[data-server="{gateway.record.instance_id}"]')).to_contain_text(
        "up", timeout=WAIT_MS)

    # Look inside one instance: its methods with their signatures, what it holds.
    assert front.record is not None
    page.click(f'tr.instance[data-instance="{front.record.instance_id}"]')
    expect(page.locator("#inspect")).to_contain_text("order(customer", timeout=WAIT_MS)
    expect(page.locator("#inspect")).to_contain_text("calls in flight now", timeout=WAIT_MS)

    alice, bob = clients(f"127.0.0.1:{haproxy.port}"), clients(f"127.0.0.1:{haproxy.port}")
    alice_conn = alice.call("mesh.hello")["result"]["connection"]
    bob_conn = bob.call("mesh.hello")["result"]["connection"]

    # Tap one service: both clients' calls show in the live flow.
    page.fill("#filter-service", "panel-front")
    page.click("#tap-start")
    expect(page.locator("#tap-state")).to_contain_text("tapping", timeout=WAIT_MS)
    assert alice.call("panel-front.order", ["alice-1"])["result"] == "shipped:alice-1"
    assert bob.call("panel-front.order", ["bob-1"])["result"] == "shipped:bob-1"
    flow = page.locator("#flow tbody tr.flow-row")
    expect(flow.filter(has_text=f"conn={alice_conn}")).to_have_count(1, timeout=WAIT_MS)
    expect(flow.filter(has_text=f"conn={bob_conn}")).to_have_count(1, timeout=WAIT_MS)

    # Narrow it to alice's connection: bob's next call (made first) must not show, alice's must.
    page.fill("#filter-where", f"conn={alice_conn}")
    page.click("#tap-start")
    expect(page.locator("#tap-state")).to_contain_text(alice_conn, timeout=WAIT_MS)
    assert bob.call("panel-front.order", ["bob-2"])["result"] == "shipped:bob-2"
    assert alice.call("panel-front.order", ["alice-2"])["result"] == "shipped:alice-2"
    mine = flow.filter(has_text="alice-2")
    expect(mine).to_have_count(1, timeout=WAIT_MS)
    # One instance serves both, and its tap reports events in order: bob-2 would have come first.
    assert flow.filter(has_text="bob-2").count() == 0
    assert flow.filter(has_text=f"conn={bob_conn}").count() == 0

    # A trace id typed: a bad one is refused in words, the call's own draws its waterfall.
    trace_id = mine.locator("a.trace").get_attribute("data-trace")
    assert trace_id and len(trace_id) == 32
    waterfall = page.locator("#waterfall")
    page.fill("#trace-id", "not-a-trace")
    page.press("#trace-id", "Enter")
    expect(page.locator("#trace-state")).to_contain_text("32 hex digits", timeout=WAIT_MS)
    page.fill("#trace-id", trace_id)
    page.press("#trace-id", "Enter")
    expect(waterfall.locator('.span-row[data-service="panel-back"]').first).to_be_visible(timeout=WAIT_MS)
    page.fill("#trace-id", "not-a-trace")
    page.press("#trace-id", "Enter")
    expect(waterfall.locator(".span-row")).to_have_count(0, timeout=WAIT_MS)

    # Click the call's trace id: the waterfall shows both hops and the user span in the back.
    mine.locator("a.trace").click()
    expect(waterfall.locator('.span-row[data-service="panel-front"]').first).to_be_visible(timeout=WAIT_MS)
    expect(waterfall.locator('.span-row[data-service="panel-back"]').first).to_be_visible(timeout=WAIT_MS)
    expect(waterfall.locator('.span-row[data-service="gateway"]').first).to_be_visible(timeout=WAIT_MS)
    expect(waterfall).to_contain_text("sql", timeout=WAIT_MS)
    expect(waterfall).to_contain_text("customer=alice-2", timeout=WAIT_MS)
    # The call graph drawn from spans, and the methods' figures.
    expect(page.locator('path.edge[data-edge="panel-front>panel-back"]')).to_have_count(1, timeout=WAIT_MS)
    expect(page.locator('tr.method[data-method="panel-back.ship"]')).to_be_visible(timeout=WAIT_MS)

    shot = tmp_path / "panel.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    copy_to = os.environ.get("MESHKIT_PANEL_SCREENSHOT")
    if copy_to and os.path.isdir(os.path.dirname(copy_to) or "."):
        shutil.copyfile(shot, copy_to)

    # Closing the tab closes its tap on the instance, well before an idle tap closes itself (5 s).
    assert front.record is not None
    assert taps_open(mesh_settings, front.record.instance_id) == 1
    page.close()
    wait_until(lambda: taps_open(mesh_settings, front.record.instance_id) == 0 if front.record else False,
               3.0, "the panel to close the closed tab's tap")
