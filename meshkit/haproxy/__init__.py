"""HAProxy in front of the gateways: configuration rendered from the registry, servers kept in step.

The layers, lowest first (each imports only those before it):

* :mod:`~meshkit.haproxy.errors` — ``HAProxyError`` and its subclasses
* :mod:`~meshkit.haproxy.config` — ``configs/haproxy.toml`` as a ``ProxyConfig``
* :mod:`~meshkit.haproxy.model` — frontends, backends and servers from config and records
* :mod:`~meshkit.haproxy.hosts` — host names in records resolved off the event loop, last good answer kept
* :mod:`~meshkit.haproxy.process` — the HAProxy master of a run directory: started detached, found, stopped
* :mod:`~meshkit.haproxy.render` — the Jinja2 templates in ``haproxy/``, and ``haproxy -c``
* :mod:`~meshkit.haproxy.runtime` — runtime API and master CLI clients
* :mod:`~meshkit.haproxy.reconcile` — the commands that make HAProxy's servers match a model
* :mod:`~meshkit.haproxy.keeper` — a master that can serve the model, running its structure (start, take over, reload)
* :mod:`~meshkit.haproxy.sync` — the long-running sync process

The ``meshkit haproxy render|sync|stop`` verbs are :mod:`meshkit.cli.haproxy`.
See ``docs/haproxy.md``. Importing this package imports none of them.
"""
