"""
Helpers for tests of the admin listener: its URL, JSON and metrics over
loopback, and a log watcher.
"""

from __future__ import annotations

import json

from prometheus_client.parser import text_string_to_metric_families
from support import Rig


def answered_one_at_a_time(clock, fleet, backend, seconds: float = 3.0, each: float = 0.01) -> None:
    """
    C{backend} answers C{seconds} of requests one at a time, C{each} seconds
    each, another sent at once: a learned limit measures one second of work
    a second at one request in flight.
    """
    for _ in range(round(seconds / each)):
        load = fleet.start(backend, "clip-visual")
        clock.advance(each)
        fleet.finish(load, each)


def admin_url(r: Rig) -> str:
    port = r.balancer.admin.port.getHost().port
    return f"http://127.0.0.1:{port}"


async def status(r: Rig) -> dict:
    response = await r.client.get(admin_url(r) + "/api/status")
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    return json.loads(await response.content())


def host(document: dict, address: str) -> dict:
    [found] = [h for h in document["hosts"] if h["address"] == address]
    return found


async def act(r: Rig, address: str, action: str, **kw):
    """
    POST an action; the answer's status and JSON body.
    """
    response = await r.client.post(f"{admin_url(r)}/api/hosts/{address}/{action}", **kw)
    return response.code, json.loads(await response.content())


async def metrics(r: Rig) -> dict:
    """
    The samples of C{/metrics}: C{{(name, frozenset(labels.items())): value}}.
    """
    response = await r.client.get(admin_url(r) + "/metrics")
    assert response.code == 200
    text = (await response.content()).decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def sample(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def events(r: Rig, key: str) -> list[dict]:
    return [e for e in r.events if e.get("imml_event") == key]
