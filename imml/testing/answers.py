"""
What a fake host computes: which requests the ML service accepts, and the
answers it gives them.

Everything here is a pure function of the request: the validation of the
C{entries} field (as Immich's C{get_entries} and model lookup do), the checks
of the picture or text, and a deterministic answer shaped like the real
service's, so that the same input gives the same bytes on every host.

The task keys are the classifier's (L{imml.classify.task_of}); only the
C{(task, type)} pairs the service has models for are kept here, as data.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Collection
from functools import lru_cache
from typing import Any

from imml.classify import TASKS as _CLASSIFIER_TASKS
from imml.classify import task_of

__all__ = ["KNOWN_MODELS", "TASKS", "VECTORS", "BadRequest", "answer_for", "read_entries"]

_UNRECOGNISED = task_of({})

TASKS: tuple[str, ...] = tuple(t for t in _CLASSIFIER_TASKS if t != _UNRECOGNISED)
"""
The task keys a fake host serves, as L{imml.classify.task_of} names them and
as used by L{imml.testing.ENTRIES} and L{imml.testing.FakeMLHost.service_time}:
the classifier's tasks without its name for an unrecognised request.
"""

KNOWN_MODELS: frozenset[str] = frozenset(
    {
        # CLIP
        "ViT-B-32__openai",
        "ViT-B-16__openai",
        "ViT-L-14__openai",
        "ViT-B-32__laion2b-s34b-b79k",
        "ViT-B-16-SigLIP2__webli",
        "XLM-Roberta-Large-Vit-B-16Plus",
        "nllb-clip-base-siglip__v1",
        # faces
        "buffalo_l",
        "buffalo_m",
        "buffalo_s",
        "antelopev2",
        # OCR
        "PP-OCRv5_mobile",
        "PP-OCRv5_server",
    }
)
"""Model names a L{FakeMLHost} loads by default; any other one answers 500."""

VECTORS: tuple[str, ...] = ("exact", "fp16", "other-model", "wrong-shape")
"""
What a fake host's embeddings are like (L{imml.testing.FakeMLHost.vectors}):
C{"exact"}, the same on every host; C{"fp16"}, each value rounded to half
precision (an accelerated build: tiny differences that must be tolerated);
C{"other-model"}, vectors of the same length that compare with nothing (other
model files); C{"wrong-shape"}, 768 values rather than 512 (another model).
"""

_TYPES: dict[str, frozenset[str]] = {
    "clip": frozenset({"visual", "textual"}),
    "facial-recognition": frozenset({"detection", "recognition"}),
    "ocr": frozenset({"detection", "recognition"}),
}
"""The types of each task of C{entries} the service has models for."""

_TEXT_TYPE = "textual"
"""The one type whose model takes text rather than a picture."""


class BadRequest(Exception):
    """
    An answer about the request itself, which any host would give.

    @ivar status: The HTTP status.
    @ivar detail: The C{detail} of the JSON body, or the plain text body.
    @ivar plain: Whether the body is plain text rather than JSON.
    """

    def __init__(self, status: int, detail: Any, plain: bool = False) -> None:
        super().__init__(status, detail)
        self.status = status
        self.detail = detail
        self.plain = plain


def read_entries(entries: str | None) -> tuple[str, tuple[str, ...]]:
    """
    Validate C{entries} like Immich's C{get_entries} and model lookup.

    @param entries: The C{entries} form field, or L{None} when missing.
    @return: C{(task, models)}: the task key (several joined by C{+}) and one
        C{"task/type/modelName"} per model the request needs.
    @raise BadRequest: 422 for a missing or malformed field, 500 for a
        task/type combination the service does not know.
    """
    if entries is None:
        raise BadRequest(
            422,
            [{"type": "missing", "loc": ["body", "entries"], "msg": "Field required", "input": None}],
        )
    try:
        request = json.loads(entries)
        keys: list[str] = []
        models: list[str] = []
        for task, types in request.items():
            for type_, entry in types.items():
                name = entry["modelName"]
                if not isinstance(name, str):
                    raise TypeError(name)
                key = task_of({task: {type_: entry}})
                if type_ not in _TYPES.get(task, ()) or key == _UNRECOGNISED:
                    raise BadRequest(500, f"Unknown model combination: {task}/{type_}")
                if key not in keys:
                    keys.append(key)
                models.append(f"{task}/{type_}/{name}")
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        raise BadRequest(422, "Invalid request format.") from e
    if not keys:
        raise BadRequest(422, "Invalid request format.")
    return "+".join(keys), tuple(models)


def answer_for(
    task: str,
    models: tuple[str, ...],
    image: bytes | None,
    text: str | None,
    loadable: Collection[str] = KNOWN_MODELS,
    failing_tasks: Collection[str] = (),
    vectors: str = "exact",
) -> bytes:
    """
    The rest of the real service's checks, then its 200 answer.

    @param task: The task key, from L{read_entries}.
    @param models: The models, from L{read_entries}.
    @param image: The C{image} part, or L{None}.
    @param text: The C{text} field, or L{None}.
    @param loadable: Model names that load.
    @param failing_tasks: Task keys whose model fails to load.
    @param vectors: What the embeddings are like (one of L{VECTORS}).
    @return: The JSON body of the answer.
    @raise BadRequest: 400 without input or with an empty picture, 500 for
        a model that does not load or gets an input it cannot handle.
    """
    if image is None and text is None:
        raise BadRequest(400, "Either image or text must be provided")
    if image is not None and not image:
        raise BadRequest(400, "The image is empty")
    for model in models:
        name = model.rsplit("/", 1)[1]
        if name not in loadable:
            raise BadRequest(500, f"Failed to load model '{name}'")
    for key in task.split("+"):
        if key in failing_tasks:
            raise BadRequest(500, f"Failed to load model for {key}")
    for model in models:
        if (model.split("/", 2)[1] == _TEXT_TYPE) != (image is None):
            # The model gets an input it cannot handle: an unhandled error.
            raise BadRequest(500, "Internal Server Error", plain=True)
    is_image = image is not None
    seed = hashlib.blake2b(image if image is not None else text.encode("utf-8")).digest()  # type: ignore[union-attr]
    return _answer(task, seed, is_image, vectors)


def _embedding(seed: bytes, size: int = 512, vectors: str = "exact") -> str:
    """
    A unit vector of C{size} floats derived from C{seed}, as a JSON string,
    as a host whose embeddings are like C{vectors} computes it.
    """
    if vectors == "other-model":
        seed = hashlib.blake2b(seed, person=b"other-model").digest()
    elif vectors == "wrong-shape":
        size = 768
    raw = hashlib.shake_256(seed).digest(2 * size)
    values = struct.unpack(f"<{size}h", raw)
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    unit = [v / norm for v in values]
    if vectors == "fp16":
        unit = [struct.unpack("<e", struct.pack("<e", v))[0] for v in unit]
    return "[" + ",".join([f"{v:.6f}" for v in unit]) + "]"


_IMAGE_HEIGHT = 1080
_IMAGE_WIDTH = 1440


@lru_cache(maxsize=4096)
def _answer(task: str, seed: bytes, is_image: bool, vectors: str = "exact") -> bytes:
    """
    The JSON body a healthy host answers; a pure function of its input, so
    memoized (benchmarks send the same few inputs again and again).
    """
    answer: dict[str, Any] = {}
    for key in task.split("+"):
        digest = hashlib.blake2b(seed, digest_size=16, person=key.encode()[:16]).digest()
        if key.startswith("clip-"):
            answer["clip"] = _embedding(digest, vectors=vectors)
        elif key == "faces":
            x, y = digest[0] * 4, digest[1] * 4
            answer["facial-recognition"] = [
                {
                    "boundingBox": {"x1": x, "y1": y, "x2": x + 120, "y2": y + 150},
                    "embedding": _embedding(digest, vectors=vectors),
                    "score": 0.98,
                }
            ]
        elif key == "ocr":
            x, y = float(digest[0]), float(digest[1])
            answer["ocr"] = {
                "box": [x, y, x + 200.0, y, x + 200.0, y + 40.0, x, y + 40.0],
                "text": [f"immich {digest[:4].hex()}"],
                "boxScore": [0.93],
                "textScore": [0.97],
            }
    if is_image:
        answer["imageHeight"] = _IMAGE_HEIGHT
        answer["imageWidth"] = _IMAGE_WIDTH
    return json.dumps(answer, separators=(",", ":")).encode()
