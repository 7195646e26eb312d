"""Per-address and per-connection limits: pure decisions of counts and time (no I/O).

* :class:`TokenBucket` — ``rate`` tokens per second up to ``burst``; one per
  event. Used for the connection rate of an address and the request rate of
  one connection.
* :class:`Exemptions` — networks (``127.0.0.0/8``, ``::1``) that no limit or
  ban applies to: behind an HAProxy that sends no PROXY header every client
  is HAProxy's own address, and limiting it would limit everyone.
* :class:`AddressBuckets` — a request-rate bucket per address (HTTP requests).
* :class:`AddressLimits` — at most ``max_per_address`` open connections per
  address and a connection rate per address. It remembers at most
  ``max_addresses`` rate buckets (the least recently seen is forgotten
  first), so a flood of distinct addresses costs bounded memory; open counts
  are bounded by the gateway's own ``max_connections``.

Every method takes ``now`` (a :func:`time.monotonic` instant), so unit tests
drive time instead of sleeping.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Iterable

from ..errors import ConfigError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TokenBucket:
    """``rate`` events per second on average, ``burst`` at once; ``rate <= 0`` admits everything."""

    __slots__ = ("_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self._tokens = float(self.burst)
        self._stamp = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one; False (nothing spent) when the rate is exceeded."""
        if not self.ready(now):
            return False
        if self.rate > 0:
            self._tokens -= 1.0
        return True

    def ready(self, now: float) -> bool:
        """Whether a token is there to take (nothing spent)."""
        if self.rate <= 0:
            return True
        elapsed = max(0.0, now - self._stamp)
        self._stamp = now
        self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
        return self._tokens >= 1.0


class Exemptions:
    """Networks exempt from limits and bans (see the module doc)."""

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks: tuple[Network, ...] = tuple(_network(text) for text in networks)
        # Asked for every request (the ban policy's judge): parsing the address
        # each time was ~1.5% of a gateway's CPU per request. Bounded by _MEMO.
        self._memo: dict[str, bool] = {}

    def __contains__(self, address: str) -> bool:
        known = self._memo.get(address)
        if known is not None:
            return known
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False  # not an IP (a unix socket peer): nothing to match
        exempt = any(ip in network for network in self.networks)
        if len(self._memo) >= _MEMO:
            self._memo.clear()  # many addresses: start over rather than grow
        self._memo[address] = exempt
        return exempt


_MEMO = 4096  # addresses whose exemption is remembered, at most


def _network(text: str) -> Network:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ConfigError(f"not an IP network: {text!r}") from None


ADDRESS_LIMIT = "too_many_from_address"
CONNECT_RATE = "connect_rate"


class AddressLimits:
    """Open connections and connection rate per client address (see the module doc)."""

    def __init__(self, max_per_address: int, connect_rate: float, connect_burst: int,
                 max_addresses: int) -> None:
        self.max_per_address = max_per_address
        self.connect_rate = connect_rate
        self.connect_burst = connect_burst
        self.max_addresses = max(1, max_addresses)
        self.open: dict[str, int] = {}
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def admit(self, address: str, now: float) -> str | None:
        """Count a new connection from ``address``; or the reason it is refused (then not counted).

        Reasons: :data:`ADDRESS_LIMIT` (``max_per_address`` already open) and
        :data:`CONNECT_RATE` (connecting faster than ``connect_rate`` per
        second beyond ``connect_burst``). A refused connect still spends
        rate: a client that hammers stays refused.
        """
        bucket = self._buckets.get(address)
        if bucket is None:
            bucket = TokenBucket(self.connect_rate, self.connect_burst, now)
            self._buckets[address] = bucket
            if len(self._buckets) > self.max_addresses:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(address)
        if not bucket.take(now):
            return CONNECT_RATE
        count = self.open.get(address, 0)
        if self.max_per_address > 0 and count >= self.max_per_address:
            return ADDRESS_LIMIT
        self.open[address] = count + 1
        return None

    def release(self, address: str) -> None:
        """One connection :meth:`admit` counted for ``address`` has closed."""
        count = self.open.get(address, 0) - 1
        if count > 0:
            self.open[address] = count
        else:
            self.open.pop(address, None)

    @property
    def tracked(self) -> int:
        """Addresses whose connection rate is remembered (at most ``max_addresses``)."""
        return len(self._buckets)


class AddressBuckets:
    """A request-rate bucket per client address, for HTTP (a request is not a connection).

    Remembers at most ``max_addresses`` buckets, the least recently seen
    forgotten first, as :class:`AddressLimits` does.
    """

    def __init__(self, rate: float, burst: int, max_addresses: int) -> None:
        self.rate = rate
        self.burst = burst
        self.max_addresses = max(1, max_addresses)
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def bucket(self, address: str, now: float) -> TokenBucket | None:
        """``address``'s bucket (made on first use); None when there is no limit."""
        if self.rate <= 0:
            return None
        bucket = self._buckets.get(address)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst, now)
            self._buckets[address] = bucket
            if len(self._buckets) > self.max_addresses:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(address)
        return bucket

    def take(self, address: str, now: float) -> bool:
        """Spend one of ``address``'s tokens; False (not spent) when it is over its rate."""
        bucket = self.bucket(address, now)
        return bucket is None or bucket.take(now)

    @property
    def tracked(self) -> int:
        """Addresses whose request rate is remembered (at most ``max_addresses``)."""
        return len(self._buckets)
