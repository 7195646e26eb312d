"""Structured logging: JSON and text lines, trace ids, levels, install and removal."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from meshkit.config import Settings
from meshkit.context import CallContext, reset_current, set_current
from meshkit.errors import ConfigError
from meshkit.logs import configure_logging, reset_logging
from meshkit.trace import TraceContext

log = logging.getLogger("meshkit.test")


@pytest.fixture(autouse=True)
def _clean_logging() -> Iterator[None]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        yield
    finally:
        reset_logging()
        assert root.level == level
        assert root.handlers == handlers


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def _json(service: str = "echo", **settings: Any) -> io.StringIO:
    stream = io.StringIO()
    configure_logging(Settings(**settings), service, "ab12cd", stream=stream)
    return stream


def test_json_line_has_the_standard_fields() -> None:
    stream = _json()
    log.info("served %s", "ping")
    (line,) = _lines(stream)
    assert line["level"] == "INFO"
    assert line["service"] == "echo"
    assert line["instance"] == "ab12cd"
    assert line["logger"] == "meshkit.test"
    assert line["event"] == "served ping"
    assert line["trace_id"] is None and line["span_id"] is None
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
    assert "\n" not in stream.getvalue().rstrip("\n")


def test_json_line_carries_the_current_trace() -> None:
    stream = _json()
    trace = TraceContext.new_root()
    token = set_current(CallContext(service="echo", name="ping", trace=trace))
    try:
        log.info("inside")
    finally:
        reset_current(token)
    log.info("outside")
    inside, outside = _lines(stream)
    assert (inside["trace_id"], inside["span_id"]) == (trace.trace_id, trace.span_id)
    assert outside["trace_id"] is None
    # The form docs/logging.md tells people to grep for.
    assert f'"trace_id":"{trace.trace_id}"' in stream.getvalue()


def test_extras_are_fields_and_made_json_safe() -> None:
    stream = _json()

    class Opaque:
        def __str__(self) -> str:
            return "opaque!"

    log.warning(
        "odd",
        extra={
            "method": "ping",
            "n": 3,
            "obj": Opaque(),
            "nan": float("nan"),
            "service": "billing",
        },
    )
    (line,) = _lines(stream)
    assert line["method"] == "ping"
    assert line["n"] == 3
    assert line["obj"] == "opaque!"
    assert line["nan"] == "nan"
    # An extra may not hide a standard field.
    assert line["service"] == "echo"
    assert line["extra_service"] == "billing"


def test_exception_is_written_as_exc() -> None:
    stream = _json()
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    (line,) = _lines(stream)
    assert line["level"] == "ERROR"
    assert line["exc"].startswith("Traceback")
    assert "ValueError: boom" in line["exc"]


def test_text_format_is_one_readable_line() -> None:
    stream = _json(log_format="text")
    trace = TraceContext.new_root()
    token = set_current(CallContext(service="echo", name="ping", trace=trace))
    try:
        log.info("served", extra={"method": "ping", "note": "two words"})
    finally:
        reset_current(token)
    text = stream.getvalue()
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d\.\d{3} INFO  echo/ab12cd served method=ping note=\"two words\" "
        rf"\[trace={trace.trace_id[:8]}\]\n",
        text,
    )


def test_text_format_puts_the_traceback_below() -> None:
    stream = _json(log_format="text")
    try:
        raise KeyError("k")
    except KeyError:
        log.error("failed", exc_info=True)
    first, *rest = stream.getvalue().splitlines()
    assert first.endswith("ERROR echo/ab12cd failed")
    assert rest[0].startswith("Traceback") and rest[-1] == "KeyError: 'k'"


def test_level_comes_from_the_service_overrides() -> None:
    settings = {"service_overrides": {"echo": {"log_level": "DEBUG"}}}
    stream = _json("other", **settings)
    log.debug("hidden")
    assert logging.getLogger().level == logging.INFO
    assert stream.getvalue() == ""
    stream = _json("echo", **settings)
    log.debug("shown")
    assert logging.getLogger().level == logging.DEBUG
    assert [line["event"] for line in _lines(stream)] == ["shown"]


def test_library_loggers_are_left_to_follow_the_root() -> None:
    names = ("asyncio", "zmq", "urllib3")
    before = {n: (logging.getLogger(n).level, list(logging.getLogger(n).handlers)) for n in names}
    _json(log_level="DEBUG")
    after = {n: (logging.getLogger(n).level, list(logging.getLogger(n).handlers)) for n in names}
    assert after == before


def test_configure_twice_installs_one_handler() -> None:
    root = logging.getLogger()
    count = len(root.handlers)
    first = _json()
    second = _json()
    assert len(root.handlers) == count + 1
    log.info("once")
    assert first.getvalue() == ""
    assert [line["event"] for line in _lines(second)] == ["once"]


def test_unknown_level_is_a_config_error_and_changes_nothing() -> None:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    with pytest.raises(ConfigError):
        _json(log_level="LOUD")
    assert (root.handlers, root.level) == (handlers, level)


def test_reset_removes_the_handler() -> None:
    stream = _json()
    reset_logging()
    log.warning("after reset")
    assert stream.getvalue() == ""
    reset_logging()  # nothing installed: a no-op


def test_importing_the_module_configures_nothing() -> None:
    code = (
        "import logging\n"
        "root = logging.getLogger()\n"
        "before = (root.level, list(root.handlers), dict(logging.Logger.manager.loggerDict))\n"
        "import meshkit.logs\n"
        "after = (root.level, list(root.handlers), dict(logging.Logger.manager.loggerDict))\n"
        "assert before[:2] == after[:2], (before, after)\n"
        "assert all(not getattr(lg, 'handlers', None) for lg in after[2].values()), after\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


# -- a last line of defence: one record, one bounded line ---------------------


def test_json_line_is_bounded_and_stays_json() -> None:
    stream = _json(max_log_line=4096)
    log.warning("rejected %s", "m" * (4 << 20), extra={"method": "x" * 100_000, "count": 3})
    (line,) = stream.getvalue().splitlines()
    assert len(line) <= 4096
    record = json.loads(line)
    assert record["truncated"] is True and record["count"] == 3
    assert record["event"].startswith("rejected mmm") and record["level"] == "WARNING"


def test_json_traceback_keeps_its_end_within_the_bound() -> None:
    stream = _json(max_log_line=4096)
    try:
        raise ValueError("v" * 100_000)
    except ValueError:
        log.exception("handler failed")
    (line,) = stream.getvalue().splitlines()
    assert len(line) <= 4096
    record = json.loads(line)
    assert record["event"] == "handler failed" and record["exc"].endswith("v")


def test_text_record_is_bounded() -> None:
    stream = io.StringIO()
    configure_logging(Settings(log_format="text", max_log_line=4096), "echo", "ab12cd", stream=stream)
    try:
        raise ValueError("v" * 100_000)
    except ValueError:
        log.exception("failed %s", "m" * (1 << 20))
    assert len(stream.getvalue()) <= 4096 + 1
    assert stream.getvalue().endswith("v\n")


def test_short_lines_are_untouched() -> None:
    stream = _json(max_log_line=4096)
    log.info("served %s", "ping", extra={"method": "ping"})
    (record,) = _lines(stream)
    assert "truncated" not in record and record["event"] == "served ping"
