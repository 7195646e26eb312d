"""Proxies whose attributes are a service's methods: ``client.service("cart").add(item)``.

Made by :meth:`meshkit.AsyncClient.service` (awaitable results) and
:meth:`meshkit.Client.service` (blocking results). ``proxy.method.stream(...)``
iterates a streamed call (:mod:`meshkit.streams`), when the client streams.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["Method", "ServiceProxy"]


class ServiceProxy:
    """Attribute access names a method; calling it calls the service."""

    def __init__(self, call: Callable[..., Any], service: str, timeout: float | None, wait: bool,
                 stream: Callable[..., Any] | None = None) -> None:
        self._call = call
        self._service = service
        self._timeout = timeout
        self._wait = wait
        self._stream = stream

    def __getattr__(self, method: str) -> Method:
        if method.startswith("_"):
            raise AttributeError(method)
        return Method(self, method)


class Method:
    """One method of a :class:`ServiceProxy`: call it, or ``.stream(...)`` it."""

    __slots__ = ("__name__", "_proxy")

    def __init__(self, proxy: ServiceProxy, name: str) -> None:
        self._proxy = proxy
        self.__name__ = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        proxy = self._proxy
        return proxy._call(proxy._service, self.__name__, args, kwargs, timeout=proxy._timeout, wait=proxy._wait)

    def stream(self, *args: Any, **kwargs: Any) -> Any:
        """Iterate the streamed call of this method with ``args`` (``async for``, or ``for`` when blocking)."""
        proxy = self._proxy
        if proxy._stream is None:
            raise TypeError("this proxy's client does not stream")
        return proxy._stream(proxy._service, self.__name__, *args, timeout=proxy._timeout, **kwargs)
