"""What the panel's integration tests share: the panel as a child process, and services for it to show."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from meshkit import Settings
from meshkit.panelurl import read_url
from meshkit.testing import ProcessExitedError, settings_env, wait_until

REPO = Path(__file__).resolve().parents[2]
WAIT = 15.0


class PanelProcess:
    """``python -m meshkit panel --run-dir DIR`` on loopback and a kernel-chosen port; stopped by PID."""

    def __init__(self, settings: Settings, run_dir: Path, log_path: Path, *args: str) -> None:
        self.run_dir = run_dir
        self.log_path = log_path
        run_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **settings_env(settings), "MESHKIT_LOG_FORMAT": "text"}
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "meshkit", "panel", "--run-dir", str(run_dir), "--refresh", "0.5", *args],
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        self.url = ""

    def wait_ready(self) -> str:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise ProcessExitedError(f"the panel exited with {self.process.returncode}:\n{self.log()}")
            self.url = read_url(str(self.run_dir)) or ""
            return bool(self.url)

        wait_until(ready, WAIT, "the panel to write its URL")
        return self.url

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(5)


def taps_open(settings: Settings, instance_id: str) -> int:
    """How many taps the instance says it has open (its ``_mesh.info``).

    Asked from a thread of its own, so that it works under a running event
    loop too (Playwright's sync API runs one in the test's thread).
    """
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from meshkit import AsyncClient
    from meshkit.observe import query

    async def ask() -> int:
        async with AsyncClient(settings) as client:
            return int((await query.info(client, instance_id))["taps_open"])

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, ask()).result(30)
