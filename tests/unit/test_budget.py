"""Budgets: what a peer may make an instance hold, in requests and bytes."""

from __future__ import annotations

from meshkit.budget import REQUEST_OVERHEAD, Budget, request_cost


def test_cost_is_frames_plus_overhead_plus_what_containers_may_take() -> None:
    assert request_cost(b"abc", b"de", 0) == REQUEST_OVERHEAD + 5
    # [[], {}]: three containers, each charged as a decoded empty list or dict.
    assert request_cost(b"abc", b"\x92\x90\x80", 3) == REQUEST_OVERHEAD + 6 + 3 * 64


def test_count_and_bytes_both_bound() -> None:
    budget = Budget(max_count=3, max_bytes=100)
    for _ in range(3):
        assert budget.fits(10)
        budget.take(10)
    assert not budget.fits(1)  # count
    budget.give(10)
    assert budget.fits(80) and not budget.fits(81)  # bytes: 20 held


def test_an_empty_budget_admits_one_request_of_any_size() -> None:
    budget = Budget(max_count=10, max_bytes=100)
    assert budget.fits(10_000)
    budget.take(10_000)
    assert not budget.fits(1)
    budget.give(10_000)
    assert (budget.count, budget.bytes) == (0, 0)
