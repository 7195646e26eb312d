"""extranonce1 allocation: unique among live connections, within and across instance prefixes."""

from __future__ import annotations

import itertools

import pytest

from services.stratum.extranonce import ExtranonceAllocator, ExtranonceExhaustedError, prefix_candidates


def test_values_are_prefix_then_counter_big_endian() -> None:
    alloc = ExtranonceAllocator(0x0102, size=4, prefix_size=2)
    assert [alloc.allocate().hex() for _ in range(3)] == ["01020000", "01020001", "01020002"]
    assert alloc.live == 3


def test_no_two_live_connections_share_a_value_and_released_ones_come_back() -> None:
    alloc = ExtranonceAllocator(7, size=3, prefix_size=2)  # 256 values
    held = [alloc.allocate() for _ in range(256)]
    assert len(set(held)) == 256
    with pytest.raises(ExtranonceExhaustedError):
        alloc.allocate()
    alloc.release(held[10])
    alloc.release(held[200])
    again = {alloc.allocate(), alloc.allocate()}
    assert again == {held[10], held[200]}
    alloc.release(b"\xff\xff\x00")  # another prefix's value: ignored
    alloc.release(b"\x00")  # wrong size: ignored
    assert alloc.live == 256


def test_counter_skips_values_still_held_after_wrapping() -> None:
    alloc = ExtranonceAllocator(0, size=3, prefix_size=2)
    first = [alloc.allocate() for _ in range(256)]
    for value in first[::2]:
        alloc.release(value)
    fresh = [alloc.allocate() for _ in range(128)]
    assert set(fresh) == set(first[::2])


def test_instances_with_different_prefixes_never_collide() -> None:
    a, b = ExtranonceAllocator(1), ExtranonceAllocator(2)
    values_a = {a.allocate() for _ in range(1000)}
    values_b = {b.allocate() for _ in range(1000)}
    assert not values_a & values_b
    assert a.owns(next(iter(values_a))) and not a.owns(next(iter(values_b)))


def test_prefix_candidates_cover_the_space_from_a_per_instance_start() -> None:
    walk = list(prefix_candidates("gateway-1", prefix_size=1))
    assert sorted(walk) == list(range(256))
    starts = {next(prefix_candidates(f"gateway-{i}")) for i in range(50)}
    assert len(starts) > 45  # instances starting together try different prefixes first
    assert list(itertools.islice(prefix_candidates("x"), 3)) == list(itertools.islice(prefix_candidates("x"), 3))


@pytest.mark.parametrize(("prefix", "size", "prefix_size"), [(-1, 4, 2), (65536, 4, 2), (0, 4, 4), (0, 9, 2)])
def test_bad_layouts_are_refused(prefix: int, size: int, prefix_size: int) -> None:
    with pytest.raises(ValueError):
        ExtranonceAllocator(prefix, size=size, prefix_size=prefix_size)
