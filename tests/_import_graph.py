"""The package's import graph read from its source (top-level and function-level imports alike), for the
layout tests: which module imports which, and the first import cycle if there is one."""
import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "openclip_align"


def module_name(path: Path) -> str:
    """``openclip_align.integration.checkpoints`` for .../openclip_align/integration/checkpoints.py."""
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> Dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def _imported(name: str, path: Path, modules) -> Set[str]:
    found = set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:        # `from . import x`: the module x
                    found.add(f"{source}.{alias.name}")
                elif source in modules:
                    found.add(source)
    found.discard(name)
    return found


def import_graph() -> Dict[str, Set[str]]:
    """Every module of openclip_align -> the modules of openclip_align it imports."""
    modules = package_modules()
    return {name: _imported(name, path, modules) for name, path in modules.items()}


def within(graph: Dict[str, Set[str]], prefix: str) -> Dict[str, Set[str]]:
    """The graph's modules under ``prefix`` (e.g. 'openclip_align.integration.') and their edges among them."""
    inside = {name for name in graph if name.startswith(prefix)}
    return {name: graph[name] & inside for name in inside}


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One import cycle as a list of modules (first = last), or None."""
    state: Dict[str, str] = {}

    def visit(module: str, trail: List[str]) -> Optional[List[str]]:
        if state.get(module) == "open":
            return trail[trail.index(module):] + [module]
        if state.get(module) == "done":
            return None
        state[module] = "open"
        for other in sorted(graph.get(module, ())):
            cycle = visit(other, trail + [module])
            if cycle:
                return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        cycle = visit(module, [])
        if cycle:
            return cycle
    return None
