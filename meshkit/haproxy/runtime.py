"""Clients for HAProxy's two control sockets: the runtime API and the master CLI.

Both speak HAProxy's line protocol in non-interactive mode: connect, send one
line (commands separated by ``;``), half-close, read the reply until HAProxy
closes. A socket that cannot be reached, or does not answer within the
timeout, raises :class:`HAProxyUnreachableError`.

HAProxy does not mark failures in a structured way, so :meth:`RuntimeAPI.command`
turns on ``set severity-output number`` for the same connection: messages then
start with a syslog level (``[3]: No such server.``), and a level of 3 (error)
or below raises :class:`RuntimeCommandError`. An empty reply means success.

The commands that change servers are written in one place,
:func:`meshkit.haproxy.reconcile.plan` (with the HAProxy facts they rely on);
this module sends them and parses what HAProxy reports.

The master CLI ``reload`` answers nothing: :meth:`MasterCLI.reload` watches
``show proc`` for the master's reload counter instead (see docs/haproxy.md).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..untrusted import clip
from .errors import HAProxyUnreachableError, ReloadError, RuntimeCommandError

log = logging.getLogger("meshkit.haproxy.runtime")

_SEVERITY = re.compile(r"^\[(\d)\]: ?", re.MULTILINE)
_NOT_ONE_COMMAND = re.compile(r"[;\x00-\x1f\x7f]")

# srv_admin_state bits (HAProxy's SRV_ADMF_*)
ADMIN_FORCED_MAINT = 0x01
ADMIN_INHERITED_MAINT = 0x02
ADMIN_CONFIG_MAINT = 0x04  # "disabled" in the config file; stays set after leaving maintenance
ADMIN_FORCED_DRAIN = 0x08
ADMIN_RESOLUTION_MAINT = 0x20
# What HAProxy itself counts as maintenance (SRV_ADMF_MAINT): not ADMIN_CONFIG_MAINT.
ADMIN_ANY_MAINT = ADMIN_FORCED_MAINT | ADMIN_INHERITED_MAINT | ADMIN_RESOLUTION_MAINT
# srv_check_state bits (HAProxy's CHK_ST_*)
CHECK_CONFIGURED = 0x02
CHECK_ENABLED = 0x04
# srv_op_state values (HAProxy's SRV_ST_*)
OP_STOPPED, OP_STARTING, OP_RUNNING, OP_STOPPING = 0, 1, 2, 3


@dataclass(frozen=True)
class ServerState:
    """One server as ``show servers state`` reports it."""

    backend: str
    name: str
    host: str
    port: int
    op_state: int
    admin_state: int
    check_state: int

    @property
    def in_maintenance(self) -> bool:
        return bool(self.admin_state & ADMIN_ANY_MAINT)

    @property
    def draining(self) -> bool:
        return bool(self.admin_state & ADMIN_FORCED_DRAIN)

    @property
    def health_enabled(self) -> bool:
        """The health check exists and runs (servers added at run time start without)."""
        return bool(self.check_state & CHECK_ENABLED)

    @property
    def up(self) -> bool:
        """Taking traffic as far as health goes (running or starting)."""
        return self.op_state in (OP_RUNNING, OP_STARTING)


@dataclass(frozen=True)
class ProcessTable:
    """The master CLI's ``show proc``: the master, its current workers and the old ones."""

    master_pid: int
    reloads: int
    failed_reloads: int
    workers: tuple[int, ...]
    old_workers: tuple[int, ...]


async def exchange(path: Path, line: str, timeout: float) -> str:
    """Send one command line to a CLI socket and return the whole reply."""
    if "\n" in line:
        raise ValueError(f"a CLI command is one line: {line!r}")
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        raise HAProxyUnreachableError(f"cannot connect to {path}: {exc or 'timed out'}") from None
    try:
        writer.write(line.encode() + b"\n")
        await writer.drain()
        # The master CLI keeps the connection open until the client half-closes.
        writer.write_eof()
        data = await asyncio.wait_for(reader.read(), timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        raise HAProxyUnreachableError(f"no answer from {path} to {line!r}: {exc or 'timed out'}") from None
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
    return data.decode(errors="replace")


class RuntimeAPI:
    """The runtime API on the admin stats socket, served by HAProxy's current worker."""

    def __init__(self, socket_path: str | Path, timeout: float = 2.0) -> None:
        self.path = Path(socket_path)
        self.timeout = timeout

    async def execute(self, command: str) -> str:
        """Send ``command`` as it is; return the raw reply."""
        return await exchange(self.path, command, self.timeout)

    async def command(self, command: str) -> str:
        """Send ``command`` and return its reply; raise :class:`RuntimeCommandError` if HAProxy refused it.

        ``command`` must be one command: a ``;`` (HAProxy's command separator)
        or a control character raises ``ValueError`` before anything is sent.
        """
        if _NOT_ONE_COMMAND.search(command):
            raise ValueError(f"not one command: {clip(command)!r}")
        reply = await self.execute("set severity-output number; " + command)
        levels = [int(level) for level in _SEVERITY.findall(reply)]
        text = _SEVERITY.sub("", reply).strip()
        if any(level <= 3 for level in levels) or text.startswith("Unknown command"):
            raise RuntimeCommandError(command, text.splitlines()[0] if text else "refused")
        return text

    async def worker_pid(self) -> int:
        """Pid of the worker answering on this socket."""
        reply = await self.execute("show info")
        match = re.search(r"^Pid: (\d+)$", reply, re.MULTILINE)
        if not match:
            raise HAProxyUnreachableError(f"unexpected 'show info' reply from {self.path}")
        return int(match.group(1))

    async def answers(self) -> bool:
        """Whether a worker answers on this socket now."""
        try:
            await self.worker_pid()
        except HAProxyUnreachableError:
            return False
        return True

    async def servers(self) -> list[ServerState]:
        """Every server of every backend (``show servers state``)."""
        return parse_servers_state(await self.execute("show servers state"))

    async def backends(self) -> set[str]:
        """Names of every backend HAProxy runs (``show backend``)."""
        lines = (await self.execute("show backend")).splitlines()
        return {line.strip() for line in lines if line.strip() and not line.startswith("#")}  # "# name" heads it


class MasterCLI:
    """The master CLI (``haproxy -W -S <socket>``): process list and reloads."""

    def __init__(self, socket_path: str | Path, timeout: float = 2.0) -> None:
        self.path = Path(socket_path)
        self.timeout = timeout

    async def execute(self, command: str) -> str:
        return await exchange(self.path, command, self.timeout)

    async def processes(self) -> ProcessTable:
        return parse_show_proc(await self.execute("show proc"))

    async def reload(self, timeout: float = 15.0) -> ProcessTable:
        """Reload HAProxy (it re-reads its configuration file) and wait for the new worker.

        Returns the process table after the reload. Raises :class:`ReloadError`
        if HAProxy reports the reload as failed (the old worker keeps running)
        or no new worker shows up within ``timeout`` seconds.
        """
        before = await self.processes()
        try:
            await self.execute("reload")
        except HAProxyUnreachableError:
            pass  # the master re-executes itself and may drop the connection before replying
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                table = await self.processes()
            except HAProxyUnreachableError:
                table = None  # still re-executing
            if table is not None:
                if table.failed_reloads > before.failed_reloads:
                    raise ReloadError("HAProxy could not load the new configuration; the old worker keeps running")
                if table.reloads > before.reloads and table.workers and not set(table.workers) & set(before.workers):
                    return table
            await asyncio.sleep(0.05)
        raise ReloadError(f"no new HAProxy worker {timeout:.0f}s after 'reload'")


async def wait_for_worker(
    master: MasterCLI,
    runtime: RuntimeAPI,
    workers: tuple[int, ...] | None,
    master_pid: int | None,
    check_alive: Callable[[], None],
    timeout: float,
) -> None:
    """Wait until ``runtime``'s socket is answered by one of ``workers``, or by master ``master_pid``'s worker.

    With ``workers`` None (a fresh start) the master CLI must answer, and as
    master ``master_pid`` (not one it replaces, still bound to the path
    meanwhile): before that, the master is still re-executing itself and
    would lose a signal. ``check_alive`` raises if the master died. Raises
    :class:`ReloadError` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        check_alive()
        try:
            if workers is None:
                table = await master.processes()
                if master_pid is None or table.master_pid == master_pid:
                    workers = table.workers or None
            if workers is not None and await runtime.worker_pid() in workers:
                return
        except HAProxyUnreachableError:
            pass
        if time.monotonic() > deadline:
            raise ReloadError(f"no haproxy worker answered on {runtime.path} in {timeout:.0f}s")
        await asyncio.sleep(0.05)


def parse_servers_state(text: str) -> list[ServerState]:
    """Parse ``show servers state`` (format version 1, a ``#`` header naming the columns)."""
    columns: list[str] = []
    states = []
    for line in text.splitlines():
        if line.startswith("# "):
            columns = line[2:].split()
            continue
        fields = line.split()
        if not columns or len(fields) != len(columns):
            continue  # the version line, blank lines
        row = dict(zip(columns, fields, strict=True))
        try:
            states.append(ServerState(
                backend=row["be_name"],
                name=row["srv_name"],
                host=row["srv_addr"],
                port=int(row["srv_port"]),
                op_state=int(row["srv_op_state"]),
                admin_state=int(row["srv_admin_state"]),
                check_state=int(row["srv_check_state"]),
            ))
        except (KeyError, ValueError):
            log.warning("unexpected 'show servers state' line: %r", line)
    return states


def parse_show_proc(text: str) -> ProcessTable:
    """Parse the master CLI's ``show proc``."""
    master_pid = reloads = failed = 0
    workers: list[int] = []
    old: list[int] = []
    section = "workers"
    for line in text.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip()
            if title in ("workers", "old workers", "programs"):
                section = title
            continue
        fields = line.split()
        if len(fields) < 3 or not fields[0].isdigit():
            continue
        if fields[1] == "master":
            master_pid, reloads = int(fields[0]), int(fields[2])
            match = re.search(r"\[failed: (\d+)\]", line)
            failed = int(match.group(1)) if match else 0
        elif fields[1] == "worker":
            (old if section == "old workers" else workers).append(int(fields[0]))
    if not master_pid:
        raise HAProxyUnreachableError(f"unexpected 'show proc' reply: {text[:200]!r}")
    return ProcessTable(master_pid, reloads, failed, tuple(workers), tuple(old))
