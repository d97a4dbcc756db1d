"""The README's code map names every module of the package, and only modules that are there."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def mapped_modules(readme: str) -> set[str]:
    """The module paths the "## Code" block names: ``layerfs/x/`` heads a folder whose modules follow
    indented (``  name.py  what it holds``); ``layerfs/x.py`` names one module."""
    block = readme.split("\n## Code\n", 1)[1].split("```")[1]
    found: set[str] = set()
    folder = None
    for line in block.splitlines():
        word = line.split()[0] if line.strip() else ""
        if line.startswith("layerfs/"):
            folder = word if word.endswith("/") else None
            if word.endswith(".py"):
                found.add(word)
        elif folder is not None and re.fullmatch(r"  \w+\.py", line[:2] + word):
            found.add(folder + word)
    return found


def test_the_code_map_lists_every_module_and_no_other():
    modules = {
        str(p.relative_to(ROOT))
        for p in (ROOT / "layerfs").rglob("*.py")
        if p.name != "__init__.py" and p.name != "__main__.py"
    }
    mapped = mapped_modules((ROOT / "README.md").read_text())
    assert not modules - mapped, "modules the README's code map does not name"
    assert not mapped - modules, "modules the README's code map names that are not there"
