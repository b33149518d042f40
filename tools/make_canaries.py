"""
Write the agreement check's canary pictures, imml/canary-pictures/scene.png
and imml/canary-pictures/face.png (see imml/agreement.py and docs/agreement.md).

Both are drawn here, pixel by pixel, with nothing but the standard library
(a PNG is zlib-compressed rows): they are imml's own, under its licence.
``scene.png`` is a small landscape (sky, sun, hills, a house) for CLIP's
image model; ``face.png`` a drawn face (skin, hair, eyes, brows, nose,
mouth) for face detection and recognition.  Immich ML opens PNG as it
opens JPEG.

Run it once after changing a drawing, and commit the files:
``python tools/make_canaries.py``.  The output is the same on every run.
"""

import math
import pathlib
import struct
import zlib

OUT = pathlib.Path(__file__).resolve().parent.parent / "imml" / "canary-pictures"

Pixel = tuple[int, int, int]


def png(width: int, height: int, pixel) -> bytes:
    """A PNG of C{width} x C{height} RGB pixels, C{pixel(x, y)} each."""
    rows = b"".join(b"\x00" + b"".join(bytes(pixel(x, y)) for x in range(width)) for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")


def mix(a: Pixel, b: Pixel, t: float) -> Pixel:
    t = min(1.0, max(0.0, t))
    return tuple(round(p + (q - p) * t) for p, q in zip(a, b))


def scene(x: int, y: int) -> Pixel:
    w = h = 128
    colour = mix((70, 130, 210), (200, 225, 250), y / (h * 0.6))
    if math.hypot(x - 96, y - 26) < 12:
        colour = (250, 215, 80)
    hill = h * 0.62 + 10 * math.sin(x / w * math.pi * 2.0)
    if y > hill:
        colour = mix((70, 150, 60), (30, 90, 30), (y - hill) / (h - hill))
    if 24 <= x < 56 and 70 <= y < 96:
        colour = (190, 60, 50) if (x // 8 + y // 8) % 5 else (120, 40, 35)
        if 34 <= x < 44 and 80 <= y < 96:
            colour = (90, 60, 40)
    if 20 <= x < 60 and 50 <= y < 70 and abs(x - 40) < (y - 50) * 1.0 + 1:
        colour = (110, 50, 40)
    return colour


def face(x: int, y: int) -> Pixel:
    w, h = 112, 128
    cx, cy = w / 2, h * 0.55
    colour = mix((150, 170, 190), (90, 110, 140), y / h)
    inside = ((x - cx) / 36) ** 2 + ((y - cy) / 46) ** 2
    if inside < 1:
        colour = mix((235, 195, 165), (200, 150, 120), inside)
        for ex in (cx - 15, cx + 15):
            d = math.hypot(x - ex, (y - (cy - 10)) * 1.6)
            if d < 7:
                colour = (255, 255, 255)
            if d < 3.5:
                colour = (60, 40, 30)
            if abs(x - ex) < 9 and -22 < y - cy < -19:
                colour = (70, 45, 30)
        if abs(x - cx) < 3 + (y - cy) * 0.25 and 0 <= y - cy < 14:
            colour = mix(colour, (170, 120, 95), 0.6)
        if abs(x - cx) < 13 and 0 < (y - cy - 22) < 5 - abs(x - cx) * 0.25:
            colour = (170, 70, 70)
    if ((x - cx) / 40) ** 2 + ((y - (cy - 20)) / 36) ** 2 < 1 and (inside >= 0.85 or y < cy - 30):
        colour = (70, 45, 25)
    return colour


def main() -> None:
    OUT.mkdir(exist_ok=True)
    (OUT / "scene.png").write_bytes(png(128, 128, scene))
    (OUT / "face.png").write_bytes(png(112, 128, face))


if __name__ == "__main__":
    main()
