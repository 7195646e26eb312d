"""The browser control panel: what the mesh, Circus and HAProxy are doing, live, on one page.

The layers, lowest first (each imports only those before it):

* :mod:`~meshkit.panelurl` — the URL file in the run directory (outside the package: the stack reads it)
* :mod:`~meshkit.panel.feed` — one tab's outgoing frames, bounded in bytes (drop, count, say so)
* :mod:`~meshkit.panel.figures` — rates, p50/p99, the call graph and the topology, as pure functions
* :mod:`~meshkit.panel.mesh` — the ``_mesh.*`` methods of one instance behind one interface
* :mod:`~meshkit.panel.taps` — a tab's live flow: filters, rate-limited taps closed with the tab
* :mod:`~meshkit.panel.circus` — watchers, processes, restarts and flap stops
* :mod:`~meshkit.panel.servers` — HAProxy's servers from its runtime API
* :mod:`~meshkit.panel.panel` — the refresh loop and the state every tab is sent
* :mod:`~meshkit.panel.app` — the aiohttp application: the page, the JSON API, the WebSocket
* :mod:`~meshkit.panel.webserver` — binding, the URL file, running until SIGTERM

The page itself is ``static/`` (one HTML, one JS and one CSS file, nothing
fetched from elsewhere). ``meshkit panel`` is :mod:`meshkit.cli.panel`; see
``docs/panel.md``. Importing this package imports none of them.
"""
