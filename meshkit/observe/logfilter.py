"""Run-time log levels, for everyone or only for the calls whose metadata match.

``_mesh.log_level(level, where=None)``: without ``where``, the process's
level (the root logger's) becomes ``level``. With ``where`` (``{"customer":
"c42"}``), records at ``level`` and above are written while serving a call
whose metadata has every key of ``where`` with that value, and the level for
everyone else stays as it was: one customer's requests are logged in detail
without raising the level for all. ``level`` ``"reset"`` with a ``where``
removes that rule.

How: the root logger's level is lowered to the lowest level any rule asks
for, and a filter on the root logger's handlers drops what is below the base
level unless the current call (:func:`meshkit.context.current_call`)
matches a rule. At most :data:`MAX_RULES` rules.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ..context import current_call
from ..untrusted import clip

MAX_RULES = 16
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class LogLevelError(ValueError):
    """A log-level request the instance refuses: an unknown level, a bad ``where`` (``bad_arguments``)."""


def parse_level(level: Any) -> int:
    if not isinstance(level, str) or level.upper() not in LEVELS:
        raise LogLevelError(f"level must be one of {', '.join(LEVELS)}, got {clip(repr(level))}")
    return int(logging.getLevelName(level.upper()))


class LogRules(logging.Filter):
    """The rules of one process (see the module doc); install with :meth:`set`."""

    def __init__(self, root: logging.Logger | None = None) -> None:
        super().__init__()
        self.root = root or logging.getLogger()
        # Read when first needed: the runner configures logging after the service is built.
        self._base: int | None = None
        self.rules: dict[frozenset[tuple[str, str]], int] = {}

    @property
    def base(self) -> int:
        """The level for calls no rule matches (the root logger's, until a rule or a level is set)."""
        return self.root.getEffectiveLevel() if self._base is None else self._base

    def level_for(self, meta: Mapping[str, str]) -> int:
        """The lowest level written for a call with ``meta``."""
        level = self.base
        for where, rule_level in self.rules.items():
            if rule_level < level and all(meta.get(k) == v for k, v in where):
                level = rule_level
        return level

    def set(self, level: Any, where: Any = None) -> dict[str, Any]:
        """Apply a rule (see the module doc); answers :meth:`describe`."""
        if self._base is None:
            self._base = self.root.getEffectiveLevel()  # no rule yet: the root's level is the base
        if where is None:
            self._base = parse_level(level)
        else:
            if not isinstance(where, dict) or not where or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in where.items()):
                raise LogLevelError("where must be a non-empty map of strings to strings")
            key = frozenset(where.items())
            if level == "reset":
                self.rules.pop(key, None)
            else:
                if key not in self.rules and len(self.rules) >= MAX_RULES:
                    raise LogLevelError(f"already {MAX_RULES} log-level rules; reset one first")
                self.rules[key] = parse_level(level)
        self._apply()
        return self.describe()

    def describe(self) -> dict[str, Any]:
        return {"level": logging.getLevelName(self.base),
                "rules": [{"where": dict(sorted(w)), "level": logging.getLevelName(n)}
                          for w, n in self.rules.items()]}

    def _apply(self) -> None:
        self.root.setLevel(min([self.base, *self.rules.values()]))
        for handler in self.root.handlers:
            if self.rules and self not in handler.filters:
                handler.addFilter(self)
            elif not self.rules and self in handler.filters:
                handler.removeFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.base:
            return True
        call = current_call()
        return call is not None and record.levelno >= self.level_for(call.meta)
