"""What can go wrong between meshkit and HAProxy, rooted at :class:`HAProxyError`.

::

    MeshError
    └── HAProxyError                 something between meshkit and HAProxy failed
        ├── HAProxyUnreachableError  a CLI socket does not answer (HAProxy down or restarting)
        ├── RuntimeCommandError      HAProxy answered a runtime command with an error
        ├── ConfigCheckError         ``haproxy -c`` rejected a rendered configuration
        └── ReloadError              a reload did not bring up a new worker

Configuration files that are wrong (``configs/haproxy.toml``) raise
:class:`meshkit.errors.ConfigError` instead: that is the user's fault, and is
reported before anything runs.
"""

from __future__ import annotations

from ..errors import MeshError


class HAProxyError(MeshError):
    """Root of the errors raised while talking to or driving HAProxy."""


class HAProxyUnreachableError(HAProxyError):
    """A runtime API or master CLI socket could not be reached or did not answer in time."""


class RuntimeCommandError(HAProxyError):
    """HAProxy refused a runtime command; ``reply`` is what it said."""

    def __init__(self, command: str, reply: str) -> None:
        super().__init__(f"{command!r}: {reply}")
        self.command = command
        self.reply = reply


class ConfigCheckError(HAProxyError):
    """``haproxy -c`` rejected a rendered configuration; ``output`` holds its messages."""

    def __init__(self, output: str) -> None:
        super().__init__(f"haproxy rejected the configuration:\n{output}")
        self.output = output


class ReloadError(HAProxyError):
    """The master CLI ``reload`` failed or did not bring up a new worker in time."""
