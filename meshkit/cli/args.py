"""What the command line means: call arguments, JSON values, durations (pure functions).

``meshkit call SERVICE METHOD [ARG ...]`` takes each ``ARG`` as

* ``JSON`` — a positional argument: ``42``, ``'"text"'``, ``'[1, 2]'``;
* ``KEY=JSON`` — a keyword argument: ``who='"world"'``, ``times=3``
  (``KEY`` is a Python identifier, so no JSON text can be mistaken for one).

An ``ARG`` that is not valid JSON is an error (:class:`UsageError`, exit
status 2), never silently a string; ``--raw`` takes every value as a
string instead (``--raw world lang=en``). ``NaN`` and ``Infinity`` are not
JSON and are refused too.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Sequence
from typing import Any

from ..errors import MeshError
from ..untrusted import clip

_KEYWORD = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", re.DOTALL)


class UsageError(MeshError):
    """The command line is wrong: a value that is not JSON, a keyword given twice, ..."""

    code = "usage"


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(text: str, what: str) -> Any:
    """``text`` as a JSON value; :class:`UsageError` naming ``what`` if it is not one."""
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise UsageError(
            f"{what} is not valid JSON: {clip(text)!r} ({exc}); quote a string as "
            "JSON ('\"text\"') or pass --raw to take every value as a string") from None


def parse_call_args(tokens: Sequence[str], raw: bool = False) -> tuple[list[Any], dict[str, Any]]:
    """``(args, kwargs)`` of a call from its ``ARG`` tokens (see the module doc).

    Positional and keyword arguments may come in any order (they travel
    separately); the positional ones keep their relative order. A keyword
    given twice is a :class:`UsageError`.
    """
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    position = 0
    for token in tokens:
        match = _KEYWORD.fullmatch(token)
        if match is not None:
            name, text = match.groups()
            if name in kwargs:
                raise UsageError(f"keyword argument {name!r} is given twice")
            kwargs[name] = text if raw else parse_json(text, f"keyword argument {name!r}")
            continue
        position += 1
        args.append(token if raw else parse_json(token, f"argument {position}"))
    return args, kwargs


def positive_seconds(text: str) -> float:
    """An argparse ``type``: a finite number of seconds greater than 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {clip(text)!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {clip(text)!r}")
    return value
