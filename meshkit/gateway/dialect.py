"""How a listener's answers and pushes look: JSON-RPC 2.0, or Stratum's JSON-RPC 1.0 style.

A gateway's ``dialect`` option picks one for its listener. Requests are
parsed the same way in both (:func:`~meshkit.gateway.jsonrpc.parse_line`
accepts objects with or without ``"jsonrpc"``); only what the gateway writes
differs:

===========  ===================================================  ===================================================
             ``jsonrpc`` (the default)                            ``stratum``
===========  ===================================================  ===================================================
result       ``{"jsonrpc":"2.0","id":1,"result":true}``           ``{"id":1,"result":true,"error":null}``
error        ``{"jsonrpc":"2.0","id":1,"error":{"code":-32601,    ``{"id":1,"result":null,"error":[-32601,
             "message":"...","data":{"code":"method_not_found"}}}``  "...",{"code":"method_not_found"}]}``
push         ``{"jsonrpc":"2.0","method":"T","params":P}``        ``{"id":null,"method":"T","params":P}``
===========  ===================================================  ===================================================

Stratum v1 clients (cgminer, bfgminer, cpuminer, ASIC firmware) read an
answer as ``result``/``error`` with both present and an error as an array
``[code, message, data]``; a JSON-RPC 2.0 error object would be misread.
The numbers and ``data`` are the same in both dialects; a backend that
refuses a request with a ``client_code``
(:class:`~meshkit.errors.RefusedError`, say ``23`` for a low-difficulty
share) has that number as the code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import jsonrpc
from .jsonrpc import RequestId

JSONRPC = "jsonrpc"
STRATUM = "stratum"
NAMES = (JSONRPC, STRATUM)


@dataclass(frozen=True)
class Dialect:
    """The shapes one listener writes (see the module doc); pure, no I/O."""

    name: str

    @property
    def stratum(self) -> bool:
        return self.name == STRATUM

    def result_doc(self, rid: RequestId, result: Any) -> dict[str, Any]:
        """A success answer as an object."""
        if self.stratum:
            return {"id": rid, "result": result, "error": None}
        return jsonrpc.result_doc(rid, result)

    def error_doc(self, rid: RequestId, code: int, message: str,
                  data: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """An error answer as an object; ``data.code`` defaults to the code's stable string."""
        if self.stratum:
            err = jsonrpc.error_object(code, message, data)
            return {"id": rid, "result": None, "error": [err["code"], err["message"], err["data"]]}
        return jsonrpc.error_doc(rid, code, message, data)

    def error_line(self, rid: RequestId, code: int, message: str,
                   data: Mapping[str, Any] | None = None) -> bytes:
        """An error answer, newline included."""
        line, _ = jsonrpc.answer_line([self.error_doc(rid, code, message, data)], batch=False,
                                      make_error=self.error_doc)
        return line

    def notification_line(self, method: str, params: Any) -> bytes:
        """A pushed message, newline included; raises one of :data:`jsonrpc.UNENCODABLE`."""
        if self.stratum:
            return jsonrpc.encode_line({"id": None, "method": method, "params": params})
        return jsonrpc.notification_line(method, params)

    def answer_line(self, docs: Sequence[dict[str, Any]], batch: bool,
                    limit: int | None = None) -> tuple[bytes, list[str]]:
        """:func:`jsonrpc.answer_line` with this dialect's error shape for what it replaces."""
        return jsonrpc.answer_line(docs, batch, limit, make_error=self.error_doc)


_DIALECTS = {name: Dialect(name) for name in NAMES}


def named(name: str) -> Dialect:
    """The dialect called ``name``; ``ValueError`` for an unknown one."""
    try:
        return _DIALECTS[name]
    except KeyError:
        raise ValueError(f"unknown dialect {name!r}; expected one of {list(NAMES)}") from None
