"""Helpers of the stack's integration tests: a stack's files in a temporary directory, and the CLI.

:func:`stack_files` lays out what ``meshkit up`` needs for a stack of its own
(the project's ``circus.ini`` plus any extra watchers, a run directory, a
settings file, a fresh namespace and a kernel-chosen public port);
:func:`meshkit` runs one ``meshkit`` command against it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def meshkit(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshkit", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def stack_files(tmp_path: Path, extra: str = "") -> tuple[dict[str, str], Path, Path]:
    """Environment, run directory and ini for a stack in ``tmp_path`` (kernel-chosen public port)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ini = tmp_path / "circus.ini"
    ini.write_text((ROOT / "circus.ini").read_text() + extra)
    config = tmp_path / "meshkit.toml"
    config.write_text((ROOT / "configs" / "meshkit.toml").read_text()
                      + "\n[services.crasher]\nflap_max_restarts = 3\nflap_window = 30.0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHKIT_")}
    env.update({
        "MESHKIT_RUN_DIR": str(run_dir),
        "MESHKIT_HOME": str(ROOT),
        "MESHKIT_CONFIG": str(config),
        "MESHKIT_NAMESPACE": "stack" + uuid.uuid4().hex[:8],
        "MESHKIT_STRATUM_HOST": "127.0.0.1",
        "MESHKIT_STRATUM_PORT": "0",
        "MESHKIT_HEARTBEAT_INTERVAL": "0.3",
        "MESHKIT_TTL": "2",
        "MESHKIT_RESYNC_INTERVAL": "0.5",
        "MESHKIT_DRAIN_GRACE": "3",
        "MESHKIT_GATEWAY_DRAIN_GRACE": "2",
    })
    return env, run_dir, ini
