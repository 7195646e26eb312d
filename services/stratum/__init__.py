"""A Stratum v1 mining pool's pure core (Bitcoin flavour), and a CPU miner to test it with.

The layers, lowest first (each imports only those before it); none does I/O
except the miner:

* :mod:`~services.stratum.target` — double SHA-256, hashes as numbers, ``nbits``, difficulty ↔ target
* :mod:`~services.stratum.work` — block templates of our own, coinbase split, merkle branch, ``Job``
* :mod:`~services.stratum.shares` — ``judge``: a ``mining.submit`` rebuilt, hashed and given a ``Verdict``
* :mod:`~services.stratum.jobbook` — recent jobs and accepted-share hashes of one process, bounded
* :mod:`~services.stratum.vardiff` — per-connection difficulty towards a share rate (clock passed in)
* :mod:`~services.stratum.extranonce` — extranonce1 unique per live connection across instances
* :mod:`~services.stratum.messages` — the JSON-RPC 1.0 style lines miners parse
* :mod:`~services.stratum.mining` — the miner's own decoding of a job and its nonce search
* :mod:`~services.stratum.miner` — a small CPU miner over TCP (asyncio streams)

See ``docs/stratum.md``. Not wired into the gateway yet. Importing this
package imports none of them.
"""
