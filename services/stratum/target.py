"""Hashes, targets and difficulties, as Bitcoin and Stratum pools count them.

A block header's hash is the double SHA-256 of its 80 bytes. Read as a
number, it is **little-endian**: the 32 digest bytes are the number's bytes
from least to most significant. (That is why block explorers show hashes
byte-reversed: they print the number big-endian, leading zeros first.)
A hash *meets* a target when that number is at most the target.

* ``nbits`` is the block target in "compact" form: the high byte is an
  exponent E, the low three bytes a mantissa M, and the target is
  ``M * 256**(E-3)``. Genesis's ``0x1d00ffff`` is ``0xffff * 256**26``.
* *Difficulty 1* is the target ``0x00000000FFFF0000…0000`` (``0x1d00ffff``
  decoded), the "pool difficulty 1" of slush, ckpool and every miner.
* A share target for pool difficulty ``d`` is ``DIFF1_TARGET / d`` (rounded
  down, capped at ``2**256 - 1``); ``d`` may be below 1 (a share target
  above difficulty 1) so that a CPU finds shares in a test.
* The difficulty a hash *achieved* is ``DIFF1_TARGET / hash``.
"""

from __future__ import annotations

import hashlib
import math
from fractions import Fraction

DIFF1_TARGET = 0x00000000FFFF0000000000000000000000000000000000000000000000000000
MAX_TARGET = 2**256 - 1


def dsha256(data: bytes) -> bytes:
    """SHA-256 of SHA-256 of ``data``: Bitcoin's hash for headers, transactions and merkle nodes."""
    return hashlib.sha256(hashlib.sha256(data).digest()).digest()


def hash_value(digest: bytes) -> int:
    """A 32-byte digest as the number it stands for: little-endian, as Bitcoin compares it."""
    return int.from_bytes(digest, "little")


def display_hash(digest: bytes) -> str:
    """The hex a block explorer shows for ``digest``: its bytes reversed (the number, big-endian)."""
    return digest[::-1].hex()


def nbits_to_target(nbits: int) -> int:
    """The target a compact ``nbits`` encodes; ``ValueError`` for a negative or overflowing one."""
    if not 0 <= nbits <= 0xFFFFFFFF:
        raise ValueError(f"nbits {nbits:#x} is not a 32-bit value")
    exponent, mantissa = nbits >> 24, nbits & 0x00FFFFFF
    if mantissa & 0x00800000:
        # The sign bit of the mantissa: Bitcoin Core treats such a target as
        # negative and invalid, so do we.
        raise ValueError(f"nbits {nbits:#010x} encodes a negative target")
    target = mantissa >> 8 * (3 - exponent) if exponent <= 3 else mantissa << 8 * (exponent - 3)
    if target > MAX_TARGET:
        raise ValueError(f"nbits {nbits:#010x} encodes a target above 2**256")
    return target


def target_to_nbits(target: int) -> int:
    """The compact form of ``target`` (precision lost below the top three bytes, as in Bitcoin)."""
    if not 0 < target <= MAX_TARGET:
        raise ValueError("a target is between 1 and 2**256 - 1")
    size = (target.bit_length() + 7) // 8
    mantissa = target >> 8 * (size - 3) if size > 3 else target << 8 * (3 - size)
    if mantissa & 0x00800000:  # keep the sign bit clear: one more byte of exponent
        mantissa >>= 8
        size += 1
    return (size << 24) | mantissa


def share_target(difficulty: float) -> int:
    """The target a share must meet at pool ``difficulty`` (> 0, finite): ``DIFF1_TARGET / difficulty``.

    Computed with exact fractions so that a difficulty like ``1/65536`` gives
    exactly ``DIFF1_TARGET * 65536`` and not a float's approximation.
    """
    if not (math.isfinite(difficulty) and difficulty > 0):
        raise ValueError(f"difficulty must be a positive finite number, not {difficulty!r}")
    ratio = Fraction(difficulty)
    return min(MAX_TARGET, DIFF1_TARGET * ratio.denominator // ratio.numerator)


def achieved_difficulty(value: int) -> float:
    """The pool difficulty a hash whose number is ``value`` reached (``DIFF1_TARGET / value``)."""
    return math.inf if value == 0 else DIFF1_TARGET / value
