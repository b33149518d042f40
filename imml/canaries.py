"""
The agreement check's fixed inputs (I{canaries}) and how the hosts' answers
to them compare (L{imml.agreement} sends them and judges).

One canary per embedding task: a few short texts for CLIP's text model, a
small landscape for its image model, a drawn face for face detection and
recognition (the pictures are in C{imml/canary-pictures/}, made by
C{tools/make_canaries.py}).  Each is sent with the C{entries} of the real
request that asked for the task: the same models, the same options.

An answer is read into a L{Reading}: its I{shape} (the keys of the JSON
object, how many faces, how long each vector is) and its vectors.  Two
readings agree when their shapes are equal and the cosine similarity of
every pair of vectors reaches the task's threshold: rounding (half
precision, Core ML) leaves it above 0.9999; another model, other model files
or a broken accelerator leave it far below.
"""

from __future__ import annotations

import functools
import json
import math
from importlib import resources
from typing import Any, Optional

from attrs import frozen

#: The tasks whose answers Immich stores as vectors, and so are checked.
CANARY_TASKS = ("clip-visual", "clip-textual", "faces")

#: The texts of the CLIP text model's canary: one request each.
TEXTS = ("a dog running on a beach", "a birthday cake with candles", "snow on the mountains at sunset")

#: The picture of each task that takes one.
PICTURES = {"clip-visual": "scene.png", "faces": "face.png"}

#: Where the tasks' answers are, in the answer's JSON object.
_ANSWER_KEYS = {"clip-visual": "clip", "clip-textual": "clip", "faces": "facial-recognition"}
_ENTRIES_TYPES = {
    "clip-visual": ("clip", frozenset({"visual"})),
    "clip-textual": ("clip", frozenset({"textual"})),
    "faces": ("facial-recognition", frozenset({"detection", "recognition"})),
}
_BOUNDARY = b"imml-canary-0c1d5e7a9b"


class Unreadable(ValueError):
    """
    An answer is not shaped as the service's answers are; the message says
    how.
    """


@frozen
class Reading:
    """
    What a host answered to a canary.

    @ivar shape: the keys, counts and lengths of its answers, in order.
    @ivar vectors: every vector in them, in order.
    """

    shape: tuple
    vectors: tuple[tuple[float, ...], ...]


@frozen
class Comparison:
    """
    How one reading compares with another.

    @ivar similarity: the least cosine similarity of their vectors, or None
        when their shapes differ or they hold no vector.
    @ivar reason: a phrase for people: why they agree or not.
    """

    agrees: bool
    similarity: Optional[float]
    reason: str


@functools.cache
def picture(name: str) -> bytes:
    """
    The canary picture C{name}, from the package.
    """
    return (resources.files("imml") / "canary-pictures" / name).read_bytes()


def inputs(task: str) -> tuple[tuple[Optional[bytes], Optional[str]], ...]:
    """
    The canary of C{task}: one C{(image, text)} per request.
    """
    if task == "clip-textual":
        return tuple((None, text) for text in TEXTS)
    return ((picture(PICTURES[task]), None),)


def body(entries: bytes, image: Optional[bytes], text: Optional[str]) -> tuple[bytes, bytes]:
    """
    The C{POST /predict} body of one canary request: C{(content type, body)},
    shaped as Immich's server shapes its own.
    """
    part = b"--" + _BOUNDARY + b"\r\n"
    chunks = [part, b'Content-Disposition: form-data; name="entries"\r\n\r\n', entries, b"\r\n", part]
    if image is not None:
        chunks += [
            b'Content-Disposition: form-data; name="image"; filename="blob"\r\n',
            b"Content-Type: application/octet-stream\r\n\r\n",
            image,
        ]
    else:
        chunks += [b'Content-Disposition: form-data; name="text"\r\n\r\n', (text or "").encode("utf-8")]
    chunks += [b"\r\n--", _BOUNDARY, b"--\r\n"]
    return b"multipart/form-data; boundary=" + _BOUNDARY, b"".join(chunks)


@functools.lru_cache(maxsize=64)
def model_of(task: str, entries: bytes) -> Optional[str]:
    """
    The model names a request's C{entries} asks for (for people: e.g.
    C{ViT-B-32__openai}), or None when its task is not checked or its
    C{entries} is not one the check understands (several tasks at once;
    detection without recognition): such requests are not held back.
    """
    wanted = _ENTRIES_TYPES.get(task)
    if wanted is None:
        return None
    try:
        decoded = json.loads(entries)
    except ValueError:
        return None
    key, types = wanted
    if not isinstance(decoded, dict) or set(decoded) != {key}:
        return None
    chosen = decoded[key]
    if not isinstance(chosen, dict) or set(chosen) != types:
        return None
    names = []
    for type_ in sorted(types):
        entry = chosen[type_]
        name = entry.get("modelName") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            return None
        if name not in names:
            names.append(name)
    return "+".join(names)


def _vector(value: Any, where: str) -> tuple[float, ...]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise Unreadable(f"{where} is not a list of numbers") from None
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise Unreadable(f"{where} is not a list of numbers")
    return tuple(float(v) for v in value)


def _read_one(task: str, raw: bytes) -> tuple[tuple, list[tuple[float, ...]]]:
    try:
        answer = json.loads(raw)
    except ValueError:
        raise Unreadable("the answer is not JSON") from None
    key = _ANSWER_KEYS[task]
    if not isinstance(answer, dict) or key not in answer:
        raise Unreadable(f"the answer has no {key!r}")
    shape: list = [("keys", tuple(sorted(answer)))]
    if key == "clip":
        vector = _vector(answer[key], "'clip'")
        shape.append(("values", len(vector)))
        return tuple(shape), [vector]
    faces = answer[key]
    if not isinstance(faces, list) or not all(isinstance(f, dict) and "embedding" in f for f in faces):
        raise Unreadable(f"{key!r} is not a list of faces with embeddings")
    shape.append(("faces", len(faces)))
    vectors = []
    for face in faces:
        vector = _vector(face["embedding"], "a face's 'embedding'")
        shape.append(("face", tuple(sorted(face)), len(vector)))
        vectors.append(vector)
    return tuple(shape), vectors


def read(task: str, answers: list[bytes]) -> Reading:
    """
    The reading of a host's answers to C{task}'s canary (one per input).

    @raise Unreadable: an answer is not shaped as the service's are.
    """
    shape, vectors = [], []
    for raw in answers:
        one, found = _read_one(task, raw)
        shape.append(one)
        vectors += found
    return Reading(tuple(shape), tuple(vectors))


def cosine(u: tuple[float, ...], v: tuple[float, ...]) -> float:
    """
    The cosine similarity of two vectors of one length (0 for a zero
    vector).
    """
    dot = sum(a * b for a, b in zip(u, v))
    norms = math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v))
    return dot / norms if norms else 0.0


def _difference(a: tuple, b: tuple) -> str:
    """
    The first way the shapes C{a} and C{b} differ, for people.
    """
    for one, other in zip(a, b):
        for x, y in zip(one, other):
            if x != y:
                kind = x[0]
                if kind == "values" or kind == "face" and x[2] != y[2]:
                    return f"vectors of {x[-1]} values, not {y[-1]}"
                if kind == "faces":
                    return f"{x[1]} faces found, not {y[1]}"
                return f"answers with keys {list(x[1])}, not {list(y[1])}"
        if len(one) != len(other):
            return f"{len(one)} parts, not {len(other)}"
    return f"{len(a)} answers, not {len(b)}"


def compare(reading: Reading, other: Reading, threshold: float) -> Comparison:
    """
    How C{reading} compares with C{other}: they agree when their shapes are
    equal and each pair of their vectors is at least C{threshold} alike.
    """
    if reading.shape != other.shape:
        return Comparison(False, None, _difference(reading.shape, other.shape))
    if not reading.vectors:
        return Comparison(True, None, "the same shape, and no vector to compare (no face found)")
    similarity = min(cosine(u, v) for u, v in zip(reading.vectors, other.vectors))
    if similarity >= threshold:
        return Comparison(True, similarity, f"similarity {similarity:.4f}")
    return Comparison(False, similarity, f"similarity {similarity:.4f}, below {threshold:g}")


__all__ = [
    "CANARY_TASKS",
    "Comparison",
    "Reading",
    "Unreadable",
    "body",
    "compare",
    "cosine",
    "inputs",
    "model_of",
    "read",
]
