"""
The Grafana dashboard in docs/: importable in Grafana 10 (it asks for its
Prometheus data source; its panels have titles, unique ids and places of
their own), and every metric its queries name exists in a real /metrics
scrape of a balancer that has answered, retried, hedged and failed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from steering import admin_url
from support import bounded, rig, until

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana-dashboard.json"
DATASOURCE = "${DS_PROMETHEUS}"

#: The sample names each type of metric family exposes, after its name.
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "gauge": ("",),
    "info": ("_info",),
    "unknown": ("",),
}

#: PromQL's words that look like metric names: operators, modifiers, numbers.
KEYWORDS = frozenset("and or unless bool offset by without on ignoring group_left group_right inf nan".split())


def metric_names(expr: str) -> set[str]:
    """
    The metric names a PromQL expression selects: what is left once its
    strings, label matchers, ranges, grouping label lists, functions and
    keywords are taken out.
    """
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', " ", expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for token in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*(?![\w:])(?!\s*\()", expr):
        if token.group().lower() not in KEYWORDS:
            names.add(token.group())
    return names


def test_metric_names_are_read_out_of_promql():
    assert metric_names(
        'histogram_quantile(0.95, sum by (task, le) (rate(a_seconds_bucket{x="y", le=~"1|2"}[$__rate_interval])))'
    ) == {"a_seconds_bucket"}
    assert metric_names(
        "sum without (instance) (b_total offset 5m) / on (backend) group_left (name) c_info * 1e3 and d"
    ) == {"b_total", "c_info", "d"}
    assert metric_names('time() - max(e{job="by (x)"}) > bool 0') == {"e"}
    assert metric_names("sum(rate(f_total{a='}'}[5m:1m]))") == {"f_total"}


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict) -> Iterator[dict]:
    """
    Every panel, rows and the panels of collapsed rows included.
    """
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", ())


def queries(dashboard: dict) -> Iterator[str]:
    """
    The PromQL of every panel's targets and of the template variables.
    """
    for panel in panels(dashboard):
        for target in panel.get("targets", ()):
            yield target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            selector = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query)
            yield selector.group(1) if selector else query


def test_it_asks_for_its_prometheus_on_import():
    dashboard = load()
    [source] = dashboard["__inputs"]
    assert (source["name"], source["type"], source["pluginId"]) == ("DS_PROMETHEUS", "datasource", "prometheus")
    [grafana] = [r for r in dashboard["__requires"] if r["id"] == "grafana"]
    assert int(grafana["version"].split(".")[0]) >= 10
    assert dashboard["id"] is None and dashboard["uid"] and dashboard["title"]
    kinds = {r["id"] for r in dashboard["__requires"] if r["type"] == "panel"}
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["type"] in kinds, panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE, panel["title"]
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == DATASOURCE


def test_panels_have_titles_unique_ids_and_places_of_their_own():
    dashboard = load()
    all_panels = list(panels(dashboard))
    assert all(isinstance(p["title"], str) and p["title"].strip() for p in all_panels)
    ids = [p["id"] for p in all_panels]
    assert all(isinstance(i, int) for i in ids) and len(set(ids)) == len(ids)
    targets = [t for p in all_panels for t in p.get("targets", ())]
    for panel in all_panels:
        refs = [t["refId"] for t in panel.get("targets", ())]
        assert len(set(refs)) == len(refs), panel["title"]
    assert targets
    places = [(p["title"], p["gridPos"]) for p in dashboard["panels"]]
    for title, g in places:
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, title
    for i, (one, a) in enumerate(places):
        for other, b in places[i + 1 :]:
            apart = (
                a["x"] + a["w"] <= b["x"]
                or b["x"] + b["w"] <= a["x"]
                or a["y"] + a["h"] <= b["y"]
                or b["y"] + b["h"] <= a["y"]
            )
            assert apart, f"{one!r} overlaps {other!r}"


def test_it_shows_what_an_operator_needs():
    used = set().union(*(metric_names(q) for q in queries(load())))
    for needed in (
        "imml_backend_requests_total",  # requests/s by host and task
        "imml_request_duration_seconds_bucket",  # p50/p95 by task
        "imml_backend_request_duration_seconds_bucket",
        "imml_queue_depth",  # the queue
        "imml_queue_wait_seconds_bucket",
        "imml_queue_oldest_wait_seconds",
        "imml_backend_state",  # host states
        "imml_backend_up",
        "imml_backend_retries_total",
        "imml_backend_hedges_total",
        "imml_backend_errors_total",
    ):
        assert needed in used, needed


def scrape(text: str) -> tuple[dict[str, str], set[str]]:
    """
    A scrape's metric families (name to type) and the names of its samples.
    """
    families = list(text_string_to_metric_families(text))
    return {f.name: f.type for f in families}, {s.name for f in families for s in f.samples}


def check_names(names: set[str], families: dict[str, str], samples: set[str]) -> None:
    """
    Each of C{names} is a family's name with a suffix its type gives its
    samples (a counter's C{_total}, a histogram's C{_bucket}, C{_sum} and
    C{_count}, nothing for a gauge), and the scrape has samples of it.
    """
    for name in sorted(names):
        owners = [f for f, kind in families.items() if name.startswith(f) and name[len(f) :] in SUFFIXES[kind]]
        assert owners, f"{name}: no metric of /metrics has samples of that name"
        assert name in samples, f"{name}: /metrics has no samples of it"


def test_a_name_that_is_not_scraped_or_has_the_wrong_suffix_is_caught():
    families, samples = scrape(
        '# TYPE a counter\na_total 1\n# TYPE h histogram\nh_bucket{le="+Inf"} 1\nh_sum 1\nh_count 1\n'
        "# TYPE g gauge\ng 1\n# TYPE e histogram\n"
    )
    check_names({"a_total", "h_bucket", "h_sum", "h_count", "g"}, families, samples)
    for wrong in ("a", "h", "g_bucket", "g_total", "nothing_total", "e_bucket"):
        with pytest.raises(AssertionError):
            check_names({wrong}, families, samples)


@bounded(30)
async def test_every_metric_the_dashboard_queries_is_in_metrics():
    async with await rig([dict(name="h0"), dict(name="h1")], "--strategy", "failover", "--fall", "1") as r:
        first, second = r.hosts
        # Retries and errors: the first host answers 503, the second answers.
        first.mode = "error503"
        for task in ("clip-visual", "clip-textual", "ocr"):
            response = await r.predict(task=task)
            assert response.code == 200
            await response.content()
        # A hedge: the first host takes a request, then fails its checks
        # with the request on it, which the second host answers.
        first.mode, first.service_time = "ok", 30.0
        pending = r.predict(task="faces")
        await until(lambda: first.in_flight == 1)
        first.mode = "ping-fail"
        response = await pending
        assert response.code == 200
        await response.content()

        response = await r.client.get(admin_url(r) + "/metrics")
        assert response.code == 200
        families, samples = scrape((await response.content()).decode())
        names = set().union(*(metric_names(q) for q in queries(load())))
        assert names
        check_names(names, families, samples)
