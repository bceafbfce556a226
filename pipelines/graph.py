"""Graph pipelines (pure): ``spec.graph.nodes[] {name, dependsOn, spec}`` → order, checks, canvas.

A graph is a DAG of nodes; a node runs when every node it depends on succeeded.
This module checks the dependencies (unknown names, cycles — the cycle is named),
orders the nodes (dependencies first, document order otherwise), computes each
node's ancestors (the nodes whose results it may reference) and compiles the DAG
into one Celery canvas.

The canvas is built by series-parallel decomposition, so no node waits for more
than it depends on where the graph allows it:

* nodes that do not depend on each other at all (separate components) run as a
  ``group``;
* a node every other node is an ancestor or a descendant of (a bottleneck) splits
  the graph into ``chain(before, node, after)``; ``chain(group(...), node)`` is a
  Celery chord;
* a graph with neither (e.g. two sources both feeding two sinks) is cut after its
  sources: ``chain(sources, rest)`` — every dependency is still respected, a node
  may then wait for a source it does not need.

Every node is an immutable signature: results are never passed along the canvas,
a node reads the results it references from the result backend by task id
(``pipelines.resolver``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from celery import chain, group

from app.core.errors import SpecError

Dependencies = Mapping[str, Sequence[str]]


def read_dependencies(nodes_raw: Sequence[Mapping[str, Any]], names: Sequence[str],
                      location: str = "spec.graph.nodes") -> dict[str, tuple[str, ...]]:
    """Each node's ``dependsOn`` checked: a list of known node names, no duplicates, no cycle."""
    deps: dict[str, tuple[str, ...]] = {}
    for index, (node, name) in enumerate(zip(nodes_raw, names, strict=True)):
        where = f"{location}[{index}].dependsOn"
        raw = node.get("dependsOn")
        if raw is None:
            raw = []
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list) or not all(isinstance(d, str) for d in raw):
            raise SpecError(where, "must be a list of node names")
        for position, dep in enumerate(raw):
            if dep not in names:
                raise SpecError(f"{where}[{position}]", f"unknown node {dep!r} (nodes: {', '.join(names)})")
        deps[name] = tuple(dict.fromkeys(raw))
    cycle = find_cycle(deps)
    if cycle is not None:
        first = names.index(cycle[0])
        raise SpecError(f"{location}[{first}].dependsOn", f"dependency cycle: {' -> '.join(cycle)}")
    return deps


def find_cycle(deps: Dependencies) -> list[str] | None:
    """A cycle as ``[a, b, ..., a]`` (each depends on the next), or ``None``."""
    done: set[str] = set()
    for start in deps:
        if start in done:
            continue
        path: list[str] = []
        on_path: set[str] = set()
        stack: list[tuple[str, int]] = [(start, 0)]
        while stack:
            node, position = stack.pop()
            if position == 0:
                path.append(node)
                on_path.add(node)
            children = deps.get(node, ())
            if position < len(children):
                stack.append((node, position + 1))
                child = children[position]
                if child in on_path:
                    return path[path.index(child):] + [child]
                if child not in done:
                    stack.append((child, 0))
            else:
                path.pop()
                on_path.discard(node)
                done.add(node)
    return None


def topological_order(names: Sequence[str], deps: Dependencies) -> list[str]:
    """Dependencies first; among nodes that are ready, document order."""
    order: list[str] = []
    placed: set[str] = set()
    while len(order) < len(names):
        ready = next(n for n in names if n not in placed and all(d in placed for d in deps[n]))
        order.append(ready)
        placed.add(ready)
    return order


def ancestors_of(deps: Dependencies) -> dict[str, frozenset[str]]:
    """Every node's transitive dependencies."""
    found: dict[str, frozenset[str]] = {}

    def visit(name: str) -> frozenset[str]:
        if name not in found:
            result: set[str] = set()
            for dep in deps[name]:
                result.add(dep)
                result |= visit(dep)
            found[name] = frozenset(result)
        return found[name]

    for name in deps:
        visit(name)
    return found


# -- the canvas --------------------------------------------------------------------------
def compile_canvas(order: Sequence[str], deps: Dependencies, signature_of: Callable[[str], Any]) -> Any:
    """One Celery canvas running the DAG (see the module docstring for its shape)."""
    ancestors = ancestors_of(deps)
    descendants: dict[str, set[str]] = {name: set() for name in order}
    for name, above in ancestors.items():
        for ancestor in above:
            descendants[ancestor].add(name)
    position = {name: i for i, name in enumerate(order)}

    def sort(nodes: set[str] | frozenset[str]) -> list[str]:
        return sorted(nodes, key=position.__getitem__)

    def components(nodes: set[str]) -> list[set[str]]:
        left, found = set(nodes), []
        while left:
            seed = min(left, key=position.__getitem__)
            part, frontier = {seed}, [seed]
            while frontier:
                node = frontier.pop()
                linked = ({d for d in deps[node]} | {d for d in order if node in deps[d]}) & left
                for other in linked - part:
                    part.add(other)
                    frontier.append(other)
            left -= part
            found.append(part)
        return found

    def build(nodes: set[str]) -> Any:
        if len(nodes) == 1:
            return signature_of(next(iter(nodes)))
        parts = components(nodes)
        if len(parts) > 1:
            return group(*(build(part) for part in parts))
        for node in sort(nodes):
            before = ancestors[node] & nodes
            after = descendants[node] & nodes
            if len(before) + len(after) + 1 == len(nodes):  # a bottleneck
                steps = [build(set(before))] if before else []
                steps.append(signature_of(node))
                if after:
                    steps.append(build(after))
                return chain(*steps)
        sources = {n for n in nodes if not (set(deps[n]) & nodes)}
        return chain(build(sources), build(nodes - sources))

    return build(set(order))
