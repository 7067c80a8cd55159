"""The package layout holds: one namespace, and imports only run downward.

    app  ->  ingest | processors | sinks | simulators  ->  kafka  ->  codecs  ->  contract, arrays

Every module's imports are read with ``ast`` (function-local ones included), so a dependency
cannot hide inside a function.
"""

from __future__ import annotations

import ast
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "portpulse"
STAGES = ("ingest", "processors", "sinks", "simulators")

#: What each part of the namespace may import from PortPulse (besides itself).
ALLOWED: dict[str, set[str]] = {
    "contract": set(),
    "arrays": {"_arrays"},  # its compiled half
    "codecs": {"contract", "arrays"},
    "kafka": {"contract", "arrays", "codecs"},
    **{stage: {"contract", "arrays", "codecs", "kafka"} for stage in STAGES},
    "app": {"contract", "arrays", "codecs", "kafka", *STAGES},
}
#: Pure modules: no sockets, no event loop, no client libraries.
PURE = [
    "portpulse/codecs/wire.py",
    "portpulse/codecs/recordbatch.py",
    "portpulse/codecs/mqttwire.py",
    "portpulse/arrays.py",
    "portpulse/ingest/decode.py",
    "portpulse/ingest/records.py",
    "portpulse/processors/clean.py",
    "portpulse/processors/window.py",
    "portpulse/processors/engine.py",
    "portpulse/sinks/lineprotocol.py",
]
IO_LIBRARIES = {"asyncio", "socket", "paho", "aiokafka", "influxdb_client", "aiohttp"}


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def imported(path: Path) -> set[str]:
    """Absolute module names ``path`` imports, anywhere in its body."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def part_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.stem == "arrays" else "root"


def test_every_stage_is_a_symlinked_folder_of_the_namespace() -> None:
    for stage in STAGES:
        link = PACKAGE / stage
        assert link.is_symlink(), stage
        assert link.resolve() == (ROOT / stage).resolve()


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_downward(path: Path) -> None:
    part = part_of(path)
    names = imported(path)
    stray = sorted(n for n in names if n.split(".")[0] in STAGES)
    assert not stray, f"{path}: top-level stage imports {stray}; use portpulse.<stage>"
    if part == "root":
        return  # portpulse/__init__ (the contract's re-exports) and __main__ (the command line)
    used = {n.split(".")[1] for n in names if n.startswith("portpulse.")}
    used -= {part}
    assert used <= ALLOWED[part], f"{path} ({part}) imports {sorted(used - ALLOWED[part])}"


@pytest.mark.parametrize("rel", PURE)
def test_pure_modules_import_no_io(rel: str) -> None:
    roots = {n.split(".")[0] for n in imported(PACKAGE.parent / rel)}
    assert not roots & IO_LIBRARIES, f"{rel} imports {sorted(roots & IO_LIBRARIES)}"


def test_installed_modules_come_from_the_one_namespace() -> None:
    for stage in STAGES:
        spec = importlib.util.find_spec(f"portpulse.{stage}")
        assert spec is not None and spec.origin is not None
        assert Path(spec.origin).resolve() == (ROOT / stage / "__init__.py").resolve()


def test_a_wheel_holds_only_the_portpulse_namespace(tmp_path: Path) -> None:
    """Built without network from a copy of the checkout (setuptools builds in its source tree):
    every file under ``portpulse/``, stages included."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so")
    for name in ("portpulse", *STAGES):
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(src),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("portpulse-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.startswith("portpulse-")}
    assert top == {"portpulse"}
    for stage in STAGES:
        want = {f"portpulse/{stage}/{p.name}" for p in (ROOT / stage).glob("*.py")}
        assert want and want <= set(names), stage
    assert "portpulse/contract/catalogue.toml" in names
    assert "portpulse/app/dashboard.html" in names
    for compiled in (
        "portpulse/_arrays.",
        "portpulse/ingest/_lineproto.",
        "portpulse/codecs/_mqttsplit.",
        "portpulse/codecs/_records.",
        "portpulse/sinks/_lineformat.",
        "portpulse/processors/_hampel.",
        "portpulse/processors/_windows.",
    ):
        assert [n for n in names if n.startswith(compiled) and n.endswith(".so")], f"{compiled} not compiled"


def test_the_console_script_and_python_dash_m_run_the_same_command_line() -> None:
    from importlib.metadata import entry_points

    from portpulse.app.cli import main

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "portpulse"]
    assert script.load() is main
    out = subprocess.run([sys.executable, "-m", "portpulse", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("portpulse ")
