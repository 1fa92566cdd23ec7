"""The package's shape: stages as folders, imports pointing down the stages, no import cycles, a torch-free runtime."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import cifarx

PACKAGE = Path(cifarx.__file__).parent
# Each stage and the stages it may import from (the cross-cutting modules errors, io and process are "base").
ALLOWED = {
    "base": set(),
    "data": {"base"},
    "models": {"base", "data"},
    "training": {"base", "data", "models"},
    "runtimes": {"base", "data"},
    "deploy": {"base", "data", "models", "training", "runtimes"},
    "measure": {"base", "data", "models", "training", "runtimes"},
    "report": {"base", "data", "training", "runtimes", "measure"},
    "cli": {"base", "data", "models", "training", "runtimes", "deploy", "measure", "report"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage(module: str) -> str:
    if module == "cifarx.__main__":  # `python -m cifarx`: the command line's entry point
        return "cli"
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else "base"


def imports_of(path: Path) -> set[str]:
    """Every cifarx module `path` imports, deferred imports inside functions included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("cifarx."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cifarx"):
            for alias in node.names:  # `from cifarx.data import images` names a module; `... import f` a function
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in MODULES else node.module)
    return {name for name in found if name != "cifarx"}


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}
GRAPH = {name: imports_of(path) - {name} for name, path in MODULES.items()}


def test_imports_point_down_the_stages():
    upward = [f"{name} -> {target}" for name, targets in GRAPH.items() for target in targets
              if stage(target) != stage(name) and stage(target) not in ALLOWED[stage(name)]]
    assert not upward, upward


def test_every_module_lives_in_a_stage_folder():
    loose = [name for name in MODULES if stage(name) == "base"
             and name not in {"cifarx", "cifarx.errors", "cifarx.io", "cifarx.process"}]
    assert not loose, f"modules outside the stage folders: {loose}"


def test_no_import_cycles():
    state: dict[str, str] = {}
    cycles = []

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for target in sorted(GRAPH.get(name, ())):
            if target not in GRAPH:
                continue
            if state.get(target) == "open":
                cycles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_runtimes_stage_imports_no_torch():
    modules = sorted(name for name in MODULES if stage(name) == "runtimes")
    code = f"import sys; import {', '.join(modules)}; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
