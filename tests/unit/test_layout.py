"""The package's layout, pinned: layers import downward only, no import circle, markers in place.

The layers are those drawn in ``docs/architecture.md``. A new module must be
given its layer here, which is the moment to ask where it belongs.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "meshkit"

# Lowest first. A module may import its own layer and those below, never above.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("codes", "loops", "errors", "untrusted", "trace", "timing", "stepped", "clock", "topics", "keys",
                    "names", "programs", "tasks", "sections", "config", "decoder", "transport", "context",
                    "leases", "signature", "concurrency", "tally", "datagrams", "redisconn", "loopbridge", "panelurl")),
    ("vocabulary", ("wire", "record", "budget", "statsd", "metrics", "logs", "handlers", "quota", "curve", "zap",
                    "access")),
    ("registry", ("storage", "registry", "registration", "rundir", "resources")),
    ("calls", ("peer", "pool", "publish", "client", "blocking", "inbox", "limits", "invoke", "answers", "server",
               "exchange", "observe", "ejection", "retrybudget", "cancels", "sequence", "pushes", "streams", "calls",
               "proxy", "attempts")),
    ("service", ("service", "jobs", "runner")),
    ("roles", ("gateway", "haproxy", "stack", "testing", "panel")),
    ("commands", ("cli", "__main__", "")),  # "" is the package itself: meshkit/__init__.py
]


def layer_of(module: str) -> int:
    """The layer of ``module`` (``"gateway.service"``, ``"wire"``; ``""`` for the package)."""
    head = module.split(".", 1)[0]
    for rank, (_, heads) in enumerate(LAYERS):
        if head in heads:
            return rank
    raise AssertionError(f"meshkit.{module} has no layer: add it to LAYERS and to docs/architecture.md")


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The meshkit modules ``module`` imports (at any depth of its code, lazily or not)."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    package = [p for p in package if p]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
            elif node.module and node.module.split(".")[0] == "meshkit":
                base = []
            else:
                continue
            target = ".".join(base + (node.module.split(".") if node.module else []))
            if node.level == 0 and node.module:
                target = ".".join(node.module.split(".")[1:])
            names = [f"{target}.{a.name}" if target else a.name for a in node.names]
            submodules = [n for n in names if n in known]
            found.update(submodules or ([target] if target in known else []))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "meshkit":
                    name = ".".join(alias.name.split(".")[1:])
                    if name in known:
                        found.add(name)
    found.discard(module)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {module: imports(module, path, known) for module, path in known.items()}


def test_every_import_runs_downward() -> None:
    upward = [f"meshkit.{a} ({LAYERS[layer_of(a)][0]}) imports meshkit.{b} ({LAYERS[layer_of(b)][0]})"
              for a, targets in graph().items() for b in targets if layer_of(b) > layer_of(a)]
    assert not upward, upward


def test_there_is_no_import_circle() -> None:
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                circles.append([*path[path.index(target):], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    # The package itself hands names on (meshkit/__init__.py); importing it
    # from below is an import of those names, drawn as the upward arrows above.
    assert not [c for c in circles if "" not in c], circles


def test_every_integration_file_carries_the_marker() -> None:
    unmarked = [path.name for path in sorted((ROOT / "tests" / "integration").glob("test_*.py"))
                if "\npytestmark = pytest.mark.integration\n" not in path.read_text()]
    assert not unmarked, unmarked
