"""Who may call what: the access policy, and capability tokens for one method.

A caller's identity is the service its CurveZMQ key speaks for (the ZAP
User-Id, :mod:`meshkit.zap`); without CURVE there is no identity and nothing
here is enforced. Every instance checks what reaches its own router, so the
policy holds however the caller found the endpoint.

**The policy** (``Settings.access_policy``, a TOML file such as
``configs/access.toml``; empty: :data:`DEFAULT_POLICY`)::

    [default]                       # every caller without a table of its own
    call = ["*"]                    # "*", "svc.*" (every method of svc), "svc.method"
    publish = ["*"]                 # topics it may push: "*", "prefix.*", "topic"
    subscribe = ["*"]               # topics its records may list

    [services.gateway]              # a caller's own rules (missing keys: [default]'s)
    call = ["$services"]            # every method of each service its `services` option names
                                    # (an empty option: any service, as the gateway itself reads it)

A refused call or push is answered ``forbidden`` (``docs/protocol.md``),
counted in ``rejected.forbidden`` and logged at most once per cause per
``log_repeat_interval``. A record listing a topic its service may not
subscribe to is ignored by every view (:func:`subscribe_refusal`).

**Capability tokens** (:func:`issue`, checked by :meth:`Guard.call_refusal`):
where a static rule is too coarse, a service that may call ``svc.method``
hands another service a token for exactly that method, until an expiry.
A token is ``base64url(body) "." base64url(signature)``, the body the
MessagePack array ``[1, issuer_key, grantee, service, method, expires]``
(``issuer_key`` the issuer's CURVE public key in Z85, ``expires`` whole Unix
seconds) signed with Ed25519 by a key derived from the issuer's CURVE secret
(:meth:`meshkit.curve.Keypair.signing_seed`); its verifying key is the
``sign-key`` of the issuer's public key file, so any instance that trusts the
issuer can check it with no shared secret. The caller sends it in the call's
metadata under :data:`TOKEN_META`. It admits the call only if the signature
is good, the issuer's key is trusted, the issuer may itself call the method
(a token cannot grant more than its issuer has), the caller is the grantee,
the call is for that service and method, and the expiry has not passed
(hosts' clocks are assumed in step, as for TLS certificates).
"""

from __future__ import annotations

import base64
import binascii
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import nacl.exceptions
import nacl.signing

from . import curve, names
from .config import Settings
from .curve import Keypair, TrustStore
from .errors import ConfigError
from .record import InstanceRecord
from .topics import topic_matches
from .untrusted import clip

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib

TOKEN_META = "mk-token"
MAX_TOKEN = 1024  # characters; a token is about 200
MAX_TOKEN_TTL = 24 * 3600.0  # seconds a token may be issued for
GATEWAY_SERVICES = "$services"
KINDS = ("call", "publish", "subscribe")
_CACHE_MAX = 4096  # decisions (and verified tokens) remembered per guard
DEFAULT_POLICY: Mapping[str, Any] = {
    "default": {"call": ["*"], "publish": ["*"], "subscribe": ["*"]},
    "services": {"gateway": {"call": [GATEWAY_SERVICES]}},
}


@dataclass(frozen=True)
class ServicesOption:
    """The one gateway option the policy reads (``$services``): what a gateway lets clients call."""

    services: tuple[str, ...] = ()


@dataclass(frozen=True)
class Policy:
    """The rules of one deployment: per caller and kind, the patterns it may use."""

    default: Mapping[str, tuple[str, ...]]
    callers: Mapping[str, Mapping[str, tuple[str, ...]]]

    @classmethod
    def from_data(cls, data: Mapping[str, Any], where: str = "access policy") -> Policy:
        """Build from the TOML tables (``ConfigError`` naming ``where`` if malformed)."""
        unknown = set(data) - {"default", "services"}
        if unknown:
            raise ConfigError(f"{where}: unknown tables {sorted(unknown)} (expected [default], [services.*])")
        default = _rules(data.get("default", {}), f"{where} [default]")
        callers = {}
        services = data.get("services", {})
        if not isinstance(services, dict):
            raise ConfigError(f"{where}: [services] must be a table of tables")
        for name, table in services.items():
            try:
                names.validate_service_name(name)
            except ValueError as exc:
                raise ConfigError(f"{where} [services.{clip(name)}]: {exc}") from None
            callers[name] = _rules(table, f"{where} [services.{name}]")
        return cls(default, callers)

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        if not settings.access_policy:
            return cls.from_data(DEFAULT_POLICY, "built-in policy")
        path = Path(settings.access_policy)
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read access policy {path}: {exc}") from None
        return cls.from_data(data, str(path))

    def patterns(self, caller: str, kind: str) -> tuple[str, ...]:
        rules = self.callers.get(caller, {})
        return rules[kind] if kind in rules else self.default.get(kind, ())


def _rules(table: Any, where: str) -> dict[str, tuple[str, ...]]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    rules = {}
    for kind, patterns in table.items():
        if kind not in KINDS:
            raise ConfigError(f"{where}: unknown key {clip(kind)!r} (expected {', '.join(KINDS)})")
        if not isinstance(patterns, list) or not all(isinstance(p, str) and p for p in patterns):
            raise ConfigError(f"{where}: {kind} must be a list of non-empty strings")
        rules[kind] = tuple(patterns)
    return rules


def call_allowed(patterns: Iterable[str], service: str, method: str,
                 gateway_services: Callable[[], Sequence[str]]) -> bool:
    """Whether ``service.method`` is covered by ``patterns`` (see the module doc for their forms)."""
    for pattern in patterns:
        if pattern == GATEWAY_SERVICES:
            allowed = gateway_services()
            if not allowed or service in allowed:
                return True
        elif pattern == "*" or pattern == f"{service}.*" or pattern == f"{service}.{method}":
            return True
    return False


def topic_allowed(patterns: Iterable[str], topic: str) -> bool:
    patterns = tuple(patterns)
    return "*" in patterns or topic_matches(patterns, topic)


def subscribe_refusal(policy: Policy, service: str, topics: Iterable[str]) -> str | None:
    """Why a record of ``service`` listing ``topics`` must be ignored, or ``None``."""
    patterns = policy.patterns(service, "subscribe")
    for topic in topics:
        if not topic_allowed(patterns, topic):
            return f"service {service!r} may not subscribe to {clip(topic)!r}"
    return None


# -- tokens ------------------------------------------------------------------------


class TokenError(ValueError):
    """A capability token that does not admit the call (the message says why)."""


@dataclass(frozen=True, slots=True)
class Grant:
    """What a verified token says."""

    issuer: str  # the issuer's service, from its trusted key
    grantee: str
    service: str
    method: str
    expires: int


def issue(pair: Keypair, grantee: str, service: str, method: str, ttl: float,
          now: Callable[[], float] = time.time) -> str:
    """A token letting ``grantee`` call ``service.method`` for ``ttl`` seconds, signed by ``pair``."""
    names.validate_service_name(grantee)
    names.validate_service_name(service)
    if not method or len(method) > 200:
        raise ConfigError(f"method must be 1-200 characters, got {clip(method)!r}")
    if not 0 < ttl <= MAX_TOKEN_TTL:
        raise ConfigError(f"token ttl must be in (0, {MAX_TOKEN_TTL:.0f}] seconds, got {ttl!r}")
    body = msgpack.packb([1, pair.public_text, grantee, service, method, int(now() + ttl)])
    signature = nacl.signing.SigningKey(pair.signing_seed()).sign(body).signature
    return f"{_b64(body)}.{_b64(signature)}"


def verify(token: str, trust: TrustStore, now: float) -> Grant:
    """The grant of ``token`` if it is well formed, signed by a trusted key and unexpired; else ``TokenError``."""
    if len(token) > MAX_TOKEN:
        raise TokenError(f"token longer than {MAX_TOKEN} characters")
    try:
        body_text, _, sig_text = token.partition(".")
        body, signature = _unb64(body_text), _unb64(sig_text)
        fields = msgpack.unpackb(body, max_str_len=256, max_array_len=8, max_map_len=0, max_bin_len=0)
        version, issuer_key, grantee, service, method, expires = fields
        if version != 1 or not all(isinstance(f, str) for f in (issuer_key, grantee, service, method)) \
                or type(expires) is not int:
            raise ValueError("unexpected fields")
    except (ValueError, TypeError, binascii.Error, msgpack.UnpackException) as exc:
        raise TokenError(f"malformed token ({clip(str(exc), 80)})") from None
    issuer = trust.get(issuer_key)
    if issuer is None or not issuer.sign_key:
        raise TokenError("token issuer's key is not trusted")
    try:
        nacl.signing.VerifyKey(issuer.sign_key).verify(body, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError):
        raise TokenError("token signature is not valid") from None
    if expires <= now:
        raise TokenError(f"token expired {now - expires:.0f}s ago")
    return Grant(issuer.service, grantee, service, method, expires)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# -- enforcement -------------------------------------------------------------------


class Guard:
    """Decides, for one serving instance, whether an authenticated caller may call or push.

    Decisions of the static policy are cached (their inputs are bounded by
    the handler table and the trusted keys); a push's topic is the peer's
    choice, so topic decisions are cached only up to a bound.
    """

    def __init__(self, policy: Policy, service: str, trust: TrustStore, settings: Settings,
                 clock: Callable[[], float] = time.time) -> None:
        self.policy = policy
        self.service = service
        self.trust = trust
        self.settings = settings
        self.clock = clock
        self._calls: dict[tuple[str, str], bool] = {}
        self._topics: dict[tuple[str, str], bool] = {}
        self._tokens: dict[str, Grant] = {}

    def gateway_services(self, caller: str) -> Sequence[str]:
        """The caller's ``services`` option, read as the gateway reads it (table, then environment)."""
        try:
            return self.settings.section(ServicesOption, caller).services
        except ConfigError:
            return ("",)  # unreadable: allow nothing rather than everything (no service is named "")

    def may_call(self, caller: str, service: str, method: str) -> bool:
        """Whether the static policy lets ``caller`` call ``service.method``."""
        key = (caller, f"{service}.{method}")
        allowed = self._calls.get(key)
        if allowed is None:
            allowed = call_allowed(self.policy.patterns(caller, "call"), service, method,
                                   lambda: self.gateway_services(caller))
            if len(self._calls) < _CACHE_MAX:
                self._calls[key] = allowed
        return allowed

    def call_refusal(self, caller: str | None, method: str, meta: Mapping[str, str] | None) -> str | None:
        """Why ``caller`` may not call ``method`` here (policy, then a token in ``meta``), or ``None``."""
        if caller is None:
            return "the caller is not authenticated"
        if self.may_call(caller, self.service, method):
            return None
        token = meta.get(TOKEN_META) if meta else None
        if token is None:
            return f"service {caller!r} may not call {self.service}.{clip(method)}"
        try:
            grant = self._grant(token)
        except TokenError as exc:
            return f"service {caller!r} may not call {self.service}.{clip(method)}: {exc}"
        if (grant.grantee, grant.service, grant.method) != (caller, self.service, method):
            return f"the token is for {grant.grantee!r} to call {grant.service}.{clip(grant.method)}"
        if not self.may_call(grant.issuer, self.service, method):
            return f"the token's issuer {grant.issuer!r} may not call {self.service}.{clip(method)} itself"
        return None

    def _grant(self, token: str) -> Grant:
        grant = self._tokens.get(token)
        now = self.clock()
        if grant is None:
            grant = verify(token, self.trust, now)
            if len(self._tokens) >= _CACHE_MAX:
                self._tokens.clear()
            self._tokens[token] = grant
        elif grant.expires <= now:
            del self._tokens[token]
            raise TokenError(f"token expired {now - grant.expires:.0f}s ago")
        elif self.trust.get(token_issuer_key(token)) is None:
            del self._tokens[token]
            raise TokenError("token issuer's key is no longer trusted")
        return grant

    def push_refusal(self, caller: str | None, topic: str) -> str | None:
        """Why ``caller`` may not push ``topic`` here, or ``None``."""
        if caller is None:
            return "the caller is not authenticated"
        key = (caller, topic)
        allowed = self._topics.get(key)
        if allowed is None:
            allowed = topic_allowed(self.policy.patterns(caller, "publish"), topic)
            if len(self._topics) < _CACHE_MAX:
                self._topics[key] = allowed
        return None if allowed else f"service {caller!r} may not publish {clip(topic)!r}"


def token_issuer_key(token: str) -> str:
    """The issuer key a token names (unverified; for a cached token only)."""
    try:
        return str(msgpack.unpackb(_unb64(token.partition(".")[0]))[1])
    except Exception:
        return ""


def guard_for(settings: Settings, service: str, trust: TrustStore | None) -> Guard | None:
    """The guard of a server whose trusted keys are ``trust``; ``None`` without CURVE (no identities)."""
    if trust is None:
        return None
    return Guard(Policy.from_settings(settings), service, trust, settings)


def record_filter(settings: Settings) -> Callable[[InstanceRecord], str | None] | None:
    """For a registry view: why a record must be ignored (untrusted key, forbidden topic); ``None`` without CURVE.

    Raises ``ConfigError`` at once if the key directory or the policy is unusable.
    """
    if not curve.enabled(settings):
        return None
    trust = TrustStore.from_settings(settings)
    policy = Policy.from_settings(settings)

    def refusal(record: InstanceRecord) -> str | None:
        return curve.record_refusal(trust, record) or subscribe_refusal(policy, record.service, record.topics)

    return refusal
