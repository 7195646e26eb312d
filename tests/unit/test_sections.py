"""The one section loader: coercion by annotation, table then environment, clear errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from meshkit.errors import ConfigError
from meshkit.sections import coerce, load_section, read_section


@dataclass(frozen=True)
class Sample:
    flag: bool = False
    count: int = 1
    ratio: float = 0.5
    name: str = "x"
    items: tuple[str, ...] = ()


def test_defaults_stay_the_dataclass_s() -> None:
    assert load_section(Sample, {}, "[s]") == Sample()
    assert read_section(Sample, {}, "[s]") == {}


def test_values_from_a_table_are_coerced_by_annotation() -> None:
    table = {"flag": True, "count": 3.0, "ratio": 2, "name": 500, "items": ["a", " b ", ""]}
    assert load_section(Sample, table, "[s]") == Sample(True, 3, 2.0, "500", ("a", "b"))


def test_the_environment_wins_over_the_table() -> None:
    env = {"P_COUNT": "7", "P_ITEMS": "a, b,,c", "P_FLAG": "yes", "OTHER": "1"}
    section = load_section(Sample, {"count": 2, "name": "t"}, "[s]", env=env, env_prefix="P_")
    assert section == Sample(flag=True, count=7, name="t", items=("a", "b", "c"))


@pytest.mark.parametrize(("raw", "expected"), [("1", True), ("ON", True), ("", False), ("No", False), (0, False)])
def test_bool_spellings(raw: Any, expected: bool) -> None:
    assert coerce(raw, bool, "flag") is expected


@pytest.mark.parametrize(
    ("kind", "raw"),
    [(bool, "maybe"), (bool, 1.5), (int, "ten"), (int, 1.5), (int, True), (int, [1]), (float, "soon"),
     (float, False), (str, [1]), (str, {"a": 1})],
)
def test_values_that_do_not_fit_are_config_errors(kind: Any, raw: Any) -> None:
    with pytest.raises(ConfigError, match="where: key expects"):
        coerce(raw, kind, "where: key")


def test_a_huge_bad_value_is_clipped_in_the_error() -> None:
    with pytest.raises(ConfigError) as caught:
        coerce("x" * 100_000, int, "[s]: count")
    assert len(str(caught.value)) < 300


def test_unknown_keys_are_refused_unless_the_table_is_shared() -> None:
    with pytest.raises(ConfigError, match=r"\[s\]: unknown keys \['nope'\]"):
        read_section(Sample, {"nope": 1}, "[s]")
    assert read_section(Sample, {"nope": 1, "count": 2}, "[s]", ignore_unknown=True) == {"count": 2}


def test_skipped_fields_are_neither_read_nor_refused() -> None:
    assert read_section(Sample, {"name": ["kept", "raw"], "count": 2}, "[s]",
                        env={"NAME": "env"}, skip={"name"}) == {"count": 2}


def test_a_table_that_is_no_table_is_an_error() -> None:
    with pytest.raises(ConfigError, match="must be a table"):
        read_section(Sample, ["count"], "[s]")
