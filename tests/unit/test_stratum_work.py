"""Block templates, coinbase, merkle branch, header and byte orders, pinned by real Bitcoin blocks."""

from __future__ import annotations

import struct

import pytest

from services.stratum import target, work
from services.stratum.target import DIFF1_TARGET, display_hash, dsha256

# The genesis block: header fields, its hash, and its one (coinbase) transaction.
GENESIS_HASH = "000000000019d6689c085ae165831e934ff763ae46a2a6c172b3f1b60a8ce26f"
GENESIS_MERKLE = "4a5e1e4baab89f3a32518a88c31bc87f618f76673e2cc77ab2127b7afdeda33b"
GENESIS_COINBASE = bytes.fromhex(
    "01000000010000000000000000000000000000000000000000000000000000000000000000ffffffff4d04ffff001d0104"
    "455468652054696d65732030332f4a616e2f32303039204368616e63656c6c6f72206f6e206272696e6b206f66207365"
    "636f6e64206261696c6f757420666f722062616e6b73ffffffff0100f2052a01000000434104678afdb0fe5548271967f1"
    "a67130b7105cd6a828e03909a67962e0ea1f61deb649f6bc3f4cef38c4f35504e51ec112de5c384df7ba0b8d578a4c702b"
    "6bf11d5fac00000000"
)
GENESIS = dict(version=1, ntime=0x495FAB29, nbits=0x1D00FFFF, nonce=2083236893)

# Block 125552, the classic worked example: four transactions, coinbase first (explorer order).
B125552_TXIDS = [
    "51d37bdd871c9e1f4d5541be67a6ab625e32028744d7d4609d0c37747b40cd2d",
    "60c25dda8d41f8d3d7d5c6249e2ea1b05a25bf7ae2ad6d904b512b31f997e1a1",
    "01f314cdd8566d3e5dbdd97de2d9fbfbfd6873e916a00d48758282cbb81a45b9",
    "b519286a1040da6ad83c783eb2872659eaf57b1bec088e614776ffe7dc8f6d01",
]
B125552_PREV = "00000000000008a3a41b85b8b29ad444def299fee21793cd8b9e567eab02cd81"
B125552_MERKLE = "2b12fcf1b09288fcaff797d71e950e71ae42b91e8bdb2304758dfcffc2b620e3"
B125552_HASH = "00000000000000001e8d6829a8a21adc5d38d0a473b144b6765798e61f98bd1d"
B125552_HEADER = (
    "01000000"
    "81cd02ab7e569e8bcd9317e2fe99f2de44d49ab2b8851ba4a308000000000000"
    "e320b6c2fffc8d750423db8b1eb942ae710e951ed797f7affc8892b0f1fc122b"
    "c7f5d74d"
    "f2b9441a"
    "42a14695"
)


def internal(display: str) -> bytes:
    """An explorer's hex as the internal byte order."""
    return bytes.fromhex(display)[::-1]


def test_genesis_header_hashes_to_the_genesis_block_hash() -> None:
    head = work.header(GENESIS["version"], b"\0" * 32, internal(GENESIS_MERKLE), GENESIS["ntime"],
                       GENESIS["nbits"], GENESIS["nonce"])
    assert len(head) == 80
    assert display_hash(dsha256(head)) == GENESIS_HASH
    assert dsha256(head) == internal(GENESIS_HASH)


def test_genesis_coinbase_is_its_merkle_root() -> None:
    txid = dsha256(GENESIS_COINBASE)
    assert display_hash(txid) == GENESIS_MERKLE
    assert work.merkle_root([txid]) == txid
    assert work.merkle_branch([]) == []


def test_block_125552_merkle_root_from_its_txids() -> None:
    txids = [internal(t) for t in B125552_TXIDS]
    assert display_hash(work.merkle_root(txids)) == B125552_MERKLE
    branch = work.merkle_branch(txids[1:])
    assert len(branch) == 2 and branch[0] == txids[1]
    assert branch[1] == dsha256(txids[2] + txids[3])
    assert display_hash(work.fold_branch(txids[0], branch)) == B125552_MERKLE


def test_block_125552_header_bytes_and_hash() -> None:
    head = work.header(1, internal(B125552_PREV), internal(B125552_MERKLE), 1305998791, 0x1A44B9F2, 2504433986)
    assert head.hex() == B125552_HEADER
    assert display_hash(dsha256(head)) == B125552_HASH
    assert target.hash_value(dsha256(head)) <= target.nbits_to_target(0x1A44B9F2)


def test_stratum_prevhash_swaps_each_word() -> None:
    wire = work.stratum_prevhash(internal(B125552_PREV))
    assert wire == "ab02cd818b9e567ee21793cddef299feb29ad444a41b85b8000008a300000000"
    # Equivalently: the explorer's hex with its eight 4-byte words in reverse order.
    words = [B125552_PREV[i : i + 8] for i in range(0, 64, 8)]
    assert wire == "".join(reversed(words))
    assert work.prevhash_from_stratum(wire) == internal(B125552_PREV)
    with pytest.raises(ValueError):
        work.prevhash_from_stratum("00" * 31)
    with pytest.raises(ValueError):
        work.stratum_prevhash(b"\0" * 31)


def naive_merkle_root(txids: list[bytes]) -> bytes:
    level = list(txids)
    while len(level) > 1:
        if len(level) % 2:
            level.append(level[-1])
        level = [dsha256(level[i] + level[i + 1]) for i in range(0, len(level), 2)]
    return level[0]


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 17, 33])
def test_branch_folds_to_the_full_tree_root(count: int) -> None:
    txids = [dsha256(struct.pack("<I", i)) for i in range(count)]
    branch = work.merkle_branch(txids[1:])
    assert work.fold_branch(txids[0], branch) == naive_merkle_root(txids)
    assert len(branch) == (count - 1).bit_length()


@pytest.mark.parametrize(
    ("height", "encoded"),
    [(0, "00"), (1, "51"), (16, "60"), (17, "0111"), (127, "017f"), (128, "028000"), (255, "02ff00"),
     (256, "020001"), (32767, "02ff7f"), (32768, "03008000"), (227836, "03fc7903"), (840000, "0340d10c")],
)
def test_bip34_height_push_is_bitcoin_cores(height: int, encoded: str) -> None:
    # 227,836 is the first block that had to carry its height (its coinbase starts 03fc7903).
    assert work.height_push(height).hex() == encoded


def test_varint_sizes() -> None:
    assert work.varint(0xFC) == b"\xfc"
    assert work.varint(0xFD) == b"\xfd\xfd\x00"
    assert work.varint(0x10000) == b"\xfe\x00\x00\x01\x00"
    assert work.varint(1 << 32) == b"\xff" + (1 << 32).to_bytes(8, "little")


SCRIPT = bytes.fromhex("76a914") + b"\x11" * 20 + bytes.fromhex("88ac")  # pay-to-pubkey-hash


def template(**changes: object) -> work.BlockTemplate:
    fields: dict[str, object] = dict(
        height=840000, prevhash=internal(B125552_PREV), version=0x20000000, nbits=0x1D00FFFF,
        ntime=1_700_000_000, coinbase_value=312_500_000, payout_script=SCRIPT,
        txids=tuple(internal(t) for t in B125552_TXIDS[1:]),
    )
    fields.update(changes)
    return work.BlockTemplate(**fields)  # type: ignore[arg-type]


def test_coinbase_parts_make_a_well_formed_transaction() -> None:
    coinb1, coinb2 = work.coinbase_parts(840000, 312_500_000, SCRIPT, 8, b"/meshkit/")
    tx = coinb1 + b"\xaa" * 8 + coinb2
    assert tx[:4] == b"\x01\x00\x00\x00" and tx[4] == 1
    assert tx[5:37] == b"\0" * 32 and tx[37:41] == b"\xff" * 4
    script_len = tx[41]
    script = tx[42 : 42 + script_len]
    assert script.startswith(bytes.fromhex("0340d10c") + b"\x08" + b"\xaa" * 8)  # height push, en push
    assert script.endswith(b"\x09/meshkit/")
    rest = tx[42 + script_len :]
    assert rest[:4] == b"\xff" * 4 and rest[4] == 1
    assert struct.unpack("<q", rest[5:13])[0] == 312_500_000
    assert rest[13] == len(SCRIPT) and rest[14 : 14 + len(SCRIPT)] == SCRIPT
    assert rest[14 + len(SCRIPT) :] == b"\0\0\0\0"
    assert coinb1.endswith(b"\x08")  # the extranonces start right after their push opcode


def test_coinbase_script_limits() -> None:
    with pytest.raises(ValueError):
        work.coinbase_parts(1, 0, SCRIPT, 0)
    with pytest.raises(ValueError):
        work.coinbase_parts(840000, 0, SCRIPT, 24, b"x" * 75)  # scriptSig of 105 bytes
    with pytest.raises(ValueError):
        work.height_push(-1)


def test_job_fields_and_notify_params() -> None:
    job = work.make_job(template(), "1f", extranonce_size=8, clean_jobs=True)
    params = job.notify_params()
    assert params[0] == "1f"
    assert params[1] == "ab02cd818b9e567ee21793cddef299feb29ad444a41b85b8000008a300000000"
    assert params[2] == job.coinb1.hex() and params[3] == job.coinb2.hex()
    assert params[4] == [b.hex() for b in work.merkle_branch(template().txids)]
    assert params[5:] == ["20000000", "1d00ffff", "6553f100", True]
    en1, en2 = b"\x00\x01\x00\x02", b"\xde\xad\xbe\xef"
    head = job.header(en1, en2, job.ntime, 0x01020304)
    root = work.fold_branch(dsha256(job.coinbase(en1, en2)), job.merkle_branch)
    # Little-endian numbers around internal-order hashes:
    assert head[:4] == bytes.fromhex("00000020")
    assert head[4:36] == internal(B125552_PREV) and head[36:68] == root
    assert head[68:72] == bytes.fromhex("00f15365") and head[72:76] == bytes.fromhex("ffff001d")
    assert head[76:] == bytes.fromhex("04030201")
    with pytest.raises(ValueError):
        job.coinbase(en1, b"\0")


def test_next_template_is_a_deterministic_chain() -> None:
    first = template(txids=())
    second = work.next_template(first, ntime=first.ntime - 5, tx_count=3)
    assert second.height == first.height + 1 and second.ntime == first.ntime + 1
    assert len(second.txids) == 3 and second.prevhash != first.prevhash
    assert work.next_template(first, ntime=first.ntime - 5, tx_count=3) == second


def test_nbits_and_difficulty() -> None:
    assert target.nbits_to_target(0x1D00FFFF) == DIFF1_TARGET
    assert target.nbits_to_target(0x1A44B9F2) == 0x44B9F2 << (8 * (0x1A - 3))
    # Block 125552's difficulty, as explorers list it: 244,112.49.
    assert DIFF1_TARGET / target.nbits_to_target(0x1A44B9F2) == pytest.approx(244112.4877, rel=1e-9)
    assert target.target_to_nbits(DIFF1_TARGET) == 0x1D00FFFF
    assert target.target_to_nbits(target.nbits_to_target(0x1A44B9F2)) == 0x1A44B9F2
    assert target.target_to_nbits(0x80) == 0x02008000  # sign bit kept clear
    for bad in (0x1D80FFFF, 0xFF00FFFF, -1, 1 << 32):
        with pytest.raises(ValueError):
            target.nbits_to_target(bad)


def test_share_target_for_a_difficulty() -> None:
    assert target.share_target(1) == DIFF1_TARGET
    assert target.share_target(2) == DIFF1_TARGET // 2
    assert target.share_target(2**-16) == DIFF1_TARGET << 16  # exact, not a float's approximation
    assert target.share_target(1e-300) == target.MAX_TARGET
    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            target.share_target(bad)
    assert target.achieved_difficulty(DIFF1_TARGET) == 1.0
    assert target.achieved_difficulty(0) == float("inf")
