#!/usr/bin/env python3
"""
Tiny CLIP models for the real Immich ML service (bench/realhost.py), laid out
in a model cache folder as the service expects them, and a small JPEG.

Run by the Immich checkout's interpreter (it has onnx, onnxruntime,
tokenizers and Pillow; imml is not needed):

    /path/to/immich-venv/bin/python bench/realhost_models.py OUT \\
        --visual-ms 9 --text-ratio 0.2

writes, for the model name Immich's server asks for (ViT-B-32__openai):

    OUT/clip/ViT-B-32__openai/config.json
    OUT/clip/ViT-B-32__openai/visual/model.onnx, preprocess_cfg.json
    OUT/clip/ViT-B-32__openai/textual/model.onnx, tokenizer.json, tokenizer_config.json
    OUT/image.jpg

The visual model is shaped like a small vision transformer's arithmetic:
a patch embedding (a convolution with the patch as stride) over the
224 x 224 picture, then a stack of token x width matrix products, a mean over
the tokens and a projection to the 512 floats of a ViT-B-32 embedding.  Its
depth is calibrated on this machine so that one inference, with the session
options Immich uses on a CPU (two intra-op threads, one inter-op thread),
takes about ``--visual-ms`` milliseconds.  The text model (a token embedding
and its own stack) is calibrated to ``--text-ratio`` of that.  Prints one
JSON line with the depths and the measured milliseconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

MODEL = "ViT-B-32__openai"
EMBED = 512
CONTEXT = 77
WORDS = "a an the of on in at with photo picture dog cat beach mountain city night car tree sky sea".split()
#: At most this many distinct weight matrices per model; deeper stacks reuse them.
DISTINCT = 8


def _stack(nodes: list, inits: list, x: str, width: int, depth: int, rng: np.random.Generator, tag: str) -> str:
    weights = []
    for i in range(min(depth, DISTINCT)):
        name = f"{tag}_w{i}"
        # He's scale keeps the values' size through the ReLUs: a deep stack
        # never sinks into denormal floats, which the CPU computes far slower.
        w = (rng.standard_normal((width, width)) * np.sqrt(2.0 / width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, name))
        weights.append(name)
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", [x, weights[i % len(weights)]], [f"{tag}_mm{i}"]))
        nodes.append(helper.make_node("Relu", [f"{tag}_mm{i}"], [f"{tag}_h{i}"]))
        x = f"{tag}_h{i}"
    return x


def _head(nodes: list, inits: list, x: str, width: int, rng: np.random.Generator) -> None:
    nodes.append(helper.make_node("ReduceMean", [x], ["pooled"], axes=[0], keepdims=1))
    proj = (rng.standard_normal((width, EMBED)) / np.sqrt(width)).astype(np.float32)
    inits.append(numpy_helper.from_array(proj, "proj"))
    nodes.append(helper.make_node("MatMul", ["pooled", "proj"], ["embedding"]))


def _model(nodes: list, inits: list, name: str, inputs: list) -> onnx.ModelProto:
    out = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, EMBED])
    graph = helper.make_graph(nodes, name, inputs, [out], inits)
    model = helper.make_model(graph, producer_name="imml-bench", opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


def visual(depth: int, patch: int, width: int = 768) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    tokens = (224 // patch) ** 2
    conv = (rng.standard_normal((width, 3, patch, patch)) / np.sqrt(3 * patch * patch)).astype(np.float32)
    inits = [
        numpy_helper.from_array(conv, "patch"),
        numpy_helper.from_array(np.array([width, tokens], dtype=np.int64), "flat"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "patch"], ["patches"], strides=[patch, patch]),
        helper.make_node("Reshape", ["patches", "flat"], ["grid"]),
        helper.make_node("Transpose", ["grid"], ["tokens"], perm=[1, 0]),
    ]
    x = _stack(nodes, inits, "tokens", width, depth, rng, "v")
    _head(nodes, inits, x, width, rng)
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 224, 224])
    return _model(nodes, inits, "tiny-clip-visual", [image])


def textual(depth: int, vocab: int, width: int = EMBED) -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    table = (rng.standard_normal((vocab, width)) * 0.1).astype(np.float32)
    inits = [
        numpy_helper.from_array(table, "table"),
        numpy_helper.from_array(np.array([CONTEXT, width], dtype=np.int64), "flat"),
    ]
    nodes = [
        helper.make_node("Gather", ["table", "text"], ["embedded"], axis=0),
        helper.make_node("Reshape", ["embedded", "flat"], ["tokens"]),
    ]
    x = _stack(nodes, inits, "tokens", width, depth, rng, "t")
    _head(nodes, inits, x, width, rng)
    text = helper.make_tensor_value_info("text", TensorProto.INT32, [1, CONTEXT])
    return _model(nodes, inits, "tiny-clip-textual", [text])


def seconds_per_run(model: onnx.ModelProto, feed: dict, runs: int = 15) -> float:
    """
    Seconds of one inference with the session options Immich sets on a CPU:
    the fastest of several runs, the least disturbed by other work.
    """
    options = ort.SessionOptions()
    options.inter_op_num_threads = 1
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for _ in range(3):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - began)
    return min(times)


def calibrate(build, feed: dict, target: float, low: int = 1, high: int = 9) -> tuple[int, float]:
    """The depth whose inference takes about C{target} seconds, and its time."""
    t_low, t_high = seconds_per_run(build(low), feed), seconds_per_run(build(high), feed)
    per_layer = max((t_high - t_low) / (high - low), 1e-6)
    depth = max(1, round(low + (target - t_low) / per_layer))
    took = seconds_per_run(build(depth), feed)
    for _ in range(3):  # small stacks mislead the line: correct in proportion
        if abs(took - target) <= 0.05 * target:
            break
        depth = max(1, round(depth * target / took))
        took = seconds_per_run(build(depth), feed)
    return depth, took


def tokenizer_files(folder: Path) -> int:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<unk>": 1, "<start_of_text>": 2, "<end_of_text>": 3}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
    return len(vocab)


def jpeg(path: Path, width: int, height: int) -> int:
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([(x * 255 // width), (y * 255 // height), ((x + y) * 7 % 256)], axis=-1).astype(np.uint8)
    Image.fromarray(pixels, "RGB").save(path, "JPEG", quality=85)
    return path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--visual-ms", type=float, default=9.0, help="milliseconds of one image's inference")
    p.add_argument("--patch", type=int, default=32, help="patch size (32: 49 tokens, 16: 196 tokens)")
    p.add_argument(
        "--width",
        type=int,
        default=768,
        help="the visual stack's width (768: ONNX Runtime splits each product over its threads; 128: it does not)",
    )
    p.add_argument("--visual-depth", type=int, help="the visual stack's depth, instead of calibrating it")
    p.add_argument("--text-depth", type=int, help="the text stack's depth, instead of calibrating it")
    p.add_argument("--text-ratio", type=float, default=0.2, help="a text inference's time relative to an image's")
    p.add_argument("--image", default="320x240", help="the JPEG's width x height")
    args = p.parse_args(argv)
    root = args.out / "clip" / MODEL
    (root / "visual").mkdir(parents=True, exist_ok=True)
    (root / "textual").mkdir(parents=True, exist_ok=True)
    vocab = tokenizer_files(root / "textual")
    (root / "config.json").write_text(
        json.dumps({"embed_dim": EMBED, "vision_cfg": {"image_size": 224}, "text_cfg": {"context_length": CONTEXT}})
    )
    (root / "visual" / "preprocess_cfg.json").write_text(
        json.dumps(
            {
                "size": [224, 224],
                "mode": "RGB",
                "mean": [0.48145466, 0.4578275, 0.40821073],
                "std": [0.26862954, 0.26130258, 0.27577711],
                "interpolation": "bicubic",
                "resize_mode": "shortest",
            }
        )
    )
    rng = np.random.default_rng(0)
    image = {"image": rng.standard_normal((1, 3, 224, 224)).astype(np.float32)}
    text = {"text": rng.integers(0, vocab, (1, CONTEXT)).astype(np.int32)}
    if args.visual_depth:
        v_depth = args.visual_depth
        v_s = seconds_per_run(visual(v_depth, args.patch, args.width), image)
    else:
        v_depth, v_s = calibrate(lambda d: visual(d, args.patch, args.width), image, args.visual_ms / 1000)
    if args.text_depth:
        t_depth = args.text_depth
        t_s = seconds_per_run(textual(t_depth, vocab), text)
    else:
        t_depth, t_s = calibrate(lambda d: textual(d, vocab), text, v_s * args.text_ratio)
    onnx.save(visual(v_depth, args.patch, args.width), str(root / "visual" / "model.onnx"))
    onnx.save(textual(t_depth, vocab), str(root / "textual" / "model.onnx"))
    width, _, height = args.image.partition("x")
    size = jpeg(args.out / "image.jpg", int(width), int(height))
    facts = {
        "visual_depth": v_depth,
        "visual_width": args.width,
        "visual_ms": round(v_s * 1000, 2),
        "text_depth": t_depth,
        "text_ms": round(t_s * 1000, 2),
        "jpeg_bytes": size,
    }
    print(json.dumps(facts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
