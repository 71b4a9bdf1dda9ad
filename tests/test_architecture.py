"""The import graph of lowrank_ops against the layer order of docs/ARCHITECTURE.md: no upward import, no cycle, no
unplaced module. Reads source with `ast`; nothing is imported."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"lowrank_ops": ROOT / "lowrank_ops", "lowrank_ops.kernels": ROOT / "kernels"}


def documented_layers() -> dict[str, int]:
    """Unit -> level from the ```layers block of docs/ARCHITECTURE.md."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, "docs/ARCHITECTURE.md has no ```layers block"
    levels = {}
    for line in block[1].strip().splitlines():
        level, *units = line.split()
        for unit in units:
            assert unit not in levels, f"{unit} is placed twice in docs/ARCHITECTURE.md"
            levels[unit] = int(level)
    return levels


def module_files() -> dict[str, Path]:
    modules = {}
    for prefix, directory in PACKAGES.items():
        for path in directory.rglob("*.py"):
            parts = list(path.relative_to(directory).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([prefix, *parts])] = path
    return modules


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, child.end_lineno + 1))
    return lines


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """lowrank_ops modules `path` imports (a `from X import name` counts X.name when that is a module)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    found = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("lowrank_ops"):
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.add(name if name in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("lowrank_ops"))
    return found


def unit_of(module: str, levels: dict[str, int]) -> str | None:
    """The longest documented unit that is `module` or a package above it."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in levels:
            return ".".join(parts[:end])
    return None


MODULES = module_files()
LEVELS = documented_layers()
GRAPH = {module: imports_of(path, MODULES) for module, path in MODULES.items()}


def test_every_module_is_placed_in_a_layer():
    unplaced = sorted(m for m in MODULES if unit_of(m, LEVELS) is None)
    assert not unplaced, f"place these in the layers block of docs/ARCHITECTURE.md: {unplaced}"
    stale = sorted(unit for unit in LEVELS if unit not in MODULES)
    assert not stale, f"docs/ARCHITECTURE.md places units that do not exist: {stale}"


def test_no_import_points_up_or_sideways():
    bad = []
    for module, targets in GRAPH.items():
        unit = unit_of(module, LEVELS)
        for target in targets:
            other = unit_of(target, LEVELS)
            if other is None or other == unit:
                continue
            if LEVELS[other] >= LEVELS[unit]:
                bad.append(f"{module} (level {LEVELS[unit]}) imports {target} (level {LEVELS[other]})")
    assert not bad, "imports against docs/ARCHITECTURE.md:\n" + "\n".join(sorted(bad))


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH.get(module, ())):
            if target not in GRAPH or target == module:
                continue
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


def test_the_checker_sees_an_upward_import(tmp_path):
    """The checks can fail: an algorithm importing the compress package is reported."""
    fake = tmp_path / "bad.py"
    fake.write_text("from lowrank_ops.compress.runner import compress_\n")
    targets = imports_of(fake, MODULES)
    assert targets == {"lowrank_ops.compress.runner"}
    assert LEVELS[unit_of("lowrank_ops.compress.runner", LEVELS)] > LEVELS["lowrank_ops.algorithms"]
