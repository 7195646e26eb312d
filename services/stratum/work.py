"""Block templates of our own and the Stratum jobs cut from them (no coin daemon needed).

A :class:`BlockTemplate` is what a coin daemon's ``getblocktemplate`` would
give a pool: height, previous block hash, version, ``nbits``, ``ntime``, the
coinbase value and the (here: fake) transaction ids. :func:`make_job` turns
it into a :class:`Job`, the contents of one ``mining.notify``: the coinbase
transaction split around the extranonces, the merkle branch of the coinbase,
and the header fields in the byte orders Stratum sends them.

Byte orders (every one of them is a trap; each is pinned by a test with a
real Bitcoin block):

* Hashes (previous block, txids, merkle nodes) are kept as the 32 bytes
  SHA-256 produced, the *internal* order, which is also the order they take
  inside a header or a transaction. Explorers show them reversed.
* ``version``, ``nbits``, ``ntime`` and the nonce are little-endian
  ``uint32`` inside the 80-byte header, but Stratum sends each as the
  8-hex-digit **big-endian** text of the number (``"1d00ffff"``).
* Stratum's ``prevhash`` is the internal 32 bytes with **each 4-byte word
  byte-swapped** (equivalently: the explorer's hex with its eight words in
  reverse order). It comes from the way early miners fed the header to
  SHA-256 hardware as big-endian words.
* The merkle branch is sent in internal order, unswapped; the coinbase parts
  and extranonces as plain hex of their bytes, in transaction order.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from .target import dsha256

MAX_SCRIPT_SIG = 100  # consensus: a coinbase scriptSig is 2..100 bytes
MAX_EXTRANONCE = 75  # the extranonces are one direct push (opcodes 0x01..0x4b)
DEFAULT_TAG = b"/meshkit/"


def swap_words(data: bytes) -> bytes:
    """``data`` (a multiple of 4 bytes) with the bytes of every 4-byte word reversed."""
    if len(data) % 4:
        raise ValueError("swap_words needs a multiple of 4 bytes")
    return b"".join(data[i : i + 4][::-1] for i in range(0, len(data), 4))


def stratum_prevhash(prevhash: bytes) -> str:
    """The ``prevhash`` field of ``mining.notify`` for an internal-order 32-byte hash."""
    if len(prevhash) != 32:
        raise ValueError("a block hash is 32 bytes")
    return swap_words(prevhash).hex()


def prevhash_from_stratum(text: str) -> bytes:
    """The internal-order hash back from ``mining.notify``'s ``prevhash`` (64 hex digits)."""
    raw = bytes.fromhex(text)
    if len(raw) != 32:
        raise ValueError("prevhash is 64 hex digits")
    return swap_words(raw)


def varint(n: int) -> bytes:
    """Bitcoin's CompactSize: 1, 3, 5 or 9 bytes, little-endian after the marker byte."""
    if n < 0xFD:
        return bytes([n])
    if n <= 0xFFFF:
        return b"\xfd" + struct.pack("<H", n)
    if n <= 0xFFFFFFFF:
        return b"\xfe" + struct.pack("<I", n)
    return b"\xff" + struct.pack("<Q", n)


def height_push(height: int) -> bytes:
    """The BIP34 prefix of a coinbase scriptSig: exactly what Bitcoin Core's ``CScript() << height`` gives.

    0 is ``OP_0``, 1..16 are ``OP_1``..``OP_16``; larger heights are a direct
    push of the minimal little-endian signed number (a ``0x00`` byte is added
    when the top bit of the last byte is set, so that it does not read as a
    sign). Block 227,836 starts its coinbase with ``03 fc 79 03``.
    """
    if height < 0:
        raise ValueError("a block height is not negative")
    if height == 0:
        return b"\x00"
    if height <= 16:
        return bytes([0x50 + height])
    body = height.to_bytes((height.bit_length() + 7) // 8, "little")
    if body[-1] & 0x80:
        body += b"\x00"
    return bytes([len(body)]) + body


def push(data: bytes) -> bytes:
    """A direct script push of up to 75 bytes (the length is the opcode)."""
    if not 1 <= len(data) <= MAX_EXTRANONCE:
        raise ValueError("a direct push carries 1..75 bytes")
    return bytes([len(data)]) + data


def coinbase_parts(
    height: int, value: int, payout_script: bytes, extranonce_size: int, tag: bytes = DEFAULT_TAG
) -> tuple[bytes, bytes]:
    """``(coinb1, coinb2)``: a coinbase transaction split where extranonce1 + extranonce2 go.

    The transaction is a legacy (non-segwit) one: version 1, one input
    spending the null outpoint, whose scriptSig is the BIP34 height push,
    then one push of ``extranonce_size`` bytes (coinb1 ends with its length
    opcode, coinb2 starts right after it), then a push of ``tag``; one output
    paying ``value`` satoshis to ``payout_script``; lock time 0.
    ``coinb1 + extranonce1 + extranonce2 + coinb2`` is the whole transaction.
    """
    if not 1 <= extranonce_size <= MAX_EXTRANONCE:
        raise ValueError(f"extranonce1 + extranonce2 is 1..{MAX_EXTRANONCE} bytes, not {extranonce_size}")
    prefix = height_push(height) + bytes([extranonce_size])
    suffix = push(tag) if tag else b""
    script_len = len(prefix) + extranonce_size + len(suffix)
    if not 2 <= script_len <= MAX_SCRIPT_SIG:
        raise ValueError(f"a coinbase scriptSig of {script_len} bytes is outside 2..{MAX_SCRIPT_SIG}")
    coinb1 = (
        struct.pack("<i", 1)  # transaction version, little-endian
        + varint(1)  # one input
        + b"\x00" * 32  # the null outpoint: no previous transaction...
        + b"\xff\xff\xff\xff"  # ...and index 0xffffffff
        + varint(script_len)
        + prefix
    )
    coinb2 = (
        suffix
        + b"\xff\xff\xff\xff"  # sequence
        + varint(1)  # one output
        + struct.pack("<q", value)  # satoshis, little-endian int64
        + varint(len(payout_script))
        + payout_script
        + b"\x00\x00\x00\x00"  # lock time
    )
    return coinb1, coinb2


def merkle_branch(txids: Sequence[bytes]) -> list[bytes]:
    """The hashes a miner folds the coinbase txid with to reach the merkle root.

    ``txids`` are the block's transactions *after* the coinbase, internal
    order. At each level the coinbase's path takes its right-hand sibling;
    an odd level repeats its last hash, as Bitcoin's merkle tree does.
    """
    branch: list[bytes] = []
    level: list[bytes] = [b"", *txids]  # b"": the coinbase's place, unknown here
    while len(level) > 1:
        branch.append(level[1])
        if len(level) % 2:
            level.append(level[-1])
        level = [b""] + [dsha256(level[i] + level[i + 1]) for i in range(2, len(level), 2)]
    return branch


def fold_branch(leaf: bytes, branch: Sequence[bytes]) -> bytes:
    """The merkle root reached from ``leaf`` (the coinbase txid) through ``branch``."""
    node = leaf
    for sibling in branch:
        node = dsha256(node + sibling)
    return node


def merkle_root(txids: Sequence[bytes]) -> bytes:
    """The merkle root of all of a block's txids (coinbase first), internal order."""
    if not txids:
        raise ValueError("a block has at least its coinbase")
    return fold_branch(txids[0], merkle_branch(txids[1:]))


def header(version: int, prevhash: bytes, root: bytes, ntime: int, nbits: int, nonce: int) -> bytes:
    """The 80-byte block header: four little-endian ``uint32`` around two internal-order hashes."""
    return struct.pack("<I32s32sIII", version, prevhash, root, ntime, nbits, nonce)


@dataclass(frozen=True)
class BlockTemplate:
    """What a pool builds a block on; every hash in internal byte order."""

    height: int
    prevhash: bytes
    version: int
    nbits: int
    ntime: int
    coinbase_value: int
    payout_script: bytes
    txids: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class Job:
    """One ``mining.notify``'s contents, kept in the byte orders the header needs.

    ``extranonce_size`` is the number of bytes between ``coinb1`` and
    ``coinb2`` (extranonce1 + extranonce2).
    """

    job_id: str
    prevhash: bytes
    coinb1: bytes
    coinb2: bytes
    merkle_branch: tuple[bytes, ...]
    version: int
    nbits: int
    ntime: int
    clean_jobs: bool
    extranonce_size: int
    height: int = 0

    def notify_params(self) -> list[object]:
        """The ``params`` of this job's ``mining.notify``, in Stratum's byte orders."""
        return [
            self.job_id,
            stratum_prevhash(self.prevhash),
            self.coinb1.hex(),
            self.coinb2.hex(),
            [node.hex() for node in self.merkle_branch],
            f"{self.version:08x}",  # big-endian text of the number (LE in the header)
            f"{self.nbits:08x}",
            f"{self.ntime:08x}",
            self.clean_jobs,
        ]

    def coinbase(self, extranonce1: bytes, extranonce2: bytes) -> bytes:
        """The whole coinbase transaction for these extranonces."""
        if len(extranonce1) + len(extranonce2) != self.extranonce_size:
            raise ValueError("extranonce1 + extranonce2 do not fill the job's extranonce space")
        return self.coinb1 + extranonce1 + extranonce2 + self.coinb2

    def header(self, extranonce1: bytes, extranonce2: bytes, ntime: int, nonce: int) -> bytes:
        """The 80-byte header a miner hashes for these extranonces, ``ntime`` and ``nonce``."""
        root = fold_branch(dsha256(self.coinbase(extranonce1, extranonce2)), self.merkle_branch)
        return header(self.version, self.prevhash, root, ntime, self.nbits, nonce)


def make_job(
    template: BlockTemplate,
    job_id: str,
    *,
    extranonce_size: int = 8,
    clean_jobs: bool = True,
    tag: bytes = DEFAULT_TAG,
) -> Job:
    """The job for ``template``: coinbase split around ``extranonce_size`` bytes, branch computed."""
    coinb1, coinb2 = coinbase_parts(
        template.height, template.coinbase_value, template.payout_script, extranonce_size, tag
    )
    return Job(
        job_id=job_id,
        prevhash=template.prevhash,
        coinb1=coinb1,
        coinb2=coinb2,
        merkle_branch=tuple(merkle_branch(template.txids)),
        version=template.version,
        nbits=template.nbits,
        ntime=template.ntime,
        clean_jobs=clean_jobs,
        extranonce_size=extranonce_size,
        height=template.height,
    )


def next_template(previous: BlockTemplate, ntime: int, tx_count: int = 7) -> BlockTemplate:
    """A template for the block after ``previous``, with ``tx_count`` fake txids.

    The fake chain is deterministic: the "previous block hash" is the double
    SHA-256 of the previous template's fields, and the txids hash the new
    height and their index. That is all a job announcer needs to produce
    realistic work without a coin daemon.
    """
    seed = struct.pack("<QI", previous.height, previous.ntime) + previous.prevhash
    height = previous.height + 1
    txids = tuple(dsha256(b"meshkit fake tx" + struct.pack("<QI", height, i)) for i in range(tx_count))
    return BlockTemplate(
        height=height,
        prevhash=dsha256(seed),
        version=previous.version,
        nbits=previous.nbits,
        ntime=max(ntime, previous.ntime + 1),
        coinbase_value=previous.coinbase_value,
        payout_script=previous.payout_script,
        txids=txids,
    )
