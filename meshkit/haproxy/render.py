"""Rendering a :class:`~meshkit.haproxy.model.Model` into HAProxy's configuration, and checking it.

The templates (``haproxy/haproxy.cfg.j2`` and the partials it includes) are
rendered with ``StrictUndefined``, so a missing value is an error rather than
an empty string in the output, and no printed value may hold a line break or
a control character (``ValueError``): nothing can add a line to the file.
:func:`check_config` runs ``haproxy -c`` on a rendered text before anyone
loads it.

The text carries a ``# meshkit-structure: <hash>`` line: the hash of the
same model rendered without servers. Two configurations with the same hash
differ only in servers, which the runtime API changes without a reload.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import jinja2

from ..untrusted import clip
from .errors import ConfigCheckError
from .model import Model
from .process import find_haproxy

TEMPLATE = "haproxy.cfg.j2"
_FINGERPRINT = re.compile(r"^# meshkit-structure: ([0-9a-f]+)$", re.MULTILINE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class RuntimePaths:
    """Where one HAProxy keeps its configuration and control sockets."""

    config_file: Path
    stats_socket: Path  # the runtime API (admin level), served by the current worker
    master_socket: Path  # the master CLI (reload, show proc)
    pid_file: Path

    @classmethod
    def in_dir(cls, run_dir: str | os.PathLike[str]) -> RuntimePaths:
        """The default layout: ``haproxy.cfg``, ``haproxy.sock``, ``haproxy-master.sock``, ``haproxy.pid``."""
        base = Path(run_dir).absolute()
        return cls(
            config_file=base / "haproxy.cfg",
            stats_socket=base / "haproxy.sock",
            master_socket=base / "haproxy-master.sock",
            pid_file=base / "haproxy.pid",
        )


def render(model: Model, paths: RuntimePaths, source: str = "configs/haproxy.toml") -> str:
    """The configuration text for ``model`` (servers included)."""
    return _render(model, paths, source, structure_fingerprint(model, paths))


def structure_fingerprint(model: Model, paths: RuntimePaths) -> str:
    """Hash of everything :func:`render` writes except the servers."""
    text = _render(model.without_servers(), paths, "", "")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint_of(text: str) -> str | None:
    """The structure hash recorded in a rendered configuration, if any."""
    match = _FINGERPRINT.search(text)
    return match.group(1) if match else None


def _render(model: Model, paths: RuntimePaths, source: str, fingerprint: str) -> str:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(model.config.templates)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,  # HAProxy configuration, not HTML
        finalize=_one_line,
    )
    template = env.get_template(TEMPLATE)
    return template.render(
        model=model, config=model.config, paths=paths, fingerprint=fingerprint, config_source=source
    )


def _one_line(value: object) -> object:
    """``value`` as the templates print it; ``ValueError`` if it could end its line.

    Names and addresses were checked by :func:`~meshkit.haproxy.model.haproxy_token`
    already; this guards every other printed value too.
    """
    if isinstance(value, str) and _CONTROL.search(value):
        raise ValueError(f"line break or control character in a rendered value: {clip(value)!r}")
    return value


def write_config(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (HAProxy never reads half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def check_config(text: str, model: Model, haproxy: str | None = None, timeout: float = 30.0) -> None:
    """Run ``haproxy -c`` on ``text``; raise :class:`ConfigCheckError` if it is rejected.

    ``haproxy -c`` needs every ``fd@N`` a frontend binds to be an open socket.
    Those open here are passed on. For any that is not (``render --check`` run
    by hand, or an attached sync that does not hold the socket), a throwaway
    socket stands in: the text checked names the stand-in's own descriptor.
    Nothing is ever placed at a chosen descriptor number, which could clobber
    a descriptor another thread opens meanwhile.
    """
    haproxy = haproxy or find_haproxy()
    stand_ins: list[socket.socket] = []
    passed: list[int] = []
    try:
        for fd in model.config.inherited_fds:
            if _is_socket(fd):
                passed.append(fd)
                continue
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            stand_ins.append(sock)
            passed.append(sock.fileno())
            text = re.sub(rf"^(\s*bind\s+)fd@{fd}(?!\d)", rf"\g<1>fd@{sock.fileno()}", text, flags=re.MULTILINE)
        with tempfile.TemporaryDirectory(prefix="meshkit-haproxy-check-") as tmp:
            cfg = Path(tmp) / "haproxy.cfg"
            cfg.write_text(text)
            result = subprocess.run(
                [haproxy, "-c", "-f", str(cfg)],
                pass_fds=passed,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
    finally:
        for sock in stand_ins:
            sock.close()
    if result.returncode != 0:
        lines = [line for line in (result.stdout + result.stderr).splitlines() if "[NOTICE]" not in line]
        output = "\n".join(lines).strip() or f"haproxy -c exited with {result.returncode}"
        raise ConfigCheckError(output.replace(str(cfg), "haproxy.cfg"))


def _is_socket(fd: int) -> bool:
    try:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return False
