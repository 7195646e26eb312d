"""Typed arguments: annotations checked and converted before the handler, signatures as data."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from meshkit.signature import ArgumentTypeError, ArgumentTypes


def typed(n: int, s: str) -> str:
    return s * n


def test_wrong_types_are_refused_naming_the_parameter_and_type() -> None:
    types = ArgumentTypes.of(typed)
    with pytest.raises(ArgumentTypeError, match=r"parameter 'n' expects int: Expected `int`, got `str`"):
        types.apply(["5", 6], {})
    with pytest.raises(ArgumentTypeError, match=r"parameter 's' expects str"):
        types.apply([5, 6], {})
    with pytest.raises(ArgumentTypeError, match=r"parameter 's' expects str"):
        types.apply([5], {"s": 6})


def test_exact_types_pass_untouched() -> None:
    args, kwargs = [3, "x"], {}
    out_args, out_kwargs = ArgumentTypes.of(typed).apply(args, kwargs)
    assert out_args is args and out_kwargs is kwargs


def test_a_bool_is_not_an_int() -> None:
    with pytest.raises(ArgumentTypeError, match="got `bool`"):
        ArgumentTypes.of(typed).apply([True, "x"], {})


@dataclasses.dataclass
class Point:
    x: float
    y: float


def shapes(ratio: float, pair: tuple[int, int], tags: frozenset[str], at: Point, maybe: int | None = None) -> None:
    pass


def test_unambiguous_conversions_are_made() -> None:
    args, kwargs = ArgumentTypes.of(shapes).apply([2, [1, 2], ["a", "b"]], {"at": {"x": 1, "y": 2.5}})
    assert args == [2.0, (1, 2), frozenset({"a", "b"})] and type(args[0]) is float
    assert kwargs == {"at": Point(1.0, 2.5)}


def test_nested_mismatch_is_refused_with_its_path() -> None:
    with pytest.raises(ArgumentTypeError, match=r"parameter 'pair' expects tuple\[int, int\].*\$\[1\]"):
        ArgumentTypes.of(shapes).apply([1.0, [1, "2"], [], {"x": 0, "y": 0}], {})
    with pytest.raises(ArgumentTypeError, match=r"parameter 'maybe'"):
        ArgumentTypes.of(shapes).apply([1.0, [1, 2], [], {"x": 0, "y": 0}], {"maybe": "1"})


def free(a, b: Any, c: object, *rest: int, **extra: str) -> None:  # type: ignore[no-untyped-def]
    pass


def test_unannotated_any_and_object_stay_free_and_var_params_check_each_item() -> None:
    types = ArgumentTypes.of(free)
    thing = object()
    assert types.apply(["x", thing, [1]], {}) == (["x", thing, [1]], {})
    assert types.apply([1, 2, 3, 4, 5], {"k": "v"}) == ([1, 2, 3, 4, 5], {"k": "v"})
    with pytest.raises(ArgumentTypeError, match=r"parameter 'rest' expects int"):
        types.apply([1, 2, 3, "4"], {})
    with pytest.raises(ArgumentTypeError, match=r"parameter \"extra\['k'\]\" expects str"):
        types.apply([1, 2, 3], {"k": 1})


def test_a_handler_without_annotations_is_not_checked_at_all() -> None:
    assert ArgumentTypes.of(lambda a, b: None).checks is False


def test_an_unresolvable_annotation_is_an_error_when_the_table_is_built() -> None:
    def broken(x: NoSuchType) -> None:  # type: ignore[name-defined]  # noqa: F821  (a string: never resolved)
        pass

    with pytest.raises(TypeError, match=r"cannot resolve the annotations of .*broken"):
        ArgumentTypes.of(broken)


def test_describe_is_json_data_with_names_kinds_types_schemas_and_defaults() -> None:
    described = ArgumentTypes.of(shapes).describe()
    json.dumps(described)  # JSON-able as it is
    params = {p["name"]: p for p in described["params"]}
    assert params["ratio"] == {"name": "ratio", "kind": "positional_or_keyword", "type": "float",
                               "schema": {"type": "number"}}
    assert params["maybe"]["default"] is None
    assert params["maybe"]["schema"] == {"anyOf": [{"type": "integer"}, {"type": "null"}]}
    assert params["at"]["type"] == "Point"
    assert described["returns"] == {"type": "None", "schema": {"type": "null"}}
    assert described["text"] == ("(ratio: float, pair: tuple[int, int], tags: frozenset[str], at: Point, "
                                 "maybe: int | None = None) -> None")


def test_text_of_free_and_defaulted_parameters() -> None:
    def f(a, b: int = 3, *rest, name: str = "x", **kw):  # type: ignore[no-untyped-def]
        pass

    assert ArgumentTypes.of(f).text() == "(a, b: int = 3, *rest, name: str = 'x', **kw)"


def test_callables_that_are_no_function_have_free_parameters() -> None:
    import functools

    class Handler:
        def __call__(self, payload: int) -> None:
            pass

    for fn in (Handler(), functools.partial(typed, 2)):
        types = ArgumentTypes.of(fn)  # type: ignore[arg-type]
        assert types.checks is False and types.apply(["x"], {}) == (["x"], {})
