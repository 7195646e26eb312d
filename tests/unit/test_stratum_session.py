"""services/stratum/session.py: a connection's facts as string fields, and jobs over the mesh."""

from __future__ import annotations

import pytest

from services.stratum import session
from services.stratum.vardiff import VardiffState
from services.stratum.work import BlockTemplate, make_job, next_template


def test_a_new_difficulty_applies_to_jobs_announced_after_it() -> None:
    fields = {"difficulty": "4.0", "previous": "1.0", "diff_job": "10"}
    assert session.judged_difficulty(fields, "f") == 1.0  # older job: the lower one
    assert session.judged_difficulty(fields, "10") == 1.0  # the job current at the change
    assert session.judged_difficulty(fields, "11") == 4.0  # announced after it
    assert session.judged_difficulty({"difficulty": "0.5", "previous": "2"}, "11") == 0.5
    assert session.judged_difficulty({}, "1") == 1.0


def test_the_share_context_comes_from_the_fields() -> None:
    ctx = session.share_context({"extranonce1": "0000002a", "en2size": "4", "difficulty": "0.25",
                                 "w:alice": "1", "w:gone": "0", "other": "x"}, "1")
    assert (ctx.extranonce1, ctx.extranonce2_size, ctx.difficulty, ctx.subscribed) == (
        bytes.fromhex("0000002a"), 4, 0.25, True)
    assert set(ctx.authorized) == {"alice"}
    assert not session.share_context({}, "1").subscribed
    assert not session.share_context({"extranonce1": "zz"}, "1").subscribed


def test_vardiff_round_trips_through_fields() -> None:
    state = VardiffState(0.125, 0.0625, 1700000000.5, 3)
    assert session.vardiff_state(session.vardiff_fields(state), now=0.0) == state
    assert session.vardiff_state({"difficulty": "2", "shares": "junk"}, now=9.0) == VardiffState(2.0, 2.0, 9.0, 0)


def test_a_job_crosses_the_mesh_unchanged() -> None:
    base = BlockTemplate(0, bytes(32), 0x20000000, 0x1D00FFFF, 0, 50 * 10**8, b"\x51")
    job = make_job(next_template(base, 1700000000), "1a", extranonce_size=8)
    assert session.job_from_wire(session.job_to_wire(job)) == job
    with pytest.raises(ValueError):
        session.job_from_wire({"job_id": "1"})
    assert session.job_seq("ff") == 255 and session.job_seq("xyz") == -1
