"""The lease arithmetic of cluster-wide resource limits, driven by the fake clock."""

from __future__ import annotations

import math

import pytest

from meshkit.leases import RateLease, SlotLease, batch_size, window_quota
from meshkit.testing import FakeClock


@pytest.mark.parametrize(("rate", "window"), [(100, 0.1), (2, 0.1), (7, 0.25), (0.5, 1.0), (1000, 0.01)])
def test_window_quotas_meet_the_rate_and_never_exceed_it_over_any_run_of_windows(rate: float, window: float) -> None:
    quotas = [window_quota(rate, window, i) for i in range(10_000, 10_400)]
    for k in (1, 3, 10, 37):
        for start in range(0, len(quotas) - k, 7):
            assert sum(quotas[start:start + k]) <= math.ceil(k * rate * window + 1e-9)
    per_second = round(1 / window)
    assert sum(quotas[:per_second * 4]) == pytest.approx(rate * 4, abs=1)


def test_batch_is_a_fraction_of_the_limit_at_least_what_is_wanted() -> None:
    assert batch_size(100, 0.1, 1) == 10
    assert batch_size(100, 0.1, 25) == 25
    assert batch_size(3, 0.1, 1) == 1


def test_rate_tokens_are_spent_until_the_window_ends_by_the_local_clock() -> None:
    clock = FakeClock(start=0.0)  # binary fractions at the boundary: no rounding
    lease = RateLease(rate=100, window=0.1, fraction=0.5)
    assert not lease.take(1, clock.now())  # nothing leased yet
    sent = clock.now()
    clock.advance(0.01)  # the round trip
    lease.grant(5, 5, index=42, left=0.06, sent=sent, received=clock.now())  # Redis: 60 ms left of window 42
    assert all(lease.take(1, clock.now()) for _ in range(5))
    assert not lease.take(1, clock.now())  # spent
    sent = clock.now()
    lease.grant(2, 2, index=42, left=0.05, sent=sent, received=clock.now())  # a refill in the same window adds
    assert lease.take(2, clock.now())
    sent = clock.now()
    clock.advance(0.015625)  # the round trip
    lease.grant(3, 3, index=42, left=0.03125, sent=sent, received=clock.now())
    clock.advance(0.015625)  # the lease lapses at sent + left (not received + left): never after the window's end
    assert not lease.take(1, clock.now())
    lease.grant(1, 1, index=43, left=0.1, sent=clock.now(), received=clock.now())
    assert (lease.tokens, lease.spent_last_window) == (1, 7)  # the lapsed 3 are gone with their window


def test_the_next_batch_asks_for_what_the_last_window_spent_capped_by_the_batch() -> None:
    clock = FakeClock()
    lease = RateLease(rate=1000, window=0.1, fraction=0.1)  # 100 a window, batches of at most 10
    assert lease.want(1) == 1  # nothing spent yet: ask for what is needed
    lease.grant(3, 3, index=1, left=0.1, sent=clock.now(), received=clock.now())
    assert lease.take(3, clock.now())
    lease.grant(0, 0, index=2, left=0.1, sent=clock.now(), received=clock.now())  # a new window rolls the counts
    assert lease.want(1) == 3
    lease.spent_last_window = 500
    assert lease.want(1) == 10
    assert lease.want(40) == 40


def test_tokens_of_an_old_window_do_not_carry_into_a_new_one() -> None:
    clock = FakeClock()
    lease = RateLease(rate=100, window=0.1, fraction=0.5)
    lease.grant(5, 5, index=1, left=0.1, sent=clock.now(), received=clock.now())
    lease.grant(2, 2, index=2, left=0.1, sent=clock.now(), received=clock.now())
    assert lease.tokens == 2


def test_slots_are_used_within_the_lease_and_renewed_to_what_is_in_use() -> None:
    clock = FakeClock()
    lease = SlotLease(limit=40, fraction=0.1, ttl=3.0)  # batches of 4
    assert lease.target_for(1) == 4
    lease.grant(4, share=40, sent=clock.now())
    assert all(lease.take(1, clock.now()) for _ in range(4))
    assert not lease.take(1, clock.now())
    assert lease.target_for(1) == 8
    lease.grant(8, share=40, sent=clock.now())
    assert lease.take(1, clock.now())
    for _ in range(5):
        lease.put(1)
    assert lease.in_use == 0 and lease.target_to_return() is None  # 8 idle is not over 2 batches
    assert lease.target_at_renewal() == 0


def test_many_idle_slots_go_back_down_to_one_batch() -> None:
    lease = SlotLease(limit=40, fraction=0.1, ttl=3.0)
    lease.grant(20, share=40, sent=FakeClock().now())
    lease.in_use = 12
    assert lease.target_to_return() is None  # 8 idle: not over 2 batches of 4
    lease.put(2)  # 10 idle
    assert lease.target_to_return() == 10 + 4


def test_a_lease_not_renewed_in_time_lapses_by_the_local_clock() -> None:
    clock = FakeClock(start=0.0)  # binary fractions below: no rounding at the boundary
    lease = SlotLease(limit=10, fraction=0.1, ttl=3.0)
    sent = clock.now()
    clock.advance(0.25)  # Redis stamped the lease after the request left
    lease.grant(5, share=40, sent=sent)
    clock.advance(2.5)
    assert lease.take(1, clock.now())
    clock.advance(0.25)  # sent + ttl: no new slots, whatever Redis thinks
    assert not lease.take(1, clock.now())


def test_a_shrunken_lease_reports_the_slots_in_use_beyond_it() -> None:
    clock = FakeClock()
    lease = SlotLease(limit=10, fraction=0.1, ttl=3.0)
    lease.grant(5, share=40, sent=clock.now())
    for _ in range(5):
        assert lease.take(1, clock.now())
    lease.grant(2, share=40, sent=clock.now())  # the limit was lowered, or the lease lapsed and others took the room
    assert lease.over == 3 and not lease.take(1, clock.now())


def test_a_drained_window_is_not_asked_again_until_the_next_one_has_surely_begun() -> None:
    clock = FakeClock()
    lease = RateLease(rate=100, window=0.1, fraction=0.5)
    sent = clock.now()
    clock.advance(0.004)
    lease.grant(1, 5, index=7, left=0.03, sent=sent, received=clock.now())  # 1 of 5: the cluster is drained
    assert lease.take(1, clock.now()) and not lease.take(1, clock.now())
    assert not lease.should_ask(clock.now())
    clock.advance(0.029)  # past sent + left (the tokens lapsed) but maybe not yet past Redis's window end
    assert not lease.should_ask(clock.now())
    clock.advance(0.002)  # received + left: the next window has begun at Redis
    assert lease.should_ask(clock.now())


def test_an_instance_over_its_fair_share_takes_no_slot_and_returns_each_one_freed() -> None:
    clock = FakeClock()
    lease = SlotLease(limit=4, fraction=0.25, ttl=3.0)
    lease.grant(4, share=4, sent=clock.now())  # alone: the whole limit
    for _ in range(4):
        assert lease.take(1, clock.now())
    lease.waiting = 3
    assert lease.demand == 7
    lease.grant(4, share=2, sent=clock.now())  # two more instances want slots: a share of 2
    lease.put(1)
    assert not lease.take(1, clock.now())  # 3 in use, share 2: the freed slot is not reused here
    assert lease.target_to_return() == 3  # it goes back to the cluster
    lease.grant(3, share=2, sent=clock.now())
    lease.put(1)
    lease.put(1)
    assert lease.target_to_return() == 2  # never below the share while it is wanted ...
    lease.grant(2, share=2, sent=clock.now())
    assert lease.take(1, clock.now())  # ... and within the share it is used again
