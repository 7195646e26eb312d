"""The panel as the watcher ``circus.ini`` runs: its URL printed by ``meshkit up`` and ``meshkit status``,
Circus's watchers (restarts and flap stops included) and HAProxy's servers in what it serves."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from test_stack import CRASHER, meshkit, stack_files

from meshkit.panelurl import read_url
from meshkit.stack.control import CircusControl
from meshkit.stack.processes import stack_processes, terminate
from meshkit.testing import find_program, wait_until

pytestmark = pytest.mark.integration


def state(url: str) -> dict[str, Any]:
    async def get() -> dict[str, Any]:
        async with aiohttp.ClientSession() as session, session.get(url + "api/state") as response:
            return dict(await response.json())
    return asyncio.run(get())


def watchers(url: str) -> dict[str, dict[str, Any]]:
    circus = state(url).get("circus") or {}
    return {w["name"]: w for w in circus.get("watchers", [])}


def test_the_stacks_panel_shows_circus_and_haproxy(tmp_path: Path) -> None:
    env, run_dir, ini = stack_files(tmp_path, CRASHER)
    try:
        up = meshkit("up", "--daemon", "--circus-ini", str(ini), "--run-dir", str(run_dir), env=env)
        assert up.returncode == 0, up.stdout + up.stderr
        url = read_url(str(run_dir))
        assert url and url.startswith("http://127.0.0.1:") and "control panel (loopback" in up.stdout
        assert url in up.stdout
        status = meshkit("status", "--run-dir", str(run_dir), env=env)
        assert f"control panel: {url}" in status.stdout, status.stdout + status.stderr

        # Circus's watchers, with their processes.
        wait_until(lambda: len(watchers(url).get("mining", {}).get("processes", [])) == 2, 20,
                   "the panel to show mining's two processes")
        # HAProxy's servers: both gateways, up.
        wait_until(lambda: [s["state"] for s in (state(url).get("haproxy") or {}).get("servers", [])]
                   == ["up", "up"], 20, "the panel to show two gateway servers up in HAProxy")

        # A killed backend is an abnormal exit, counted; the crash-looping watcher shows its flap stop.
        control = CircusControl(f"ipc://{run_dir}/circus.sock")
        victim = control.pids("mining")[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: watchers(url)["mining"]["abnormal_exits"] >= 1, 20,
                   "the panel to count mining's abnormal exit")
        wait_until(lambda: watchers(url).get("crasher", {}).get("flapped") is not None, 40,
                   "the panel to show crasher stopped by flap control")
        # (Its exits are counted only from the panel's start, which may have come after most of them.)
        crasher = watchers(url)["crasher"]
        assert crasher["status"] == "stopped (flapping)" and crasher["flapped"]["exits"] == 4

        look(url, tmp_path)

        panel_pid = control.pids("panel")[0]
        down = meshkit("down", "--run-dir", str(run_dir), env=env)
        assert down.returncode == 0, down.stdout + down.stderr
        assert not psutil.pid_exists(panel_pid) or psutil.Process(panel_pid).status() == psutil.STATUS_ZOMBIE
        assert read_url(str(run_dir)) is None  # the panel removed its URL file on the way out
        log = (run_dir / "panel.log").read_text()
        assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
    finally:
        terminate(stack_processes(str(run_dir)), grace=5)


def look(url: str, tmp_path: Path) -> None:
    """The same in a real browser: the Circus and HAProxy tables as the page draws them."""
    from playwright.sync_api import expect, sync_playwright

    wait_ms = 20_000
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=find_program("chromium"),
                                         args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1300})
            page.goto(url)
            expect(page.locator('tr.watcher[data-watcher="crasher"]')).to_contain_text(
                "stopped (flapping)", timeout=wait_ms)
            expect(page.locator('tr.watcher[data-watcher="mining"]')).to_contain_text("active", timeout=wait_ms)
            expect(page.locator("tr.server")).to_have_count(2, timeout=wait_ms)
            expect(page.locator('tr.instance[data-service="mining"]')).to_have_count(2, timeout=wait_ms)
            shot = tmp_path / "panel-stack.png"
            page.screenshot(path=str(shot), full_page=True)
            copy_to = os.environ.get("MESHKIT_PANEL_SCREENSHOT")
            if copy_to and os.path.isdir(os.path.dirname(copy_to) or "."):
                shutil.copyfile(shot, copy_to.replace(".png", "-stack.png"))
        finally:
            browser.close()
