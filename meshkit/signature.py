"""Typed arguments: a handler's annotations checked (and converted) before it runs.

:meth:`ArgumentTypes.of` reads a handler's parameter annotations once, when
the service's handler table is built. :meth:`ArgumentTypes.apply` then checks
every argument a peer sent for an annotated parameter against its type, with
msgspec's strict conversion (``msgspec.convert(value, type, strict=True)``):

* a value of the exact type passes untouched (checked with one ``type(v) is t``);
* conversions that cannot lose or guess are made: an ``int`` for a ``float``,
  an array for a ``tuple``/``set``/``frozenset``, a map for a ``dataclass``,
  ``TypedDict`` or ``msgspec.Struct``, a string for a ``datetime``/``UUID``;
* anything else fails: ``"5"`` is not an ``int``, ``6`` is not a ``str``,
  ``True`` is not an ``int``. The failure names the parameter and the expected
  type (:class:`ArgumentTypeError`, which the server answers ``bad_arguments``).

Unannotated parameters, and those annotated ``Any`` or ``object``, stay free.
``*args: T`` checks every extra positional argument against ``T``, and
``**kwargs: T`` every extra keyword value. The arity (missing or unexpected
arguments) is the signature binder's business, not this module's.

:meth:`ArgumentTypes.describe` gives the signature as JSON-able data (names,
kinds, type names, JSON Schema where msgspec can draw one, defaults), for
``_mesh.info`` and other-language clients; :meth:`ArgumentTypes.text` gives
the one-line form the instance record carries (``"(n: int, s: str = 'x') -> str"``).

Cost, measured by ``bench/typed.py``: see ``docs/limits.md``, "Typed arguments".
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from .untrusted import clip

__all__ = ["ArgumentTypeError", "ArgumentTypes", "Param"]

_FREE = (inspect.Parameter.empty, Any, object)
# Characters of a default value's repr kept in a description (a default may be huge).
_DEFAULT_LIMIT = 80
# Characters of the one-line signature text kept in the instance record.
TEXT_LIMIT = 300


class ArgumentTypeError(Exception):
    """An argument does not fit its parameter's annotation (the message names both)."""


@dataclass(frozen=True, slots=True)
class Param:
    """One parameter: ``annotation`` is the resolved type, or ``None`` when it is free."""

    name: str
    kind: inspect._ParameterKind
    annotation: Any
    default: Any = inspect.Parameter.empty

    @property
    def type_name(self) -> str:
        return type_name(self.annotation) if self.annotation is not None else "any"


class ArgumentTypes:
    """The annotated parameters of one handler, and the check made on every call."""

    __slots__ = ("_by_name", "_positional", "_var_keyword", "_var_positional", "checks", "params", "returns")

    def __init__(self, params: list[Param], returns: Any) -> None:
        self.params = params
        self.returns = returns
        kinds = inspect.Parameter
        self._positional = [p for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
        self._by_name = {p.name: p for p in params
                         if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)}
        self._var_positional = next((p for p in params if p.kind is kinds.VAR_POSITIONAL), None)
        self._var_keyword = next((p for p in params if p.kind is kinds.VAR_KEYWORD), None)
        # False when no parameter is annotated: apply() is then skipped entirely.
        self.checks = any(p.annotation is not None for p in params)

    @classmethod
    def of(cls, fn: Callable[..., Any], signature: inspect.Signature | None = None) -> ArgumentTypes:
        """Read ``fn``'s annotations (string annotations resolved in its module).

        Raises ``TypeError`` naming the function when an annotation cannot be
        resolved: a method whose check cannot be built must not start unchecked.
        A callable that is no function or method (a ``functools.partial``, an
        object with ``__call__``, as ``Service.add_subscription`` may get) has
        its parameters left free.
        """
        signature = signature or inspect.signature(fn)
        if not (inspect.isfunction(fn) or inspect.ismethod(fn)):
            return cls([Param(p.name, p.kind, None, p.default) for p in signature.parameters.values()], None)
        try:
            hints = typing.get_type_hints(fn)
        except Exception as exc:  # NameError for a forward reference, and others
            name = getattr(fn, "__qualname__", repr(fn))
            raise TypeError(f"cannot resolve the annotations of {name}: {exc}") from None
        params = []
        for p in signature.parameters.values():
            annotation = hints.get(p.name, inspect.Parameter.empty)
            free = any(annotation is f for f in _FREE)
            params.append(Param(p.name, p.kind, None if free else annotation, p.default))
        returns = hints.get("return", inspect.Parameter.empty)
        return cls(params, None if any(returns is f for f in _FREE) else returns)

    def apply(self, args: list[Any], kwargs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        """``(args, kwargs)`` with annotated arguments checked and converted (copies when changed).

        Raises :class:`ArgumentTypeError` for the first argument that does not fit.
        """
        if not self.checks:
            return args, kwargs
        positional = self._positional
        out_args = args
        for i, value in enumerate(args):
            param = positional[i] if i < len(positional) else self._var_positional
            if param is None or param.annotation is None:
                continue
            converted = _convert(param, value)
            if converted is not value:
                if out_args is args:
                    out_args = list(args)
                out_args[i] = converted
        out_kwargs = kwargs
        for key, value in kwargs.items():
            param = self._by_name.get(key) or self._var_keyword
            if param is None or param.annotation is None:
                continue
            converted = _convert(param, value, key)
            if converted is not value:
                if out_kwargs is kwargs:
                    out_kwargs = dict(kwargs)
                out_kwargs[key] = converted
        return out_args, out_kwargs

    def describe(self) -> dict[str, Any]:
        """The signature as JSON-able data (see the module doc)."""
        return {
            "params": [_describe_param(p) for p in self.params],
            "returns": _describe_type(self.returns),
            "text": self.text(),
        }

    def text(self) -> str:
        """``"(n: int, s: str = 'x') -> str"``, at most :data:`TEXT_LIMIT` characters."""
        kinds = inspect.Parameter
        parts = []
        for p in self.params:
            star = "*" if p.kind is kinds.VAR_POSITIONAL else "**" if p.kind is kinds.VAR_KEYWORD else ""
            part = star + p.name + (f": {p.type_name}" if p.annotation is not None else "")
            if p.default is not inspect.Parameter.empty:
                shown = repr(p.default) if isinstance(p.default, str) else p.default
                part += f" = {clip(shown, 20)}"
            parts.append(part)
        returns = f" -> {type_name(self.returns)}" if self.returns is not None else ""
        return clip(f"({', '.join(parts)}){returns}", TEXT_LIMIT)


def _convert(param: Param, value: Any, key: str | None = None) -> Any:
    annotation = param.annotation
    if type(value) is annotation:
        return value
    try:
        return msgspec.convert(value, annotation, strict=True)
    except msgspec.ValidationError as exc:
        where = param.name if key is None or key == param.name else f"{param.name}[{key!r}]"
        raise ArgumentTypeError(
            f"parameter {clip(where, 100)!r} expects {type_name(annotation)}: {clip(str(exc), 200)}"
        ) from None
    except TypeError as exc:  # an annotation msgspec cannot check at all
        raise ArgumentTypeError(f"parameter {param.name!r}: cannot check {type_name(annotation)}: "
                                f"{clip(str(exc), 200)}") from None


def type_name(annotation: Any) -> str:
    """A short readable name: ``int``, ``list[str]``, ``int | None``, ``Point``."""
    if annotation is None or annotation is type(None):
        return "None"
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return clip(repr(annotation).replace("typing.", ""), 120)


def _describe_type(annotation: Any) -> dict[str, Any]:
    if annotation is None:
        return {"type": "any"}
    found: dict[str, Any] = {"type": type_name(annotation)}
    try:
        found["schema"] = msgspec.json.schema(annotation)
    except (TypeError, ValueError):
        pass  # a type with no JSON Schema (a custom class): the name alone
    return found


def _describe_param(p: Param) -> dict[str, Any]:
    found = {"name": p.name, "kind": p.kind.name.lower(), **_describe_type(p.annotation)}
    if p.default is not inspect.Parameter.empty:
        plain = isinstance(p.default, (int, float, bool, type(None)))
        found["default"] = p.default if plain else clip(p.default, _DEFAULT_LIMIT)
    return found
