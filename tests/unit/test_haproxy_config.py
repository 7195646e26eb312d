"""The HAProxy configuration file: sections read by the common loader, every mistake a ConfigError."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from meshkit.errors import ConfigError
from meshkit.haproxy.config import ProxyConfig, default_templates, load_proxy_config, parse_proxy_config

REPO = Path(__file__).resolve().parents[2]


def config(**haproxy: Any) -> ProxyConfig:
    data: dict[str, Any] = {
        "haproxy": haproxy,
        "frontend": [
            {"name": "stratum", "bind": "fd@5", "service": "gateway", "listener": "stratum"},
            {"name": "stratum-alt", "bind": "127.0.0.1:3334", "service": "gateway", "listener": "stratum"},
            {"name": "api", "bind": "*:8080", "mode": "http", "service": "gateway", "listener": "http",
             "balance": "roundrobin", "http_check": "GET /health"},
        ],
    }
    return parse_proxy_config(data, base=REPO / "configs")


def test_shipped_config_loads() -> None:
    loaded = load_proxy_config(REPO / "configs" / "haproxy.toml")
    assert [f.name for f in loaded.frontends] == ["stratum"]
    assert loaded.frontends[0].service == "gateway"
    assert loaded.templates == default_templates() == REPO / "haproxy"
    assert loaded.timeouts.client == "1h"


def test_bind_override_and_inherited_fds() -> None:
    cfg = config().with_binds({"stratum-alt": "fd@7"})
    assert [f.bind for f in cfg.frontends] == ["fd@5", "fd@7", "*:8080"]
    assert cfg.inherited_fds == (5, 7)
    with pytest.raises(ConfigError, match="unknown frontends"):
        cfg.with_binds({"nope": "fd@3"})
    with pytest.raises(ConfigError, match="bind must be"):
        cfg.with_binds({"api": "fd@x"})


@pytest.mark.parametrize(
    ("frontend", "message"),
    [
        ({"name": "a b", "bind": "*:1", "service": "s", "listener": "l"}, "identifier"),
        ({"name": "a", "bind": "*:1", "service": "s"}, "'listener' is required"),
        ({"name": "a", "bind": "*:1", "service": "s", "listener": "l", "mode": "udp"}, "mode"),
        ({"name": "a", "bind": "*:1", "service": "s", "listener": "l", "balance": "source"}, "balance"),
        ({"name": "a", "bind": "nowhere", "service": "s", "listener": "l"}, "bind must be"),
        ({"name": "a", "bind": "*:1", "service": "s", "listener": "l", "http_check": "GET /"}, "mode"),
        ({"name": "a", "bind": "*:1", "service": "s", "listener": "l", "colour": "red"}, "unknown keys"),
    ],
)
def test_bad_frontends_are_config_errors(frontend: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_proxy_config({"frontend": [frontend]}, base=Path("."))


def test_other_config_errors() -> None:
    with pytest.raises(ConfigError, match="at least one"):
        parse_proxy_config({}, base=Path("."))
    with pytest.raises(ConfigError, match="duration"):
        config(timeouts={"client": "forever"})
    with pytest.raises(ConfigError, match="unknown keys"):
        config(timeout={"client": "1h"})
    with pytest.raises(ConfigError, match="templates directory"):
        config(templates="/nonexistent")
    with pytest.raises(ConfigError, match="unique"):
        parse_proxy_config({"frontend": [{"name": "a", "bind": "*:1", "service": "s", "listener": "l"}] * 2},
                           base=Path("."))
    mixed = [
        {"name": "a", "bind": "*:1", "service": "s", "listener": "l"},
        {"name": "b", "bind": "*:2", "service": "s", "listener": "l", "mode": "http"},
    ]
    with pytest.raises(ConfigError, match="disagree on mode"):
        parse_proxy_config({"frontend": mixed}, base=Path("."))


def test_values_are_coerced_by_the_section_loader() -> None:
    cfg = config(maxconn=500, stop_timeout=3, check={"inter": 250, "fall": 3}, retries={"count": 0})
    assert (cfg.maxconn, cfg.stop_timeout) == (500, 3.0)
    assert (cfg.check.inter, cfg.check.fall, cfg.retries.count) == ("250", 3, 0)


@pytest.mark.parametrize(
    ("haproxy", "message"),
    [
        ({"maxconn": -1}, "maxconn must be a non-negative integer"),
        ({"maxconn": "lots"}, "maxconn expects int"),
        ({"maxconn": True}, "maxconn expects int"),
        ({"stop_timeout": "soon"}, "stop_timeout expects float"),
        ({"check": {"fall": -2}}, "fall must be a non-negative integer"),
        ({"check": {"inter": ["1s"]}}, "inter expects str"),
        ({"retries": {"count": 1.5}}, "count expects int"),
        ({"check": "fast"}, "must be a table"),
    ],
)
def test_bad_values_name_their_section_and_key(haproxy: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config(**haproxy)
