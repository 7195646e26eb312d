"""One typed loader for every configuration section: a dataclass, a table, the environment.

A *section* is a frozen dataclass whose fields are its keys, with their
defaults: :class:`~meshkit.config.Settings` (``[meshkit]``), the gateway's
options (``[services.gateway]``), flap limits (``[services.<watcher>]``),
the HAProxy file's ``[haproxy.timeouts]`` and ``[[frontend]]`` tables.
:func:`read_section` reads one from a parsed TOML table and, optionally,
from environment variables ``<PREFIX><FIELD>`` (upper case), which win over
the table. It never reads ``os.environ`` itself: the environment reaches a
section only through :meth:`Settings.load <meshkit.config.Settings.load>`,
which reads it once and keeps the ``MESHKIT_*`` variables it saw.

Values are coerced by the field's annotation, the same way for every section:

==================  ===========================================================
``bool``            a TOML boolean; a string ``1 true yes on`` / ``0 false no
                    off`` or empty (any case)
``int``             an integer, an integral float, or a string of one; never a
                    boolean
``float``           a number, or a string of one; never a boolean
``str``             a string; a number is written out (``inter = 500`` is
                    ``"500"``)
``tuple[str, ...]`` a list, or a comma-separated string; blank items dropped
==================  ===========================================================

A value that does not fit raises :class:`~meshkit.errors.ConfigError` naming
the section and the key, with the value clipped. Range checks are the
section's own (its ``__post_init__``, or its parser).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Collection, Mapping
from typing import Any, TypeVar

from .errors import ConfigError
from .untrusted import clip

T = TypeVar("T")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def section_types(cls: type[Any]) -> dict[str, Any]:
    """Field name → resolved annotation of the dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def read_section(
    cls: type[Any],
    table: Any,
    where: str,
    *,
    env: Mapping[str, str] | None = None,
    env_prefix: str = "",
    ignore_unknown: bool = False,
    skip: Collection[str] = (),
    unknown_noun: str = "keys",
) -> dict[str, Any]:
    """The coerced values for section ``cls`` found in ``table`` and ``env``.

    ``where`` names the section in errors (``"config.toml [haproxy.check]"``).
    Keys of ``table`` that are no field of ``cls`` are an error unless
    ``ignore_unknown`` (a ``[services.<name>]`` table is shared by several
    sections). Fields in ``skip`` are neither read nor coerced (the caller
    owns them). Only keys present are returned: defaults stay the dataclass's.
    """
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where} must be a table")
    types = {name: kind for name, kind in section_types(cls).items() if name not in skip}
    unknown = set(table) - set(types) - set(skip)
    if unknown and not ignore_unknown:
        raise ConfigError(f"{where}: unknown {unknown_noun} {sorted(unknown)}")
    raw = {key: value for key, value in table.items() if key in types}
    if env is not None:
        for name in types:
            value = env.get(env_prefix + name.upper())
            if value is not None:
                raw[name] = value
    return {key: coerce(value, types[key], f"{where}: {key}") for key, value in raw.items()}


def load_section(cls: type[T], table: Any, where: str, **options: Any) -> T:
    """``cls(**read_section(cls, table, where, **options))``: the section, validated by ``cls``."""
    return cls(**read_section(cls, table, where, **options))


def coerce(value: Any, kind: Any, where: str) -> Any:
    """``value`` as the annotation ``kind`` (see the module doc); :class:`ConfigError` if it does not fit."""
    try:
        if kind is bool:
            return _bool(value)
        if kind is int:
            return _int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if typing.get_origin(kind) is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(item).strip() for item in items if str(item).strip())
        if isinstance(value, (dict, list, tuple)):
            raise ValueError(value)
        return str(value)
    except (TypeError, ValueError):
        name = getattr(kind, "__name__", str(kind))
        raise ConfigError(f"{where} expects {name}, got {clip(value)}") from None


def _bool(value: Any) -> bool:
    if isinstance(value, str):
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise ValueError(value)
    if isinstance(value, (bool, int)):
        return bool(value)
    raise ValueError(value)


def _int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    if isinstance(value, (dict, list, tuple)):
        raise TypeError(value)
    return int(value)
