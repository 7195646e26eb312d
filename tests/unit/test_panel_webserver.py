"""The panel's options: where it listens, read from settings and checked; its URL file."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshkit.config import Settings
from meshkit.errors import ConfigError
from meshkit.panel.webserver import PanelOptions
from meshkit.panelurl import read_url, remove_url, write_url


def test_options_come_from_the_environment_and_default_to_loopback_and_port_0() -> None:
    assert PanelOptions() == PanelOptions(host="127.0.0.1", port=0)
    options = Settings.load(env={"MESHKIT_PANEL_PORT": "8700", "MESHKIT_PANEL_TAP_MAX_RPS": "5"}).section(
        PanelOptions, "panel")
    assert (options.host, options.port, options.tap_max_rps) == ("127.0.0.1", 8700, 5.0)


@pytest.mark.parametrize("changes", [{"port": 70000}, {"port": -1}, {"refresh": 0}, {"tap_max_rps": -1},
                                     {"queue_bytes": 0}])
def test_bad_options_are_refused(changes: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        PanelOptions(**changes)  # type: ignore[arg-type]


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("::1", True), ("localhost", True),
                                            ("0.0.0.0", False), ("10.1.2.3", False), ("box.example", False)])
def test_only_loopback_addresses_count_as_loopback(host: str, loopback: bool) -> None:
    assert PanelOptions(host=host).loopback is loopback


def test_the_url_file_is_written_read_and_removed(tmp_path: Path) -> None:
    assert read_url(str(tmp_path)) is None
    write_url(str(tmp_path), "http://127.0.0.1:41873/")
    assert read_url(str(tmp_path)) == "http://127.0.0.1:41873/"
    (tmp_path / "panel.url").write_text("javascript:alert(1)\n")
    assert read_url(str(tmp_path)) is None  # not a URL the panel wrote
    remove_url(str(tmp_path))
    remove_url(str(tmp_path))
    assert read_url(str(tmp_path)) is None
