"""Share judging: the genesis block through the validator, a share mined here, and every rejection."""

from __future__ import annotations

import functools

import pytest
from test_stratum_work import GENESIS, GENESIS_COINBASE, GENESIS_HASH, SCRIPT, internal

from services.stratum import work
from services.stratum.jobbook import JobBook
from services.stratum.mining import search
from services.stratum.shares import (
    NTIME_FUTURE,
    JobLookup,
    ShareContext,
    ShareResult,
    Verdict,
    judge,
    parse_submission,
)
from services.stratum.target import DIFF1_TARGET, dsha256, hash_value, share_target

EN1 = bytes.fromhex("0001002a")
DIFF = 2**-20  # difficulty 1 is 2**32 hashes a share; this is 2**12 (~4,000)
WORKER = "alice.rig1"


def test_verdict_table_is_the_reference_pools() -> None:
    table = {v.word: (v.code, v.message) for v in Verdict}
    assert table == {
        "accepted": (None, ""),
        "block_candidate": (None, ""),
        "malformed": (20, "Other/Unknown"),
        "stale": (21, "Job not found (=stale)"),
        "duplicate": (22, "Duplicate share"),
        "low_difficulty": (23, "Low difficulty share"),
        "unauthorized": (24, "Unauthorized worker"),
        "not_subscribed": (25, "Not subscribed"),
    }


def genesis_job() -> tuple[work.Job, bytes, bytes]:
    """The genesis block as a Stratum job: its coinbase split around 8 bytes of its scriptSig."""
    start = 50  # inside the scriptSig's text: any 8 bytes do
    job = work.Job(
        job_id="genesis", prevhash=b"\0" * 32, coinb1=GENESIS_COINBASE[:start],
        coinb2=GENESIS_COINBASE[start + 8 :], merkle_branch=(), version=GENESIS["version"],
        nbits=GENESIS["nbits"], ntime=GENESIS["ntime"], clean_jobs=True, extranonce_size=8,
    )
    return job, GENESIS_COINBASE[start : start + 4], GENESIS_COINBASE[start + 4 : start + 8]


def test_the_genesis_block_is_a_block_candidate() -> None:
    job, en1, en2 = genesis_job()
    ctx = ShareContext(en1, 4, difficulty=1, authorized={WORKER})
    params = [WORKER, "genesis", en2.hex(), f"{GENESIS['ntime']:08x}", f"{GENESIS['nonce']:08x}"]
    assert params[3:] == ["495fab29", "7c2bac1d"]  # the nonce as miners submit it: big-endian text
    result = judge(params, ctx, JobLookup(job), now=GENESIS["ntime"])
    assert result.verdict is Verdict.BLOCK_CANDIDATE, result.detail
    assert result.digest == internal(GENESIS_HASH)
    assert result.achieved == pytest.approx(2536.0, rel=1e-3)
    assert result.error() is None


@functools.lru_cache(maxsize=1)
def mined() -> tuple[work.Job, list[str], ShareResult]:
    """A job built from our own template and a share for it found by brute force, here."""
    template = work.BlockTemplate(
        height=840000, prevhash=dsha256(b"parent"), version=0x20000000, nbits=0x1D00FFFF,
        ntime=1_700_000_000, coinbase_value=312_500_000, payout_script=SCRIPT,
        txids=tuple(dsha256(bytes([i])) for i in range(5)),
    )
    job = work.make_job(template, "a1", extranonce_size=8)
    en2 = bytes.fromhex("00000007")
    base = job.header(EN1, en2, job.ntime, 0)[:76]
    nonce = search(base, 0, 1 << 20, share_target(DIFF))
    assert nonce is not None
    params = [WORKER, "a1", en2.hex(), f"{job.ntime:08x}", f"{nonce:08x}"]
    result = judge(params, context(), JobLookup(job), now=job.ntime)
    return job, params, result


def context(**changes: object) -> ShareContext:
    fields: dict[str, object] = dict(extranonce1=EN1, extranonce2_size=4, difficulty=DIFF, authorized={WORKER})
    fields.update(changes)
    return ShareContext(**fields)  # type: ignore[arg-type]


def verdict(params: object, ctx: ShareContext | None = None, lookup: JobLookup | None = None,
            now: float | None = None, accepted: frozenset[bytes] = frozenset()) -> ShareResult:
    job = mined()[0]
    return judge(params, ctx or context(), lookup or JobLookup(job), now=job.ntime if now is None else now,
                 accepted=accepted)


def test_a_mined_share_is_accepted() -> None:
    job, params, result = mined()
    assert result.verdict is Verdict.ACCEPTED, result.detail
    assert hash_value(result.digest) <= share_target(DIFF)
    assert result.achieved >= DIFF
    assert result.header == job.header(EN1, bytes.fromhex(params[2]), job.ntime, int(params[4], 16))
    assert dsha256(result.header) == result.digest


def test_changing_any_part_of_the_work_loses_the_share() -> None:
    _, params, _ = mined()
    nonce = int(params[4], 16)
    for changed in (
        [*params[:4], f"{nonce + 1:08x}"],  # another nonce
        [*params[:2], "00000008", *params[3:]],  # another extranonce2
        [*params[:3], f"{int(params[3], 16) + 1:08x}", params[4]],  # another ntime
    ):
        result = verdict(changed)
        assert result.verdict is Verdict.LOW_DIFFICULTY
        assert result.error() == [23, "Low difficulty share", None]
    assert verdict(params, context(extranonce1=bytes.fromhex("0001002b"))).verdict is Verdict.LOW_DIFFICULTY


def test_the_same_share_at_a_higher_difficulty_is_low_difficulty() -> None:
    _, params, result = mined()
    low = verdict(params, context(difficulty=result.achieved * 2))
    assert low.verdict is Verdict.LOW_DIFFICULTY and "below" in low.detail


def test_a_share_accepted_before_is_a_duplicate() -> None:
    _, params, result = mined()
    dup = verdict(params, accepted=frozenset({result.digest}))
    assert dup.verdict is Verdict.DUPLICATE and dup.error() == [22, "Duplicate share", None]


def test_unknown_and_replaced_jobs_are_stale() -> None:
    job, params, _ = mined()
    for lookup in (JobLookup(None), JobLookup(job, stale=True)):
        result = judge(params, context(), lookup, now=job.ntime)
        assert result.verdict is Verdict.STALE
        assert result.error() == [21, "Job not found (=stale)", None]
    assert judge(params, context(), None, now=job.ntime).verdict is Verdict.STALE


def test_ntime_out_of_range_is_malformed() -> None:
    job, params, _ = mined()
    early = verdict([*params[:3], f"{job.ntime - 1:08x}", params[4]])
    assert early.verdict is Verdict.MALFORMED and early.error() == [20, "ntime out of range", None]
    late = f"{job.ntime + 100 + NTIME_FUTURE + 1:08x}"
    assert verdict([*params[:3], late, params[4]], now=job.ntime + 100).verdict is Verdict.MALFORMED
    edge = f"{job.ntime + 100 + NTIME_FUTURE:08x}"  # in range: judged on its hash
    assert verdict([*params[:3], edge, params[4]], now=job.ntime + 100).verdict is Verdict.LOW_DIFFICULTY


@pytest.mark.parametrize(
    ("params", "words"),
    [
        (None, "takes [worker"),
        ("a1", "takes [worker"),
        ([WORKER, "a1", "00000007", "6553f100"], "takes [worker"),
        ([WORKER, "a1", "00000007", "6553f100", "00000000", "1fffe000"], "takes [worker"),  # BIP310 not offered
        ([WORKER, "a1", "00000007", "6553f100", 17], "nonce must be a string"),
        ([WORKER, "a1", "0000007", "6553f100", "00000000"], "extranonce2 must be 8 hex digits"),
        ([WORKER, "a1", "0000000700", "6553f100", "00000000"], "extranonce2 must be 8 hex digits"),
        ([WORKER, "a1", "zzzzzzzz", "6553f100", "00000000"], "extranonce2 must be 8 hex digits"),
        ([WORKER, "a1", "00000007", "6553f10", "00000000"], "ntime must be 8 hex digits"),
        ([WORKER, "a1", "00000007", "6553f100", "0000000g"], "nonce must be 8 hex digits"),
        ([WORKER, "a1", "00000007", "6553f100", " 0000000"], "nonce must be 8 hex digits"),
        (["", "a1", "00000007", "6553f100", "00000000"], "worker name"),
    ],
)
def test_malformed_submissions_say_what_is_wrong(params: object, words: str) -> None:
    result = verdict(params)
    assert result.verdict is Verdict.MALFORMED
    assert words in result.detail
    error = result.error()
    assert error is not None and error[0] == 20 and error[1] == result.detail


def test_huge_fields_are_clipped_in_the_detail() -> None:
    result = verdict([WORKER, "a1", "ff" * 100_000, "6553f100", "00000000"])
    assert result.verdict is Verdict.MALFORMED and len(result.detail) < 200


def test_unsubscribed_and_unauthorized_connections() -> None:
    _, params, _ = mined()
    result = verdict(params, context(subscribed=False))
    assert result.error() == [25, "Not subscribed", None]
    result = verdict(["mallory", *params[1:]])
    assert result.error() == [24, "Unauthorized worker", None]


def test_extranonce_sizes_that_do_not_fit_the_job() -> None:
    _, params, _ = mined()
    result = verdict(params, context(extranonce1=b"\x01\x02"))
    assert result.verdict is Verdict.MALFORMED and "extranonce sizes" in result.detail


def test_easy_nbits_makes_every_share_a_block_candidate() -> None:
    job, params, _ = mined()
    regtest = work.Job(**{**job.__dict__, "nbits": 0x207FFFFF})
    result = judge(params, context(), JobLookup(regtest), now=job.ntime)
    # The header changed with nbits; judge it at a difficulty it meets for sure.
    easy = judge(params, context(difficulty=result.achieved), JobLookup(regtest), now=job.ntime)
    assert easy.verdict is Verdict.BLOCK_CANDIDATE


def test_parse_submission() -> None:
    sub = parse_submission([WORKER, "a1", "000000ff", "6553f100", "7c2bac1d"], 4)
    assert (sub.extranonce2, sub.ntime, sub.nonce) == (b"\0\0\0\xff", 0x6553F100, 0x7C2BAC1D)
    with pytest.raises(ValueError, match="nonce must be 8 hex digits"):
        parse_submission([WORKER, "a1", "000000ff", "6553f100", "7c2bac1"], 4)


def test_difficulty_one_is_the_diff1_target() -> None:
    assert share_target(1) == DIFF1_TARGET


# -- the job book -------------------------------------------------------------------------


def job_named(job_id: str, clean: bool) -> work.Job:
    return work.Job(**{**mined()[0].__dict__, "job_id": job_id, "clean_jobs": clean})


def test_job_book_judges_and_remembers_accepted_shares() -> None:
    job, params, _ = mined()
    book = JobBook()
    book.add(job)
    assert book.current is job
    assert book.judge(params, context(), now=job.ntime).verdict is Verdict.ACCEPTED
    assert book.judge(params, context(), now=job.ntime).verdict is Verdict.DUPLICATE
    assert book.judge(["x"], context(), now=job.ntime).verdict is Verdict.MALFORMED
    assert book.judge([WORKER, "nope", *params[2:]], context(), now=job.ntime).verdict is Verdict.STALE


def test_clean_jobs_make_earlier_jobs_stale() -> None:
    book = JobBook()
    book.add(job_named("a1", clean=True))
    book.add(job_named("b2", clean=False))
    assert not book.lookup("a1").stale  # a job without clean_jobs leaves earlier ones valid
    book.add(job_named("c3", clean=True))
    assert book.lookup("a1").stale and book.lookup("b2").stale and not book.lookup("c3").stale
    assert book.judge(mined()[1], context(), now=mined()[0].ntime).verdict is Verdict.STALE
    assert book.lookup("zz").job is None


def test_job_book_is_bounded() -> None:
    book = JobBook(keep=3, max_shares=1)
    for i in range(10):
        book.add(job_named(f"j{i}", clean=False))
    assert [book.lookup(f"j{i}").job is not None for i in range(10)] == [False] * 7 + [True] * 3
    book = JobBook(max_shares=1)
    book.add(job_named("a1", clean=True))
    _, params, _ = mined()
    assert book.judge(params, context(), now=mined()[0].ntime).verdict is Verdict.ACCEPTED
    # Another good share for the same job: refused, not remembered without bound.
    _, en2_params, _ = other_share()
    full = book.judge(en2_params, context(), now=mined()[0].ntime)
    assert full.verdict is Verdict.MALFORMED and "too many shares" in full.detail
    with pytest.raises(ValueError):
        JobBook(keep=0)


def other_share() -> tuple[work.Job, list[str], ShareResult]:
    job, params, _ = mined()
    en2 = bytes.fromhex("00000009")
    nonce = search(job.header(EN1, en2, job.ntime, 0)[:76], 0, 1 << 20, share_target(DIFF))
    assert nonce is not None
    other = [WORKER, "a1", en2.hex(), params[3], f"{nonce:08x}"]
    return job, other, judge(other, context(), JobLookup(job), now=job.ntime)
