"""
The provider hook in a real interpreter: the child's environment puts it
first on PYTHONPATH, and Immich's provider list comes out in the user's
order whatever the import order, without touching Immich's files.
"""

import json
import os
import subprocess

import pytest
from mac_helpers import FAKE_ML, FAKE_ORT, PYTHON

from imml.mac.providers import HOOK_DIR, child_environment, setting_name

IMMICH_ORDER = "import immich_ml.models.constants; from immich_ml.sessions.ort import default_providers"
ORT_FIRST = "import onnxruntime; " + IMMICH_ORDER


def providers_seen(wanted, code, tmp_path, extra_path=()):
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "IMML_PROVIDERS")}
    base["PYTHONPATH"] = os.pathsep.join([*extra_path, str(FAKE_ORT)])
    env = child_environment(base, PYTHON, "127.0.0.1", 1, tmp_path, wanted)
    done = subprocess.run(
        [PYTHON, "-c", code + "; import json; print(json.dumps(default_providers()))"],
        cwd=FAKE_ML,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout), done.stderr


@pytest.mark.parametrize("code", [IMMICH_ORDER, ORT_FIRST])
def test_order_follows_the_user(code, tmp_path):
    seen, stderr = providers_seen(("CPUExecutionProvider", "CoreMLExecutionProvider"), code, tmp_path)
    assert seen == ["CPUExecutionProvider", "CoreMLExecutionProvider"]
    assert "imml provider hook" in stderr


def test_without_the_hook_immich_decides(tmp_path):
    seen, stderr = providers_seen(None, IMMICH_ORDER, tmp_path)
    assert seen == ["CoreMLExecutionProvider", "CPUExecutionProvider"]
    assert "imml provider hook" not in stderr


def test_unavailable_providers_are_dropped(tmp_path):
    seen, _ = providers_seen(("CUDAExecutionProvider", "CPUExecutionProvider"), IMMICH_ORDER, tmp_path)
    assert seen == ["CPUExecutionProvider"]


def test_an_existing_sitecustomize_still_runs(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "sitecustomize.py").write_text("import os; os.environ['THEIRS_RAN'] = 'yes'\n")
    code = IMMICH_ORDER + "; import os; assert os.environ['THEIRS_RAN'] == 'yes'"
    seen, _ = providers_seen(("CPUExecutionProvider",), code, tmp_path, extra_path=[str(theirs)])
    assert seen == ["CPUExecutionProvider"]


def test_child_environment(tmp_path):
    base = {"PATH": "/usr/bin", "PYTHONPATH": "/x", "MACHINE_LEARNING_PRELOAD__CLIP": "keep"}
    env = child_environment(
        base,
        "/venv/bin/python",
        "0.0.0.0",
        3003,
        "/cache",
        ("CPUExecutionProvider",),
        [("MACHINE_LEARNING_MODEL_TTL", "0")],
    )
    assert env["PATH"] == "/venv/bin:/usr/bin"
    assert env["PYTHONPATH"] == f"{HOOK_DIR}:/x"
    assert env["IMML_PROVIDERS"] == "CPUExecutionProvider"
    assert (env["IMMICH_HOST"], env["IMMICH_PORT"]) == ("0.0.0.0", "3003")
    assert env["MACHINE_LEARNING_CACHE_FOLDER"] == "/cache"
    assert env["MACHINE_LEARNING_MODEL_TTL"] == "0"
    assert env["MACHINE_LEARNING_PRELOAD__CLIP"] == "keep"
    assert setting_name("model_ttl") == "MACHINE_LEARNING_MODEL_TTL"
