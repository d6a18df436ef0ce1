"""The package's floor plan, read from the source: no import cycle, no import up the layers, and
each layer's outside libraries where they belong (docs/architecture.md draws the plan)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from .conftest import ROOT

PACKAGE = ROOT / "nextstep"
# Lower imports higher never: a module imports modules of its own part, or of a lower rank.
RANKS = {
    "models": 0, "pnginfo": 0,  # the networks; the result-file format, which anything may use
    "engine": 1,
    "loading": 2,
    "pipeline": 3,
    "serving": 4,
    "page": 5,
    "tools": 6, "train": 6, "__main__": 6,
    "__init__": 7,  # the package's public names
}
# Outside libraries imported at module level, by the parts allowed them (the standard library and
# torch go everywhere).
CONFINED = {
    "gradio": {"page"}, "starlette": {"page"},
    "huggingface_hub": {"loading"}, "safetensors": {"loading"},
    "ray": {"serving"}, "fastapi": {"serving"}, "pydantic": {"serving", "page"}, "httpx": {"serving", "tools"},
    "gradio_client": {"page", "tools"},
}
MODELS_MAY_IMPORT = {"torch", "transformers"}


def modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def part(name: str) -> str:
    """The layer a module belongs to: its subpackage, or its own name at the package's top."""
    pieces = name.split(".")
    return "__init__" if len(pieces) == 1 else pieces[1]


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, bool]]:
    """(imported name, at module level) of a module: modules of the package resolved to the
    longest known name, outside libraries to their top-level name."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [stem] + [f"{stem}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while "." in target and target not in known:
                target = target.rpartition(".")[0]
            if target != name and target != "__future__":
                found.append((target, id(node) in top_level))
    return found


def graph() -> tuple[dict[str, set[str]], dict[str, list[tuple[str, bool]]]]:
    """The package's import graph (module -> package modules it imports), and every module's imports."""
    known = modules()
    everything = {name: imports(name, path, set(known)) for name, path in known.items()}
    inside = {name: {target for target, _ in found if target in known and target != "nextstep"}
              for name, found in everything.items()}
    return inside, everything


def test_no_import_cycle():
    inside, _ = graph()
    cycles = []
    for start in inside:
        seen, todo = set(), list(inside[start])
        while todo:
            current = todo.pop()
            if current == start:
                cycles.append(start)
                break
            if current not in seen:
                seen.add(current)
                todo.extend(inside.get(current, ()))
    assert not cycles, f"modules that import themselves through others: {sorted(cycles)}"


def test_no_import_runs_up_the_layers():
    _, everything = graph()
    known = modules()
    upward = []
    for name, found in everything.items():
        for target, _ in found:
            if target in known and part(target) != part(name) and RANKS[part(target)] >= RANKS[part(name)]:
                upward.append(f"{name} -> {target}")
    assert not upward, "imports that run up (or across) the layers:\n" + "\n".join(sorted(upward))


def test_every_part_has_a_rank_and_states_its_rule():
    for name in modules():
        assert part(name) in RANKS, f"{name} belongs to no layer of the plan"
    for subpackage in {part(name) for name in modules()} - {"__init__", "pnginfo", "pipeline", "__main__"}:
        doc = ast.get_docstring(ast.parse((PACKAGE / subpackage / "__init__.py").read_text())) or ""
        assert "Layer rule" in doc or subpackage == "train", f"nextstep/{subpackage} states no layer rule"


def test_outside_libraries_stay_in_their_layers():
    _, everything = graph()
    misplaced = []
    for name, found in everything.items():
        for target, at_module_level in found:
            library = target.split(".")[0]
            if library == "nextstep" or not at_module_level:
                continue
            allowed = CONFINED.get(library)
            if allowed is not None and part(name) not in allowed:
                misplaced.append(f"{name} imports {library}")
            stdlib = library in sys.stdlib_module_names
            if part(name) == "models" and not stdlib and library not in MODELS_MAY_IMPORT:
                misplaced.append(f"{name} imports {library} (models/ takes torch and transformers only)")
    assert not misplaced, "\n".join(sorted(misplaced))
