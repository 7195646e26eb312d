"""Run aiostratum-proxy (PyPI ``aiostratum-proxy``, not written here) between a miner and a pool.

``python aiostratum_run.py POOL_HOST POOL_PORT``: the proxy listens on a
kernel-chosen port on 127.0.0.1, prints ``listening PORT`` on stdout, and
connects upstream to the pool once a worker connects. It is configured in
code, as its YAML loader calls ``yaml.load`` without a ``Loader``, which
PyYAML 6 refuses; ``max_workers: 1`` (solo mode) passes each worker's
extranonce2 through unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from aiostratum_proxy.application import Proxy


async def main(host: str, port: int) -> None:
    proxy = Proxy(name="thirdparty", max_workers=1,
                  worker_class="aiostratum_proxy.protocols.stratum.StratumWorkerProtocol",
                  pool_class="aiostratum_proxy.protocols.stratum.StratumPoolProtocol",
                  listen=[{"host": "127.0.0.1", "port": 0}],
                  pools=[{"name": "meshkit", "host": host, "port": port,
                          "account_name": "proxy.rig1", "account_password": "x"}])
    await proxy.startup()
    bound = proxy.workers.servers[0].sockets[0].getsockname()[1]
    print(f"listening {bound}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
