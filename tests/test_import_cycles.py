"""No import cycles among orchagent's modules, lazy imports inside functions and
``TYPE_CHECKING`` blocks included: a cycle hidden in a function still ties two modules
into one that neither can be read, tested or changed without (#18)."""

from __future__ import annotations

import ast
import os

from twisted.trial import unittest

import orchagent

PACKAGE = os.path.dirname(os.path.abspath(orchagent.__file__))


def module_files(package_dir: str = PACKAGE) -> dict[str, str]:
    """Dotted module name -> file, for every module of the package."""
    root = os.path.dirname(package_dir)
    found = {}
    for directory, _dirs, files in os.walk(package_dir):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                dotted = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


def imported(module: str, path: str, known: set[str]) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its file.  A package's
    own ``__init__`` is not counted as imported by its submodules (``from orchagent.seed
    import state`` imports ``state``), so a package that re-exports its modules is no
    cycle."""
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read(), path)
    here = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = here.split(".")[:len(here.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names]
            names += [t for t in targets if t in known] or [base]
    found = set()
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module and not module.startswith(name + "."):
            found.add(name)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


class ImportCycleTests(unittest.TestCase):
    def test_no_cycle_among_orchagent_modules(self):
        files = module_files()
        graph = {name: imported(name, path, set(files)) for name, path in files.items()}
        cycle = find_cycle(graph)
        self.assertIsNone(cycle, "import cycle: " + " -> ".join(cycle or []))

    def test_a_lazy_import_closing_a_cycle_is_found(self):
        base = os.path.join(os.path.abspath(self.mktemp()), "pkg")
        os.makedirs(base)
        sources = {
            "__init__.py": "",
            "a.py": "from pkg import b\n",
            "b.py": "def later():\n    from pkg.c import thing\n",
            "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import x\n",
            "d.py": "from pkg import a\n",
        }
        for name, text in sources.items():
            with open(os.path.join(base, name), "w") as fh:
                fh.write(text)
        files = module_files(base)
        graph = {name: imported(name, path, set(files)) for name, path in files.items()}
        self.assertEqual(find_cycle(graph), ["pkg.a", "pkg.b", "pkg.c", "pkg.a"])
        del sources["c.py"]
        os.unlink(os.path.join(base, "c.py"))
        files = module_files(base)
        graph = {name: imported(name, path, set(files)) for name, path in files.items()}
        self.assertIsNone(find_cycle(graph))
