"""Coverage-guided fuzzing of the wire decoder with atheris (``make fuzz`` runs it).

Every input is tried as a header, as each kind of body and as the start of a
header whose id is peeked at. The properties are those of
``tests/unit/test_fuzz_wire.py``: only :class:`~meshkit.errors.ProtocolError`
may come out, with a stable code, an id in range and a short message; the
id peek never raises. Anything else is a crash, saved under ``.run/fuzz/``.

Run by hand: ``python tests/fuzz/fuzz_wire.py -max_total_time=60``
(any libFuzzer option works).
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from meshkit import decoder, wire
    from meshkit.errors import ProtocolError

ERROR_TEXT_LIMIT = 400


def _check(exc: ProtocolError) -> None:
    assert exc.code in ("bad_request", "unsupported_version"), exc.code
    assert type(exc.id) is int and 0 <= exc.id < 2**64, exc.id
    assert len(str(exc)) < ERROR_TEXT_LIMIT, len(str(exc))


def test_one_input(data: bytes) -> None:
    try:
        wire.decode_header(data)
    except ProtocolError as exc:
        _check(exc)
    assert 0 <= decoder.peek_id(data) < 2**64
    try:
        wire.decode_call_body(data, 1)
    except ProtocolError as exc:
        _check(exc)
    try:
        body = wire.decode_error_body(data)
    except ProtocolError as exc:
        _check(exc)
    else:
        assert len(body.message) <= wire.MAX_ERROR_MESSAGE + 32


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
