"""What an instance keeps about itself: the bounds of its span buffer, taps and log filters.

Read per service with ``settings.section(ObserveOptions, name)`` from the
``[services.<name>]`` table and ``MESHKIT_<NAME>_<KEY>`` variables. Defaults
are documented in ``docs/observability.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

# Metadata keys never shown by a tap or kept in a span, whatever the settings say.
ALWAYS_SENSITIVE = ("authorization", "cookie", "password", "secret", "token", "api_key")


@dataclass(frozen=True)
class ObserveOptions:
    """Bounds and switches of an instance's observability (see the module doc)."""

    spans: bool = True  # record spans at all (stats and in-flight are always kept)
    span_buffer_count: int = 2048  # most recent spans kept, whatever their latency
    span_buffer_bytes: int = 2 * 1024 * 1024  # estimated bytes of every span kept, all stores together
    spans_per_bucket: int = 8  # latest spans kept per latency bucket (slow ones survive a flood)
    error_spans: int = 128  # latest failed spans kept
    max_taps: int = 8  # taps open on one instance at once
    sensitive_meta: tuple[str, ...] = ()  # metadata keys never shown (besides ALWAYS_SENSITIVE)
    otlp_endpoint: str = ""  # e.g. http://127.0.0.1:4318/v1/traces; empty: no export

    def __post_init__(self) -> None:
        for name in ("span_buffer_count", "span_buffer_bytes", "spans_per_bucket", "error_spans", "max_taps"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ConfigError(f"{name} must be an integer of at least 1, got {value!r}")

    @property
    def hidden_keys(self) -> frozenset[str]:
        """Metadata keys (lower case) never shown."""
        return frozenset(k.lower() for k in ALWAYS_SENSITIVE + self.sensitive_meta)
