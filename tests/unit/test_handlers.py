"""The @rpc / @subscribe / @periodic decorators and the table collected from a class."""

from __future__ import annotations

from typing import Any

import pytest

from meshkit.handlers import Handler, HandlerTable, Periodic, periodic, rpc, subscribe


class Base:
    @rpc
    def echo(self, value: Any) -> Any:
        return value

    @rpc(idempotent=True)
    async def total(self, user: str, *, currency: str = "EUR") -> str:
        return f"{user}:{currency}"

    @rpc(name="ping")
    def _ping_impl(self) -> str:
        return "pong"

    @rpc
    def overridden(self) -> str:
        return "base"

    @rpc
    def hidden_by_plain_override(self) -> str:
        return "base"

    @subscribe("jobs.new", "jobs.*")
    def on_job(self, payload: Any) -> None:
        pass

    @periodic(2)
    async def tick(self) -> None:
        pass

    def helper(self) -> str:
        return "not an entry point"


class Child(Base):
    @rpc(idempotent=True)
    def overridden(self) -> str:
        return "child"

    def hidden_by_plain_override(self) -> str:
        return "child, not exported"

    @subscribe("jobs.new")
    async def also_on_job(self, payload: Any) -> None:
        pass

    @rpc
    @periodic(0.5)
    def both(self) -> str:
        return "both"


def test_rpc_marks_without_wrapping() -> None:
    def f() -> None:
        pass

    assert rpc(f) is f
    assert rpc(idempotent=True)(f) is f
    mark = f.__meshkit_rpc__  # type: ignore[attr-defined]
    assert mark["name"] == "f" and mark["idempotent"] is True


@pytest.mark.parametrize("topics", [(), ("",), ("ok", ""), (b"bytes",), (None,)], ids=repr)
def test_subscribe_needs_topic_strings(topics: tuple[Any, ...]) -> None:
    with pytest.raises(TypeError):
        subscribe(*topics)


@pytest.mark.parametrize("interval", [0, -1, -0.5])
def test_periodic_needs_a_positive_interval(interval: float) -> None:
    with pytest.raises(ValueError):
        periodic(interval)


def test_collect_methods() -> None:
    obj = Base()
    table = HandlerTable.collect(obj)
    assert set(table.methods) == {"echo", "total", "ping", "overridden", "hidden_by_plain_override"}
    echo = table.methods["echo"]
    assert echo == Handler("echo", obj.echo, is_async=False, idempotent=False)
    assert echo.fn(3) == 3  # bound to the instance
    total = table.methods["total"]
    assert total.is_async and total.idempotent
    assert table.methods["ping"].fn() == "pong"
    assert "helper" not in table.methods and "_ping_impl" not in table.methods


def test_collect_topics_and_periodic() -> None:
    obj = Base()
    table = HandlerTable.collect(obj)
    assert set(table.topics) == {"jobs.new", "jobs.*"}
    (handler,) = table.topics["jobs.new"]
    assert handler == Handler("jobs.new", obj.on_job, is_async=False)
    assert table.topics["jobs.*"][0].fn == obj.on_job
    assert table.periodic == [Periodic("tick", obj.tick, 2.0, is_async=True)]
    assert isinstance(table.periodic[0].interval, float)


def test_collect_follows_inheritance() -> None:
    obj = Child()
    table = HandlerTable.collect(obj)
    assert set(table.methods) == {"echo", "total", "ping", "overridden", "both"}
    overridden = table.methods["overridden"]
    assert overridden.fn() == "child"  # the subclass's method wins
    assert overridden.idempotent  # with the subclass's flags
    # A plain override without @rpc withdraws the method.
    assert "hidden_by_plain_override" not in table.methods
    assert [h.fn for h in table.topics["jobs.new"]] == [obj.also_on_job, obj.on_job]
    assert table.topics["jobs.new"][0].is_async
    assert {p.name: p.interval for p in table.periodic} == {"both": 0.5, "tick": 2.0}
    assert table.methods["both"].fn() == "both"


def test_tables_are_per_instance() -> None:
    a, b = Base(), Base()
    assert HandlerTable.collect(a).methods["echo"].fn.__self__ is a  # type: ignore[attr-defined]
    assert HandlerTable.collect(b).methods["echo"].fn.__self__ is b  # type: ignore[attr-defined]


def test_empty_class() -> None:
    table = HandlerTable.collect(object())
    assert (table.methods, table.topics, table.periodic) == ({}, {}, [])


def test_topic_handlers_exact_then_patterns() -> None:
    obj = Child()
    table = HandlerTable.collect(obj)
    exact_then_pattern = [obj.also_on_job, obj.on_job, obj.on_job]
    assert [h.fn for h in table.topic_handlers("jobs.new")] == exact_then_pattern
    assert [h.fn for h in table.topic_handlers("jobs.old")] == [obj.on_job]
    assert [h.fn for h in table.topic_handlers("jobs.a.b")] == [obj.on_job]
    assert table.topic_handlers("jobs") == []
    assert table.topic_handlers("jobsx.new") == []
    assert table.topic_handlers("other") == []


def test_pattern_topic_sent_literally_is_not_counted_twice() -> None:
    class S:
        @subscribe("a.*")
        def on_a(self, payload: Any) -> None:
            pass

    obj = S()
    assert [h.fn for h in HandlerTable.collect(obj).topic_handlers("a.*")] == [obj.on_a]


def test_nested_patterns() -> None:
    class S:
        @subscribe("a.*")
        def wide(self, payload: Any) -> None:
            pass

        @subscribe("a.b.*")
        def narrow(self, payload: Any) -> None:
            pass

    obj = S()
    table = HandlerTable.collect(obj)
    assert {h.fn.__name__ for h in table.topic_handlers("a.b.c")} == {"wide", "narrow"}
    assert [h.fn for h in table.topic_handlers("a.c")] == [obj.wide]


def _handler(fn: Any) -> Handler:
    return Handler("m", fn, is_async=False)


def test_check_arguments_accepts_what_fits() -> None:
    obj = Base()
    assert _handler(obj.echo).check_arguments([1], {}) is None
    assert _handler(obj.echo).check_arguments([], {"value": 1}) is None
    assert _handler(obj.total).check_arguments(["u"], {"currency": "USD"}) is None


@pytest.mark.parametrize(
    ("args", "kwargs", "problem"),
    [
        ([], {}, "missing a required argument: 'value'"),
        ([1, 2], {}, "too many positional arguments"),
        ([1], {"value": 2}, "multiple values for argument 'value'"),
        ([], {"nope": 1}, "missing a required argument: 'value'"),
        ([1], {"nope": 1}, "got an unexpected keyword argument 'nope'"),
    ],
)
def test_check_arguments_explains_what_does_not_fit(
    args: list[Any], kwargs: dict[str, Any], problem: str
) -> None:
    assert _handler(Base().echo).check_arguments(args, kwargs) == problem


def test_check_arguments_keyword_only() -> None:
    handler = _handler(Base().total)
    assert handler.check_arguments(["u", "USD"], {}) == "too many positional arguments"


def test_check_arguments_var_args() -> None:
    def anything(*args: Any, **kwargs: Any) -> None:
        pass

    assert _handler(anything).check_arguments([1, 2, 3], {"x": 1}) is None


def _prefix_table() -> HandlerTable:
    async def on_job(payload: Any) -> None:
        pass

    return HandlerTable({}, {"jobs.*": [Handler("jobs.*", on_job, True)]}, [])


def test_topic_cache_is_bounded_by_bytes() -> None:
    # 300 pushes to jobs.<512 KiB of random> grew a gateway by 151 MiB: the
    # cache kept every topic it matched, whatever its size.
    table = _prefix_table()
    table.cache_bytes = 256 * 1024
    for i in range(300):
        topic = f"jobs.{i:04d}." + "x" * 4000
        assert [h.name for h in table.topic_handlers(topic)] == ["jobs.*"]
    assert 0 < table.cached_bytes <= 256 * 1024
    assert table.topic_handlers("jobs." + "y" * (1 << 20))  # too big to cache, still answered
    assert table.cached_bytes <= 256 * 1024


def test_topic_cache_forgets_the_oldest_and_keeps_answering() -> None:
    table = _prefix_table()
    table.cache_bytes = 8 * 1024
    first = table.topic_handlers("jobs.first")
    for i in range(200):
        table.topic_handlers(f"jobs.{i}")
    assert table.topic_handlers("jobs.first") == first
    assert table.cached_bytes <= 8 * 1024


def test_topic_cache_of_zero_bytes_caches_nothing() -> None:
    table = _prefix_table()
    table.cache_bytes = 0
    assert table.topic_handlers("jobs.a")
    assert table.cached_bytes == 0


def test_topic_cache_default_bound_holds_against_big_topics() -> None:
    table = _prefix_table()
    for i in range(300):
        table.topic_handlers(f"jobs.{i:04d}." + "x" * 65_536)
    assert 0 < table.cached_bytes <= 1024 * 1024
