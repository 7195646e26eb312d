"""The registry's local view: applying changes, full rescans, topic lookups.

No Redis here: a :class:`Registry` is built but never started, and changes
are fed to it the way the watcher and the resync loop would.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from meshkit.config import Settings
from meshkit.handlers import topic_matches
from meshkit.record import DRAINING, InstanceRecord
from meshkit.registry import Keys, Registry


def _rec(service: str, iid: str, *topics: str, state: str = "up") -> InstanceRecord:
    return InstanceRecord(service, iid, f"tcp://127.0.0.1:{1000 + len(iid)}", "h", 1,
                          topics=topics, state=state)


class Changes:
    """A listener that counts how often the view changed."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@pytest.fixture
def registry() -> Registry:
    return Registry(Settings.load(env={}, namespace="ns"))


@pytest.fixture
def changes(registry: Registry) -> Changes:
    listener = Changes()
    registry.add_listener(listener)
    return listener


def test_keys() -> None:
    keys = Keys("ns")
    assert keys.instance_prefix == "ns:inst:"
    assert keys.changes == "ns:changes"
    assert keys.instance("cart:a1") == "ns:inst:cart:a1"


def test_a_new_registry_is_empty(registry: Registry) -> None:
    assert registry.instances() == []
    assert registry.instances("cart") == []
    assert registry.services() == []
    assert registry.subscribers("x") == []
    assert registry.get("cart:a") is None
    assert not registry.synced and not registry.connected
    assert registry.keys.changes == "ns:changes"


def test_apply_set_and_delete(registry: Registry, changes: Changes) -> None:
    a, b, c = _rec("cart", "a"), _rec("cart", "b"), _rec("auth", "c")
    for rec in (a, b, c):
        registry.apply(rec)
    assert changes.count == 3
    assert registry.instances("cart") == [a, b]
    assert registry.instances("auth") == [c]
    assert sorted(r.key for r in registry.instances()) == ["auth:c", "cart:a", "cart:b"]
    assert registry.services() == ["auth", "cart"]
    assert registry.get("cart:b") is b

    registry.apply(None, "cart:a")
    assert changes.count == 4
    assert registry.instances("cart") == [b]
    assert registry.get("cart:a") is None

    registry.apply(None, "auth:c")
    assert registry.services() == ["cart"]
    assert registry.instances("auth") == []


def test_apply_replaces_a_record(registry: Registry, changes: Changes) -> None:
    registry.apply(_rec("cart", "a"))
    registry.apply(_rec("cart", "a", state=DRAINING))
    assert changes.count == 2
    (only,) = registry.instances("cart")
    assert only.state == DRAINING


def test_apply_without_change_is_silent(registry: Registry, changes: Changes) -> None:
    registry.apply(_rec("cart", "a"))
    registry.apply(_rec("cart", "a"))  # equal record
    registry.apply(None, "cart:unknown")  # nothing to delete
    assert changes.count == 1


def test_failing_listener_does_not_stop_the_others(registry: Registry, changes: Changes,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> None:
        raise RuntimeError("listener bug")

    registry.remove_listener(changes)
    registry.add_listener(broken)
    registry.add_listener(changes)
    registry.apply(_rec("cart", "a"))
    assert changes.count == 1
    assert "registry listener failed" in caplog.text


def test_remove_listener(registry: Registry, changes: Changes) -> None:
    registry.remove_listener(changes)
    registry.remove_listener(changes)  # removing twice is harmless
    registry.apply(_rec("cart", "a"))
    assert changes.count == 0


# -- full rescans -------------------------------------------------------------


def test_replace_all_takes_the_scan(registry: Registry, changes: Changes) -> None:
    registry.apply(_rec("cart", "a"))
    registry.apply(_rec("cart", "gone"))
    later = time.monotonic() + 60  # a scan that started after both changes
    registry._replace_all([_rec("cart", "a"), _rec("auth", "new")], later)
    assert sorted(r.key for r in registry.instances()) == ["auth:new", "cart:a"]
    assert changes.count == 3
    assert registry._pushed_at == {}  # old change times are forgotten


def test_replace_all_with_the_same_records_is_silent(registry: Registry, changes: Changes) -> None:
    registry.apply(_rec("cart", "a"))
    registry._replace_all([_rec("cart", "a")], time.monotonic() + 60)
    assert changes.count == 1


def test_a_change_pushed_during_the_scan_wins(registry: Registry) -> None:
    registry.apply(_rec("cart", "a"))
    scan_started = time.monotonic()
    registry.apply(_rec("cart", "a", state=DRAINING))  # announced while the scan ran
    registry._replace_all([_rec("cart", "a")], scan_started)  # the scan read the older "up"
    (only,) = registry.instances("cart")
    assert only.state == DRAINING


def test_a_delete_pushed_during_the_scan_wins(registry: Registry) -> None:
    registry.apply(_rec("cart", "a"))
    scan_started = time.monotonic()
    registry.apply(None, "cart:a")
    registry._replace_all([_rec("cart", "a")], scan_started)
    assert registry.instances("cart") == []


def test_a_set_pushed_during_the_scan_is_kept(registry: Registry) -> None:
    scan_started = time.monotonic()
    registry.apply(_rec("cart", "fresh"))
    registry._replace_all([], scan_started)  # the scan ran before the record was written
    assert [r.key for r in registry.instances()] == ["cart:fresh"]
    registry._replace_all([], time.monotonic() + 60)  # the next scan decides
    assert registry.instances() == []


def test_scan_removes_expired_records(registry: Registry) -> None:
    # A SIGKILLed instance never announces its removal; its key expires.
    registry.apply(_rec("cart", "killed"))
    registry.apply(_rec("cart", "alive"))
    registry._replace_all([_rec("cart", "alive")], time.monotonic() + 60)
    assert [r.key for r in registry.instances("cart")] == ["cart:alive"]


# -- change messages -------------------------------------------------------------


def test_change_messages(registry: Registry) -> None:
    rec = _rec("cart", "a", "jobs.*")
    registry._on_message(('{"op":"set","record":' + rec.to_json() + "}").encode())
    assert registry.get("cart:a") == rec
    registry._on_message(json.dumps({"op": "del", "key": "cart:a"}).encode())
    assert registry.get("cart:a") is None


@pytest.mark.parametrize(
    "data",
    [b"not json", b"[]", b"{}", b'{"op":"set"}', b'{"op":"set","record":{"service":"x"}}',
     b'{"op":"del"}', b'{"op":"rename","key":"a"}', None, 42],
    ids=repr,
)
def test_malformed_change_messages_are_ignored(registry: Registry, data: object) -> None:
    registry.apply(_rec("cart", "a"))
    registry._on_message(data)
    assert [r.key for r in registry.instances()] == ["cart:a"]


# -- waiting for changes ---------------------------------------------------------


def test_wait_changed() -> None:
    async def main() -> tuple[bool, bool, bool]:
        registry = Registry(Settings.load(env={}))
        expired = await registry.wait_changed(0)
        asyncio.get_running_loop().call_soon(registry.apply, _rec("cart", "a"))
        changed = await registry.wait_changed(None)
        unchanged = await registry.wait_changed(-1)
        return expired, changed, unchanged

    assert asyncio.run(main()) == (False, True, False)


# -- topics ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patterns", "topic", "expected"),
    [
        (["jobs.new"], "jobs.new", True),
        (["jobs.new"], "jobs.old", False),
        (["jobs.*"], "jobs.new", True),
        (["jobs.*"], "jobs.a.b", True),
        (["jobs.*"], "jobs", False),
        (["jobs.*"], "jobsx", False),
        (["jobs.*"], "jobs.*", True),
        (["jobs"], "jobs.new", False),
        (["*"], "jobs", False),  # only "prefix.*" is a pattern
        (["*"], "*", True),
        (["a.b.*"], "a.c", False),
        ([], "jobs", False),
        (["x", "jobs.*"], "jobs.new", True),
    ],
)
def test_topic_matches(patterns: list[str], topic: str, expected: bool) -> None:
    assert topic_matches(patterns, topic) is expected


def test_subscribers(registry: Registry) -> None:
    exact = _rec("logger", "1", "shares.accepted")
    wide = _rec("stats", "2", "shares.*", "blocks.found")
    none = _rec("cart", "3")
    for rec in (exact, wide, none):
        registry.apply(rec)
    assert registry.subscribers("shares.accepted") == [exact, wide]
    assert registry.subscribers("shares.rejected") == [wide]
    assert registry.subscribers("blocks.found") == [wide]
    assert registry.subscribers("blocks.lost") == []


def test_subscribers_include_draining_instances(registry: Registry) -> None:
    # Pushes still reach a draining instance: it finishes pushes and work in flight.
    rec = _rec("logger", "1", "shares.*", state=DRAINING)
    registry.apply(rec)
    assert registry.subscribers("shares.x") == [rec]
