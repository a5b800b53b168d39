"""The README's layout section matches the package tree file by file, and the layer contract holds."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "aegir"


def _layout_block() -> str:
    """The ``src/aegir/`` part of the README's layout block (up to the ``bench/`` line)."""
    text = (ROOT / "README.md").read_text()
    start = text.index("## Layout")
    block = text[text.index("```", start) + 3: text.index("```", text.index("```", start) + 3)]
    return block[: block.index("\nbench/")]


def _package_dirs(block: str) -> dict[str, list[str]]:
    """Package folder named in the block (``cli``, ``ducklake``, …) → the ``*.py`` names listed in it.

    Entries are indented under their folder; a line indented past the entry column (30+) continues the
    previous entry's description and belongs to the same folder."""
    listed: dict[str, list[str]] = {}
    stack: list[tuple[int, str]] = [(-1, "aegir")]
    owner = "aegir"
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent < 30:
            while stack[-1][0] >= indent:
                stack.pop()
            folder = re.match(r"^\s*([a-z_]+)/(\s|$)", line)
            if folder:
                stack.append((indent, folder.group(1)))
            owner = stack[-1][1]
        listed.setdefault(owner, []).extend(re.findall(r"\b([a-z_0-9]+\.py)\b", line))
    return listed


def test_every_module_is_in_the_readme_layout() -> None:
    block = _layout_block()
    names = set(re.findall(r"\b([a-z_0-9]+\.py)\b", block))
    modules = sorted(p.relative_to(PACKAGE) for p in PACKAGE.rglob("*.py"))
    assert len(modules) > 80
    missing = [str(m) for m in modules
               if m.name not in names and not (m.name == "__init__.py" and f"{m.parent.name}/" in block)]
    assert missing == [], f"modules missing from the README layout: {missing}"


def test_every_file_in_the_readme_layout_exists() -> None:
    listed = _package_dirs(_layout_block())
    files = {p.name for p in PACKAGE.rglob("*.py")}
    named = {name for names in listed.values() for name in names}
    assert len(named) > 80
    assert sorted(named - files) == [], "the README layout names files that do not exist"
    for folder, names in listed.items():
        if folder in {"aegir", "src"} or not names:
            continue
        where = [p for p in PACKAGE.rglob(folder) if p.is_dir()]
        assert where, f"README layout folder {folder}/ does not exist"
        assert all(any((d / n).exists() for d in where) for n in names), (folder, names)


def test_no_module_over_400_lines_without_a_stated_reason() -> None:
    long = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    over = {name: n for name, n in long.items() if n > 410}
    unexplained = [name for name in over if "Length:" not in (PACKAGE / name).read_text()[:4000]]
    assert unexplained == [], f"modules over ~400 lines without a 'Length:' reason in their docstring: {over}"


@pytest.mark.skipif(shutil.which("lint-imports", path=str(Path(sys.executable).parent)) is None,
                    reason="import-linter (dev extra) is not installed")
def test_layer_contract_holds() -> None:
    binary = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    run = subprocess.run([binary], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:]
    assert "Contracts: 2 kept, 0 broken." in run.stdout
