"""
The bodies of C{POST /predict}: building them as Immich's server does, and
reading them as strictly as the ML service does.

    - L{ENTRIES}: the exact C{entries} field Immich's server sends for each
      task;
    - L{predict_body}: a C{multipart/form-data} body shaped like Node's
      C{fetch} (undici) makes it;
    - L{parse_predict}: a strict reader of such bodies, raising
      L{MultipartError} on anything malformed.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from typing import Any

__all__ = ["ENTRIES", "MultipartError", "parse_predict", "predict_body"]

ENTRIES: dict[str, str] = {
    "clip-visual": '{"clip":{"visual":{"modelName":"ViT-B-32__openai"}}}',
    "clip-textual": ('{"clip":{"textual":{"modelName":"ViT-B-32__openai","options":{"language":"en"}}}}'),
    "faces": (
        '{"facial-recognition":{"detection":{"modelName":"buffalo_l",'
        '"options":{"minScore":0.7}},"recognition":{"modelName":"buffalo_l"}}}'
    ),
    "ocr": (
        '{"ocr":{"detection":{"modelName":"PP-OCRv5_mobile",'
        '"options":{"minScore":0.5,"maxResolution":736}},'
        '"recognition":{"modelName":"PP-OCRv5_mobile","options":{"minScore":0.8}}}}'
    ),
}
"""
The exact C{entries} form field Immich's server sends for each kind of job,
keyed by the task L{imml.classify.task_of} reads from it: C{clip-visual}
(smart search indexing, with an image), C{clip-textual} (a search query, with
text), C{faces} and C{ocr} (with an image).
"""


_UNDICI_PREFIX = b"----formdata-undici-0"


class MultipartError(ValueError):
    """
    A body is not well-formed C{multipart/form-data}.
    """


def _normalize_linefeeds(value: bytes) -> bytes:
    # What the fetch standard (undici) does to string fields of a FormData.
    return value.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def predict_body(
    entries: str | None,
    image: bytes | None = None,
    text: str | None = None,
    boundary: bytes | None = None,
) -> tuple[bytes, bytes]:
    """
    Build a C{POST /predict} body the way Immich's server (Node's C{fetch}
    with a C{FormData}) does.

    @param entries: The C{entries} field, usually a value of L{ENTRIES};
        L{None} leaves the field out (to provoke a 422).
    @param image: The picture, sent as a file part named C{image} with
        filename C{blob} and type C{application/octet-stream}.
    @param text: The C{text} field.  Line breaks become CRLF, as in the
        browser/undici encoding.
    @param boundary: The multipart boundary; by default one shaped like
        undici's, derived from the content so equal inputs give equal bodies.

    @return: C{(content_type, body)}: the C{Content-Type} header value and
        the body.
    @raise ValueError: If C{boundary} occurs in one of the parts.
    """
    parts: list[tuple[bytes, bytes]] = []
    if entries is not None:
        head = b'Content-Disposition: form-data; name="entries"\r\n\r\n'
        parts.append((head, _normalize_linefeeds(entries.encode("utf-8"))))
    if image is not None:
        head = (
            b'Content-Disposition: form-data; name="image"; filename="blob"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n"
        )
        parts.append((head, image))
    if text is not None:
        head = b'Content-Disposition: form-data; name="text"\r\n\r\n'
        parts.append((head, _normalize_linefeeds(text.encode("utf-8"))))

    if boundary is None:
        seed = hashlib.blake2b(digest_size=8)
        for _, content in parts:
            seed.update(content)
        number = int.from_bytes(seed.digest(), "big")
        while True:
            boundary = _UNDICI_PREFIX + b"%011d" % (number % 10**11)
            if not any(boundary in content for _, content in parts):
                break
            number += 1
    elif any(boundary in content for _, content in parts):
        raise ValueError("the boundary occurs in the content")

    delimiter = b"--" + boundary + b"\r\n"
    chunks: list[bytes] = []
    for head, content in parts:
        chunks += [delimiter, head, content, b"\r\n"]
    chunks.append(b"--" + boundary + b"--\r\n")
    return b"multipart/form-data; boundary=" + boundary, b"".join(chunks)


_PARAM = re.compile(rb"""\s*;\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\\r\n]|\\.)*"|[^;\s"]*)\s*""")
_QUOTED_PAIR = re.compile(rb"\\(.)")


@lru_cache(maxsize=256)
def _header_value(value: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    """
    Split a header value like C{form-data; name="x"} into its lowercased
    first token and its parameters (names lowercased, quotes removed).

    Memoized (a pure function; the same few values recur on every request):
    callers must not change the returned dict.
    """
    semicolon = value.find(b";")
    if semicolon < 0:
        return value.strip().lower(), {}
    params: dict[bytes, bytes] = {}
    pos = semicolon
    while pos < len(value):
        match = _PARAM.match(value, pos)
        if match is None:
            raise MultipartError(f"bad header parameters: {value!r}")
        name, raw = match.groups()
        if raw[:1] == b'"':
            raw = _QUOTED_PAIR.sub(rb"\1", raw[1:-1])
        params[name.lower()] = raw
        pos = match.end()
    return value[:semicolon].strip().lower(), params


def _multipart_parts(body: bytes, boundary: bytes) -> list[tuple[dict[bytes, bytes], bytes]]:
    """
    Split a multipart body into C{(headers, content)} pairs.  A preamble and
    an epilogue are allowed (RFC 2046); anything else out of place raises.
    """
    delimiter = b"--" + boundary
    if body.startswith(delimiter):
        pos = len(delimiter)
    else:
        first = body.find(b"\r\n" + delimiter)
        if first < 0:
            raise MultipartError("no boundary delimiter in the body")
        pos = first + 2 + len(delimiter)
    separator = b"\r\n" + delimiter
    parts: list[tuple[dict[bytes, bytes], bytes]] = []
    while True:
        if body.startswith(b"--", pos):
            return parts
        eol = body.find(b"\r\n", pos)
        if eol < 0 or body[pos:eol].strip(b" \t"):
            raise MultipartError("garbage after a boundary delimiter")
        start = eol + 2
        headers: dict[bytes, bytes] = {}
        if body.startswith(b"\r\n", start):
            content_start = start + 2
        else:
            end_of_headers = body.find(b"\r\n\r\n", start)
            if end_of_headers < 0:
                raise MultipartError("unterminated part headers")
            for line in body[start:end_of_headers].split(b"\r\n"):
                name, colon, value = line.partition(b":")
                if not colon or not name or name != name.strip():
                    raise MultipartError(f"bad part header line: {line!r}")
                headers[name.lower()] = value.strip()
            content_start = end_of_headers + 4
        end = body.find(separator, content_start)
        if end < 0:
            raise MultipartError("unterminated part: no closing delimiter")
        parts.append((headers, body[content_start:end]))
        pos = end + len(separator)


def parse_predict(content_type: bytes, body: bytes) -> dict[str, Any]:
    """
    Read a C{POST /predict} body strictly.

    @param content_type: The request's C{Content-Type} header value, which
        must be C{multipart/form-data} with a boundary.
    @param body: The raw body.

    @return: C{{"entries": str | None, "image": bytes | None,
        "text": str | None}}; a field sent twice keeps its last value (as
        Starlette does), unknown fields are ignored.
    @raise MultipartError: If the body is not well-formed multipart, or a
        text field is not UTF-8.
    """
    kind, params = _header_value(content_type)
    if kind != b"multipart/form-data":
        raise MultipartError(f"not multipart/form-data: {content_type!r}")
    boundary = params.get(b"boundary", b"")
    if not 0 < len(boundary) <= 70:
        raise MultipartError("missing or invalid boundary")
    fields: dict[str, Any] = {"entries": None, "image": None, "text": None}
    for headers, content in _multipart_parts(body, boundary):
        disposition, dparams = _header_value(headers.get(b"content-disposition", b""))
        name = dparams.get(b"name")
        if disposition != b"form-data" or name is None:
            raise MultipartError("a part without Content-Disposition: form-data; name=...")
        key = name.decode("utf-8", "replace")
        if key == "image":
            fields["image"] = content
        elif key in fields:
            try:
                fields[key] = content.decode("utf-8")
            except UnicodeDecodeError as e:
                raise MultipartError(f"field {key!r} is not UTF-8") from e
    return fields
