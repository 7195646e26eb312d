"""The registry's local view: applying changes, full rescans, topic lookups.

No Redis here: a :class:`Registry` is built but never started, and changes
are fed to it the way the watcher and the resync loop would.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from redis.exceptions import ResponseError

from meshkit.config import Settings
from meshkit.record import DRAINING, MAX_RECORD_BYTES, InstanceRecord
from meshkit.registry import Keys, Registry, redacted_url

# Scans this far apart drop what both missed (two heartbeat intervals of the default 1 s).
GRACE = 2.0


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
    later = time.monotonic() + 60  # scans that started after both changes
    registry._replace_all([_rec("cart", "a"), _rec("auth", "new")], later)
    registry._replace_all([_rec("cart", "a"), _rec("auth", "new")], later + GRACE)
    assert sorted(r.key for r in registry.instances()) == ["auth:new", "cart:a"]
    assert changes.count == 4
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
    later = time.monotonic() + 60
    registry._replace_all([], later)  # the next scans decide
    registry._replace_all([], later + GRACE)
    assert registry.instances() == []


def test_scan_removes_expired_records(registry: Registry) -> None:
    # A SIGKILLed instance never announces its removal; its key expires.
    registry.apply(_rec("cart", "killed"))
    registry.apply(_rec("cart", "alive"))
    later = time.monotonic() + 60
    registry._replace_all([_rec("cart", "alive")], later)
    registry._replace_all([_rec("cart", "alive")], later + GRACE)
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


# -- keys lost without a disconnect (issue #7, defect 4) ------------------------------


def test_one_scan_that_misses_a_live_record_does_not_drop_it(registry: Registry) -> None:
    # FLUSHALL or eviction: the scan runs before the owner's heartbeat rewrites the key.
    registry.apply(_rec("cart", "a"))
    registry.apply(_rec("cart", "b"))
    t = time.monotonic() + 60
    registry._replace_all([_rec("cart", "b")], t)
    assert sorted(r.key for r in registry.instances("cart")) == ["cart:a", "cart:b"]
    registry._replace_all([], t + 1.0)  # still inside two heartbeat intervals
    assert sorted(r.key for r in registry.instances("cart")) == ["cart:a", "cart:b"]
    registry._replace_all([], t + 2.0)  # "a" missed for two intervals: dead
    assert [r.key for r in registry.instances("cart")] == ["cart:b"]


def test_a_record_seen_again_is_no_longer_missing(registry: Registry) -> None:
    registry.apply(_rec("cart", "a"))
    t = time.monotonic() + 60
    registry._replace_all([], t)
    registry._replace_all([_rec("cart", "a")], t + 1.0)  # rewritten by its heartbeat
    registry._replace_all([], t + 2.5)  # missed again: a new miss, not two intervals of one
    assert [r.key for r in registry.instances("cart")] == ["cart:a"]
    registry._replace_all([], t + 4.5)
    assert registry.instances("cart") == []


def test_a_re_announced_record_is_no_longer_missing(registry: Registry) -> None:
    rec = _rec("cart", "a")
    registry.apply(rec)
    t = time.monotonic() + 60
    registry._replace_all([], t)
    registry.apply(rec)  # the heartbeat found its key gone and announced it again
    registry._replace_all([], t + 2.0)
    assert registry.instances("cart") == [rec]


def test_an_announced_deletion_still_applies_at_once(registry: Registry) -> None:
    registry.apply(_rec("cart", "a"))
    registry._replace_all([], time.monotonic() + 60)
    registry.apply(None, "cart:a")
    assert registry.instances() == []


# -- poisoned change messages (issue #7, defect 5) ---------------------------------------


BAD_RECORD = json.loads(_rec("cart", "evil").to_json()) | {"listeners": {"stratum": "fe80::1%x;shutdown x :1"}}


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 100_000,  # over the size bound: never parsed
        b"[" * 20_000,  # under it, but too deep for the JSON parser
        b'{"op":"set","record":' + b"[" * 20_000 + b"}",
        json.dumps({"op": "set", "record": BAD_RECORD}).encode(),
        json.dumps({"op": "del", "key": "cart:*"}).encode(),
        json.dumps({"op": "del", "key": "cart:a:b"}).encode(),
        json.dumps({"op": "del", "key": ["cart:a"]}).encode(),
        b'{"op":"set","record":' + json.dumps({"x": "y" * 70_000}).encode() + b"}",
    ],
    ids=["100k-open", "20k-deep", "deep-record", "injection", "glob-key", "colon-key", "list-key", "huge"],
)
def test_poisoned_change_messages_are_rejected_not_raised(registry: Registry, data: bytes) -> None:
    registry.apply(_rec("cart", "a"))
    registry._on_message(data)
    assert [r.key for r in registry.instances()] == ["cart:a"]
    assert registry.rejected == 1


def test_rejections_are_counted_each_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    counted: list[int] = []
    registry = Registry(Settings.load(env={}, namespace="ns"), on_rejected=lambda: counted.append(1))
    for _ in range(50):
        registry._on_message(b"[" * 100_000)
    assert registry.rejected == 50 and len(counted) == 50
    lines = [r for r in caplog.records if "rejected registry change" in r.getMessage()]
    assert len(lines) == 1
    assert len(lines[0].getMessage()) < 400


def test_records_read_from_redis_are_checked(registry: Registry, caplog: pytest.LogCaptureFixture) -> None:
    good = _rec("cart", "a")
    keys = [b"ns:inst:cart:a", b"ns:inst:cart:b", b"ns:inst:cart:c", b"ns:inst:cart:d", b"ns:inst:cart:e",
            b"ns:inst:cart:f"]
    values: list[object] = [
        good.to_json().encode(),
        good.to_json().encode(),  # "cart:a" stored under another key
        b"",  # expired between SCAN and GETRANGE
        b"x" * (MAX_RECORD_BYTES + 1),  # GETRANGE stopped one byte past the bound
        ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
        json.dumps(BAD_RECORD | {"instance_id": "f"}).encode(),
    ]
    assert registry._parse_batch(keys, values) == [good]
    assert registry.rejected == 4
    for key in ("cart:b", "cart:d", "cart:e", "cart:f"):
        assert f"rejected registry record ns:inst:{key}" in caplog.text


def test_keys_escape_glob_characters_in_scan_patterns() -> None:
    assert Keys("ns").match() == "ns:inst:*"
    assert Keys("ns").match("cart") == "ns:inst:cart:*"
    assert Keys("n*s?[x]").match() == r"n\*s\?\[x\]:inst:*"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6390/0", "redis://127.0.0.1:6390/0"),
        ("redis://:hunter2@10.0.0.1:6390/0", "redis://:***@10.0.0.1:6390/0"),
        ("redis://app:hunter2@10.0.0.1:6390/0", "redis://app:***@10.0.0.1:6390/0"),
        ("rediss://hunter2@h/0", "rediss://***@h/0"),
        ("unix:///run/redis.sock?db=0&password=hunter2", "unix:///run/redis.sock?db=0&password=***"),
    ],
)
def test_redacted_url_masks_passwords(url: str, shown: str) -> None:
    assert redacted_url(url) == shown
