"""The layers of DESIGN.md, checked on the source: every import (module level or lazy, absolute or
relative) of every package folder is resolved to a calbench module or an outside package and held
against the rules below. A new import that breaks a rule fails here, naming the file, the line and
the import.

(import-linter cannot see this tree: setuptools maps folders beside calbench/ into the package, so
the layout on disk is not the package's.)
"""
from __future__ import annotations

import ast
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Rule:
    source: str                    # a package (its submodules included)
    forbidden: tuple[str, ...]     # packages or modules it must not import
    why: str
    allowed: tuple[str, ...] = ()  # modules or packages of `source` the rule does not hold for


RULES = [
    Rule("calbench.contracts", ("calbench",), "contracts lie below every layer"),
    Rule("calbench.iocs.sim", ("calbench.iocs", "calbench.analysis", "calbench.devices",
                               "calbench.plans", "calbench.procedures"),
         "a simulator is a backend: it imports the contracts and its own package only"),
    Rule("calbench.iocs.hw", ("calbench.iocs", "calbench.analysis", "calbench.devices",
                              "calbench.plans", "calbench.procedures"),
         "a hardware driver is a backend: it imports the contracts and its own package only"),
    Rule("calbench.iocs", ("calbench.iocs.sim", "calbench.iocs.hw"),
         "an IOC serves any backend: it shares instrument facts and data types with them through "
         "calbench.contracts; only the builders choose one",
         allowed=("calbench.iocs.sim", "calbench.iocs.hw", "calbench.iocs.build",
                  "calbench.iocs.bench_world")),
    Rule("calbench.iocs", ("calbench.analysis", "calbench.devices", "calbench.plans",
                           "calbench.session", "ophyd", "bluesky"),
         "IOCs serve PVs: no analysis, no clients of their own PVs"),
    Rule("calbench.devices", ("calbench.iocs", "calbench.plans", "calbench.session"),
         "the PV names are the only contract between devices and IOCs"),
    Rule("calbench.devices", ("calbench.analysis",),
         "devices share geometry and limits with the analysis through calbench.contracts"),
    Rule("calbench.analysis", ("calbench.iocs", "calbench.devices", "calbench.plans",
                               "calbench.session", "ophyd", "caproto", "bluesky.run_engine",
                               "bluesky.plans", "bluesky.plan_stubs"),
         "analysis is pure: arrays and documents in, numbers, files and figures out"),
    Rule("calbench.plans", ("calbench.iocs", "caproto"),
         "plans drive devices over Channel Access, never the IOCs themselves"),
    Rule("calbench", ("calbench.procedures",),
         "procedures sit on top of every layer and of the core; only the CLI dispatches to them",
         allowed=("calbench.cli", "calbench.procedures")),
]

def package_dirs() -> dict[str, Path]:
    """calbench package name -> folder, as pyproject.toml maps them."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: ROOT / folder for name, folder in tool["package-dir"].items()}


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in package_dirs().items():
        for path in folder.glob("*.py"):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def imports_of(module: str, path: Path):
    """(line, imported name) of every import in the file; `from X import y` gives X.y, so that a
    submodule imported by name is seen (an attribute then just fails to match a rule)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _known_module(name: str, known: dict[str, Path]) -> str:
    """The module an imported name lands in (X.y -> X when y is an attribute of module X)."""
    return name if name in known or not name.startswith("calbench") else name.rpartition(".")[0]


def broken_rule(module: str, target: str) -> Rule | None:
    """The first rule `module` importing `target` breaks. Within its own source package an import
    is free, unless the rule forbids a part of that package by name (the core and procedures)."""
    for rule in RULES:
        if not within(module, rule.source) or any(within(module, a) for a in rule.allowed):
            continue
        if any(within(target, f) and (within(f, rule.source) or not within(target, rule.source))
               for f in rule.forbidden):
            return rule
    return None


def violations():
    known = modules()
    found: dict[tuple[str, str], str] = {}
    for module, path in sorted(known.items()):
        for line, name in imports_of(module, path):
            target = _known_module(name, known)
            rule = broken_rule(module, target)
            if rule is not None:
                found.setdefault((module, target),
                                 f"{path.relative_to(ROOT)}:{line}: {module} imports {target} "
                                 f"({rule.source} must not: {rule.why})")
    return found


def test_every_package_folder_is_read():
    found = modules()
    assert {"calbench.iocs.base", "calbench.devices.base", "calbench.analysis.scurve",
            "calbench.plans.xray", "calbench.session", "calbench.procedures.demo"} <= set(found)


def test_the_rules_catch_a_forbidden_import(tmp_path):
    """The checker itself: a relative import from the simulators into the drivers is found."""
    path = tmp_path / "probe.py"
    path.write_text("def f():\n    from ..hw import eiger\n")
    names = [name for _, name in imports_of("calbench.iocs.sim.probe", path)]
    assert "calbench.iocs.hw.eiger" in names


def test_only_the_cli_dispatch_imports_the_procedures():
    """Procedures are on top: a plan, a device, the session or the IOCs importing one breaks the
    rule; the CLI's dispatch and the procedures themselves may."""
    for lower in ("calbench.plans.qc6", "calbench.devices.caen", "calbench.analysis.batmet",
                  "calbench.iocs.build", "calbench.session", "calbench.queue_cli"):
        assert broken_rule(lower, "calbench.procedures.fee_paper") is not None, lower
    assert broken_rule("calbench.cli", "calbench.procedures.qc6") is None
    assert broken_rule("calbench.procedures.fee", "calbench.procedures.fee_paper") is None
    assert broken_rule("calbench.procedures.demo", "calbench.iocs.build") is None
    assert broken_rule("calbench.session", "calbench.config") is None


def test_iocs_and_backends_meet_only_through_the_contracts():
    """An IOC interface importing a simulator or a driver, or a backend importing the IOC side or
    the other kind of backend, breaks a rule; the builders that choose the backend, and a backend
    within its own package, may."""
    for ioc in ("calbench.iocs.xraybox", "calbench.iocs.multimeter34401a", "calbench.iocs.base"):
        assert broken_rule(ioc, "calbench.iocs.sim.xray") is not None, ioc
        assert broken_rule(ioc, "calbench.iocs.hw.agilent34401a") is not None, ioc
    assert broken_rule("calbench.iocs.build", "calbench.iocs.sim.xray") is None
    assert broken_rule("calbench.iocs.bench_world", "calbench.iocs.hw.scpi_psu") is None
    assert broken_rule("calbench.iocs.sim.bench", "calbench.iocs.sim.bench_circuit") is None
    assert broken_rule("calbench.iocs.xraybox", "calbench.contracts.xray") is None
    for backend in ("calbench.iocs.sim.eiger", "calbench.iocs.hw.eiger"):
        for ioc_side in ("calbench.iocs.base", "calbench.iocs.sim.xray" if "hw" in backend
                         else "calbench.iocs.hw.scpi"):
            assert broken_rule(backend, ioc_side) is not None, (backend, ioc_side)
        assert broken_rule(backend, "calbench.contracts.errors") is None
    assert broken_rule("calbench.iocs.hw.eiger", "calbench.iocs.hw.ports") is None


def test_imports_follow_the_layers():
    found = violations()
    assert not found, "imports that break DESIGN.md's layers:\n" + "\n".join(found.values())


LONG_FILE_LINES = 400
LONG_FILE_REASONS = ("# Long by design: ", "# To be split (issue 15): ")


def test_a_long_file_says_why_on_its_first_line():
    """Small rooms: a source or test file over 400 lines starts with a one-line reason."""
    unexplained = []
    for path in sorted(ROOT.rglob("*.py")):
        if any(part.startswith(".") or part in ("build", "var") for part in
               path.relative_to(ROOT).parts):
            continue
        lines = path.read_text().splitlines()
        if len(lines) > LONG_FILE_LINES and not lines[0].startswith(LONG_FILE_REASONS):
            unexplained.append(f"{path.relative_to(ROOT)} ({len(lines)} lines)")
    assert not unexplained, ("files over 400 lines without a reason on their first line "
                             f"({' or '.join(LONG_FILE_REASONS)}...):\n" + "\n".join(unexplained))
