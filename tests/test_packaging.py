"""Every package folder is in the distribution (normal installs too, not just editable ones)."""
from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_and_mapped():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping, packages = tool["package-dir"], set(tool["packages"])
    folders = {str(p.parent.relative_to(ROOT)) for root in ("calbench", "iocs", "devices", "plans",
                                                               "analysis")
               for p in (ROOT / root).rglob("__init__.py") if "__pycache__" not in p.parts}
    mapped = {folder: package for package, folder in mapping.items()}
    assert folders <= set(mapped), f"package folders missing from package-dir: {folders - set(mapped)}"
    assert {mapped[f] for f in folders} <= packages
