"""CurveZMQ on mesh connections: when it is on, keypairs, the key directory, trusted keys.

**When CURVE is on** (:func:`enabled`): ``Settings.curve`` is ``"on"`` or
``"off"``, or ``"auto"`` (the default), which means on whenever a key
directory is configured (``key_dir``), or the router binds anything but a
loopback address (``bind_host``: a wildcard or a real interface), or the
advertised host is not a loopback address. So a single-machine dev setup (everything on
``127.0.0.1``, the default) runs without keys, and anything other machines
can reach refuses to start without them: CURVE on with no ``key_dir`` is a
:class:`~meshkit.errors.ConfigError` naming the fix (``meshkit keys gen``).

**The key directory** (``key_dir``), written by ``meshkit keys gen NAME``::

    NAME.key_secret   the keypair NAME (mode 0600, owned by this user)
    NAME.key          its public half: the public key, the service it speaks
                      for, and the key that verifies its capability tokens
    OTHER.key         copied from other hosts: every ``*.key`` here is trusted

Both files are in ZeroMQ's certificate format (ZPL, as ``zmq.auth`` writes and
reads them), with two metadata entries: ``service`` (the service name the key
authenticates as) and ``sign-key`` (hex Ed25519 key, see
:mod:`meshkit.access`). A process uses the keypair named by
``Settings.key_name`` (a service: its own name unless told; anything else:
``client``).

**Permissions are checked at start** (:func:`load_keypair`, :class:`TrustStore`):
the directory and every file in use must belong to this user (or root) and
not be writable by group or others (else anyone on the host could plant a
trusted key), and a secret file must not be readable by them either. A
violation is a ``ConfigError`` naming the path and the ``chmod`` that fixes it.

**Trusted keys** (:class:`TrustStore`) map a public key to the service it
speaks for. The store re-reads the directory when its modification time
changes (at most once a second), so adding a host's key file (copy it in,
or rename it into place) takes effect without restarts. The same store
decides which registry records are believed (:func:`record_refusal`) and,
through :mod:`meshkit.zap`, which callers a server accepts.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nacl.signing
import zmq
from zmq.utils import z85

from . import names
from .config import Settings
from .errors import ConfigError
from .record import InstanceRecord
from .untrusted import clip

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
CLIENT_KEY_NAME = "client"  # the keypair of a process that is no service (a script, a CLI command)
MAX_KEY_FILE = 4096  # bytes: a certificate is about 300
MAX_TRUSTED = 10_000  # key files one directory may hold
REFRESH_EVERY = 1.0  # seconds between two looks at the directory's modification time
_ENTRY = re.compile(r'^\s*([a-z-]+)\s*=\s*"([^"]*)"\s*$')
_HEX64 = re.compile(r"[0-9a-f]{64}")


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (``localhost``, ``127.0.0.0/8``, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def enabled(settings: Settings) -> bool:
    """Whether this process's mesh connections use CURVE (see the module doc for the rule)."""
    if settings.curve == "on":
        return True
    if settings.curve == "off":
        return False
    wildcard = settings.bind_host in ("0.0.0.0", "::", "*", "")
    return bool(settings.key_dir) or wildcard or not is_loopback(settings.bind_host) \
        or not is_loopback(settings.advertised_host)


def key_name(settings: Settings) -> str:
    return settings.key_name or CLIENT_KEY_NAME


@dataclass(frozen=True, slots=True)
class Keypair:
    """A long-term CURVE keypair (Z85 bytes) and the service it speaks for."""

    service: str
    public: bytes
    secret: bytes

    @property
    def public_text(self) -> str:
        return self.public.decode()

    def signing_seed(self) -> bytes:
        """The Ed25519 seed of this keypair's capability tokens, derived from the CURVE secret.

        Derived through a keyed hash so that the CURVE secret is never used as
        a signing key itself.
        """
        return hashlib.blake2b(z85.decode(self.secret), digest_size=32,
                               person=b"meshkit-token").digest()


@dataclass(frozen=True, slots=True)
class TrustedKey:
    """A trusted public key: the service it authenticates as, and its token-verifying key."""

    public: str
    service: str
    sign_key: bytes  # 32 bytes of Ed25519 public key; b"" if the file has none
    path: str


def verify_key_of(seed: bytes) -> bytes:
    """The Ed25519 verifying key of signing ``seed`` (32 bytes): a key file's ``sign-key``."""
    return bytes(nacl.signing.SigningKey(seed).verify_key)


# -- files --------------------------------------------------------------------------


def generate(directory: str | os.PathLike[str], name: str, service: str | None = None,
             *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write the keypair ``name`` (for ``service``, default ``name``); return (public, secret) paths.

    The directory is created with mode 0700 if missing. An existing keypair
    is kept (``ConfigError``) unless ``overwrite``: replacing a key locks out
    every peer that trusts the old one.
    """
    service = service or name
    names.validate_service_name(name)
    names.validate_service_name(service)
    folder = Path(directory)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    public_path, secret_path = folder / f"{name}{PUBLIC_SUFFIX}", folder / f"{name}{SECRET_SUFFIX}"
    if not overwrite and (public_path.exists() or secret_path.exists()):
        raise ConfigError(f"keypair {name!r} already exists in {folder} (use --force to replace it)")
    public, secret = zmq.curve_keypair()
    pair = Keypair(service, public, secret)
    sign = verify_key_of(pair.signing_seed()).hex()
    meta = f'metadata\n    service = "{service}"\n    sign-key = "{sign}"\n'
    _write(secret_path, 0o600, "#   meshkit CURVE secret key: never copy this file off its host\n\n"
           f'{meta}curve\n    public-key = "{public.decode()}"\n    secret-key = "{secret.decode()}"\n')
    _write(public_path, 0o644, "#   meshkit CURVE public key: copy it to every host that must trust it\n\n"
           f'{meta}curve\n    public-key = "{public.decode()}"\n')
    return public_path, secret_path


def _write(path: Path, mode: int, text: str) -> None:
    # Written under a temporary name with its final mode, then renamed, so a
    # reader (or a TrustStore refresh) never sees half a file or a loose mode.
    temp = path.with_name(f".{path.name}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(temp, path)


def read_key_file(path: Path) -> dict[str, str]:
    """The ``name = "value"`` entries of a certificate file (bounded; ``ConfigError`` if unreadable)."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_KEY_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read key file {path}: {exc.strerror}") from None
    if len(data) > MAX_KEY_FILE:
        raise ConfigError(f"key file {path} is larger than {MAX_KEY_FILE} bytes")
    entries: dict[str, str] = {}
    for line in data.decode(errors="replace").splitlines():
        match = _ENTRY.match(line)
        if match is not None:
            entries.setdefault(match.group(1), match.group(2))
    return entries


def check_private(path: Path, *, secret: bool) -> None:
    """``ConfigError`` unless ``path`` is ours (or root's) and not writable (if ``secret``: readable) by others."""
    try:
        info = path.lstat()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    if stat.S_ISLNK(info.st_mode):
        info = path.stat()
    if info.st_uid not in (os.geteuid(), 0):
        raise ConfigError(f"{path} belongs to uid {info.st_uid}, not to this user ({os.geteuid()})")
    loose = info.st_mode & (0o077 if secret else 0o022)
    if loose:
        mode = "0600" if secret and not stat.S_ISDIR(info.st_mode) else "go-w"
        raise ConfigError(f"{path} has mode {stat.S_IMODE(info.st_mode):04o}, open to other users; "
                          f"run: chmod {mode} {path}")


def key_dir(settings: Settings) -> Path:
    """The key directory, checked; ``ConfigError`` if CURVE is on without one."""
    if not settings.key_dir:
        raise ConfigError(
            f"CurveZMQ is on (curve = {settings.curve!r}, bind_host {clip(settings.bind_host)!r}, "
            f"advertised host {clip(settings.advertised_host)!r}) "
            "but key_dir is not set: set key_dir and run `meshkit keys gen NAME` there "
            "(docs/security.md), or set curve = \"off\" on a trusted network")
    folder = Path(settings.key_dir)
    if not folder.is_dir():
        raise ConfigError(f"key_dir {folder} is not a directory (create it with `meshkit keys gen NAME`)")
    check_private(folder, secret=False)
    return folder


def load_keypair(settings: Settings) -> Keypair:
    """This process's keypair (``key_name`` in ``key_dir``), permissions checked; ``ConfigError`` if unusable."""
    name = key_name(settings)
    path = key_dir(settings) / f"{name}{SECRET_SUFFIX}"
    if not path.exists():
        raise ConfigError(f"no keypair {name!r} in {settings.key_dir}: run `meshkit keys gen {name}` "
                          f"with key_dir = {settings.key_dir!r}")
    check_private(path, secret=True)
    entries = read_key_file(path)
    try:
        public = names.validate_curve_key(entries.get("public-key", ""))
        secret = names.validate_curve_key(entries.get("secret-key", ""))
        service = names.validate_service_name(entries.get("service", name))
        if not public or not secret or zmq.curve_public(secret.encode()) != public.encode():
            raise ValueError("public-key and secret-key missing or not a pair")
    except ValueError as exc:
        raise ConfigError(f"key file {path}: {exc}") from None
    return Keypair(service, public.encode(), secret.encode())


# -- trusted keys --------------------------------------------------------------------


class TrustStore:
    """The public keys of ``directory``'s ``*.key`` files, each mapped to its service.

    A file that is unreadable, malformed or too open is skipped with a
    warning returned by :meth:`refresh` (the rest stay trusted); the
    directory itself must pass :func:`check_private` at construction.
    """

    def __init__(self, directory: Path, clock: Callable[[], float] = time.monotonic) -> None:
        check_private(directory, secret=False)
        self.directory = directory
        self._clock = clock
        self._keys: dict[str, TrustedKey] = {}
        self._mtime = -1
        self._looked = -REFRESH_EVERY
        self.problems: list[str] = []
        self.refresh()

    @classmethod
    def from_settings(cls, settings: Settings, clock: Callable[[], float] = time.monotonic) -> TrustStore:
        return cls(key_dir(settings), clock)

    def __len__(self) -> int:
        return len(self._keys)

    def keys(self) -> list[TrustedKey]:
        """Every trusted key, as last read."""
        return list(self._keys.values())

    def get(self, public: str) -> TrustedKey | None:
        """The trusted key ``public`` (Z85 text), or ``None`` (re-reading the directory if it changed)."""
        self.maybe_refresh()
        return self._keys.get(public)

    def service_of(self, public: str) -> str | None:
        key = self.get(public)
        return key.service if key is not None else None

    def maybe_refresh(self) -> None:
        now = self._clock()
        if now - self._looked < REFRESH_EVERY:
            return
        self._looked = now
        try:
            mtime = self.directory.stat().st_mtime_ns
        except OSError:
            return  # keep what is known: a vanished directory must not trust nothing silently mid-flight
        if mtime != self._mtime:
            self.refresh()

    def refresh(self) -> list[str]:
        """Re-read every key file now; return the problems found (also kept in :attr:`problems`)."""
        self._looked = self._clock()
        keys: dict[str, TrustedKey] = {}
        problems: list[str] = []
        try:
            self._mtime = self.directory.stat().st_mtime_ns
            paths = sorted(p for p in self.directory.iterdir() if p.name.endswith(PUBLIC_SUFFIX))
        except OSError as exc:
            self.problems = [f"cannot list {self.directory}: {exc.strerror}"]
            return self.problems
        for path in paths[:MAX_TRUSTED]:
            try:
                key = _trusted_key(path)
            except ConfigError as exc:
                problems.append(str(exc))
                continue
            if key.public in keys and keys[key.public].service != key.service:
                problems.append(f"{path}: key already trusted for service {keys[key.public].service!r}; skipped")
                continue
            keys[key.public] = key
        if len(paths) > MAX_TRUSTED:
            problems.append(f"{self.directory}: more than {MAX_TRUSTED} key files; the rest are ignored")
        self._keys = keys
        self.problems = problems
        return problems


def _trusted_key(path: Path) -> TrustedKey:
    check_private(path, secret=False)
    entries = read_key_file(path)
    try:
        public = names.validate_curve_key(entries.get("public-key", ""))
        if not public:
            raise ValueError("no public-key")
        service = names.validate_service_name(entries.get("service", ""))
        sign = entries.get("sign-key", "")
        if sign and _HEX64.fullmatch(sign) is None:
            raise ValueError("sign-key must be 64 hex digits")
    except ValueError as exc:
        raise ConfigError(f"key file {path}: {exc}") from None
    return TrustedKey(public, service, bytes.fromhex(sign), str(path))


def record_refusal(store: TrustStore, record: InstanceRecord) -> str | None:
    """Why ``record`` must not be believed (its key is absent, unknown or another service's), or ``None``."""
    if not record.curve_key:
        return "it has no curve_key and CurveZMQ is on"
    service = store.service_of(record.curve_key)
    if service is None:
        return f"its curve_key {record.curve_key[:8]}... is not trusted"
    if service != record.service:
        return f"its curve_key is trusted for service {service!r}, not {clip(record.service)!r}"
    return None


# -- sockets -------------------------------------------------------------------------


def apply_client(sock: zmq.Socket[bytes], server_key: str, settings: Settings) -> None:
    """Make ``sock`` (before it connects) a CURVE client of ``server_key``, if CURVE is on.

    Reads this process's keypair from disk (checked, see :func:`load_keypair`)
    each time: a peer is connected rarely, and a replaced key file then takes
    effect without a restart. Raises ``ConfigError`` when CURVE is on and the
    record has no key (the registry filter keeps such records out, so this is
    a record that bypassed it).
    """
    if not enabled(settings):
        return
    if not server_key:
        raise ConfigError("CurveZMQ is on but the instance advertises no curve_key")
    pair = load_keypair(settings)
    sock.curve_publickey = pair.public
    sock.curve_secretkey = pair.secret
    sock.curve_serverkey = server_key.encode()
