"""The dependency rules of the layout, checked on the source: features and rules never import
grpc, the sidecar or capture; capture never imports the sidecar; the serving side of capture
never imports the relay; the runtime half of features never imports its build half; nothing
imports the CLI. And the relay process really starts without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import monitor

PACKAGE = Path(monitor.__file__).resolve().parent
REPO = PACKAGE.parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside functions (absolute names)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


SOURCES = {
    _module_name(p): _imports(p)
    for p in sorted(PACKAGE.rglob("*.py"))
    if "wire/safety_monitor" not in p.as_posix()
}


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


RUNTIME = (
    "monitor.capture",
    "monitor.sidecar",
    "monitor.rules",
    "monitor.features",
    "monitor.outputs",
    "monitor.audit",
    "monitor.wire",
)

# (modules the rule is about, modules they must not import, exceptions to the first set)
RULES = [
    (("monitor.features", "monitor.rules"), ("grpc", "monitor.sidecar", "monitor.capture"), ()),
    (("monitor.capture",), ("monitor.sidecar",), ()),
    # The serving side talks to the relay only through the channel (ring, frames, protocol).
    (
        ("monitor.capture",),
        ("monitor.capture.relay",),
        ("monitor.capture.relay",),
    ),
    # The relay never loads torch (its start-up and memory). The channel's writing half
    # imports torch inside FrameWriter, which only the serving process builds; the fresh
    # interpreter test below checks what the relay really loads. Local encoding in the relay
    # (relay/encode.py) imports torch inside a function, when the first activations it
    # encodes arrive: a relay not asked to encode never does.
    (("monitor.capture.relay",), ("torch", "transformers"), ("monitor.capture.relay.encode",)),
    # The runtime half of features never reaches for the build half.
    (("monitor.features",), ("monitor.features.build",), ("monitor.features.build",)),
    (("monitor",), ("monitor.cli",), ("monitor.cli",)),
    # The runtime never reaches for build-time code, scaffolding or the review page (the
    # review page is its own process; `audit serve` in the audit CLI starts it).
    (
        RUNTIME,
        ("monitor.features.build", "monitor.fixtures", "monitor.audit.review", "monitor.bench"),
        ("monitor.features.build", "monitor.audit.review", "monitor.audit.cli"),
    ),
]


@pytest.mark.parametrize(("owners", "forbidden", "exempt"), RULES)
def test_forbidden_imports(
    owners: tuple[str, ...], forbidden: tuple[str, ...], exempt: tuple[str, ...]
) -> None:
    offenders = [
        f"{module} imports {name}"
        for module, names in SOURCES.items()
        if _under(module, owners) and not _under(module, exempt)
        for name in sorted(names)
        if _under(name, forbidden)
    ]
    assert not offenders, "\n".join(offenders)


def test_datasets_import_nothing_else_of_monitor() -> None:
    # The README's layout: the data sets and their reader stand alone.
    offenders = [
        f"{module} imports {name}"
        for module, names in SOURCES.items()
        if _under(module, ("monitor.datasets",))
        for name in sorted(names)
        if _under(name, ("monitor",)) and not _under(name, ("monitor.datasets",))
    ]
    assert not offenders, "\n".join(offenders)
    assert "monitor.datasets.build" in SOURCES  # not vacuous


def test_the_check_sees_the_modules_it_is_about() -> None:
    # Guards against the rules passing vacuously after a rename.
    for module in (
        "monitor.capture.client",
        "monitor.capture.relay.main",
        "monitor.capture.channel.protocol",
        "monitor.features.pack",
        "monitor.features.build.sae",
        "monitor.rules.engine",
        "monitor.sidecar.service",
    ):
        assert module in SOURCES
    assert "torch" in SOURCES["monitor.capture.client"]
    assert "monitor.capture.channel.protocol" in SOURCES["monitor.capture.relay.main"]


def test_the_relay_starts_without_torch() -> None:
    """Import the relay's entry point in a fresh interpreter: torch must not get loaded."""
    code = (
        "import sys\n"
        "import monitor.capture.relay.main\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"the relay loaded {done.stdout.strip()}"
