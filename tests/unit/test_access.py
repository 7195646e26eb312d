"""The access policy, the gateway's `$services` rule and capability tokens (meshkit.access)."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshkit import access, curve
from meshkit.config import Settings
from meshkit.errors import ConfigError


def _settings(**kw: object) -> Settings:
    return Settings.load(None, {}, **kw)


def _pair(folder: Path, name: str) -> curve.Keypair:
    return curve.load_keypair(_settings(key_dir=str(folder), key_name=name))



def _guard(tmp_path: Path, policy: dict[str, object], service: str = "vault",
           now: list[float] | None = None, **settings: object) -> access.Guard:
    clock = now or [1000.0]
    return access.Guard(access.Policy.from_data(policy), service, curve.TrustStore(tmp_path),
                        _settings(**settings), clock=lambda: clock[0])


def test_the_default_policy_lets_services_call_each_other_and_the_gateway_only_its_services(tmp_path: Path) -> None:
    curve.generate(tmp_path, "x")
    overrides = {"gateway": {"services": ["mining"]}}
    mining = _guard(tmp_path, dict(access.DEFAULT_POLICY), "mining", service_overrides=overrides)
    vault = _guard(tmp_path, dict(access.DEFAULT_POLICY), "vault", service_overrides=overrides)
    assert mining.call_refusal("jobs", "submit", None) is None
    assert vault.call_refusal("jobs", "read", None) is None
    assert mining.call_refusal("gateway", "submit", None) is None
    assert "may not call vault.read" in str(vault.call_refusal("gateway", "read", None))
    assert vault.call_refusal(None, "read", None) == "the caller is not authenticated"
    anything = _guard(tmp_path, dict(access.DEFAULT_POLICY), "vault")  # an empty `services`: any service
    assert anything.call_refusal("gateway", "read", None) is None


def test_the_gateway_services_rule_reads_the_option_from_the_environment_too(tmp_path: Path) -> None:
    curve.generate(tmp_path, "x")
    clock = [0.0]
    settings = Settings.load(None, {"MESHKIT_GATEWAY_SERVICES": "vault,jobs"})
    guard = access.Guard(access.Policy.from_data(access.DEFAULT_POLICY), "vault", curve.TrustStore(tmp_path),
                         settings, clock=lambda: clock[0])
    assert guard.call_refusal("gateway", "read", None) is None
    other = access.Guard(access.Policy.from_data(access.DEFAULT_POLICY), "mining", curve.TrustStore(tmp_path),
                         settings, clock=lambda: clock[0])
    assert other.call_refusal("gateway", "submit", None) is not None


def test_policy_patterns_and_topics(tmp_path: Path) -> None:
    curve.generate(tmp_path, "x")
    guard = _guard(tmp_path, {"default": {"call": ["vault.read"], "publish": ["jobs.*"]},
                              "services": {"admin": {"call": ["vault.*"]}}})
    assert guard.call_refusal("shares", "read", None) is None
    assert guard.call_refusal("shares", "wipe", None) is not None
    assert guard.call_refusal("admin", "wipe", None) is None
    assert guard.push_refusal("shares", "jobs.new") is None
    assert "may not publish" in str(guard.push_refusal("shares", "blocks.new"))
    assert access.subscribe_refusal(guard.policy, "shares", ["jobs.new"]) is not None  # no subscribe rule


@pytest.mark.parametrize("bad", [{"calls": {}}, {"default": {"call": "*"}}, {"default": {"kall": ["*"]}},
                                 {"services": {"Bad Name": {}}}])
def test_a_malformed_policy_is_a_config_error(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        access.Policy.from_data(bad)


def test_a_token_grants_one_method_to_one_caller_until_it_expires(tmp_path: Path) -> None:
    curve.generate(tmp_path, "teller")
    curve.generate(tmp_path, "client")
    now = [1000.0]
    policy = {"default": {"call": ["*"]}, "services": {"client": {"call": []}, "other": {"call": []}}}
    guard = _guard(tmp_path, policy, now=now)
    token = access.issue(_pair(tmp_path, "teller"), "client", "vault", "read", 30, now=lambda: now[0])
    meta = {access.TOKEN_META: token}
    assert guard.call_refusal("client", "read", None) is not None
    assert guard.call_refusal("client", "read", meta) is None
    assert "the token is for" in str(guard.call_refusal("client", "wipe", meta))
    assert "the token is for" in str(guard.call_refusal("other", "read", meta))  # not the grantee
    now[0] += 31
    assert "expired" in str(guard.call_refusal("client", "read", meta))


def test_a_token_cannot_grant_more_than_its_issuer_has_or_be_forged(tmp_path: Path) -> None:
    curve.generate(tmp_path, "teller")
    curve.generate(tmp_path / "elsewhere", "teller")
    policy = {"default": {"call": []}, "services": {"admin": {"call": ["*"]}}}
    guard = _guard(tmp_path, policy)
    own = access.issue(_pair(tmp_path, "teller"), "client", "vault", "read", 30, now=lambda: 1000.0)
    assert "issuer 'teller' may not call" in str(guard.call_refusal("client", "read", {access.TOKEN_META: own}))
    stranger = access.issue(_pair(tmp_path / "elsewhere", "teller"), "client", "vault", "read", 30,
                            now=lambda: 1000.0)
    assert "not trusted" in str(guard.call_refusal("client", "read", {access.TOKEN_META: stranger}))
    body, _, sig = own.partition(".")
    forged = f"{body}.{sig[:-2]}AA" if not sig.endswith("AA") else f"{body}.{sig[:-2]}BB"
    assert "signature" in str(guard.call_refusal("client", "read", {access.TOKEN_META: forged}))
    assert "malformed" in str(guard.call_refusal("client", "read", {access.TOKEN_META: "garbage"}))
    with pytest.raises(ConfigError):
        access.issue(_pair(tmp_path, "teller"), "client", "vault", "read", 0)
