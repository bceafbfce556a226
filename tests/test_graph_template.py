"""Graph pipelines without a broker: validation at submission and the compiled Celery canvas."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from celery.canvas import _chain, _chord, group

from app.core.errors import SpecError
from pipelines import Pipeline
from pipelines.graph import compile_canvas, find_cycle
from pipelines.graph_template import build_prompts


def node(name: str, *deps: str, **spec: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "spec": spec}
    if deps:
        entry["dependsOn"] = list(deps)
    return entry


def graph(*nodes: dict[str, Any], **shared: Any) -> dict[str, Any]:
    return {"apiVersion": "mloc/v1", "kind": "Pipeline", "metadata": {"name": "g"},
            "spec": {"taskType": "echo", **shared, "graph": {"nodes": list(nodes)}}}


DIAMOND = graph(node("a", data={"x": 1}),
                node("b", "a", data={"from_a": "${a.result.echo.data.x}"}),
                node("c", "a", data={"from_a": "${stage.result.echo.data.x}"}),
                node("d", "b", "c", data={"b": "${b.result.echo.data}", "c": "${c.result.echo.data}",
                                          "a": "${a.result.echo.data.x}"}))


def shape(canvas: Any) -> Any:
    """The canvas as nested tuples of task-id-free names: ('chain', ...), ('group', ...), ('chord', ...)."""
    if isinstance(canvas, _chord):
        return ("chord", ("group", *(shape(t) for t in canvas.tasks)), shape(canvas.body))
    if isinstance(canvas, _chain):
        return ("chain", *(shape(t) for t in canvas.tasks))
    if isinstance(canvas, group):
        return ("group", *(shape(t) for t in canvas.tasks))
    return canvas["kwargs"]["pipeline"]["stage"]


def test_diamond_compiles_to_a_chain_with_a_chord_and_no_broker() -> None:
    pipeline = Pipeline.from_dict(DIAMOND)
    assert pipeline.is_graph
    assert [s.name for s in pipeline.stages] == ["a", "b", "c", "d"]
    d = pipeline.stages[3]
    assert d.depends_on == ("b", "c") and d.ancestors == ("a", "b", "c")
    canvas = pipeline.graph("pid", ["ta", "tb", "tc", "td"])
    assert shape(canvas) == ("chain", "a", ("chord", ("group", "b", "c"), "d"))
    first, join = canvas.tasks
    assert first.immutable and first.id == "ta" and first.options["queue"] == "tasks"
    assert join.body.id == "td"
    info = join.body.kwargs["pipeline"]
    assert info["graph"] is True and info["depends_on"] == ["b", "c"] and info["ancestors"] == ["a", "b", "c"]
    # A chain is refused for a graph; a linear pipeline's graph() is its chain.
    with pytest.raises(ValueError, match="graph"):
        pipeline.chain()
    linear = Pipeline.from_dict({"spec": {"taskType": "echo", "stages": [{"name": "x"}, {"name": "y"}]}})
    assert shape(linear.graph()) == ("chain", "x", "y")


@pytest.mark.parametrize(("deps", "expected"), [
    # Independent nodes: one group.
    ({"a": (), "b": ()}, ("group", "a", "b")),
    # Fan-in: a chord.
    ({"a": (), "b": (), "c": ("a", "b")}, ("chord", ("group", "a", "b"), "c")),
    # Unequal branches before a join: no node waits for more than it needs.
    ({"a": (), "b": ("a",), "c": (), "d": ("b", "c")}, ("chord", ("group", ("chain", "a", "b"), "c"), "d")),
    # Two sources feeding two sinks (no bottleneck): cut after the sources.
    ({"a": (), "b": (), "c": ("a", "b"), "d": ("a", "b")}, ("chord", ("group", "a", "b"), ("group", "c", "d"))),
    # Two independent chains.
    ({"a": (), "b": ("a",), "c": (), "d": ("c",)}, ("group", ("chain", "a", "b"), ("chain", "c", "d"))),
])
def test_canvas_shapes(deps: dict[str, tuple[str, ...]], expected: Any) -> None:
    from celery import signature

    def sig(name: str) -> Any:
        return signature("meshq.echo", kwargs={"pipeline": {"stage": name}}, immutable=True)

    assert shape(compile_canvas(list(deps), deps, sig)) == expected


def test_find_cycle_names_it() -> None:
    assert find_cycle({"a": ("c",), "b": ("a",), "c": ("b",)}) == ["a", "c", "b", "a"]
    assert find_cycle({"a": (), "b": ("a",)}) is None


def bad(mutate: Any) -> dict[str, Any]:
    document = copy.deepcopy(DIAMOND)
    mutate(document["spec"])
    return document


@pytest.mark.parametrize(("document", "field", "message"), [
    (bad(lambda s: s["graph"]["nodes"][0].update(dependsOn=["d"])), "spec.graph.nodes[0].dependsOn",
     "dependency cycle: a -> d -> b -> a"),
    (bad(lambda s: s["graph"]["nodes"][1].update(dependsOn=["a", "zz"])), "spec.graph.nodes[1].dependsOn[1]",
     "unknown node 'zz'"),
    (bad(lambda s: s["graph"]["nodes"][1].update(dependsOn=[])), "spec.graph.nodes[1].spec.data.from_a",
     "node 'a' is not an ancestor of 'b'"),
    (bad(lambda s: s["graph"]["nodes"][2]["spec"].update(data={"x": "${b.result.echo}"})),
     "spec.graph.nodes[2].spec.data.x", "node 'b' is not an ancestor of 'c'"),
    (bad(lambda s: s["graph"]["nodes"][3]["spec"].update(data={"x": "${stage.result.echo}"})),
     "spec.graph.nodes[3].spec.data.x", "depends on 2"),
    (bad(lambda s: s.update(stages=[{"name": "x"}])), "spec.graph", "not both"),
    (bad(lambda s: s["graph"]["nodes"][1].update(name="a")), "spec.graph.nodes[1].name", "duplicate node name"),
    (bad(lambda s: s["graph"].update(nodes=[])), "spec.graph.nodes", "non-empty"),
    (bad(lambda s: s["graph"]["nodes"][3].update(runOn={"node": "zz"})), "spec.graph.nodes[3].runOn.node",
     "unknown node"),
    (bad(lambda s: s["graph"]["nodes"][2].update(runOn={"node": "b"})), "spec.graph.nodes[2].runOn.node",
     "not an ancestor"),
    (bad(lambda s: s["graph"]["nodes"][2].update(after=["b"])), "spec.graph.nodes[2].after", "unknown field"),
    (bad(lambda s: s["graph"]["nodes"][1]["spec"].update(taskType="inference", parallel={"max_shards": 0})),
     "spec.graph.nodes[1].spec.parallel.max_shards", "greater than or equal to 1"),
    (bad(lambda s: s["graph"]["nodes"][1]["spec"].update(resources={"replicas": 0})),
     "spec.graph.nodes[1].spec.resources.replicas", "greater than or equal to 1"),
    (bad(lambda s: s["graph"]["nodes"][2]["spec"].update(echo={"sleep_s": -1})),
     "spec.graph.nodes[2].spec.echo.sleep_s", "greater than or equal"),
])
def test_bad_graphs_are_refused_naming_the_field(document: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        Pipeline.from_dict(document)
    assert info.value.field == field, str(info.value)
    assert message in str(info.value)


def test_nodes_run_on_and_tags() -> None:
    document = copy.deepcopy(DIAMOND)
    document["spec"]["graph"]["nodes"][1]["tags"] = ["gpu"]
    document["spec"]["graph"]["nodes"][3]["runOn"] = {"node": "a"}
    pipeline = Pipeline.from_dict(document)
    b, d = pipeline.stages[1], pipeline.stages[3]
    assert b.tags == ["gpu"] and d.run_on == "a"
    canvas = pipeline.graph()
    assert canvas.tasks[1].tasks[0].options["queue"] == "tasks.gpu"  # chain(a, chord([b, c], d))


# -- graph_template data ---------------------------------------------------------------------
RESULTS = {"pro": {"items": [{"output": "cheap"}, {"output": "fast\nand green"}]},
           "con": {"items": [{"output": "loud"}, {"output": "rare"}], "usage": {"total_tokens": 9}}}


def briefing(**template: Any) -> dict[str, Any]:
    return {"type": "graph_template", "template": template}


def test_two_column_briefing_builds_one_prompt_from_both_columns() -> None:
    data = briefing(name="two_column_briefing",
                    columns=[{"label": "Benefits", "node": "pro", "path": "items[1].output"},
                             {"label": "Risks", "expr": "con.result.items.0.output"}],
                    options={"intro": "Weigh these.", "closing": ["Be brief.", "Use bullets."]})
    prompts = build_prompts(data, RESULTS.__getitem__, "spec.data")
    assert prompts == ["Weigh these.\n• Benefits: fast\n  and green\n• Risks: loud\nBe brief.\nUse bullets."]
    default = build_prompts(briefing(columns=data["template"]["columns"]), RESULTS.__getitem__, "spec.data")[0]
    assert default.startswith("You are an energy strategist.") and "weigh the benefits against the risks." in default


def test_wildcard_columns_give_one_prompt_per_row_and_inline_text() -> None:
    data = briefing(text="Q{n}: for {Pro} / against {Against} ({col1_label}) {unknown}",
                    columns=[{"label": "Pro", "node": "pro", "path": "items[*].output"},
                             {"label": "Against", "node": "con", "path": "items[*].output"},
                             {"label": "n", "node": "con", "path": "usage.total_tokens"}])
    assert build_prompts(data, RESULTS.__getitem__, "spec.data") == [
        "Q9: for cheap / against loud (Against) {unknown}", "Q9: for fast\nand green / against rare (Against) {unknown}"]


def test_graph_template_errors_name_the_column() -> None:
    data = briefing(columns=[{"label": "A", "node": "pro", "path": "items.5.output"},
                             {"label": "B", "node": "con", "path": "items.0.output"}])
    with pytest.raises(SpecError) as info:
        build_prompts(data, RESULTS.__getitem__, "spec.graph.nodes[2].spec.data")
    assert info.value.field == "spec.graph.nodes[2].spec.data.template.columns[0]"
    data["template"]["columns"][0]["default"] = "n/a"
    assert "• A: n/a" in build_prompts(data, RESULTS.__getitem__, "spec.data")[0]


@pytest.mark.parametrize(("columns", "field", "message"), [
    ([{"label": "x", "node": "zz", "path": "items"}, {"label": "y", "node": "b", "path": "items"}],
     "spec.graph.nodes[3].spec.data.template.columns[0].node", "unknown node 'zz'"),
    ([{"label": "x", "expr": "d.items"}, {"label": "y", "node": "b", "path": "items"}],
     "spec.graph.nodes[3].spec.data.template.columns[0].expr", "not an ancestor"),
    ([{"label": "x", "node": "b", "path": "items"}], "spec.graph.nodes[3].spec.data.template.columns",
     "at least two columns"),
    ([{"label": "x"}, {"label": "y", "node": "b"}], "spec.graph.nodes[3].spec.data.template.columns[0]",
     "needs node and path"),
])
def test_graph_template_is_checked_at_submission(columns: list[dict[str, Any]], field: str, message: str) -> None:
    document = copy.deepcopy(DIAMOND)
    document["spec"]["graph"]["nodes"][3]["spec"] = {
        "taskType": "inference", "model": {"source": {"identifier": "/m"}},
        "data": briefing(columns=columns)}
    with pytest.raises(SpecError) as info:
        Pipeline.from_dict(document)
    assert info.value.field == field, str(info.value)
    assert message in str(info.value)


def test_graph_template_in_a_plain_task_is_refused() -> None:
    spec = {"taskType": "inference", "model": {"source": {"identifier": "/m"}},
            "data": briefing(columns=[{"label": "x", "node": "a", "path": "p"}, {"label": "y", "node": "a"}])}
    with pytest.raises(SpecError, match="use it in a graph node"):
        Pipeline.from_dict(spec)


def test_stages_are_parsed_as_a_path_of_graph_nodes() -> None:
    """A ``stages`` document is the graph whose stage i depends on stage i-1: same nodes, same canvas."""
    linear = Pipeline.from_dict({"spec": {"taskType": "echo", "stages": [
        {"name": "x"}, {"name": "y", "spec": {"data": {"v": "${x.result.echo}"}}},
        {"name": "z", "runOn": {"stage": "x"}}]}})
    path = Pipeline.from_dict(graph(node("x"), node("y", "x", data={"v": "${x.result.echo}"}),
                                    {**node("z", "y"), "runOn": {"node": "x"}}))
    nodes = [(s.name, s.depends_on, s.ancestors, s.run_on, s.spec) for s in linear.stages]
    assert nodes == [(s.name, s.depends_on, s.ancestors, s.run_on, s.spec) for s in path.stages]
    assert nodes[2][:4] == ("z", ("y",), ("x", "y"), "x")
    assert shape(linear.graph()) == shape(path.graph()) == ("chain", "x", "y", "z")
    # Only the path's signatures hand each stage the previous stage's result.
    assert not any(t.immutable for t in linear.chain().tasks) and all(t.immutable for t in path.graph().tasks)


def test_a_failed_stage_skips_every_later_stage_whatever_celery_stored_under_their_ids() -> None:
    from pipelines.status import mark_skipped

    stages = [{"name": "a", "state": "SUCCESS"}, {"name": "b", "state": "FAILURE", "error": "boom"},
              {"name": "c", "state": "FAILURE", "error": "boom"}, {"name": "d", "state": "PENDING"}]
    mark_skipped(stages, {"a": [], "b": ["a"], "c": ["b"], "d": ["c"]}, cancelled=False)
    assert [s["state"] for s in stages] == ["SUCCESS", "FAILURE", "SKIPPED", "SKIPPED"]
    assert "error" not in stages[2]
