#!/usr/bin/env python3
"""Fails when the modules of a crate import each other in a cycle (docs/ARCHITECTURE.md: background
loops at the top, shared helpers at the bottom). A module's edges are the `crate::NAME` paths its
non-test code names, where NAME is another top-level module of the same crate (a file `NAME.rs` or
a directory `NAME/`); items of the crate root (`crate::AgentError`) are not modules and make no edge.
"""

import os
import re
import sys


def modules(src):
    files = {}
    for root, _, names in os.walk(src):
        for name in names:
            if not name.endswith(".rs") or name == "tests.rs":
                continue
            rel = os.path.relpath(os.path.join(root, name), src)[:-3]
            top = rel.split(os.sep)[0]
            files.setdefault("(root)" if top in ("lib", "main") else top, []).append(
                os.path.join(root, name)
            )
    return files


def edges(files):
    names = set(files)
    out = {m: set() for m in names}
    for m, paths in files.items():
        for path in paths:
            with open(path, encoding="utf-8") as f:
                code = f.read().split("#[cfg(test)]")[0]
            used = set(re.findall(r"\bcrate::(\w+)", code))
            for group in re.findall(r"\buse crate::\{([^}]*)\}", code, re.S):
                used.update(re.findall(r"^\s*(\w+)", group, re.M))
                used.update(re.findall(r",\s*(\w+)", group))
            out[m].update(u for u in used if u in names and u != m)
    return out


def cycles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def main():
    bad = False
    for crate in sorted(os.listdir("crates")):
        src = os.path.join("crates", crate, "src")
        if not os.path.isdir(src):
            continue
        graph = edges(modules(src))
        for comp in cycles(graph):
            bad = True
            detail = "; ".join(f"{m} -> {', '.join(sorted(graph[m] & set(comp)))}" for m in comp)
            print(f"module-cycles: {crate}: {' <-> '.join(comp)} import each other ({detail})",
                  file=sys.stderr)
    if bad:
        print("module-cycles: move what both need into a module below them", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
