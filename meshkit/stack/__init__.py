"""The process stack: Circus control, the stack's lifecycle and flap control.

Layers, bottom up: ``control`` (serialised, retried circusd commands),
``processes`` (a stack's processes by run directory), ``console`` (output that
never fails), ``order`` (who stops when), ``rolling`` (rolling restarts),
``exits`` (processes that exit, from circusd's events, with their logs' end),
``flap`` (crash-loop control), ``circusd`` (circusd with a clean log and its
startup failures in words), ``stack`` (a run directory's paths and
environment), ``readiness`` (when a starting stack is up, or has failed),
``lifecycle`` (up, stop, down). The ``meshkit up|down|...``
verbs that drive it are :mod:`meshkit.cli.stack`.
"""
