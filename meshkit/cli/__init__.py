"""The ``meshkit`` command line.

``meshkit run MODULE:CLASS``              run one service instance (graceful on SIGTERM)
``meshkit ls [--json] [--wait N] [SERVICE]``  instances: endpoint, state (probed: ``unreachable``), age, methods
``meshkit call SERVICE METHOD [ARG..]``   each ARG is JSON or KEY=JSON; prints the result as JSON
``meshkit publish TOPIC JSON``            push to every subscriber; prints how many acknowledged
``meshkit redis start|stop|status``       a private Redis for this directory (:mod:`.localredis`)
``meshkit haproxy render|sync|stop``      HAProxy in front of the gateways (docs/haproxy.md)
``meshkit up|down|status|scale|start|stop``  the Circus stack (docs/operations.md)
``meshkit ban ls|add|rm``                 client-address bans every gateway enforces (:mod:`.ban`)
``meshkit keys gen|show``                 CurveZMQ keypairs and trusted keys (:mod:`.keys`)
``meshkit resources [--json]``            cluster-wide use of each named resource (:mod:`.resources`)
``meshkit trace|inspect|stats|tap|log-level``  look inside the running mesh (:mod:`.observe`)
``meshkit panel``                         the browser control panel (:mod:`.panel`)
``meshkit ejections [SERVICE]``           instances each caller ejected, its retry budget (:mod:`.ejections`)

Settings come from ``MESHKIT_*`` variables and the file named by
``MESHKIT_CONFIG`` or ``--config``. Without ``MESHKIT_REDIS_URL``, the mesh
commands read the Redis of the stack or of ``meshkit redis start`` running
from this directory, and say so (:mod:`meshkit.rundir`). Errors print one
line to stderr (a failed ``up`` or ``restart`` adds the end of the log of the
process that exited); exit statuses are listed in :mod:`.output` (0 done, 1
failed, 2 bad command line or settings).

Every argparse verb lives in this package, and nothing below it imports it.
Layers: :mod:`.args` (what the command line means) and :mod:`.output`
(what is printed) are pure; :mod:`.reach` probes Redis and instances;
the commands are :mod:`.mesh` (``run ls call publish``), :mod:`.localredis`
(``redis``), :mod:`.haproxy` (``haproxy``) and :mod:`.stack` (the stack's).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .. import __version__
from ..errors import MeshError
from .output import EXIT_INTERRUPTED, EXIT_USAGE, error_line, exit_status, format_table

__all__ = ["build_parser", "format_table", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command in ``argv`` (default: ``sys.argv[1:]``) and return its exit status."""
    parser = build_parser()
    args = parse(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except MeshError as exc:
        print(error_line(exc), file=sys.stderr)
        return exit_status(exc)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``, letting a command's positional list continue after its options.

    argparse ends a ``nargs="*"`` positional at the first option, so
    ``meshkit call hello greet --raw world`` would leave ``world`` over. A
    command that names its list in ``intermixed`` (a default) gets such
    leftovers appended to it, in order; anything else left over, or any
    leftover that looks like an option (and is not a negative number), is
    an error as usual.
    """
    args, extra = parser.parse_known_args(argv)
    if extra:
        field = getattr(args, "intermixed", None)
        if field is None or any(_is_option(token) for token in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        getattr(args, field).extend(extra)
    return args


def _is_option(token: str) -> bool:
    if not token.startswith("-") or token == "-":
        return False
    try:
        float(token)
    except ValueError:
        return True
    return False


def build_parser() -> argparse.ArgumentParser:
    """The parser of every ``meshkit`` command (the stack's and HAProxy's register themselves)."""
    parser = argparse.ArgumentParser(prog="meshkit", description="A brokerless ZeroMQ service mesh.")
    parser.add_argument("--version", action="version", version=f"meshkit {__version__}")
    parser.add_argument("--config", help="TOML settings file (default: $MESHKIT_CONFIG)")
    sub = parser.add_subparsers(metavar="COMMAND")
    for add in _commands():
        add(sub)
    return parser


def _commands() -> list[Callable[[Any], None]]:
    from .ban import add_commands as ban_commands
    from .ejections import add_commands as ejection_commands
    from .haproxy import add_commands as haproxy_commands
    from .keys import add_commands as keys_commands
    from .localredis import add_commands as redis_commands
    from .mesh import add_commands as mesh_commands
    from .observe import add_commands as observe_commands
    from .panel import add_commands as panel_commands
    from .resources import add_commands as resources_commands
    from .stack import add_commands as stack_commands

    return [mesh_commands, redis_commands, haproxy_commands, stack_commands, ban_commands, keys_commands,
            resources_commands, observe_commands, panel_commands, ejection_commands]
