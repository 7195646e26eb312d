"""Vardiff driven by a clock the test holds: no sleeps."""

from __future__ import annotations

import pytest

from services.stratum.vardiff import Vardiff, VardiffConfig

CFG = VardiffConfig(share_interval=10.0, min_difficulty=1.0, max_difficulty=1e6, retarget_interval=60.0,
                    variance=0.3, max_step=4.0, burst_shares=24)


def feed(vd: Vardiff, start: float, interval: float, count: int) -> tuple[float, list[float]]:
    """Send ``count`` shares ``interval`` seconds apart; return the time and the changes announced."""
    now, changes = start, []
    for _ in range(count):
        now += interval
        new = vd.record_share(now)
        if new is not None:
            changes.append(new)
    return now, changes


def test_a_miner_at_the_target_rate_keeps_its_difficulty() -> None:
    vd = Vardiff(CFG, now=0.0, difficulty=64.0)
    _, changes = feed(vd, 0.0, 10.0, 60)  # ten minutes at one share per 10 s
    assert changes == [] and vd.difficulty == 64.0
    _, changes = feed(vd, 600.0, 12.5, 20)  # 25 % slow: within the variance window
    assert changes == []


def test_a_fast_miner_is_raised_quickly_and_converges() -> None:
    vd = Vardiff(CFG, now=0.0)
    # A miner whose hash rate gives a share every 0.01 s at difficulty 1, i.e. 1,000 x the target rate.
    now, rate = 0.0, 1000.0
    for _ in range(200):
        now += 10.0 / (rate / vd.difficulty)
        vd.record_share(now)
        if now > 3600:
            break
    assert 1000.0 * 0.7 <= vd.difficulty <= 1000.0 * 1.3
    # The first raise came from the burst rule, within the first second, by the largest step.
    vd = Vardiff(CFG, now=0.0)
    now, changes = feed(vd, 0.0, 0.01, 24)
    assert changes == [4.0] and now < 1.0


def test_a_quiet_miner_is_lowered_step_by_step_to_the_minimum() -> None:
    vd = Vardiff(CFG, now=0.0, difficulty=1000.0)
    assert vd.tick(10.0) is None  # not yet a retarget interval
    seen = [vd.tick(t) for t in (60.0, 120.0, 180.0, 240.0, 300.0, 360.0)]
    assert seen[:5] == [250.0, 62.5, 15.625, 3.90625, 1.0]  # at most a factor 4 per retarget
    assert seen[5] is None and vd.difficulty == 1.0  # clamped at min_difficulty


def test_slow_shares_lower_the_difficulty_in_proportion() -> None:
    vd = Vardiff(CFG, now=0.0, difficulty=100.0)
    _, changes = feed(vd, 0.0, 20.0, 3)  # 60 s, 3 shares: twice the target interval
    assert changes == [50.0]


def test_difficulty_is_clamped_to_the_maximum() -> None:
    vd = Vardiff(VardiffConfig(max_difficulty=8.0), now=0.0, difficulty=7.0)
    _, changes = feed(vd, 0.0, 0.001, 24)
    assert changes == [8.0]
    _, changes = feed(vd, 1.0, 0.001, 24)
    assert changes == []  # already at the maximum: nothing to announce
    burst = Vardiff(CFG, now=5.0)
    assert [burst.record_share(5.0) for _ in range(24)][-1] == 4.0  # all in one clock tick


def test_a_clock_that_steps_back_does_not_break_it() -> None:
    vd = Vardiff(CFG, now=100.0, difficulty=10.0)
    assert vd.record_share(50.0) is None
    assert vd.difficulty == 10.0


def test_shares_are_judged_at_the_lower_difficulty_until_a_job_is_sent() -> None:
    vd = Vardiff(CFG, now=0.0, difficulty=10.0)
    assert vd.judged_difficulty == 10.0
    _, changes = feed(vd, 0.0, 0.01, 24)  # raised to 40
    assert changes == [40.0] and vd.difficulty == 40.0 and vd.judged_difficulty == 10.0
    _, changes = feed(vd, 1.0, 0.01, 24)  # raised again before any job: still the lowest in flight
    assert changes == [160.0] and vd.judged_difficulty == 10.0
    vd.job_sent()
    assert vd.judged_difficulty == 160.0
    assert vd.tick(100.0) == 40.0  # lowered: the new, lower one counts at once
    assert vd.judged_difficulty == 40.0


@pytest.mark.parametrize(
    "bad",
    [dict(share_interval=0), dict(min_difficulty=-1), dict(min_difficulty=10, max_difficulty=1),
     dict(variance=1.0), dict(max_step=1.0), dict(burst_shares=0), dict(retarget_interval=float("inf"))],
)
def test_bad_configs_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        VardiffConfig(**bad)  # type: ignore[arg-type]


def test_a_vardiff_survives_being_kept_as_numbers_between_shares() -> None:
    from services.stratum.vardiff import Vardiff, VardiffConfig, VardiffState

    cfg = VardiffConfig(share_interval=1.0, min_difficulty=1.0, burst_shares=4, retarget_interval=60.0)
    whole = Vardiff(cfg, 0.0)
    state = whole.state()
    changes = []
    for i in range(1, 5):
        # One share each, the vardiff rebuilt from its numbers every time (as a pool does).
        piece = Vardiff.restore(cfg, state)
        changes.append(piece.record_share(i * 0.01))
        state = piece.state()
        whole.record_share(i * 0.01)
    assert changes[-1] == whole.difficulty == 4.0
    assert state == whole.state() == VardiffState(4.0, 1.0, 0.04, 0)
    assert Vardiff.restore(cfg, VardiffState(0.001, 0.0, 0.0, -3)).state() == VardiffState(1.0, 1.0, 0.0, 0)
