"""Key files, permissions, trusted keys, when CURVE is on (meshkit.curve); tokens and policy (meshkit.access)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from meshkit import curve
from meshkit.config import Settings
from meshkit.errors import ConfigError
from meshkit.record import InstanceRecord


def _settings(**kw: object) -> Settings:
    return Settings.load(None, {}, **kw)


def _pair(folder: Path, name: str) -> curve.Keypair:
    return curve.load_keypair(_settings(key_dir=str(folder), key_name=name))


@pytest.mark.parametrize(("kw", "on"), [
    ({}, False),  # a dev setup: everything on loopback
    ({"advertise_host": "198.18.0.2"}, True),
    ({"bind_host": "0.0.0.0"}, True),  # advertised as this host's name
    ({"advertise_host": "::1"}, False),
    ({"key_dir": "/k"}, True),
    ({"advertise_host": "198.18.0.2", "curve": "off"}, False),
    ({"curve": "on"}, True),
])
def test_when_curve_is_on(kw: dict[str, object], on: bool) -> None:
    assert curve.enabled(_settings(**kw)) is on


def test_the_curve_setting_is_checked() -> None:
    with pytest.raises(ConfigError, match="curve must be"):
        _settings(curve="yes")


def test_curve_on_without_a_key_dir_says_how_to_fix_it() -> None:
    with pytest.raises(ConfigError, match="meshkit keys gen"):
        curve.load_keypair(_settings(advertise_host="198.18.0.2"))


def test_generate_writes_a_private_secret_and_refuses_to_overwrite(tmp_path: Path) -> None:
    public, secret = curve.generate(tmp_path / "k", "shares")
    assert os.stat(secret).st_mode & 0o777 == 0o600
    assert os.stat(tmp_path / "k").st_mode & 0o777 == 0o700
    pair = _pair(tmp_path / "k", "shares")
    assert pair.service == "shares" and pair.public_text in public.read_text()
    assert "secret-key" not in public.read_text()
    with pytest.raises(ConfigError, match="already exists"):
        curve.generate(tmp_path / "k", "shares")


def test_a_secret_readable_by_others_stops_the_start(tmp_path: Path) -> None:
    _, secret = curve.generate(tmp_path, "shares")
    secret.chmod(0o640)
    with pytest.raises(ConfigError, match="chmod 0600"):
        _pair(tmp_path, "shares")


def test_a_key_dir_writable_by_others_stops_the_start(tmp_path: Path) -> None:
    curve.generate(tmp_path / "k", "shares")
    (tmp_path / "k").chmod(0o777)
    with pytest.raises(ConfigError, match="open to other users"):
        _pair(tmp_path / "k", "shares")


def test_a_missing_keypair_names_the_command(tmp_path: Path) -> None:
    curve.generate(tmp_path, "shares")
    with pytest.raises(ConfigError, match="meshkit keys gen client"):
        _pair(tmp_path, "client")


def test_the_trust_store_maps_keys_to_services_and_skips_bad_files(tmp_path: Path) -> None:
    curve.generate(tmp_path, "shares")
    curve.generate(tmp_path, "gw", "gateway")
    (tmp_path / "junk.key").write_text('curve\n    public-key = "short"\n')
    loose = tmp_path / "loose.key"
    loose.write_text((tmp_path / "shares.key").read_text())
    loose.chmod(0o666)
    store = curve.TrustStore(tmp_path)
    assert {k.service for k in store.keys()} == {"shares", "gateway"}
    assert store.service_of(_pair(tmp_path, "gw").public_text) == "gateway"
    assert any("junk.key" in p for p in store.problems) and any("loose.key" in p for p in store.problems)


def test_the_trust_store_sees_a_new_key_file_without_a_restart(tmp_path: Path) -> None:
    now = [0.0]
    curve.generate(tmp_path / "k", "shares")
    store = curve.TrustStore(tmp_path / "k", clock=lambda: now[0])
    other, _ = curve.generate(tmp_path / "other", "jobs")
    key = _pair(tmp_path / "other", "jobs").public_text
    assert store.service_of(key) is None
    os.rename(other, tmp_path / "k" / "jobs.key")
    assert store.service_of(key) is None  # looked less than a second ago
    now[0] += curve.REFRESH_EVERY
    assert store.service_of(key) == "jobs"


def test_a_record_is_believed_only_with_a_key_trusted_for_its_service(tmp_path: Path) -> None:
    curve.generate(tmp_path, "shares")
    curve.generate(tmp_path, "jobs")
    store = curve.TrustStore(tmp_path)
    record = InstanceRecord("shares", "a1", "tcp://127.0.0.1:5000", "127.0.0.1", 1)
    shares, jobs = _pair(tmp_path, "shares").public_text, _pair(tmp_path, "jobs").public_text
    assert curve.record_refusal(store, record) is not None  # no key
    assert "not trusted" in str(curve.record_refusal(store, _with_key(record, "x" * 40)))
    assert "for service 'jobs'" in str(curve.record_refusal(store, _with_key(record, jobs)))
    assert curve.record_refusal(store, _with_key(record, shares)) is None


def _with_key(record: InstanceRecord, key: str) -> InstanceRecord:
    return InstanceRecord(record.service, record.instance_id, record.endpoint, record.host, record.pid,
                          curve_key=key)


def test_the_record_keeps_its_json_without_a_key_and_checks_the_key_grammar() -> None:
    record = InstanceRecord("shares", "a1", "tcp://127.0.0.1:5000", "127.0.0.1", 1)
    assert "curve_key" not in record.to_json()
    keyed = _with_key(record, "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7")
    assert InstanceRecord.from_json(keyed.to_json()) == keyed
    with pytest.raises(ValueError, match="curve key"):
        InstanceRecord.from_json(_with_key(record, "a b" * 14).to_json())
