"""The Redis key families, pinned: changing one is a change of the stored layout."""

from __future__ import annotations

from meshkit.keys import Keys, glob_escape
from meshkit.registry import Keys as RegistryKeys
from meshkit.storage import Keys as StorageKeys


def test_every_family_under_the_namespace() -> None:
    keys = Keys("ns")
    assert keys.instance("shares:shares-1") == "ns:inst:shares:shares-1"
    assert keys.changes == "ns:changes"
    assert keys.connection("gw-1-7") == "ns:conn:gw-1-7"
    assert keys.gateway_connections("gw-1") == "ns:gwconns:gw-1"


def test_scan_patterns_escape_glob_characters() -> None:
    keys = Keys("n*s")
    assert keys.match() == r"n\*s:inst:*"
    assert keys.match("a?b") == r"n\*s:inst:a\?b:*"
    assert keys.gateways_match() == r"n\*s:gwconns:*"
    assert glob_escape("[x]\\") == "\\[x\\]\\\\"


def test_the_older_import_paths_name_the_same_class() -> None:
    assert RegistryKeys is Keys and StorageKeys is Keys
