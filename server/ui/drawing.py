"""Geometry of the web view's SVG pictures (pure): a pipeline's graph and a loss curve.

Only numbers and the caller's own values come out; the templates write the SVG and
escape every text in it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

NODE_W, NODE_H = 176, 58
GAP_X, GAP_Y = 64, 18
MARGIN = 12


@dataclass
class PlacedNode:
    name: str
    x: float
    y: float
    item: dict[str, Any] = field(default_factory=dict)  # what the template shows in the box


@dataclass
class Edge:
    source: str
    target: str
    path: str  # an SVG path ``d``


@dataclass
class GraphPicture:
    width: float
    height: float
    nodes: list[PlacedNode]
    edges: list[Edge]


def layers(names: list[str], depends_on: dict[str, list[str]]) -> dict[str, int]:
    """Each node's column: one past the deepest node it depends on (0 for a root).
    Names it does not know are ignored; the graph was checked for cycles at submission."""
    column: dict[str, int] = {}
    known = set(names)

    def depth(name: str, seen: frozenset[str]) -> int:
        if name in column:
            return column[name]
        parents = [p for p in depends_on.get(name, []) if p in known and p not in seen]
        column[name] = 1 + max((depth(p, seen | {name}) for p in parents), default=-1)
        return column[name]

    for name in names:
        depth(name, frozenset())
    return column


def graph_picture(items: list[dict[str, Any]]) -> GraphPicture:
    """Nodes (``{name, depends_on, ...}``, in submission order) placed in columns left to
    right by dependency depth, with an edge from each dependency to its dependant."""
    names = [item["name"] for item in items]
    deps = {item["name"]: list(item.get("depends_on") or []) for item in items}
    column = layers(names, deps)
    rows: dict[int, int] = {}
    placed: dict[str, PlacedNode] = {}
    for item in items:
        col = column[item["name"]]
        row = rows.get(col, 0)
        rows[col] = row + 1
        placed[item["name"]] = PlacedNode(item["name"], MARGIN + col * (NODE_W + GAP_X),
                                          MARGIN + row * (NODE_H + GAP_Y), item)
    edges = []
    for item in items:
        target = placed[item["name"]]
        for parent in deps[item["name"]]:
            source = placed.get(parent)
            if source is None:
                continue
            x1, y1 = source.x + NODE_W, source.y + NODE_H / 2
            x2, y2 = target.x, target.y + NODE_H / 2
            bend = max((x2 - x1) / 2, 20)
            edges.append(Edge(parent, item["name"],
                              f"M{x1:.0f},{y1:.0f} C{x1 + bend:.0f},{y1:.0f} {x2 - bend:.0f},{y2:.0f} "
                              f"{x2 - 6:.0f},{y2:.0f}"))
    width = MARGIN * 2 + (max(column.values(), default=0) + 1) * (NODE_W + GAP_X) - GAP_X
    height = MARGIN * 2 + max(rows.values(), default=1) * (NODE_H + GAP_Y) - GAP_Y
    return GraphPicture(width, height, list(placed.values()), edges)


CHART_W, CHART_H = 420, 160
CHART_PAD_L, CHART_PAD_R, CHART_PAD_T, CHART_PAD_B = 48, 10, 10, 24


@dataclass
class Chart:
    width: int
    height: int
    points: list[tuple[float, float, float, float]]  # (x, y, step, loss)
    polyline: str
    y_labels: list[tuple[float, str]]
    x_labels: list[tuple[float, str]]


def loss_chart(history: list[Any]) -> Chart | None:
    """A loss curve from ``[[step, loss], ...]``; None without a numeric point."""
    pairs = []
    for point in history:
        if (isinstance(point, list | tuple) and len(point) == 2
                and all(isinstance(v, int | float) and not isinstance(v, bool) for v in point)
                and point[1] == point[1]):  # NaN is no point
            pairs.append((float(point[0]), float(point[1])))
    if not pairs:
        return None
    steps = [s for s, _ in pairs]
    losses = [v for _, v in pairs]
    s_lo, s_hi = min(steps), max(steps)
    l_lo, l_hi = min(losses), max(losses)
    s_span = (s_hi - s_lo) or 1.0
    l_span = (l_hi - l_lo) or 1.0
    inner_w = CHART_W - CHART_PAD_L - CHART_PAD_R
    inner_h = CHART_H - CHART_PAD_T - CHART_PAD_B

    def at(step: float, loss: float) -> tuple[float, float]:
        return (CHART_PAD_L + (step - s_lo) / s_span * inner_w,
                CHART_PAD_T + (l_hi - loss) / l_span * inner_h)

    points = [(*at(s, v), s, v) for s, v in pairs]
    return Chart(CHART_W, CHART_H, points,
                 " ".join(f"{x:.1f},{y:.1f}" for x, y, _, _ in points),
                 [(at(s_lo, l_hi)[1], f"{l_hi:.4g}"), (at(s_lo, l_lo)[1], f"{l_lo:.4g}")],
                 [(at(s_lo, l_lo)[0], f"{s_lo:g}"), (at(s_hi, l_lo)[0], f"{s_hi:g}")])
