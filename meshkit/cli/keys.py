"""``meshkit keys gen|show``: the CurveZMQ keypairs of this host (docs/security.md).

``meshkit keys gen NAME [--service S] [--dir D] [--force]``  write ``NAME.key_secret`` (0600) and ``NAME.key``
``meshkit keys show [NAME] [--dir D] [--json]``               the trusted keys of the directory (or one keypair)

The directory is ``--dir``, else the ``key_dir`` setting. ``gen`` refuses to
replace an existing keypair without ``--force`` (every peer trusting the old
key would be locked out). ``show`` lists every ``*.key`` file: the service it
speaks for and its public key, and any file it would skip (with why); with
NAME, it checks that keypair as a process starting with it would (exit 1 if
it is missing or its permissions are too open). Copy ``NAME.key`` (never the
secret) into the key directory of every host that must trust it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .. import curve
from ..config import Settings
from ..errors import ConfigError
from .output import EXIT_FAILED, EXIT_OK, format_table


def add_commands(sub: Any) -> None:
    """Register ``keys`` and its verbs on the ``meshkit`` parser."""
    keys = sub.add_parser("keys", help="CurveZMQ keypairs and trusted keys (docs/security.md)")
    verbs = keys.add_subparsers(metavar="VERB")
    gen = verbs.add_parser("gen", help="write a new keypair")
    gen.add_argument("name", help="the keypair's name: a service's own name, or 'client' for scripts")
    gen.add_argument("--service", help="the service the key speaks for (default: NAME)")
    gen.add_argument("--dir", help="the key directory (default: the key_dir setting)")
    gen.add_argument("--force", action="store_true", help="replace an existing keypair")
    gen.set_defaults(func=cmd_gen)
    show = verbs.add_parser("show", help="the trusted keys, or one keypair checked")
    show.add_argument("name", nargs="?", help="check this keypair as a starting process would")
    show.add_argument("--dir", help="the key directory (default: the key_dir setting)")
    show.add_argument("--json", action="store_true", help="one JSON array of {service, public_key, file}")
    show.set_defaults(func=cmd_show)


def _settings(args: argparse.Namespace) -> Settings:
    settings = Settings.load(getattr(args, "config", None))
    if args.dir:
        settings = settings.replace(key_dir=args.dir)
    if not settings.key_dir:
        raise ConfigError("no key directory: pass --dir or set key_dir (MESHKIT_KEY_DIR)")
    return settings


def cmd_gen(args: argparse.Namespace) -> int:
    settings = _settings(args)
    try:
        public, secret = curve.generate(settings.key_dir, args.name, args.service, overwrite=args.force)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    pair = curve.load_keypair(settings.replace(key_name=args.name))
    print(f"wrote {secret} (keep it on this host) and {public} (copy it to every host that must trust it)")
    print(f"{pair.service} {pair.public_text}")
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.name:
        pair = curve.load_keypair(settings.replace(key_name=args.name))
        print(f"{pair.service} {pair.public_text}")
        return EXIT_OK
    store = curve.TrustStore(curve.key_dir(settings))
    keys = sorted(store.keys(), key=lambda k: (k.service, k.path))
    rows = [{"service": k.service, "public_key": k.public, "file": Path(k.path).name} for k in keys]
    if args.json:
        print(json.dumps(rows))
    else:
        print(format_table([["SERVICE", "PUBLIC KEY", "FILE"],
                            *[[r["service"], r["public_key"], r["file"]] for r in rows]]))
    for problem in store.problems:
        print(f"skipped: {problem}")
    return EXIT_FAILED if store.problems else EXIT_OK
