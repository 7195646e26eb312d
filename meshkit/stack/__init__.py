"""The process stack: Circus control, operator commands and flap control.

Layers, bottom up: ``control`` (serialised, retried circusd commands),
``processes`` (a stack's processes by run directory), ``console`` (output that
never fails), ``order`` (who stops when), ``rolling`` (rolling restarts),
``flap`` (crash-loop control), ``circusd`` (circusd with a clean log and its
startup failures in words), ``lifecycle`` (up, stop, down), ``commands`` (the
``meshkit`` subcommands).
"""
