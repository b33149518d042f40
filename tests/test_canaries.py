"""
The agreement check's canaries and comparisons, as pure functions: what a
host's answer reads as, which answers agree (rounding does, another model
does not), the options' parsers, and the pictures shipped in the package.
"""

import importlib.util
import json

import pytest
from support import ROOT

from imml import canaries
from imml.agreement import THRESHOLD, parse_switch, parse_thresholds
from imml.canaries import CANARY_TASKS, Unreadable, compare, model_of, read
from imml.testing import ENTRIES, parse_predict
from imml.testing.answers import answer_for, read_entries


def answers(task: str, vectors: str = "exact") -> list[bytes]:
    """A fake host's answers to C{task}'s canary, its embeddings like C{vectors}."""
    kind, models = read_entries(ENTRIES[task])
    return [answer_for(kind, models, image, text, vectors=vectors) for image, text in canaries.inputs(task)]


@pytest.mark.parametrize("task", CANARY_TASKS)
def test_rounding_to_half_precision_agrees_far_above_the_threshold(task):
    result = compare(read(task, answers(task, "fp16")), read(task, answers(task)), THRESHOLD)
    assert result.agrees and result.similarity > 0.9999


@pytest.mark.parametrize("task", CANARY_TASKS)
def test_another_model_disagrees(task):
    result = compare(read(task, answers(task, "other-model")), read(task, answers(task)), THRESHOLD)
    assert not result.agrees and result.similarity < 0.5
    assert "below 0.99" in result.reason


@pytest.mark.parametrize("task", CANARY_TASKS)
def test_vectors_of_another_length_disagree_and_say_so(task):
    result = compare(read(task, answers(task, "wrong-shape")), read(task, answers(task)), THRESHOLD)
    assert (result.agrees, result.similarity) == (False, None)
    assert result.reason == "vectors of 768 values, not 512"


def test_another_number_of_faces_or_other_keys_disagree():
    [one] = answers("faces")
    answer = json.loads(one)
    two = dict(answer, **{"facial-recognition": answer["facial-recognition"] * 2})
    result = compare(read("faces", [json.dumps(two).encode()]), read("faces", [one]), THRESHOLD)
    assert (result.agrees, result.reason) == (False, "2 faces found, not 1")
    fewer = {k: v for k, v in answer.items() if k != "imageWidth"}
    result = compare(read("faces", [json.dumps(fewer).encode()]), read("faces", [one]), THRESHOLD)
    assert not result.agrees and "keys" in result.reason


def test_no_face_found_anywhere_compares_the_shape_alone():
    empty = json.dumps({"facial-recognition": [], "imageHeight": 128, "imageWidth": 112}).encode()
    result = compare(read("faces", [empty]), read("faces", [empty]), THRESHOLD)
    assert (result.agrees, result.similarity) == (True, None)


@pytest.mark.parametrize(
    "task, body, why",
    [
        ("clip-visual", b"Internal Server Error", "not JSON"),
        ("clip-visual", b'{"ocr": {}}', "no 'clip'"),
        ("clip-visual", b'{"clip": "[0.1, \\"x\\"]"}', "not a list of numbers"),
        ("clip-textual", b'{"clip": "[0.1, 0.2"}', "not a list of numbers"),
        ("faces", b'{"facial-recognition": [{"score": 0.9}]}', "faces with embeddings"),
    ],
)
def test_an_answer_not_shaped_like_the_service_s_is_unreadable(task, body, why):
    with pytest.raises(Unreadable, match=why):
        read(task, [body])


def test_the_models_of_immich_s_entries_and_those_not_checked():
    assert model_of("clip-visual", ENTRIES["clip-visual"].encode()) == "ViT-B-32__openai"
    assert model_of("clip-textual", ENTRIES["clip-textual"].encode()) == "ViT-B-32__openai"
    assert model_of("faces", ENTRIES["faces"].encode()) == "buffalo_l"
    assert model_of("ocr", ENTRIES["ocr"].encode()) is None
    both = b'{"clip":{"visual":{"modelName":"a"}},"facial-recognition":{"detection":{"modelName":"b"}}}'
    assert model_of("clip-visual", both) is None
    assert model_of("faces", b'{"facial-recognition":{"detection":{"modelName":"buffalo_l"}}}') is None
    assert model_of("clip-visual", b"not json") is None


@pytest.mark.parametrize("task", CANARY_TASKS)
def test_a_canary_body_is_read_by_the_strict_reader_as_immich_s_own(task):
    for image, text in canaries.inputs(task):
        content_type, body = canaries.body(ENTRIES[task].encode(), image, text)
        fields = parse_predict(content_type, body)
        assert (fields["entries"], fields["image"], fields["text"]) == (ENTRIES[task], image, text)


def test_the_shipped_pictures_are_the_generator_s_and_small():
    spec = importlib.util.spec_from_file_location("make_canaries", ROOT / "tools" / "make_canaries.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    assert canaries.picture("scene.png") == make.png(128, 128, make.scene)
    assert canaries.picture("face.png") == make.png(112, 128, make.face)
    assert all(len(canaries.picture(p)) < 8192 for p in ("scene.png", "face.png"))


def test_thresholds_one_for_all_or_per_task():
    assert parse_thresholds("0.98") == dict.fromkeys(CANARY_TASKS, 0.98)
    assert parse_thresholds("faces=0.95, clip-visual=0.97") == {
        "clip-visual": 0.97,
        "clip-textual": THRESHOLD,
        "faces": 0.95,
    }
    for bad, why in [("ocr=0.9", "not a checked task"), ("faces=x", "not a number"), ("1.5", "at most 1")]:
        with pytest.raises(ValueError, match=why):
            parse_thresholds(bad)


def test_the_switch_is_on_or_off():
    assert [parse_switch(t) for t in ("on", "OFF", "true", "False")] == [True, False, True, False]
    with pytest.raises(ValueError, match="neither on nor off"):
        parse_switch("maybe")
