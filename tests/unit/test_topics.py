"""Topic matching: exact topics and ``prefix.*`` patterns, one rule for every reader."""

from __future__ import annotations

import pytest

from meshkit.topics import topic_matches


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
