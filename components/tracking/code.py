"""The code a stage runs, found by walking imports, and its digest (part of the cache key).

Starting from a stage's module (``pipelines.train``), every ``import`` / ``from ... import``
anywhere in a module (lazy imports inside functions included) that names a module of this
project (``pipelines``, ``components``, ``serving``) is followed, as are import-path strings
in the ``package.module:attribute`` form (Ray Serve's ``import_path: serving.app:build_app``). A
package's ``__init__`` counts for every module imported through it. Each module is digested by
its syntax tree, so comments and formatting do not change a digest but any code change does.

Third-party code is not part of the key: a new torch or Ray version does not rerun stages.
"""

from __future__ import annotations

import ast
import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

PROJECT_PACKAGES = ("pipelines", "components", "serving")
# where the project packages live (this file is <root>/components/tracking/code.py)
PROJECT_ROOT = Path(__file__).resolve().parents[2]
# "package.module:attribute", the import-path form Ray Serve, entry points and Hydra use
_IMPORT_STRING = re.compile(
    r"^(?:" + "|".join(PROJECT_PACKAGES) + r")(?:\.[A-Za-z_]\w*)+:[A-Za-z_][\w.]*$"
)


def module_file(name: str, root: Path = PROJECT_ROOT) -> Path | None:
    """The source file of module ``name`` under ``root`` (a package's ``__init__.py``), if any."""
    base = root.joinpath(*name.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _is_project(name: str) -> bool:
    return name.split(".", 1)[0] in PROJECT_PACKAGES


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _resolve_relative(module: str | None, level: int, current: str, is_package: bool) -> str:
    package = current if is_package else current.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{module}" if module else package


def imports_of(tree: ast.AST, name: str, is_package: bool, root: Path = PROJECT_ROOT) -> set[str]:
    """Project modules a module's source refers to (imports anywhere in it, import strings)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = (
                _resolve_relative(node.module, node.level, name, is_package)
                if node.level
                else node.module
            )
            if not base:
                continue
            found.add(base)
            for alias in node.names:
                # ``from components.model import export``: a submodule, if such a file exists
                if module_file(f"{base}.{alias.name}", root) is not None:
                    found.add(f"{base}.{alias.name}")
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and _IMPORT_STRING.match(node.value)
        ):
            found.add(node.value.split(":", 1)[0])
    return {module for module in found if _is_project(module)}


# path -> ((mtime_ns, size), digest, imported modules): every stage walks mostly the same modules
_parsed: dict[tuple[Path, str], tuple[tuple[int, int], str, frozenset[str]]] = {}


def _parse(path: Path, name: str, root: Path) -> tuple[str, frozenset[str]]:
    stat = path.stat()
    key, version = (path, name), (stat.st_mtime_ns, stat.st_size)
    cached = _parsed.get(key)
    if cached is not None and cached[0] == version:
        return cached[1], cached[2]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    digest = hashlib.sha256(ast.dump(tree).encode()).hexdigest()
    imported = frozenset(imports_of(tree, name, path.name == "__init__.py", root))
    _parsed[key] = (version, digest, imported)
    return digest, imported


def code_closure(modules: Iterable[str], root: Path = PROJECT_ROOT) -> dict[str, str]:
    """``{module name: digest of its syntax tree}`` for ``modules`` and all they import here."""
    pending = [parent for module in modules for parent in _with_parents(module)]
    digests: dict[str, str] = {}
    while pending:
        name = pending.pop()
        if name in digests:
            continue
        path = module_file(name, root)
        if path is None:
            continue  # a name imported from a module (caught above) or a missing optional module
        digests[name], imported = _parse(path, name, root)
        pending.extend(
            parent
            for module in imported
            for parent in _with_parents(module)
            if parent not in digests
        )
    return dict(sorted(digests.items()))


def changed_modules(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Modules added, removed or edited between two closures (short digests compare fine)."""
    names = sorted(set(before) | set(after))
    return [n for n in names if before.get(n, "")[:12] != after.get(n, "")[:12]]
