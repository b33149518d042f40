import json

import attrs

from imml.classify import RequestInfo, classify, entries_field

CLIP_TEXT = '{"clip":{"textual":{"modelName":"ViT-B-32__openai","options":{"language":"en"}}}}'
FACES = (
    '{"facial-recognition":{"detection":{"modelName":"buffalo_l","options":{"minScore":0.7}},'
    '"recognition":{"modelName":"buffalo_l"}}}'
)


def body(entries: str, image: bytes = b"\xff\xd8picture", boundary: bytes = b"XyZ") -> tuple[bytes, bytes]:
    parts = [
        b"--" + boundary + b"\r\n",
        b'Content-Disposition: form-data; name="image"; filename="blob"\r\n',
        b"Content-Type: application/octet-stream\r\n\r\n",
        image + b"\r\n",
        b"--" + boundary + b"\r\n",
        b'Content-Disposition: form-data; name="entries"\r\n\r\n',
        entries.encode() + b"\r\n",
        b"--" + boundary + b"--\r\n",
    ]
    return b"multipart/form-data; boundary=" + boundary, b"".join(parts)


def test_entries_found_after_an_image_part():
    ctype, raw = body(FACES, image=b"--XyZ is not a delimiter here\r\n" * 3)
    assert entries_field(ctype, raw) == FACES.encode()


def test_tasks():
    for entries, task, interactive in [
        (CLIP_TEXT, "clip-textual", True),
        ('{"clip":{"visual":{"modelName":"ViT-B-32__openai"}}}', "clip-visual", False),
        (FACES, "faces", False),
        ('{"ocr":{"detection":{"modelName":"PP-OCRv5_mobile"}}}', "ocr", False),
        ('{"weird":{}}', "other", False),
        ("not json", "other", False),
    ]:
        ctype, raw = body(entries)
        info = classify(b"POST", b"/predict", ctype, raw)
        assert (info.task, info.interactive, info.retryable) == (task, interactive, True)


def test_quoted_boundary():
    ctype, raw = body(CLIP_TEXT, boundary=b"a b")
    assert classify(b"POST", b"/predict", b'multipart/form-data; boundary="a b"', raw).task == "clip-textual"


def test_other_requests_have_no_task():
    info = classify(b"GET", b"/", None, b"")
    assert info.task is None and info.retryable
    info = classify(b"POST", b"/other", b"application/json", json.dumps({}).encode())
    assert info.task is None and not info.retryable


def test_predict_without_multipart_is_still_forwarded():
    info = classify(b"POST", b"/predict", b"application/json", b"{}")
    assert info.task == "other"


def test_a_request_seen_behind_others_is_the_same_request():
    info = RequestInfo(b"POST", b"/predict", "clip-textual", interactive=True, ahead=1, entries=CLIP_TEXT.encode())
    behind = info.behind(3)
    assert behind.ahead == 3
    assert behind == attrs.evolve(info, ahead=3)
    assert info.behind(2, searching=True) == attrs.evolve(info, ahead=2, searching=True)
    # a field added to the class must be carried by behind() too
    fields = [f.name for f in attrs.fields(RequestInfo)]
    assert fields == ["method", "path", "task", "interactive", "ahead", "entries", "searching"]
