"""Hosts to test on: Linux network namespaces joined by veth pairs and a bridge.

:meth:`HostNetwork.create` builds ``count`` hosts for one test. Each host is a
network namespace with a loopback and one interface, ``eth0``, carrying its
own address from ``198.18.0.0/15`` (the range set aside for benchmarking
networks, RFC 2544). The other end of every ``eth0`` is a port of a bridge
that lives in a namespace of its own (the *switch*), so the machine's own
namespace gains no interface, no address and no route: only the addresses the
test itself created are reachable, and only from its hosts.

Contracts:

* **Names** are ``mkh-<pid>-<token>-sw`` and ``mkh-<pid>-<token>-h<N>``: the
  pid of the process that built the network and a random token, so parallel
  runs never collide. Interface names only need to be unique inside each
  namespace, so every run uses the same short ones.
* **Addresses**: host ``N`` (from 1) is ``.N`` of a ``/24`` chosen from the
  token. Every network is private to its switch, so two runs that drew the
  same ``/24`` still cannot reach each other.
* **Processes**: :meth:`Host.run` starts a command with
  ``ip netns exec`` (which execs it, so the pid is the command's own), with
  the caller's environment plus ``env``; the host keeps every process it
  started and stops them by pid (:meth:`Host.kill_all`).
* **Links**: :meth:`HostNetwork.cut` takes a host's link down at the switch
  (the host is off the network; its own configuration is untouched) or, given
  two hosts, adds blackhole routes between just those two;
  :meth:`HostNetwork.restore` undoes either.
* **Clean-up**: :meth:`HostNetwork.close` stops every process started on the
  hosts, then every process still inside their namespaces, then deletes the
  namespaces (which removes the veths and the bridge with them). It runs at
  fixture teardown whether the test passed or not. A network left by a run
  that crashed (its owner pid is gone) is removed by the next
  :meth:`HostNetwork.create`; a live run's network is never touched.
* A machine that does not allow namespaces raises
  :class:`HostsUnavailableError` naming the command that failed: multi-host
  tests fail with the reason, they never skip.

The pure parts (:func:`plan_network`, :func:`leftovers`, the command plans)
are functions of data, tested without I/O.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from .processes import MissingProgramError, find_program

PREFIX = "mkh"
"""Every namespace this module creates starts with ``PREFIX-``."""

RANGE = ipaddress.IPv4Network("198.18.0.0/15")
"""Where host addresses come from; nothing outside it is ever assigned."""

MAX_HOSTS = 253  # .1 to .253 of a /24; .254 and .255 stay unused

_NAME = re.compile(rf"^{PREFIX}-(\d+)-([0-9a-f]{{6}})-(sw|h\d+)$")

Command = list[str]


class HostsUnavailableError(RuntimeError):
    """This machine does not allow the namespaces, veths or bridge the hosts need."""


@dataclasses.dataclass(frozen=True)
class HostPlan:
    """One host: its namespace, its index (from 1) and its address."""

    index: int
    netns: str
    address: str


@dataclasses.dataclass(frozen=True)
class NetworkPlan:
    """The names and addresses of one network, decided before anything is created."""

    switch: str
    subnet: ipaddress.IPv4Network
    hosts: tuple[HostPlan, ...]

    @property
    def namespaces(self) -> list[str]:
        """Every namespace of the network, hosts first."""
        return [h.netns for h in self.hosts] + [self.switch]


def subnet_for(token: str) -> ipaddress.IPv4Network:
    """The ``/24`` inside :data:`RANGE` that ``token`` (six hex digits) selects."""
    index = int(token, 16) % (RANGE.num_addresses // 256)
    return ipaddress.IPv4Network((int(RANGE.network_address) + index * 256, 24))


def plan_network(count: int, owner_pid: int, token: str) -> NetworkPlan:
    """Names and addresses for ``count`` hosts built by ``owner_pid`` (see the module doc)."""
    if not 1 <= count <= MAX_HOSTS:
        raise ValueError(f"a network has 1 to {MAX_HOSTS} hosts, not {count}")
    if not re.fullmatch(r"[0-9a-f]{6}", token):
        raise ValueError(f"token must be six hex digits, not {token!r}")
    base = f"{PREFIX}-{owner_pid}-{token}"
    subnet = subnet_for(token)
    hosts = tuple(HostPlan(i, f"{base}-h{i}", str(subnet.network_address + i))
                  for i in range(1, count + 1))
    return NetworkPlan(f"{base}-sw", subnet, hosts)


def owner_of(netns: str) -> int | None:
    """The pid encoded in a namespace name of ours, or ``None`` for any other name."""
    match = _NAME.match(netns)
    return int(match.group(1)) if match else None


def leftovers(names: Iterable[str], alive: Callable[[int], bool]) -> list[str]:
    """The namespaces of ours whose owner is no longer alive (a crashed run's)."""
    return sorted(n for n in names if (pid := owner_of(n)) is not None and not alive(pid))


def setup_commands(plan: NetworkPlan) -> list[Command]:
    """``ip`` argument lists that build ``plan``, in order."""
    sw = plan.switch
    cmds: list[Command] = [["netns", "add", n] for n in plan.namespaces]
    cmds += [["-n", sw, "link", "add", "br0", "type", "bridge"],
             ["-n", sw, "link", "set", "br0", "up"]]
    prefix = plan.subnet.prefixlen
    for h in plan.hosts:
        port = _port(h)
        cmds += [
            ["-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", h.netns],
            ["-n", sw, "link", "set", port, "master", "br0"],
            ["-n", sw, "link", "set", port, "up"],
            ["-n", h.netns, "link", "set", "lo", "up"],
            ["-n", h.netns, "addr", "add", f"{h.address}/{prefix}", "dev", "eth0"],
            ["-n", h.netns, "link", "set", "eth0", "up"],
        ]
    return cmds


def teardown_commands(namespaces: Sequence[str]) -> list[Command]:
    """``ip`` argument lists that delete ``namespaces`` (their interfaces go with them)."""
    return [["netns", "del", n] for n in namespaces]


def link_commands(plan: NetworkPlan, a: HostPlan, b: HostPlan | None, up: bool) -> list[Command]:
    """Cut (``up=False``) or restore the link of ``a``, or only between ``a`` and ``b``."""
    if b is None:
        return [["-n", plan.switch, "link", "set", _port(a), "up" if up else "down"]]
    verb = "del" if up else "add"
    return [["-n", x.netns, "route", verb, "blackhole", f"{y.address}/32"] for x, y in ((a, b), (b, a))]


def _port(host: HostPlan) -> str:
    return f"h{host.index}"


class HostProcess:
    """A process started on a host; stopped by its pid, never by name."""

    def __init__(self, host: str, argv: Sequence[str], popen: subprocess.Popen[bytes], log_path: str) -> None:
        self.host = host
        self.argv = list(argv)
        self.process = popen
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of its output (stdout and stderr)."""
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float = 5.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited within ``grace`` seconds; the exit code."""
        if self.running():
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(grace)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.process.wait(10)

    def kill(self) -> None:
        """SIGKILL (no clean-up at all)."""
        if self.running():
            self.process.kill()
            self.process.wait(10)


class Host:
    """One namespace host: run processes on it (:meth:`run`), stop them (:meth:`kill_all`)."""

    def __init__(self, plan: HostPlan, log_dir: str) -> None:
        self.plan = plan
        self.name = f"h{plan.index}"
        self.netns = plan.netns
        self.address = plan.address
        self.processes: list[HostProcess] = []
        self._log_dir = log_dir

    def run(self, argv: Sequence[str], env: Mapping[str, str] | None = None,
            label: str | None = None) -> HostProcess:
        """Start ``argv`` on this host with this process's environment plus ``env``.

        Output goes to a log file (:meth:`HostProcess.tail`). The process is
        tracked and stopped with the host.
        """
        child_env = dict(os.environ)
        child_env.update(env or {})
        child_env.setdefault("PYTHONUNBUFFERED", "1")
        label = label or Path(argv[0]).name
        log_path = os.path.join(self._log_dir, f"{self.name}-{label}-{len(self.processes)}.log")
        with open(log_path, "wb") as log:
            popen = subprocess.Popen([_ip(), "netns", "exec", self.netns, *argv], env=child_env,
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        proc = HostProcess(self.name, argv, popen, log_path)
        self.processes.append(proc)
        return proc

    def kill_all(self) -> None:
        """SIGKILL every process started on this host (a host that dies at once)."""
        for proc in self.processes:
            proc.kill()

    def kill_everything(self) -> list[int]:
        """SIGKILL every process inside this host's namespace, started here or not; their pids.

        What :meth:`kill_all` misses: the daemons a started process left
        behind (``meshkit up --daemon``'s circusd and everything under it).
        """
        pids = _namespace_pids(self.netns)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)  # inside a namespace this module created: ours
            except ProcessLookupError:
                pass
        for proc in self.processes:
            if proc.process.poll() is None:
                proc.process.wait(10)
        return pids

    def __repr__(self) -> str:
        return f"Host({self.name}, {self.address}, {self.netns})"


class HostNetwork:
    """``count`` hosts on one bridge; see the module doc. Use as a context manager or :meth:`close`."""

    def __init__(self, plan: NetworkPlan, log_dir: str) -> None:
        self.plan = plan
        self.log_dir = log_dir
        self.hosts = [Host(h, log_dir) for h in plan.hosts]
        self._closed = False

    @classmethod
    def create(cls, count: int, log_dir: str | None = None) -> HostNetwork:
        """Remove crashed runs' leftovers, then build ``count`` hosts.

        Raises :class:`HostsUnavailableError` if the machine refuses; whatever
        was built before the refusal is removed again.
        """
        clean_leftovers()
        plan = plan_network(count, os.getpid(), secrets.token_hex(3))
        net = cls(plan, log_dir or tempfile.mkdtemp(prefix="meshkit-hosts-"))
        try:
            for cmd in setup_commands(plan):
                _run_ip(cmd)
        except BaseException:
            net.close()
            raise
        return net

    def __getitem__(self, index: int) -> Host:
        """Host ``index``, counted from 1 like the addresses and names."""
        if not 1 <= index <= len(self.hosts):
            raise IndexError(f"hosts are numbered 1 to {len(self.hosts)}, not {index}")
        return self.hosts[index - 1]

    def cut(self, a: Host, b: Host | None = None) -> None:
        """Take ``a``'s link down, or (given ``b``) drop all traffic between ``a`` and ``b`` only."""
        for cmd in link_commands(self.plan, a.plan, b.plan if b else None, up=False):
            _run_ip(cmd)

    def restore(self, a: Host, b: Host | None = None) -> None:
        """Undo :meth:`cut` with the same arguments."""
        for cmd in link_commands(self.plan, a.plan, b.plan if b else None, up=True):
            _run_ip(cmd)

    def close(self) -> None:
        """Stop every process, then delete the namespaces; safe to call twice, never raises."""
        if self._closed:
            return
        self._closed = True
        for host in self.hosts:
            for proc in host.processes:
                try:
                    proc.stop(grace=2.0)
                except Exception:  # clean-up goes on whatever one process does
                    pass
        remove_namespaces(self.plan.namespaces)

    def __enter__(self) -> HostNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def clean_leftovers() -> list[str]:
    """Remove the namespaces of runs whose owner process is gone; the names removed."""
    stale = leftovers(list_namespaces(), _alive)
    remove_namespaces(stale)
    return stale


def list_namespaces() -> list[str]:
    """Every named network namespace on the machine (``ip netns list``)."""
    out = _run_ip(["netns", "list"])
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def remove_namespaces(namespaces: Sequence[str]) -> None:
    """SIGKILL the processes still inside ``namespaces``, then delete them; never raises."""
    present = set(_try_list())
    for netns in namespaces:
        if netns not in present:
            continue
        for pid in _namespace_pids(netns):
            # These are processes inside a namespace this module created: ours.
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for cmd in teardown_commands([n for n in namespaces if n in present]):
        try:
            _run_ip(cmd)
        except HostsUnavailableError:
            pass


def _namespace_pids(netns: str) -> list[int]:
    try:
        return [int(p) for p in _run_ip(["netns", "pids", netns]).split() if p.isdigit()]
    except HostsUnavailableError:
        return []


def _try_list() -> list[str]:
    try:
        return list_namespaces()
    except (HostsUnavailableError, MissingProgramError):
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ip() -> str:
    return shutil.which("ip") or find_program("ip")


def _run_ip(args: Command) -> str:
    """Run ``ip ARGS``; a refusal becomes :class:`HostsUnavailableError` with ip's own words."""
    try:
        done = subprocess.run([_ip(), *args], capture_output=True, text=True, timeout=30)
    except MissingProgramError as exc:
        raise HostsUnavailableError(f"namespace hosts need iproute2: {exc}") from None
    if done.returncode != 0:
        raise HostsUnavailableError(
            f"this machine refused `ip {' '.join(args)}` (namespace hosts need root and "
            f"network namespaces, veth and bridge support): {done.stderr.strip()[:300]}")
    return done.stdout
