"""The HAProxy model, host names, rendering, reconciliation plan and CLI parsers, without HAProxy or Redis."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from test_haproxy_config import config

from meshkit.errors import ConfigError
from meshkit.haproxy.hosts import HostCache, detached
from meshkit.haproxy.model import (
    Server,
    backend_name,
    build_model,
    haproxy_token,
    identifier,
    listener_hosts,
    server_name,
    split_address,
)
from meshkit.haproxy.reconcile import ADD, REMOVE, UPDATE, plan
from meshkit.haproxy.render import RuntimePaths, fingerprint_of, render, structure_fingerprint
from meshkit.haproxy.runtime import RuntimeAPI, ServerState, parse_servers_state, parse_show_proc
from meshkit.record import DRAINING, InstanceRecord

PATHS = RuntimePaths.in_dir("/run/meshkit")


def gateway(instance: str, stratum: str = "10.0.0.1:4000", state: str = "up", **listeners: str) -> InstanceRecord:
    return InstanceRecord(service="gateway", instance_id=instance, endpoint="tcp://10.0.0.1:5000", host="h",
                          pid=1, state=state, listeners={"stratum": stratum, **listeners})


# -- names -------------------------------------------------------------------------


def test_server_names_are_stable_valid_identifiers() -> None:
    assert server_name("3f2a9c01d4e5") == "3f2a9c01d4e5"
    odd = server_name("host/with spaces;and#more")
    assert odd == server_name("host/with spaces;and#more")
    assert odd.startswith("host_with_spaces_and_more-")
    assert all(c.isalnum() or c in "_.:-" for c in odd)
    assert server_name("a/b") != server_name("a_b")  # cleaning never makes two ids collide
    assert len(server_name("x" * 200)) <= 48
    assert identifier("") != ""
    assert backend_name("gateway", "stratum") == "gateway.stratum"


def test_split_address() -> None:
    assert split_address("10.0.0.1:4000") == ("10.0.0.1", 4000)
    assert split_address("[::1]:4000") == ("::1", 4000)
    assert split_address("gw.local:1") == ("gw.local", 1)
    for bad in ("10.0.0.1", ":4000", "h:0", "h:70000", "h:port"):
        with pytest.raises(ValueError):
            split_address(bad)


# -- model ---------------------------------------------------------------------------


def test_model_from_config_and_records() -> None:
    records = [
        gateway("gw2", "10.0.0.2:4000", http="10.0.0.2:8000"),
        gateway("gw1", "10.0.0.1:4000", state=DRAINING),
        gateway("gw3", "not-an-address"),
        InstanceRecord(service="shares", instance_id="sh1", endpoint="tcp://x:1", host="h", pid=1,
                       listeners={"stratum": "10.0.0.9:1"}),
    ]
    model = build_model(config(), records)
    assert [(f.name, f.backend) for f in model.frontends] == [
        ("stratum", "gateway.stratum"), ("stratum-alt", "gateway.stratum"), ("api", "gateway.http")]
    assert [b.name for b in model.backends] == ["gateway.stratum", "gateway.http"]
    stratum = model.backend("gateway.stratum")
    assert stratum is not None
    assert [(s.name, s.address, s.draining) for s in stratum.servers] == [
        ("gw1", "10.0.0.1:4000", True), ("gw2", "10.0.0.2:4000", False)]
    http = model.backend("gateway.http")
    assert http is not None and [s.name for s in http.servers] == ["gw2"]
    assert len(model.problems) == 1 and "gateway:gw3" in model.problems[0]


def test_model_resolves_host_names() -> None:
    model = build_model(config(), [gateway("gw1", "gw1.local:4000")], resolve={"gw1.local": "10.1.1.1"}.__getitem__)
    stratum = model.backend("gateway.stratum")
    assert stratum is not None and stratum.servers[0].host == "10.1.1.1"

    def fail(host: str) -> str:
        raise OSError("no such host")

    model = build_model(config(), [gateway("gw1", "gw1.local:4000")], resolve=fail)
    assert "no such host" in model.problems[0]


# -- host names ------------------------------------------------------------------------


class Names:
    """A resolver driven by the test: answers from ``table``, raises for names not in it."""

    def __init__(self, **table: str) -> None:
        self.table = table
        self.asked: list[str] = []

    def __call__(self, host: str) -> str:
        self.asked.append(host)
        if host not in self.table:
            raise OSError(f"no such host {host}")
        return self.table[host]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_listener_hosts_lists_names_and_addresses_of_routed_records() -> None:
    records = [gateway("gw1", "gw1.local:4000"), gateway("gw2", "10.0.0.2:4000", http="gw2.local:80"),
               gateway("gw3", "not-an-address"),
               InstanceRecord(service="shares", instance_id="sh1", endpoint="tcp://x:1", host="h", pid=1,
                              listeners={"stratum": "other.local:1"})]
    assert listener_hosts(config(), records) == {"gw1.local", "10.0.0.2", "gw2.local"}


def test_host_cache_resolves_before_the_model_and_keeps_the_last_good_address() -> None:
    clock, names = Clock(), Names(**{"gw1.local": "10.1.1.1"})
    hosts = HostCache(clock, names, ttl=30.0, timeout=5.0)
    assert hosts.lookup("10.0.0.7") == "10.0.0.7" and hosts.lookup("::1") == "::1"
    with pytest.raises(OSError, match="not resolved yet"):
        hosts.lookup("gw1.local")

    asyncio.run(hosts.refresh({"gw1.local", "10.0.0.7"}))
    assert names.asked == ["gw1.local"]  # addresses are never looked up
    model = build_model(config(), [gateway("gw1", "gw1.local:4000")], hosts.lookup)
    stratum = model.backend("gateway.stratum")
    assert stratum is not None and stratum.servers[0].host == "10.1.1.1" and not model.problems

    # Within the TTL nothing is looked up again.
    clock.now += 29.0
    asyncio.run(hosts.refresh({"gw1.local"}))
    assert names.asked == ["gw1.local"]

    # The TTL passed and the name no longer resolves: the last good address
    # stays, so the server (and its clients) stay too.
    clock.now += 2.0
    del names.table["gw1.local"]
    asyncio.run(hosts.refresh({"gw1.local"}))
    assert names.asked == ["gw1.local"] * 2
    assert hosts.lookup("gw1.local") == "10.1.1.1"
    stratum = build_model(config(), [gateway("gw1", "gw1.local:4000")], hosts.lookup).backend("gateway.stratum")
    assert stratum is not None and [s.host for s in stratum.servers] == ["10.1.1.1"]

    # A new answer replaces it; a name never resolved is a problem of the model.
    clock.now += 31.0
    names.table["gw1.local"] = "10.1.1.2"
    asyncio.run(hosts.refresh({"gw1.local", "gw9.local"}))
    assert hosts.lookup("gw1.local") == "10.1.1.2"
    model = build_model(config(), [gateway("gw9", "gw9.local:4000")], hosts.lookup)
    assert "no such host gw9.local" in model.problems[0]

    # Names no record uses any more are forgotten.
    asyncio.run(hosts.refresh(set()))
    with pytest.raises(OSError, match="not resolved yet"):
        hosts.lookup("gw1.local")


def test_host_cache_does_not_wait_for_a_hanging_resolver() -> None:
    release = threading.Event()
    answered = {"gw1.local": "10.1.1.1"}

    def resolve(host: str) -> str:
        if host in answered:
            return answered.pop(host)
        release.wait(30.0)  # a resolver that hangs (until the test ends)
        raise OSError("gave up")

    clock = Clock()
    hosts = HostCache(clock, resolve, ttl=30.0, timeout=0.05)
    try:
        asyncio.run(hosts.refresh({"gw1.local"}))
        clock.now += 31.0
        asyncio.run(hosts.refresh({"gw1.local", "gw2.local"}))  # returns after its timeout
        assert hosts.lookup("gw1.local") == "10.1.1.1"  # the last good answer
        with pytest.raises(OSError, match="no answer"):
            hosts.lookup("gw2.local")
    finally:
        release.set()


def test_detached_returns_results_and_raises_errors() -> None:
    def fail() -> str:
        raise OSError("boom")

    assert asyncio.run(detached(lambda: 42)) == 42
    with pytest.raises(OSError, match="boom"):
        asyncio.run(detached(fail))


# -- rendering -------------------------------------------------------------------------


def test_render_contents() -> None:
    model = build_model(config(), [gateway("gw1"), gateway("gw2", "[::1]:4001", state=DRAINING)])
    text = render(model, PATHS)
    assert "stats socket /run/meshkit/haproxy.sock mode 600 level admin expose-fd listeners" in text
    assert "hard-stop-after 1h" in text
    assert "\n    master-worker\n" in text
    assert "timeout client 1h" in text and "timeout connect 2s" in text
    assert "    bind fd@5\n" in text and "    bind 127.0.0.1:3334\n" in text
    assert text.count("default_backend gateway.stratum") == 2
    assert "balance leastconn" in text and "balance roundrobin" in text
    assert "server gw1 10.0.0.1:4000 check inter 500ms fall 2 rise 1 send-proxy-v2 check-send-proxy\n" in text
    assert "server gw2 [::1]:4001 check inter 500ms fall 2 rise 1 send-proxy-v2 check-send-proxy disabled\n" in text
    assert "retry-on conn-failure empty-response response-timeout 503" in text
    assert "option redispatch 1" in text
    assert "http-check send meth GET uri /health" in text
    # The http check begins with the PROXY header too, and must see a 200.
    assert "http-check connect default\n" in text and "http-check expect status 200\n" in text
    # The client's address reaches gateways by PROXY v2, never by a header clients can forge.
    assert "forwardfor" not in text
    assert "\n\n\n" not in text and text.endswith("\n")
    assert "log " not in text  # no connection logs unless configured
    assert "    log stderr format short daemon info\n" in render(build_model(config(log="stderr format short "
                                                                                     "daemon info"), []), PATHS)


def test_fingerprint_ignores_servers_but_not_structure() -> None:
    empty = build_model(config(), [])
    full = build_model(config(), [gateway("gw1"), gateway("gw2", "10.0.0.2:4000")])
    assert structure_fingerprint(empty, PATHS) == structure_fingerprint(full, PATHS)
    assert fingerprint_of(render(full, PATHS)) == structure_fingerprint(full, PATHS)
    changed = build_model(config(timeouts={"queue": "6s"}), [])
    assert structure_fingerprint(changed, PATHS) != structure_fingerprint(empty, PATHS)
    rebound = build_model(config().with_binds({"stratum": "fd@9"}), [])
    assert structure_fingerprint(rebound, PATHS) != structure_fingerprint(empty, PATHS)
    assert fingerprint_of("global\n") is None


def test_check_options_come_from_config() -> None:
    model = build_model(config(check={"inter": "1s", "fall": 3, "rise": 2}), [gateway("gw1")])
    assert model.server_options == "check inter 1s fall 3 rise 2 send-proxy-v2 check-send-proxy"
    line = "server gw1 10.0.0.1:4000 check inter 1s fall 3 rise 2 send-proxy-v2 check-send-proxy\n"
    assert line in render(model, PATHS)


# -- reconciliation plan -----------------------------------------------------------------


def state(name: str, host: str = "10.0.0.1", port: int = 4000, admin: int = 0, check: int = 6,
          backend: str = "gateway.stratum") -> ServerState:
    return ServerState(backend=backend, name=name, host=host, port=port, op_state=2, admin_state=admin,
                       check_state=check)


def commands(steps: list[Any]) -> list[tuple[str, str, tuple[str, ...]]]:
    return [(s.action, s.server, s.commands) for s in steps if s.backend == "gateway.stratum"]


def test_plan_adds_missing_servers_health_first() -> None:
    model = build_model(config(), [gateway("gw1"), gateway("gw2", "10.0.0.2:4000", state=DRAINING)])
    assert commands(plan(model, [])) == [
        (ADD, "gw1", ("add server gateway.stratum/gw1 10.0.0.1:4000 check inter 500ms fall 2 rise 1 "
                      "send-proxy-v2 check-send-proxy",
                      "enable health gateway.stratum/gw1", "set server gateway.stratum/gw1 state ready")),
        (ADD, "gw2", ("add server gateway.stratum/gw2 10.0.0.2:4000 check inter 500ms fall 2 rise 1 "
                      "send-proxy-v2 check-send-proxy",
                      "enable health gateway.stratum/gw2", "set server gateway.stratum/gw2 state drain")),
    ]


def test_plan_leaves_matching_servers_alone() -> None:
    model = build_model(config(), [gateway("gw1"), gateway("gw2", "10.0.0.2:4000", state=DRAINING)])
    actual = [state("gw1"), state("gw2", "10.0.0.2", admin=0x08)]
    assert commands(plan(model, actual)) == []
    # A server rendered "disabled" keeps the config-maintenance bit (0x04) once
    # it left maintenance: that is not maintenance.
    actual = [state("gw1", admin=0x04), state("gw2", "10.0.0.2", admin=0x0C)]
    assert commands(plan(model, actual)) == []


def test_plan_updates_state_address_and_health() -> None:
    model = build_model(config(), [gateway("gw1"), gateway("gw2", "10.0.0.2:4000", state=DRAINING)])
    actual = [state("gw1", "10.0.0.9", 4009, admin=0x05, check=2), state("gw2", "10.0.0.2", admin=0x01)]
    assert commands(plan(model, actual)) == [
        (UPDATE, "gw1", ("set server gateway.stratum/gw1 addr 10.0.0.1 port 4000",
                         "enable health gateway.stratum/gw1", "set server gateway.stratum/gw1 state ready")),
        (UPDATE, "gw2", ("set server gateway.stratum/gw2 state drain",)),
    ]


def test_plan_removes_servers_of_vanished_instances_without_cutting_sessions() -> None:
    model = build_model(config(), [gateway("gw1")])
    actual = [state("gw1"), state("old"), state("older", admin=0x01), state("x", backend="someone.elses")]
    # Maintenance (no new connections), then the delete HAProxy refuses while
    # connections are attached; never "shutdown sessions".
    assert commands(plan(model, actual)) == [
        (REMOVE, "old", ("set server gateway.stratum/old state maint", "del server gateway.stratum/old")),
        (REMOVE, "older", ("del server gateway.stratum/older",)),
    ]
    assert not any("shutdown" in c for step in plan(model, actual) for c in step.commands)
    assert all(s.backend != "someone.elses" for s in plan(model, actual))
    assert commands(plan(model, actual, remove=False)) == []


# -- runtime API and master CLI replies -------------------------------------------------------


SERVERS_STATE = """1
# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight \
srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state \
bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr \
srv_agent_addr srv_agent_port
3 gateway.stratum 1 gw1 127.0.0.1 2 0 1 1 4 6 3 2 6 0 0 0 - 40045 - 0 0 - - 0
3 gateway.stratum 2 gw2 127.0.0.1 0 1 1 1 0 1 0 0 2 0 0 0 - 40046 - 0 0 - - 0
3 gateway.stratum 3 gw3 127.0.0.1 2 8 1 1 0 1 0 0 6 0 0 0 - 40047 - 0 0 - - 0

"""


def test_parse_servers_state() -> None:
    gw1, gw2, gw3 = parse_servers_state(SERVERS_STATE)
    assert (gw1.backend, gw1.name, gw1.host, gw1.port) == ("gateway.stratum", "gw1", "127.0.0.1", 40045)
    assert gw1.up and gw1.health_enabled and not gw1.in_maintenance and not gw1.draining
    assert gw2.in_maintenance and not gw2.health_enabled and not gw2.up  # just added
    assert gw3.draining and not gw3.in_maintenance
    assert parse_servers_state("1\n# be_id be_name srv_id\n\n") == []


def test_parse_show_proc() -> None:
    text = """#<PID>          <type>          <reloads>       <uptime>        <version>
6928            master          2 [failed: 1]   0d00h10m23s     2.6.12-1+deb12u4
# workers
19895           worker          0               0d00h00m01s     2.6.12-1+deb12u4
# old workers
6930            worker          2               0d00h10m23s     2.6.12-1+deb12u4
# programs

"""
    table = parse_show_proc(text)
    assert (table.master_pid, table.reloads, table.failed_reloads) == (6928, 2, 1)
    assert table.workers == (19895,) and table.old_workers == (6930,)


# -- nothing unvalidated reaches HAProxy (issue #7, defect 1) --------------------------

INJECTION = "fe80::1%x;shutdown frontend stratum "


@pytest.mark.parametrize(
    "host", [INJECTION, "fe80::1%a\nb", "fe80::1%a b", "::1%;", "10.0.0.1 backup", "a#b"], ids=repr,
)
def test_host_cache_takes_only_strict_ip_literals_as_addresses(host: str) -> None:
    assert not HostCache.is_address(host)
    with pytest.raises(OSError):
        HostCache().lookup(host)


def test_host_cache_accepts_scope_ids_of_the_grammar() -> None:
    assert HostCache.is_address("fe80::1%eth0") and HostCache.is_address("fe80::1%vlan.10_a-b")
    assert HostCache().lookup("fe80::1%eth0") == "fe80::1%eth0"


def test_host_cache_never_resolves_names_outside_the_grammar() -> None:
    names = Names(**{"gw1.local": "10.1.1.1"})
    hosts = HostCache(Clock(), names)
    asyncio.run(hosts.refresh({"gw1.local", "evil;name", "a b"}))
    assert names.asked == ["gw1.local"]
    with pytest.raises(OSError, match="not a valid host"):
        hosts.lookup("evil;name")


@pytest.mark.parametrize(
    "address", [f"{INJECTION}:4000", f"[{INJECTION}]:4000", "10.0.0.1:4000 backup", "gw#1:4000", "[gw.local]:1"],
    ids=repr,
)
def test_records_with_unsafe_listener_addresses_never_become_servers(address: str) -> None:
    model = build_model(config(), [gateway("gw1", "10.0.0.1:4000"), gateway("gw2", address)])
    stratum = model.backend("gateway.stratum")
    assert stratum is not None and [s.name for s in stratum.servers] == ["gw1"]
    assert len(model.problems) == 1 and "gateway:gw2" in model.problems[0]
    for step in plan(model, []):
        assert all(";" not in command and "shutdown" not in command for command in step.commands)


def test_a_resolver_answer_outside_the_grammar_is_a_problem_not_a_server() -> None:
    model = build_model(config(), [gateway("gw1", "gw1.local:4000")], resolve=lambda host: INJECTION)
    stratum = model.backend("gateway.stratum")
    assert stratum is not None and stratum.servers == ()
    assert "gateway:gw1" in model.problems[0]


@pytest.mark.parametrize(
    "value", [INJECTION, "a b", "a;b", "a#b", "a\nb", "", "x" * 301, 'a"b', "a\\b", None], ids=repr,
)
def test_haproxy_token_refuses_what_could_split_a_command_or_a_line(value: Any) -> None:
    with pytest.raises(ValueError, match="not safe"):
        haproxy_token(value)


def test_haproxy_token_passes_names_and_addresses() -> None:
    for value in ("gateway.stratum", "gw1", "10.0.0.1:4000", "[fe80::1%eth0]:4000", "a_b-c"):
        assert haproxy_token(value) == value


def test_servers_cannot_hold_unsafe_values() -> None:
    with pytest.raises(ValueError, match="not safe"):
        Server("gw1", INJECTION, 4000)
    with pytest.raises(ValueError, match="not safe"):
        Server("gw 1", "10.0.0.1", 4000)
    with pytest.raises(ValueError, match="port"):
        Server("gw1", "10.0.0.1", 0)
    assert Server("gw1", "fe80::1%eth0", 4000).address == "[fe80::1%eth0]:4000"


def test_rendering_refuses_a_value_with_a_line_break(tmp_path: Path) -> None:
    model = build_model(config(), [gateway("gw1", "10.0.0.1:4000")])
    bad = replace(model, frontends=(replace(model.frontends[0], bind="127.0.0.1:1\n    mode http"),))
    with pytest.raises(ValueError, match="line break or control character"):
        render(bad, PATHS)


@pytest.mark.parametrize("command", ["add server a/b 10.0.0.1:1; shutdown frontend x", "show info\nshow stat",
                                     "set server a/b addr 10.0.0.1\x00"], ids=repr)
def test_the_runtime_api_refuses_a_command_that_would_be_several(command: str, tmp_path: Path) -> None:
    api = RuntimeAPI(tmp_path / "missing.sock")
    with pytest.raises(ValueError, match="one command"):
        asyncio.run(api.command(command))


def test_send_proxy_is_v2_by_default_and_configurable() -> None:
    servers = [gateway("gw1")]
    assert build_model(config(), servers).server_options.endswith(" send-proxy-v2 check-send-proxy")
    v1 = build_model(config(send_proxy="v1"), servers)
    assert v1.server_options.endswith(" send-proxy check-send-proxy")
    none = build_model(config(send_proxy="none"), servers)
    assert none.server_options == "check inter 500ms fall 2 rise 1"
    server_lines = [line for line in render(none, PATHS).splitlines() if line.startswith("    server ")]
    assert server_lines and not any("send-proxy" in line for line in server_lines)
    with pytest.raises(ConfigError, match="send_proxy"):
        config(send_proxy="v3")
