"""The gateway's garbage-collector threshold: raised while it runs, put back at stop."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from meshkit.gateway.service import GC_YOUNG, YoungGeneration


@pytest.fixture(autouse=True)
def threshold() -> Iterator[tuple[int, int, int]]:
    before = gc.get_threshold()
    gc.set_threshold(700, before[1], before[2])
    try:
        yield gc.get_threshold()
    finally:
        gc.set_threshold(*before)


def test_raised_then_put_back(threshold: tuple[int, int, int]) -> None:
    raised = YoungGeneration.raise_to(GC_YOUNG)
    assert raised is not None
    assert gc.get_threshold() == (GC_YOUNG, threshold[1], threshold[2])  # the older generations as they were
    raised.restore()
    assert gc.get_threshold() == threshold


def test_never_lowered_nor_set_when_off(threshold: tuple[int, int, int]) -> None:
    assert YoungGeneration.raise_to(0) is None
    assert YoungGeneration.raise_to(500) is None  # below what the interpreter has
    assert gc.get_threshold() == threshold
    gc.disable()
    try:
        assert YoungGeneration.raise_to(GC_YOUNG) is None  # collection is off: nothing to tune
    finally:
        gc.enable()
    assert gc.get_threshold() == threshold


def test_a_second_gateway_in_the_process_leaves_it_to_the_first(threshold: tuple[int, int, int]) -> None:
    first = YoungGeneration.raise_to(GC_YOUNG)
    assert first is not None
    assert YoungGeneration.raise_to(GC_YOUNG) is None
    first.restore()
    assert gc.get_threshold() == threshold
