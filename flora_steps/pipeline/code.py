"""Each stage's code: every package source file its command runs, found from the imports (transitively).

Both engines make these files inputs of the stage, so editing a module reruns exactly
the stages that use it. Read from the sources with ``ast``; nothing is imported.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]
#: The package of the stage commands: ``python -m flora_steps.stages.<module>``.
STAGES_PACKAGE = f"{PACKAGE.name}.stages"


@cache
def _module_file(module: str) -> Path | None:
    """The source file of a ``flora_steps`` module name, or ``None`` outside the package."""
    parts = module.split(".")
    if parts[0] != PACKAGE.name:
        return None
    base = PACKAGE.joinpath(*parts[1:])
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def docstring(module: str) -> str:
    """A package module's docstring, read from its source: the module is not imported."""
    path = _module_file(module)
    if path is None:
        raise KeyError(module)
    return ast.get_docstring(ast.parse(path.read_text(), str(path))) or ""


def _module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


@cache
def _imports(path: Path) -> frozenset[str]:
    """Package modules ``path`` imports (a package's ``__init__`` runs too), read from its source."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return frozenset(found)


@cache
def code_files(module: str) -> tuple[Path, ...]:
    """Every package source file that ``python -m flora_steps.stages.<module>`` runs, by its imports (transitively).

    Importing ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py`` too, so those
    count. Paths are relative to the repository root, sorted.
    """
    pending, seen = [f"{STAGES_PACKAGE}.{module}"], set()
    while pending:
        name = pending.pop()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            path = _module_file(".".join(parts[:depth]))
            if path is not None and path not in seen:
                seen.add(path)
                pending.extend(_imports(path))
    return tuple(sorted(path.relative_to(PACKAGE.parent) for path in seen))
