"""
The documentation as a reader follows it: every link to a file or heading
leads somewhere, every doc the code names exists, the licence is the one
the package declares, and the README's curl examples of C{/predict} get an
answer from a balancer.
"""

import configparser
import json
import os
import re
from pathlib import Path

import pytest
from support import bounded, rig
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(markdown: Path) -> set[str]:
    """
    The anchors GitHub gives the headings of C{markdown}.
    """
    found = set()
    for line in markdown.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower().replace("`", "")
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def links(markdown: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", markdown.read_text(), flags=re.S)
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("markdown", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_leads_somewhere(markdown):
    broken = []
    for target in links(markdown):
        path, _, anchor = target.partition("#")
        file = (markdown.parent / path).resolve() if path else markdown
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in anchors(file)):
            broken.append(target)
    assert broken == []


def test_every_doc_the_code_names_exists():
    named = {}
    for source in [*ROOT.glob("imml/**/*.py"), *ROOT.glob("tests/**/*.py"), ROOT / "Dockerfile", *DOCS]:
        for doc in re.findall(r"\bdocs/[\w.-]+\.md\b", source.read_text()):
            named.setdefault(doc, source.relative_to(ROOT))
    assert named, "no doc named anywhere: the pattern is wrong"
    assert {doc: where for doc, where in named.items() if not (ROOT / doc).exists()} == {}


def test_the_licence_is_the_one_the_package_declares():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    assert setup["metadata"]["license"] == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n")


def readme_curls() -> list[str]:
    """
    The curl commands of the README's C{/predict} examples, one line each.
    """
    text = (ROOT / "README.md").read_text()
    section = text.split("### Asking what Immich asks", 1)[1].split("\n## ", 1)[0]
    commands = [c.replace("\\\n", " ") for c in re.findall(r"^curl .*?(?<!\\)$", section, flags=re.M | re.S)]
    assert len(commands) == 2, commands
    return commands


@bounded(60)
async def test_the_readme_predict_examples_get_an_embedding(tmp_path):
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0 a photo, as far as the stand-in hosts care")
    async with await rig([{"name": "a"}, {"name": "b"}]) as r:
        for command in readme_curls():
            out, err, code = await getProcessOutputAndValue(
                "/bin/sh",
                ["-c", command.replace("http://127.0.0.1:3003", r.url)],
                env=dict(os.environ),
                path=str(tmp_path),
                reactor=reactor,
            )
            assert code == 0, err
            answer = json.loads(out)
            assert len(json.loads(answer["clip"])) == 512
        assert [e["task"] for e in r.request_events()] == ["clip-textual", "clip-visual"]
