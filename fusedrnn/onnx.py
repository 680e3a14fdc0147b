"""ONNX export of the fusedrnn modules with no extra arguments: `torch.onnx.export(model, ...)` just works.

While an export is running (`torch.onnx.is_in_onnx_export()`, true for both the dynamo exporter, the default in
torch 2.13, and the TorchScript one), each fusedrnn module runs torch.nn's own forward on its parameters: the same
ATen RNN ops (aten::lstm, gru, rnn_tanh, rnn_relu and the cell ops) that nn.LSTM records, which both exporters
translate into the standard ONNX LSTM / GRU / RNN nodes (cells into MatMul/Add/Sigmoid/Tanh...). The exported graph
is therefore exactly nn.LSTM's, runs in onnxruntime or any ONNX backend, and needs no fusedrnn at inference time.
The custom op fusedrnn::rnn_layer itself never reaches the exporter.
"""
from __future__ import annotations

from torch import nn

_NN_FORWARD = {"LSTM": nn.LSTM.forward, "GRU": nn.GRU.forward, "RNN": nn.RNN.forward,
               "LSTMCell": nn.LSTMCell.forward, "GRUCell": nn.GRUCell.forward, "RNNCell": nn.RNNCell.forward}


def export_forward(module: nn.Module, input, hx, name: str):
    """torch.nn's forward for `name` ("LSTM", ..., "RNNCell") run on the fusedrnn module (same attributes and
    parameter names as torch.nn's); reads the parameters by name, so parametrizations are exported too."""
    return _NN_FORWARD[name](module, input, hx)
