"""Run a small ONNX graph (the ops an iresnet/ArcFace export uses) as a differentiable torch module.

Why not load the ONNX weights into :class:`~idglow_core.faces.iresnet.IResNet` by name: exporters fuse each
Conv+BatchNorm pair into a biased Conv, de-duplicate equal initializers behind ``Identity`` nodes and name
tensors by number, so the file's tensors do not map one-to-one onto the module's parameters. Executing the
graph itself with ``torch.nn.functional`` is exact for any such export (buffalo_l's ``w600k_r50.onnx``
included). Weights are frozen buffers (they follow ``.to()``); gradients flow to the input only.
No onnx2torch (it imports torchvision). Unsupported ops raise :class:`ModelFormatError` naming them.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DependencyError, ModelFormatError, ModelNotFoundError

__all__ = ["OnnxGraphModule", "load_onnx"]


def load_onnx(path: str | Path):
    """Parse an ONNX file (weights inside the file) and return its ``ModelProto``."""
    try:
        import onnx
    except ImportError as exc:
        raise DependencyError(f"Reading ONNX weights needs the onnx package ({exc}). `pip install onnx`.") from exc
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"ONNX file '{path}' does not exist. Pass the path of w600k_r50.onnx "
                                 f"(from buffalo_l.zip).")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError / ValueError / OSError variants
        raise ModelFormatError(f"'{path}' is not a readable ONNX file ({type(exc).__name__}: {exc}). "
                               f"Download it again.") from exc


def _attrs(node) -> dict:
    from onnx import helper
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _conv(x, w, b=None, *, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group=1, **_):
    half = len(pads) // 2
    if list(pads[:half]) != list(pads[half:]):  # asymmetric: pad explicitly (F.pad wants last dim first)
        x = F.pad(x, [p for i in reversed(range(half)) for p in (pads[i], pads[i + half])])
        pads = (0,) * len(pads)
    return F.conv2d(x, w, b, stride=tuple(strides), padding=tuple(pads[:half]), dilation=tuple(dilations),
                    groups=group)


def _gemm(a, b, c=None, *, alpha=1.0, beta=1.0, transA=0, transB=0):
    y = alpha * ((a.t() if transA else a) @ (b.t() if transB else b))
    return y if c is None else y + beta * c


def _reshape(x, shape, *, allowzero=0):
    dims = [int(d) for d in shape.tolist()]
    if not allowzero:
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _flatten(x, *, axis=1):
    return x.reshape(math.prod(x.shape[:axis]), -1)


_OPS = {
    "Identity": lambda x: x,
    "Dropout": lambda x, *rest, **_: x,
    "Conv": _conv,
    "BatchNormalization": lambda x, s, b, m, v, *, epsilon=1e-5, **_: F.batch_norm(
        x, m, v, s, b, training=False, eps=epsilon),
    "PRelu": lambda x, slope: torch.where(x >= 0, x, x * slope),
    "Relu": lambda x: F.relu(x),
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div,
    "Flatten": _flatten,
    "Gemm": _gemm,
    "MatMul": torch.matmul,
    "Reshape": _reshape,
}


class OnnxGraphModule(nn.Module):
    """Executes ``model_proto.graph`` node by node. ``forward(x)`` takes the graph's single data input and
    returns its first output."""

    def __init__(self, model_proto, source: str = "the ONNX file"):
        super().__init__()
        from onnx import numpy_helper
        graph = model_proto.graph
        self._tensors: dict[str, str] = {}
        for i, init in enumerate(graph.initializer):
            self._add_tensor(init.name, numpy_helper.to_array(init), i)
        self.nodes = []
        for node in graph.node:
            attrs = _attrs(node)
            if node.op_type == "Constant":
                self._add_tensor(node.output[0], numpy_helper.to_array(attrs["value"]), len(self._tensors))
                continue
            if node.op_type not in _OPS:
                raise ModelFormatError(f"{source} uses the ONNX op '{node.op_type}' (node '{node.name}'), which "
                                       f"IdGlow's differentiable ArcFace reader does not support (supported: "
                                       f"{sorted(_OPS)}). Use buffalo_l's w600k_r50.onnx or another iresnet.")
            if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                raise ModelFormatError(f"{source}: node '{node.name}' uses auto_pad, which is not supported.")
            attrs.pop("auto_pad", None)
            attrs.pop("kernel_shape", None)
            attrs.pop("momentum", None)
            self.nodes.append((node.op_type, list(node.input), node.output[0], attrs))
        data_inputs = [v.name for v in graph.input if v.name not in self._tensors]
        if len(data_inputs) != 1:
            raise ModelFormatError(f"{source} has data inputs {data_inputs}; exactly one image input is expected.")
        self.input_name, self.output_name = data_inputs[0], graph.output[0].name

    def _add_tensor(self, onnx_name: str, array: np.ndarray, index: int) -> None:
        attr = f"t{index}"
        self.register_buffer(attr, torch.from_numpy(np.array(array, copy=True)))
        self._tensors[onnx_name] = attr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env = {self.input_name: x}

        def value(name: str):
            if name == "":
                return None
            return env[name] if name in env else getattr(self, self._tensors[name])

        for op_type, inputs, output, attrs in self.nodes:
            env[output] = _OPS[op_type](*[value(n) for n in inputs], **attrs)
        return env[self.output_name]
