"""Autocast (AMP) for the fusedrnn modules: the same casts and output dtypes as torch.nn under torch.autocast.

What torch.nn does (torch 2.13, aten/src/ATen/autocast_mode.cpp and cudnn/AutocastRNN.cpp):
- CUDA: cuDNN's RNN op (`_cudnn_rnn`, own autocast wrapper) and the cell ops (`lstm_cell`, `gru_cell`,
  `rnn_tanh_cell`, `rnn_relu_cell`) are in the lower-precision list: input, hx, cx and every weight are cast to the
  autocast dtype, and every output comes out in it.
- CPU: only oneDNN's LSTM layer (`mkldnn_rnn_layer`, used by nn.LSTM without projection while oneDNN is enabled) is
  in the list, with the same all-cast rule. Everything else runs ATen's composite implementation, where autocast
  casts each `linear` and the pointwise update is type-promoted with the carried state: so GRU/GRUCell's h,
  LSTMCell's h and c, and the c of an LSTM with projection (or of any LSTM with oneDNN disabled) keep the state's
  dtype (float32 when hx is float32, e.g. the zeros made for a float32 input), while RNN/RNNCell outputs and the
  projected h are in the autocast dtype.
fusedrnn computes the layer in the autocast dtype (like the fused ops) and gives each output the dtype torch.nn
gives it. Tensors autocast leaves alone are left alone here too: float64 and non-floating tensors, or tensors on
another device type than the autocast context's.
"""
from __future__ import annotations

import torch
from torch import Tensor


def autocast_dtype(x: Tensor):
    """The autocast dtype for x's device type if autocast is on and would cast x, else None."""
    if not torch._C._is_any_autocast_enabled() or not x.is_floating_point() or x.dtype == torch.float64:
        return None
    dev = x.device.type
    if dev not in ("cpu", "cuda", "xpu", "mps", "hpu", "xla") or not torch.is_autocast_enabled(dev):
        return None  # autocast has no notion of e.g. the meta device: torch.nn's own errors follow
    return torch.get_autocast_dtype(dev)


def cast(t, dtype):
    """Autocast's eligibility rule for one tensor (None passes through)."""
    if t is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def output_dtypes(mode: str, device_type: str, amp: torch.dtype, h_dtype: torch.dtype, c_dtype, has_proj: bool,
                  cell: bool):
    """(dtype of y and h, dtype of c) that torch.nn produces under autocast; see the module docstring."""
    if device_type != "cpu":
        return amp, amp
    if mode in ("rnn_tanh", "rnn_relu"):
        return amp, None
    if mode == "gru":
        return torch.promote_types(amp, h_dtype), None
    c = torch.promote_types(amp, c_dtype)
    if not cell and not has_proj and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled:
        return amp, amp                      # nn.LSTM takes oneDNN's layer, which autocast casts as a whole
    return (amp if has_proj else c), c       # composite: h = o * tanh(c), or the projection's linear
