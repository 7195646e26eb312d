"""load_class: MODULE:CLASS must name an importable Service subclass, or a ConfigError says why."""

from __future__ import annotations

import pytest

from meshkit.errors import ConfigError
from meshkit.runner import load_class


def test_a_service_class_is_loaded() -> None:
    cls = load_class("inprocess:Shop")
    assert cls.name == "shop"


@pytest.mark.parametrize(("target", "message"), [
    ("no-colon", "expected MODULE:CLASS"),
    (":Shop", "expected MODULE:CLASS"),
    ("inprocess:", "expected MODULE:CLASS"),
    ("meshkit_no_such_module:X", "cannot import 'meshkit_no_such_module'"),
    ("inprocess:WAIT", "is not a meshkit.Service subclass"),
    ("inprocess:Missing", "is not a meshkit.Service subclass"),
])
def test_a_bad_target_is_a_config_error(target: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_class(target)
