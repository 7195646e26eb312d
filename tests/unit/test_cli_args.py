"""What the command line means and prints, and which Redis it picks: pure, no I/O."""

from __future__ import annotations

import argparse
import json

import pytest

from meshkit.cli import build_parser, main, parse
from meshkit.cli.args import UsageError, parse_call_args, positive_seconds
from meshkit.cli.localredis import export_line
from meshkit.cli.output import EXIT_FAILED, EXIT_USAGE, error_payload, exit_status
from meshkit.cli.reach import REFUSED, verdict_of
from meshkit.config import DEFAULT_REDIS_URL, Settings
from meshkit.errors import CallTimeoutError, ConfigError, HandlerError, NoInstanceError, RegistryUnreachableError
from meshkit.rundir import RegistryChoice, choose_registry
from meshkit.storage import redacted_url

# -- call arguments -------------------------------------------------------------------


def test_each_argument_is_a_json_value() -> None:
    assert parse_call_args(["42", '"text"', "[1, 2]", '{"a": null}', "true", "-1.5"]) == (
        [42, "text", [1, 2], {"a": None}, True, -1.5], {})


def test_key_equals_json_is_a_keyword_argument() -> None:
    args, kwargs = parse_call_args(['who="world"', "1", "times=3", "opts={\"x\": [1]}"])
    assert args == [1]
    assert kwargs == {"who": "world", "times": 3, "opts": {"x": [1]}}


def test_json_that_merely_contains_an_equals_sign_stays_positional() -> None:
    assert parse_call_args(['"a=b"', '{"k=v": 1}']) == (["a=b", {"k=v": 1}], {})


@pytest.mark.parametrize("token", ["{bad", "world", "", "'single'", "[1,", "NaN", "Infinity", "-Infinity"])
def test_an_argument_that_is_not_json_is_a_usage_error(token: str) -> None:
    with pytest.raises(UsageError, match="argument 1 is not valid JSON") as info:
        parse_call_args([token])
    assert "--raw" in str(info.value)


def test_a_keyword_value_that_is_not_json_names_the_keyword() -> None:
    with pytest.raises(UsageError, match="keyword argument 'who' is not valid JSON"):
        parse_call_args(["who=world"])


def test_a_keyword_given_twice_is_an_error() -> None:
    with pytest.raises(UsageError, match="'x' is given twice"):
        parse_call_args(["x=1", "x=2"])


def test_raw_takes_every_value_as_a_string() -> None:
    assert parse_call_args(["{bad", "42", "lang=en", "n=3"], raw=True) == (["{bad", "42"], {"lang": "en", "n": "3"})


def test_a_huge_bad_argument_is_clipped_in_the_error() -> None:
    with pytest.raises(UsageError) as info:
        parse_call_args(["{" * 100_000])
    assert len(str(info.value)) < 600


@pytest.mark.parametrize("text", ["0", "-1", "nan", "inf", "abc", ""])
def test_timeouts_must_be_positive_finite_seconds(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        positive_seconds(text)
    assert positive_seconds("0.25") == 0.25


# -- the parser -------------------------------------------------------------------


def test_options_may_come_between_call_arguments() -> None:
    args = parse(build_parser(), ["call", "hello", "greet", "a", "--raw", "b", "--timeout", "2", "-3", "c"])
    assert (args.service, args.method, args.args, args.raw, args.timeout) == (
        "hello", "greet", ["a", "b", "-3", "c"], True, 2.0)


@pytest.mark.parametrize("argv", [["call", "s", "m", "x", "--bogus"], ["ls", "a", "b"],
                                  ["call", "s", "m", "--timeout", "-1"]])
def test_unknown_options_and_extra_arguments_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse(build_parser(), argv)
    assert info.value.code == 2


def test_bad_json_fails_before_any_io(capsys: pytest.CaptureFixture[str]) -> None:
    # No Redis anywhere: the argument is refused before the registry is looked for.
    assert main(["call", "svc", "m", "{bad"]) == EXIT_USAGE
    assert "argument 1 is not valid JSON" in capsys.readouterr().err
    assert main(["call", "--json", "svc", "m", "ok=1", "{bad"]) == EXIT_USAGE
    out = json.loads(capsys.readouterr().out)
    assert out["error"]["code"] == "usage" and "argument 1" in out["error"]["message"]


def test_a_publish_payload_that_is_not_json_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["publish", "news", "{bad"]) == EXIT_USAGE
    assert "the payload is not valid JSON" in capsys.readouterr().err


# -- errors as printed ----------------------------------------------------------------


def test_exit_statuses() -> None:
    assert exit_status(NoInstanceError("x")) == EXIT_FAILED
    assert exit_status(RegistryUnreachableError("redis://db", "x")) == EXIT_FAILED
    assert exit_status(UsageError("x")) == EXIT_USAGE
    assert exit_status(ConfigError("x")) == EXIT_USAGE


def test_json_error_payloads_carry_a_stable_code() -> None:
    assert error_payload(CallTimeoutError("late", service="s", method="m")) == {
        "code": "timeout", "message": "late", "service": "s", "method": "m"}
    handler = error_payload(HandlerError("boom", service="s", method="m", remote_type="ValueError"))
    assert (handler["code"], handler["remote_type"]) == ("handler_error", "ValueError")
    assert error_payload(RegistryUnreachableError("redis://db", "gone"))["code"] == "registry_unreachable"
    assert error_payload(ConfigError("bad"))["code"] == "config"


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:s3cret@db:7000/0", "redis://:***@db:7000/0"),
    ("redis://user:s3cret@db/1", "redis://user:***@db/1"),
    ("rediss://db:6380/0?password=s3cret&ssl_cert_reqs=none", "rediss://db:6380/0?password=***&ssl_cert_reqs=none"),
    ("unix:///run/x/redis.sock", "unix:///run/x/redis.sock"),
    ("unix:///run/x/redis.sock?password=s3cret", "unix:///run/x/redis.sock?password=***"),
    ("redis://db:7000/0", "redis://db:7000/0"),
])
def test_passwords_are_masked(url: str, shown: str) -> None:
    assert redacted_url(url) == shown


def test_export_line_quotes_what_the_shell_would_split() -> None:
    assert export_line("unix:///a/b.sock") == "export MESHKIT_REDIS_URL=unix:///a/b.sock"
    assert export_line("unix:///my dir/b.sock") == "export MESHKIT_REDIS_URL='unix:///my dir/b.sock'"


def test_probe_events() -> None:
    import zmq

    assert verdict_of(zmq.EVENT_HANDSHAKE_SUCCEEDED) == (True, None)
    assert verdict_of(zmq.EVENT_CONNECT_RETRIED) == (True, REFUSED)
    assert verdict_of(zmq.EVENT_CONNECTED) == (False, None)


# -- which Redis -------------------------------------------------------------------

RUN = "/proj/.run"
STACK = {"MESHKIT_RUN_DIR": RUN, "MESHKIT_REDIS_URL": "unix:///proj/.run/redis.sock", "MESHKIT_NAMESPACE": "demo"}


def choose(env: dict[str, str], answering: frozenset[str] = frozenset(), stack: dict[str, str] | None = None,
           **settings: object) -> RegistryChoice:
    return choose_registry(Settings.load(None, env, **settings), env, run_dir=RUN, local_dir="/proj/.redis",
                           answers=lambda url: url in answering, stack_env=lambda run_dir: stack)


def test_a_named_redis_is_used_as_given() -> None:
    choice = choose({"MESHKIT_REDIS_URL": "redis://db:1/0"}, stack=STACK)
    assert (choice.settings.redis_url, choice.explicit, choice.origin) == ("redis://db:1/0", True, "MESHKIT_REDIS_URL")
    assert choose({}, stack=STACK, redis_url="redis://file:1/0").origin == "the settings file"


def test_a_running_stack_gives_its_redis_and_namespace() -> None:
    choice = choose({}, stack=STACK)
    assert (choice.settings.redis_url, choice.settings.namespace) == ("unix:///proj/.run/redis.sock", "demo")
    assert not choice.explicit and choice.origin == f"the stack running from {RUN}"
    assert choice.describe() == f"unix:///proj/.run/redis.sock, namespace demo (the stack running from {RUN})"
    # A namespace the user set wins over the stack's.
    assert choose({"MESHKIT_NAMESPACE": "mine"}, stack=STACK).settings.namespace == "mine"


def test_an_orphaned_embedded_redis_then_the_background_one() -> None:
    embedded, local = "unix:///proj/.run/redis.sock", "unix:///proj/.redis/redis.sock"
    assert choose({}, frozenset({embedded, local})).settings.redis_url == embedded
    choice = choose({}, frozenset({local}))
    assert choice.settings.redis_url == local
    assert choice.origin == "the Redis of `meshkit redis start` in /proj/.redis"


def test_nothing_found_says_it_is_the_default() -> None:
    choice = choose({})
    assert choice.settings.redis_url == DEFAULT_REDIS_URL and not choice.explicit
    assert "the default: MESHKIT_REDIS_URL is not set" in choice.describe()

