"""
docs/kubernetes.md stays true: the options and variables its manifests name
exist, the configuration its ConfigMap carries parses, the probes ask the
ports and paths the balancer serves, and a probe naming the pod by its
address is answered.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from support import bounded, rig

from imml.backends import DnsName
from imml.tap import Options

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "kubernetes.md"


def manifests() -> str:
    [block] = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.S)
    return block


def literal(text: str, key: str) -> str:
    """
    The literal block (C{key: |}) of a YAML document, unindented.
    """
    lines = text.splitlines()
    [start] = [i for i, line in enumerate(lines) if line.strip() == f"{key}: |"]
    indent = len(lines[start]) - len(lines[start].lstrip()) + 2
    body = []
    for line in lines[start + 1 :]:
        if line.strip() and len(line) - len(line.lstrip()) < indent:
            break
        body.append(line[indent:])
    return "\n".join(body) + "\n"


def value(text: str, key: str) -> str:
    [found] = re.findall(rf"^\s*{re.escape(key)}: (.+)$", text, flags=re.M)
    return found.strip()


def port_named(text: str, name: str) -> int:
    [found] = re.findall(rf"- name: {name}\n\s+containerPort: (\d+)", text)
    return int(found)


def probe(text: str, kind: str) -> tuple[str, str]:
    [(path, port)] = re.findall(rf"{kind}:\n\s+httpGet:\n\s+path: (\S+)\n\s+port: (\S+)", text)
    return path, port


def test_the_manifests_options_and_configuration_are_the_balancers(tmp_path):
    text = manifests()
    args = json.loads(value(text, "args"))
    config = tmp_path / "imml.toml"
    config.write_text(literal(text, "imml.toml"))
    # (IMML_CONFIG is --config: imml.entrypoint)
    assert re.findall(r"- name: (IMML_\w+)", text) == ["IMML_CONFIG"]
    assert "IMML_CONFIG" in (ROOT / "imml" / "entrypoint.py").read_text()
    options = Options()
    options.parseOptions([*args, "--config", str(config)])
    [(address, settings)] = options["hosts"]
    # The pool's name is the headless Service's.
    assert isinstance(address, DnsName) and address.port == 3003
    service = re.search(r"name: (\S+)\n\s+namespace: (\S+)\nspec:\n\s+clusterIP: None", text)
    assert address.name == f"{service[1]}.{service[2]}.svc.cluster.local"
    # The probes ask what listens where.
    assert options["listen"] == f"tcp:{port_named(text, 'http')}"
    assert options["admin"] == f"tcp:{port_named(text, 'admin')}"
    assert probe(text, "readinessProbe") == ("/ping", "http")
    assert probe(text, "livenessProbe") == ("/api/status", "admin")
    # Kubernetes waits for the preStop sleep and the drain before it kills.
    grace = int(value(text, "terminationGracePeriodSeconds"))
    assert grace > int(value(text, "seconds")) + options["drain-timeout"]


@bounded(30)
async def test_probes_that_name_the_pod_by_its_address_are_answered():
    async with await rig([{"name": "a"}]) as r:
        admin = r.balancer.admin.port.getHost().port
        ready = await r.client.get(r.url + "/ping", headers={"host": "10.42.0.17:3003"})
        assert (ready.code, await ready.content()) == (200, b"pong")
        alive = await r.client.get(f"http://127.0.0.1:{admin}/api/status", headers={"host": "10.42.0.17:8080"})
        assert alive.code == 200
        assert json.loads(await alive.content())["hosts"][0]["health"] == "up"
        # (a name it does not know is refused: the guard is on)
        named = await r.client.get(f"http://127.0.0.1:{admin}/api/status", headers={"host": "imml.example"})
        assert named.code == 421
        await named.content()
