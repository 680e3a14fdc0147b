"""The `triton` backend: the layer op (docs/design.md) on Triton kernels, CUDA tensors (or CPU under TRITON_INTERPRET).

Layering: kernels.py (Triton kernels) -> launch.py (torch glue, GEMMs) -> TritonBackend (registry entry).
"""
from __future__ import annotations

import os

import torch

from ..backends import MODES, Backend
from . import launch

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class TritonBackend(Backend):
    """Fused time loop in one Triton launch per layer (both directions); float32/float16/bfloat16 with float32
    accumulation; LSTM (with or without proj_size), GRU, RNN (tanh/relu), bidirectional, packed."""

    name = "triton"
    takes_output_mask = True  # launch.backward skips the GEMMs of gradients not asked for

    def supports(self, device: torch.device, dtype: torch.dtype, mode: str, has_proj: bool) -> bool:
        if dtype not in _DTYPES or mode not in MODES or (has_proj and mode != "lstm"):
            return False
        if device.type == "cuda":
            return not launch.interpreting()
        # CPU tensors only run through the Triton interpreter (tests, debugging)
        return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and launch.interpreting()

    def forward(self, mode, x, batch_sizes, hx, cx, weights, has_biases, num_directions, train):
        return launch.forward(mode, x, batch_sizes, hx, cx, weights, has_biases, num_directions, train)

    def backward(self, mode, grad_y, grad_hy, grad_cy, x, batch_sizes, hx, cx, weights, has_biases,
                 num_directions, y, reserve, output_mask=(True, True, True)):
        return launch.backward(mode, grad_y, grad_hy, grad_cy, x, batch_sizes, hx, cx, weights, has_biases,
                               num_directions, y, reserve, output_mask=tuple(output_mask))
