# -*- test-case-name: tests.test_imports -*-
"""
No import cycles in C{broker}: the graph of every import statement of every
module (at module level and inside functions alike, since a deferred import
only hides a cycle) has no strongly connected component of more than one
module, and no module imports itself.
"""

import ast
import os

from twisted.trial.unittest import TestCase

import broker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(broker.__file__)))


def brokerModules():
    """
    C{{dotted name: path}} of every module of the C{broker} package.
    """
    modules = {}
    base = os.path.join(ROOT, "broker")
    for directory, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for filename in sorted(filenames):
            if not filename.endswith(".py"):
                continue
            path = os.path.join(directory, filename)
            parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def importsOf(name, path, modules):
    """
    The modules of C{modules} that the module C{name} imports.  C{from
    package import name} counts as importing C{package.name} when that is a
    module, else C{package}.  The parent packages Python imports on the way
    are not counted: they are not what the module asked for.
    """
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    isPackage = path.endswith("__init__.py")
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    out.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = name if isPackage else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                source = f"{package}.{node.module}" if node.module else package
            else:
                source = node.module
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                if candidate in modules:
                    out.add(candidate)
                elif source in modules:
                    out.add(source)
    return out


def cycles(graph):
    """
    The strongly connected components of more than one node of C{graph}
    (C{{node: set of nodes}}), and the nodes with an edge to themselves
    (Tarjan's algorithm, iterative).
    """
    index, low, onStack, stack, found = {}, {}, set(), [], []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        onStack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    onStack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in onStack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        onStack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in graph[node]:
                        found.append(sorted(component))
    return found


class ImportCycleTests(TestCase):
    def test_cyclesFound(self):
        """
        The cycle finder reports a cycle of three, a self-import, and
        nothing for a chain.
        """
        graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}, "e": {"a"}, "f": set()}
        self.assertEqual(sorted(cycles(graph)), [["a", "b", "c"], ["d"]])
        self.assertEqual(cycles({"a": {"b"}, "b": set()}), [])

    def test_fromImportResolved(self):
        """
        C{from broker import config} is an edge to C{broker.config}; a
        relative import resolves against the importing module's package.
        """
        modules = brokerModules()
        self.assertIn("broker.config", importsOf("broker.tap", modules["broker.tap"], modules))
        self.assertIn("broker.workers.pool",
                      importsOf("broker.workers.supervisor",
                                modules["broker.workers.supervisor"], modules))

    def test_noCycles(self):
        """
        No module of C{broker} imports, directly or through others, a
        module that imports it back.
        """
        modules = brokerModules()
        self.assertGreater(len(modules), 50)
        graph = {name: importsOf(name, path, modules) for name, path in modules.items()}
        found = cycles(graph)
        self.assertEqual(found, [], "import cycles:\n" + "\n".join(
            " -> ".join(component) for component in found))
