"""The web view (``/ui/``) of a real ``meshq serve``, with real workers, in headless Chromium.

Without Chromium (Debian's ``chromium``) or Playwright the browser tests are skipped with
"BROWSER TEST NOT RUN" in pytest's summary (``-ra``): they never pass without a browser.
The sign-in and cross-site checks need no browser and always run.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import ROOT, ServerProcess, wait_for

TOKEN = "ui-t0ken-for-tests"
SCRIPT = "<script>alert(1)</script>"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DOCS = ROOT / "docs"
try:
    from playwright.sync_api import Page, sync_playwright
except ImportError:  # the test extras are not installed
    sync_playwright = None  # type: ignore[assignment]



def browser_test(test: Callable[..., None]) -> Callable[..., None]:
    """Marks a test that drives Chromium; skipped, and said so, where it cannot."""
    for mark in (pytest.mark.browser,
                 pytest.mark.skipif(CHROMIUM is None, reason="BROWSER TEST NOT RUN: no Chromium on this "
                                    "machine (apt-get install chromium; .ci/run does)"),
                 pytest.mark.skipif(sync_playwright is None, reason="BROWSER TEST NOT RUN: Playwright is "
                                    "missing (pip install -e '.[test]')")):
        test = mark(test)
    return test


def node(name: str, *deps: str, **spec: Any) -> dict[str, Any]:
    return {"name": name, "spec": spec, **({"dependsOn": list(deps)} if deps else {})}


def submit(document: dict[str, Any]) -> Any:
    from pipelines import Pipeline

    return Pipeline.from_dict(document).submit()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                              args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def signed_in(browser: Any) -> Callable[[ServerProcess], Page]:
    """A page of a fresh browser context signed in to ``server`` through the login form;
    any dialog (an ``alert`` an output managed to run) is recorded on ``page.dialogs``."""
    def open_for(server: ServerProcess) -> Page:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        dialogs: list[str] = []
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        page.dialogs = dialogs  # type: ignore[attr-defined]
        page.goto(f"{server.base_url}/ui/")
        page.fill("input[name=token]", TOKEN)
        page.click("#login button[type=submit]")
        page.wait_for_selector("#runs")
        cookie = next(c for c in context.cookies() if c["name"] == "meshq_ui")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui", cookie
        assert TOKEN not in cookie["value"] and TOKEN not in page.url
        return page  # type: ignore[no-any-return]
    return open_for


def node_states(page: Page) -> dict[str, str]:
    return dict(page.eval_on_selector_all("#dag g.node", "gs => gs.map(g => [g.dataset.node, g.dataset.state])"))


def wait_states(page: Page, wanted: dict[str, str], timeout_s: float) -> dict[str, str]:
    """Wait until the page, without a reload, shows ``wanted`` (a subset of the node states)."""
    def shown() -> dict[str, str] | None:
        states = node_states(page)
        return states if all(states.get(k) == v for k, v in wanted.items()) else None

    return wait_for(shown, timeout_s, interval_s=0.3, message=f"the page to show {wanted}")


def screenshot(page: Page, name: str, tmp_path: Path) -> None:
    """Into docs/ when ``MESHQ_REFRESH_SCREENSHOTS=1`` (docs/MONITORING.md), else into tmp_path."""
    import os

    folder = DOCS if os.environ.get("MESHQ_REFRESH_SCREENSHOTS") == "1" else tmp_path
    page.screenshot(path=str(folder / name), full_page=True)
    assert (folder / name).stat().st_size > 10_000


# -- in the browser ------------------------------------------------------------------
@browser_test
def test_a_diamond_updates_live_and_shows_its_workers_files_and_outputs_as_text(
        server_factory, worker_factory, signed_in, tmp_path: Path) -> None:
    server = server_factory(token=TOKEN)
    a100 = {"gpus": [{"name": "NVIDIA A100-SXM4-80GB", "memory_total_bytes": 85_899_345_920}]}
    worker_factory("gpu,a100", worker_id="ui-w1", results_dir=server.results_dir,
                   env={"MESHQ_FAKE_HARDWARE": json.dumps(a100)})
    worker_factory("cpu", worker_id="ui-w2", results_dir=server.results_dir)
    page = signed_in(server)

    # The workers page lists both with their tags and capability queues.
    page.goto(f"{server.base_url}/ui/workers")
    rows = {r["id"]: r for r in page.eval_on_selector_all(
        "tr.worker", "rs => rs.map(r => ({id: r.dataset.worker, tags: [...r.querySelectorAll('.tag')]"
                     ".map(t => t.textContent), queues: r.querySelector('.queues').textContent, "
                     "dead: r.classList.contains('dead')}))")}
    assert rows["ui-w1"]["tags"] == ["a100", "gpu"] and rows["ui-w2"]["tags"] == ["cpu"], rows
    assert "tasks.a100+gpu" in rows["ui-w1"]["queues"] and not rows["ui-w1"]["dead"]
    assert "NVIDIA A100-SXM4-80GB 80.0 GiB" in page.text_content("tr.worker[data-worker=ui-w1]")

    slow = {"sleep_s": 3.0, "steps": 6}
    run = submit({"metadata": {"name": "diamond", "owner": "ana", "project": "webui"},
                  "spec": {"taskType": "echo", "graph": {"nodes": [
                      node("a", data={"question": "why?"}, echo=slow),
                      node("b", "a", data={"html": SCRIPT}, echo=slow),
                      node("c", "a", echo=slow),
                      node("d", "b", "c", data={"b": "${b.result.echo.data.html}"})]}}})
    page.goto(f"{server.base_url}/ui/pipelines/{run.id}")
    page.evaluate("window.notReloaded = true")
    assert len(page.query_selector_all("#dag g.node")) == 4
    edges = page.eval_on_selector_all("#dag path.edge", "es => es.map(e => e.dataset.from + '>' + e.dataset.to)")
    assert sorted(edges) == ["a>b", "a>c", "b>d", "c>d"]
    seen_running = wait_for(lambda: node_states(page).get("a") in ("STARTED", "PROGRESS") and node_states(page),
                            60, interval_s=0.2, message="node a running on the page")
    assert seen_running["d"] == "PENDING"
    wait_for(lambda: node_states(page).get("b") == "PROGRESS", 60, interval_s=0.2, message="b running")
    screenshot(page, "webui-pipeline.png", tmp_path)
    fleet = page.context.new_page()  # the pipeline's page stays open, never reloaded
    fleet.goto(f"{server.base_url}/ui/workers")
    current = fleet.eval_on_selector_all("tr.worker td.current a", "as => as.map(a => a.textContent)")
    node_ids = {s["task_id"] for s in run.stages}
    assert current and set(current) <= node_ids, current
    screenshot(fleet, "webui-workers.png", tmp_path)
    fleet.close()
    wait_states(page, dict.fromkeys("abcd", "SUCCESS"), 120)
    assert page.evaluate("window.notReloaded") is True  # the states changed without a reload
    assert page.text_content("#run-state") == "SUCCESS"

    # An output holding a script is shown as text: it is on the page, and no dialog opened.
    d_result = page.text_content(".result[data-node=d] .result-text")
    assert SCRIPT in d_result, d_result
    assert page.dialogs == [] and page.query_selector("#live script") is None
    # responses.json of a node links to the file, which the signed-in browser can read.
    link = page.get_attribute(".node-row[data-node=b] a.file:text('responses.json')", "href")
    reply = page.request.get(f"{server.base_url}{link}")
    assert reply.ok and reply.json()["echo"]["data"] == {"html": SCRIPT}
    assert "sandbox" in reply.headers["content-security-policy"]

    # The list shows it, newest first, with its metadata and node counts.
    page.goto(f"{server.base_url}/ui/")
    row = page.query_selector(f"tr.run[data-id='{run.id}']")
    assert row is not None
    text = row.text_content()
    assert "diamond" in text and "ana" in text and "webui" in text and "SUCCESS 4" in text, text
    screenshot(page, "webui-pipelines.png", tmp_path)


@browser_test
def test_a_failing_node_shows_its_error_and_its_dependants_skipped(server_factory, worker_factory,
                                                                   signed_in) -> None:
    server = server_factory(token=TOKEN)
    worker_factory(worker_id="ui-f1")
    page = signed_in(server)
    run = submit({"spec": {"taskType": "echo", "graph": {"nodes": [
        node("a", echo={"sleep_s": 2, "steps": 2}),
        node("bad", "a", data={"x": "${a.result.nope}"}),
        node("after", "bad"), node("last", "after")]}}})
    page.goto(f"{server.base_url}/ui/pipelines/{run.id}")
    page.evaluate("window.notReloaded = true")
    wait_states(page, {"a": "SUCCESS", "bad": "FAILURE", "after": "SKIPPED", "last": "SKIPPED"}, 90)
    assert page.evaluate("window.notReloaded") is True
    error = page.text_content(".error-row[data-node=bad] pre.error")
    assert "nope" in error, error
    assert page.text_content("#run-state") == "FAILURE"


@browser_test
@pytest.mark.slow
def test_a_training_node_draws_its_loss_curve_and_cancel_revokes_a_running_one(
        server_factory, worker_factory, signed_in, tiny_model_dir) -> None:
    from tests.test_training_worker import lora_spec

    server = server_factory(token=TOKEN)
    worker_factory(worker_id="ui-t1")
    page = signed_in(server)
    short = submit({"metadata": {"name": "short-lora"}, "spec": lora_spec(tiny_model_dir, max_steps=6)})
    page.goto(f"{server.base_url}/ui/pipelines/{short.id}")
    wait_for(lambda: page.query_selector("#run-state") and page.text_content("#run-state") == "SUCCESS",
             240, interval_s=0.5, message="the short training to succeed on the page")
    points = page.query_selector_all("figure.loss svg circle.point")
    assert len(points) >= 2 and page.get_attribute("figure.loss svg polyline.curve", "points")

    long = submit({"metadata": {"name": "long-lora"},
                   "spec": lora_spec(tiny_model_dir, max_steps=100_000, batch_size=1)})
    page.goto(f"{server.base_url}/ui/pipelines/{long.id}")
    name = long.stages[0]["name"]
    wait_states(page, {name: "PROGRESS"}, 240)
    # While it runs, its curve grows from the progress reports (no reload).
    wait_for(lambda: len(page.query_selector_all("figure.loss svg circle.point")) >= 3, 120, interval_s=0.5,
             message="the running training's loss curve to have points")
    page.click("#cancel")
    page.wait_for_url(re.compile(rf"/ui/pipelines/{long.id}$"))
    wait_states(page, {name: "REVOKED"}, 120)
    assert page.text_content("#run-state") == "CANCELLED"


# -- no browser needed -------------------------------------------------------------------
def test_without_the_token_every_page_answers_the_login_form_and_never_data(server_factory, worker_factory,
                                                                              redis_client) -> None:
    server = server_factory(token=TOKEN)
    worker_factory(worker_id="ui-secret-worker")
    run = submit({"metadata": {"name": "private-run"}, "spec": {"taskType": "echo", "data": {"x": 1}}})
    run.wait(timeout=60)
    base = f"{server.base_url}/ui"
    for path in ("/", "/workers", f"/pipelines/{run.id}", f"/pipelines/{run.id}?fragment=1",
                 f"/files/{run.id}/responses.json"):
        for cookies in ({}, {"meshq_ui": "forged"}, {"meshq_ui": TOKEN}):
            reply = requests.get(base + path, cookies=cookies, timeout=10, allow_redirects=False)
            assert reply.status_code == 401 and 'name="token"' in reply.text, (path, reply.status_code)
            assert "private-run" not in reply.text and "ui-secret-worker" not in reply.text
            assert run.id not in reply.text
    # A wrong token is refused; the right one gives a cookie (HttpOnly, SameSite=Strict), never a URL.
    session = requests.Session()
    form = session.get(f"{base}/login", timeout=10).text
    form_token = re.search(r'name="form_token" value="([0-9a-f]+)"', form).group(1)
    wrong = session.post(f"{base}/login", data={"token": "nope", "form_token": form_token}, timeout=10,
                         allow_redirects=False)
    assert wrong.status_code == 403 and not session.cookies
    right = session.post(f"{base}/login", data={"token": TOKEN, "form_token": form_token}, timeout=10,
                         allow_redirects=False)
    assert right.status_code == 303 and TOKEN not in right.headers["location"]
    set_cookie = right.headers["set-cookie"]
    assert "HttpOnly" in set_cookie and "SameSite=strict" in set_cookie and TOKEN not in set_cookie
    listed = session.get(f"{base}/", timeout=10)
    assert listed.ok and "private-run" in listed.text
    # The API keeps its bearer token: the web view's cookie opens no API route.
    assert session.get(f"{server.base_url}/api/v1/workers", timeout=10).status_code == 401


def test_cancel_is_refused_from_another_site_and_without_the_form_token(server_factory, worker_factory) -> None:
    server = server_factory(token=TOKEN)
    worker_factory(worker_id="ui-c1")
    run = submit({"spec": {"taskType": "echo", "echo": {"sleep_s": 60, "steps": 60}}})
    wait_for(lambda: run.status()["state"] == "RUNNING", 60, message="the task to run")
    base = f"{server.base_url}/ui"
    session = requests.Session()
    form = session.get(f"{base}/login", timeout=10).text
    form_token = re.search(r'name="form_token" value="([0-9a-f]+)"', form).group(1)
    session.post(f"{base}/login", data={"token": TOKEN, "form_token": form_token}, timeout=10)
    cancel = f"{base}/pipelines/{run.id}/cancel"
    attempts = [({}, {}), ({"form_token": "0" * 64}, {}),
                ({"form_token": form_token}, {"Origin": "http://evil.example"}),
                ({"form_token": form_token}, {"Sec-Fetch-Site": "cross-site"})]
    for data, headers in attempts:
        reply = session.post(cancel, data=data, headers=headers, timeout=10, allow_redirects=False)
        assert reply.status_code == 403, (data, headers, reply.status_code)
    assert run.status()["state"] == "RUNNING"
    done = session.post(cancel, data={"form_token": form_token}, timeout=10, allow_redirects=False,
                        headers={"Origin": server.base_url, "Sec-Fetch-Site": "same-origin"})
    assert done.status_code == 303
    wait_for(lambda: run.status()["state"] == "CANCELLED", 60, message="the task to be cancelled")


def test_a_64_node_graph_and_100_workers_render_from_fake_records(server_factory, redis_client) -> None:
    """The pages over records written straight into Redis (bench/webui.py times them)."""
    from bench.webui import record_fake_fleet, record_fake_graph

    server = server_factory()
    pipeline_id = record_fake_graph(redis_client, nodes=64)
    record_fake_fleet(redis_client, workers=100, dead_every=10)
    page = requests.get(f"{server.base_url}/ui/pipelines/{pipeline_id}", timeout=30)
    assert page.ok
    assert len(re.findall(r'<g class="node ', page.text)) == 64
    assert len(re.findall(r'<path class="edge"', page.text)) == 7 * 8 * 2  # each node after two of the layer before
    assert "s3cret" not in page.text and "[redacted]" in page.text  # a result's headers values
    assert len(re.findall(r'<circle class="point"', page.text)) >= 4 * 40  # the finished training nodes' curves
    workers = requests.get(f"{server.base_url}/ui/workers", timeout=30)
    assert workers.ok
    assert len(re.findall(r'<tr class="worker [a-z ]*" data-worker="fake-w', workers.text)) == 100
    assert len(re.findall(r'<tr class="worker dead" data-worker="fake-w', workers.text)) == 10
    assert workers.text.count("NVIDIA H100 80GB HBM3") == 800
