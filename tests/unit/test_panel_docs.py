"""docs/panel.md cannot drift from the code: every WebSocket frame, state and option is described there."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from meshkit.panel.webserver import PanelOptions

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "panel.md").read_text()
CODE = "\n".join((ROOT / "meshkit" / "panel" / name).read_text()
                 for name in ("app.py", "taps.py", "feed.py", "panel.py"))


def test_every_frame_type_and_tap_state_sent_is_in_the_doc() -> None:
    types = set(re.findall(r'"type": "(\w+)"', CODE))
    states = set(re.findall(r'"state": "([\w-]+)"', CODE))
    assert {"state", "event", "tap", "dropped", "error"} <= types
    assert {"open", "closed", "instance-closed", "limited"} <= states
    for word in types:
        assert f'"type": "{word}"' in DOC, word
    for word in states:
        assert f'"{word}"' in DOC, word


def test_every_option_is_in_the_doc_with_its_variable() -> None:
    for option in dataclasses.fields(PanelOptions):
        assert f"MESHKIT_PANEL_{option.name.upper()}" in DOC, option.name
        assert f"`{option.name}`" in DOC, option.name
