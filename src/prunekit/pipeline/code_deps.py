"""The library code a stage script runs, as the paths its dvc.yaml stage depends on.

A stage's results depend on its script and on every prunekit module that script imports, directly or through other
prunekit modules (imports inside functions included: most of the library is imported where it is used; imports
under ``if TYPE_CHECKING:`` excluded: they never run). Importing ``prunekit.a.b`` also runs the packages
``prunekit`` and ``prunekit.a``, whose ``__init__`` files register what they hold. :func:`stage_modules` follows
those imports through the source files (nothing is imported); :func:`dependency_paths` writes the result as dvc.yaml
lists it: a package directory whose every module is used, else the files. ``scripts/stage_deps.py`` prints them and
``tests/test_code_deps.py`` fails when dvc.yaml's deps leave one out.
"""

from __future__ import annotations

import ast
from pathlib import Path


def module_files(src: Path, package: str = "prunekit") -> dict[str, Path]:
    """Every module of ``package`` under ``src`` (``src/prunekit/...``): dotted name -> file."""
    root = src / package
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = (package, *f.relative_to(root).with_suffix("").parts)
        name = ".".join(parts).removesuffix(".__init__")
        out[name] = f
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Line numbers of the statements under ``if TYPE_CHECKING:`` (imports only for the type checker)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imported(
    file: Path, name: str, modules: dict[str, Path], type_checking: bool = False, parents: bool = True
) -> set[str]:
    """The modules of ``modules`` that importing or running ``file`` (module ``name``, "" for a script) imports;
    with ``type_checking``, those imported only for the type checker too; with ``parents``, the packages an import
    runs first (``a`` and ``a.b`` for ``a.b.c``), else only the modules named."""
    tree = ast.parse(file.read_text(encoding="utf-8"))
    skip = set() if type_checking else _type_checking_lines(tree)
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", 0) in skip:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            targets = [base, *(f"{base}.{a.name}" for a in node.names)]
        for target in targets:
            pieces = target.split(".")  # importing a.b.c runs a, a.b and a.b.c
            found.update(p for i in range(1 if parents else len(pieces), len(pieces) + 1)
                         if (p := ".".join(pieces[:i])) in modules)  # fmt: skip
    return found - {name}


def stage_modules(script: Path, src: Path) -> set[str]:
    """Every prunekit module running ``script`` imports, transitively."""
    modules = module_files(src)
    todo = sorted(imported(script, "", modules))
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(imported(modules[name], name, modules) - seen)
    return seen


def dependency_paths(used: set[str], src: Path, repo: Path) -> list[str]:
    """``used`` modules as dvc.yaml deps, relative to ``repo``: a package directory when every module under it is
    used, else the module files."""
    modules = module_files(src)
    files = {modules[name] for name in used}
    out: list[str] = []
    covered: set[Path] = set()
    for directory in sorted({f.parent for f in modules.values()}, key=lambda d: len(d.parts)):
        if any(directory.is_relative_to(c) for c in covered):
            continue
        inside = {f for f in modules.values() if f.is_relative_to(directory)}
        if inside <= files and directory != src / "prunekit":
            covered.add(directory)
            out.append(directory.relative_to(repo).as_posix())
    out += [f.relative_to(repo).as_posix() for f in files if not any(f.is_relative_to(c) for c in covered)]
    return sorted(out)


def covers(deps: list[str], used: set[str], src: Path, repo: Path) -> list[str]:
    """The files of ``used`` modules that no path of ``deps`` (dvc.yaml's, relative to ``repo``) contains."""
    modules = module_files(src)
    paths = [repo / d for d in deps]
    return sorted(
        modules[name].relative_to(repo).as_posix()
        for name in used
        if not any(modules[name] == p or modules[name].is_relative_to(p) for p in paths)
    )


def import_cycles(src: Path, package: str = "prunekit") -> list[list[str]]:
    """Every set of modules of ``package`` that import each other in a circle (imports inside functions and for
    the type checker included; a package's ``__init__`` importing its own modules, which Python allows, is not a
    circle by itself), each sorted; none in a well-layered package."""
    modules = module_files(src, package)
    graph = {name: imported(f, name, modules, type_checking=True, parents=False) for name, f in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return sorted(cycles)
