#!/usr/bin/env python3
"""Fails when the top-level modules of src/ import each other in a cycle (ARCHITECTURE.md:
the data path reads one way; `relay` wires everything and nothing imports it).

    python3 tests/module_cycles.py        # prints the edges; exit 1 on a cycle

An edge a -> b is any `crate::b` path in src/a.rs or src/a/**.rs outside comments, test
modules included.
"""
import re
import sys
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def module_of(path):
    rel = path.relative_to(SRC).parts
    return rel[0][:-3] if len(rel) == 1 else rel[0]


def edges():
    g = defaultdict(set)
    for path in SRC.rglob("*.rs"):
        a = module_of(path)
        if a in ("main", "lib"):
            continue
        for line in path.read_text().splitlines():
            code = line.split("//", 1)[0]
            for b in re.findall(r"crate::([a-z_]+)", code):
                if b != a:
                    g[a].add(b)
    return g


def cycles(g):
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def main():
    g = edges()
    found = cycles(g)
    for c in found:
        print("module cycle: " + ", ".join(c), file=sys.stderr)
        for a in c:
            for b in sorted(g[a] & set(c)):
                print(f"  {a} -> {b}", file=sys.stderr)
    if found:
        return 1
    print(f"module_cycles.py: {sum(len(v) for v in g.values())} imports among {len(g)} modules, no cycle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
