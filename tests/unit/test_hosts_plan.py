"""The pure parts of meshkit.testing.hosts: names, addresses, the command plans, what counts as a leftover."""

from __future__ import annotations

import ipaddress

import pytest

from meshkit.testing import HostsUnavailableError, hosts
from meshkit.testing.hosts import (
    RANGE,
    leftovers,
    link_commands,
    owner_of,
    plan_network,
    setup_commands,
    subnet_for,
    teardown_commands,
)


def test_names_carry_owner_and_token() -> None:
    plan = plan_network(3, 4242, "0a1b2c")
    assert plan.switch == "mkh-4242-0a1b2c-sw"
    assert [h.netns for h in plan.hosts] == [f"mkh-4242-0a1b2c-h{i}" for i in (1, 2, 3)]
    assert plan.namespaces == [*(h.netns for h in plan.hosts), plan.switch]
    assert all(len(n) <= 40 for n in plan.namespaces)


def test_addresses_are_distinct_and_inside_the_benchmark_range() -> None:
    plan = plan_network(253, 1, "ffffff")
    addresses = [ipaddress.IPv4Address(h.address) for h in plan.hosts]
    assert len(set(addresses)) == 253
    assert all(a in RANGE and a in plan.subnet for a in addresses)
    assert plan.subnet.network_address not in addresses
    assert plan.subnet.broadcast_address not in addresses
    assert [h.address for h in plan_network(2, 1, "000000").hosts] == ["198.18.0.1", "198.18.0.2"]


@pytest.mark.parametrize(("token", "subnet"), [
    ("000000", "198.18.0.0/24"), ("0000ff", "198.18.255.0/24"),
    ("000100", "198.19.0.0/24"), ("0001ff", "198.19.255.0/24"), ("000200", "198.18.0.0/24"),
])
def test_subnet_for_stays_in_the_range(token: str, subnet: str) -> None:
    assert subnet_for(token) == ipaddress.IPv4Network(subnet)


@pytest.mark.parametrize(("count", "token"), [(0, "abcdef"), (254, "abcdef"), (2, "ABCDEF"),
                                              (2, "abc"), (2, "abc;rm")])
def test_bad_plans_are_refused(count: int, token: str) -> None:
    with pytest.raises(ValueError):
        plan_network(count, 1, token)


@pytest.mark.parametrize(("name", "owner"), [
    ("mkh-12-abcdef-sw", 12), ("mkh-12-abcdef-h7", 12), ("mkh-12-abcdef-h", None),
    ("t1", None), ("mkh-x-abcdef-h1", None), ("mkh-12-abcdef-h1-extra", None), ("xmkh-12-abcdef-h1", None),
])
def test_owner_of_reads_only_our_names(name: str, owner: int | None) -> None:
    assert owner_of(name) == owner


def test_leftovers_are_ours_with_a_dead_owner() -> None:
    names = ["mkh-10-aaaaaa-h1", "mkh-10-aaaaaa-sw", "mkh-20-bbbbbb-h1", "somebody-else", "mkh-30-cccccc-sw"]
    alive = {20}.__contains__
    assert leftovers(names, alive) == ["mkh-10-aaaaaa-h1", "mkh-10-aaaaaa-sw", "mkh-30-cccccc-sw"]


def test_setup_touches_only_the_new_namespaces() -> None:
    plan = plan_network(2, 7, "abcdef")
    cmds = setup_commands(plan)
    assert cmds[:3] == [["netns", "add", n] for n in plan.namespaces]
    # Every other command names its namespace: the machine's own gets nothing.
    for cmd in cmds[3:]:
        assert cmd[0] == "-n" and cmd[1] in plan.namespaces, cmd
    assert ["-n", plan.switch, "link", "add", "br0", "type", "bridge"] in cmds
    h2 = plan.hosts[1]
    assert ["-n", plan.switch, "link", "add", "h2", "type", "veth", "peer", "name", "eth0",
            "netns", h2.netns] in cmds
    assert ["-n", h2.netns, "addr", "add", f"{h2.address}/24", "dev", "eth0"] in cmds
    assert ["-n", h2.netns, "link", "set", "lo", "up"] in cmds


def test_teardown_deletes_each_namespace() -> None:
    plan = plan_network(2, 7, "abcdef")
    assert teardown_commands(plan.namespaces) == [["netns", "del", n] for n in plan.namespaces]


def test_cut_and_restore_a_host_link() -> None:
    plan = plan_network(3, 7, "abcdef")
    h3 = plan.hosts[2]
    assert link_commands(plan, h3, None, up=False) == [["-n", plan.switch, "link", "set", "h3", "down"]]
    assert link_commands(plan, h3, None, up=True) == [["-n", plan.switch, "link", "set", "h3", "up"]]


def test_cut_between_two_hosts_blackholes_both_directions() -> None:
    plan = plan_network(3, 7, "abcdef")
    h1, h2, _ = plan.hosts
    assert link_commands(plan, h1, h2, up=False) == [
        ["-n", h1.netns, "route", "add", "blackhole", f"{h2.address}/32"],
        ["-n", h2.netns, "route", "add", "blackhole", f"{h1.address}/32"],
    ]
    assert [c[3] for c in link_commands(plan, h1, h2, up=True)] == ["del", "del"]


def test_a_refusing_machine_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # `false` stands in for an `ip` that the machine refuses: no namespace is touched.
    monkeypatch.setattr(hosts, "_ip", lambda: "false")
    with pytest.raises(HostsUnavailableError, match="refused `ip netns list`"):
        hosts.HostNetwork.create(2)


def test_the_bench_helper_parses_its_commands() -> None:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "hosts.py"
    spec = importlib.util.spec_from_file_location("bench_hosts", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.build_parser().parse_args(["run", "3", "--", "sh", "-c", "true"])
    assert (args.count, module.command_of(args)) == (3, ["sh", "-c", "true"])
    assert module.build_parser().parse_args(["clean"]).command == "clean"
