#!/usr/bin/env python3
"""Module cycles in each crate: exits 1, naming them, when a group of source files import
each other in a circle (issue #20: "remove the module cycles").

A node is one source file (a module; `mod.rs` is its directory's module). An edge is a path
that names another module of the same crate: `crate::a::b`, `super::x`, `self::x`, or a
`use crate::{...}` group. Comments and `#[cfg(test)] mod tests` are left out: tests may
reach anywhere. Declaring a child (`mod x;`) is not an edge, so a parent may hold its
children and re-export them; a child naming its parent is one.
"""

import os
import re
import sys


def modules(src):
    found = {}
    for directory, _, files in os.walk(src):
        for name in files:
            if not name.endswith(".rs"):
                continue
            path = os.path.join(directory, name)
            parts = os.path.relpath(path, src)[:-3].split(os.sep)
            if parts[-1] == "mod":
                parts = parts[:-1]
            if parts in (["lib"], ["main"]) or parts[-1] == "tests":
                continue
            found["::".join(parts)] = path
    return found


def edges(found):
    def resolve(path):
        segments = path.split("::")
        for end in range(len(segments), 0, -1):
            candidate = "::".join(segments[:end])
            if candidate in found:
                return candidate
        return None

    graph = {}
    for module, path in found.items():
        with open(path, encoding="utf-8") as source:
            text = source.read()
        text = re.split(r"#\[cfg\(test\)\]\s*mod tests\s*\{", text)[0]
        text = re.sub(r"//[^\n]*", "", text)
        names = set(re.findall(r"crate::((?:[a-z_0-9]+::)*[a-z_0-9]+)", text))
        for group in re.findall(r"use crate::\{([^;]*)\};", text, re.S):
            names |= set(re.findall(r"\b([a-z_0-9]+(?:::[a-z_0-9]+)*)", group))
        segments = module.split("::")
        for name in re.findall(r"\bsuper::((?:[a-z_0-9]+::)*[a-z_0-9]+)", text):
            names.add("::".join(segments[:-1] + [name]))
        for name in re.findall(r"\bself::((?:[a-z_0-9]+::)*[a-z_0-9]+)", text):
            names.add("::".join(segments + [name]))
        targets = {resolve(name) for name in names} - {None, module}
        graph[module] = targets
    return graph


def cycles(graph):
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(10_000)

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def main():
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates")
    total = 0
    for crate in sorted(os.listdir(root)):
        src = os.path.join(root, crate, "src")
        if not os.path.isdir(src):
            continue
        graph = edges(modules(src))
        for group in cycles(graph):
            total += 1
            print(f"{crate}: modules import each other in a circle:")
            for module in group:
                print(f"    {module} -> {', '.join(sorted(t for t in graph[module] if t in group))}")
    if total:
        print(f"{total} module cycles")
        sys.exit(1)
    print("no module cycles")


if __name__ == "__main__":
    main()
