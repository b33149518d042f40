"""
Write imml/mac/tiny.onnx, the model that ``imml-mac doctor`` runs through
each execution provider.

The model computes ``y = relu(x * 2 + 1)`` on a float32 tensor of shape
[1, 16]: three ordinary operators that Core ML, the CPU and every other
provider take, small enough (a few hundred bytes) to ship in the package.
The doctor checks the output against numpy, so a provider that "runs" but
computes garbage is caught too.

Needs the ``onnx`` package, which is not a dependency of imml: run it once
in a scratch virtual environment (``pip install onnx``) and commit the file.
"""

import pathlib
import sys

import onnx
from onnx import TensorProto, helper

OUT = pathlib.Path(__file__).resolve().parent.parent / "imml" / "mac" / "tiny.onnx"


def build() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])
    two = helper.make_tensor("two", TensorProto.FLOAT, [1], [2.0])
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    nodes = [
        helper.make_node("Mul", ["x", "two"], ["doubled"]),
        helper.make_node("Add", ["doubled", "one"], ["shifted"]),
        helper.make_node("Relu", ["shifted"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "imml-doctor", [x], [y], [two, one])
    # Opset 13 and IR 7: old enough for every onnxruntime Immich has shipped.
    model = helper.make_model(
        graph,
        producer_name="imml",
        opset_imports=[helper.make_opsetid("", 13)],
    )
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


def main() -> int:
    data = build().SerializeToString()
    OUT.write_bytes(data)
    print(f"wrote {OUT} ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
