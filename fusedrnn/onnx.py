"""ONNX export of the fusedrnn modules with no extra arguments: `torch.onnx.export(model, ...)` just works.

While an export is running (`torch.onnx.is_in_onnx_export()`, true for both the dynamo exporter, the default in
torch 2.13, and the TorchScript one), each fusedrnn module runs torch.nn's own forward on its parameters: the same
ATen RNN ops (aten::lstm, gru, rnn_tanh, rnn_relu and the cell ops) that nn.LSTM records, which both exporters
translate into the standard ONNX LSTM / GRU / RNN nodes (cells into MatMul/Add/Sigmoid/Tanh...). The exported graph
is therefore exactly nn.LSTM's, runs in onnxruntime or any ONNX backend, and needs no fusedrnn at inference time.
The custom op fusedrnn::rnn_layer itself never reaches the exporter.
"""
from __future__ import annotations

import torch
from torch import nn

_NN_FORWARD = {"LSTM": nn.LSTM.forward, "GRU": nn.GRU.forward, "RNN": nn.RNN.forward,
               "LSTMCell": nn.LSTMCell.forward, "GRUCell": nn.GRUCell.forward, "RNNCell": nn.RNNCell.forward}


def _export_flags():
    """The two flags torch.onnx.is_in_onnx_export() reads (the TorchScript exporter's GLOBALS and the dynamo
    exporter's _flags), found once; None where this torch keeps them elsewhere or its function reads anything else
    (then in_export() calls it)."""
    code = getattr(torch.onnx.is_in_onnx_export, "__code__", None)
    reads = {n for n in code.co_names if not n.startswith("torch.onnx.")} if code is not None else {"?"}
    if not reads <= {"_flags", "GLOBALS", "in_onnx_export", "_is_onnx_exporting"}:
        return None
    try:
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:
        return None
    if not hasattr(GLOBALS, "in_onnx_export") or not hasattr(_flags, "_is_onnx_exporting"):
        return None
    return GLOBALS, _flags


_FLAGS = None
_FLAGS_FOUND = False


def in_export() -> bool:
    """torch.onnx.is_in_onnx_export(), without its two imports a call (about 1 us: a cell step's fixed cost)."""
    global _FLAGS, _FLAGS_FOUND
    if torch.compiler.is_compiling():  # (dynamo knows torch's function; it refuses to trace the flags' objects)
        return torch.onnx.is_in_onnx_export()
    if not _FLAGS_FOUND:
        _FLAGS, _FLAGS_FOUND = _export_flags(), True
    if _FLAGS is None:
        return torch.onnx.is_in_onnx_export()
    return _FLAGS[0].in_onnx_export or _FLAGS[1]._is_onnx_exporting


def export_forward(module: nn.Module, input, hx, name: str):
    """torch.nn's forward for `name` ("LSTM", ..., "RNNCell") run on the fusedrnn module (same attributes and
    parameter names as torch.nn's); reads the parameters by name, so parametrizations are exported too."""
    return _NN_FORWARD[name](module, input, hx)
