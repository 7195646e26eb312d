"""Seeing inside a running instance: spans, stats, in-flight calls, taps, and the tools that read them.

Layers, lowest first (nothing here imports the package itself):

* :mod:`.options` — the ``[services.<name>]`` keys that bound what is kept;
* :mod:`.spans` — :class:`~.spans.Span` and the bounded :class:`~.spans.SpanBuffer`;
* :mod:`.stats` — per-method counters and fixed-bucket latency histograms;
* :mod:`.tap` — live, rate-limited, self-closing event streams;
* :mod:`.logfilter` — run-time log levels for the calls whose metadata match;
* :mod:`.observer` — the one object per instance the server and client report to;
* :mod:`.user` — user spans (``with self.span("sql", query=q)``);
* :mod:`.introspect` — the reserved ``_mesh.*`` methods every instance answers;
* :mod:`.otlp` — optional OTLP export (the ``otlp`` extra);
* :mod:`.query` — the async Python API that asks instances (CLI and panel use it);
* :mod:`.render` — terminal waterfalls and tables (pure).

See ``docs/observability.md``.
"""
