"""The `cuda` backend: the layer op (docs/design.md) on the compiled extension `fusedrnn._C_cuda` (csrc/cuda).

Layering: csrc/cuda/*_kernels.cu (framework-free kernels) -> csrc/cuda/torch_ops.cpp (the internal ops
`torch.ops.fusedrnn.cuda_rnn_forward` / `cuda_rnn_backward`, CUDA dispatch key) -> CudaBackend (registry entry).
Their fakes are registered here, so torch.compile and opcheck can trace them without a GPU kernel running.

Importing this module never fails: on a CPU-only torch, or when the extension was not built, the backend is recorded
as missing with instructions (fusedrnn.backends.note_missing) instead of registered.
"""
from __future__ import annotations

import torch

from .backends import GATES, MODES, Backend, note_missing, register_backend

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Reserve width per mode, in units of H (docs/design.md).
_RESERVE = {"lstm": 5, "gru": 4, "rnn_tanh": 0, "rnn_relu": 0}

HOW_TO_BUILD = (
    "the CUDA extension fusedrnn._C_cuda is not built; it needs a CUDA build of torch (torch.version.cuda set) "
    "and the CUDA toolkit (nvcc, or CUDA_HOME pointing at it) at install time: "
    "FUSEDRNN_FORCE_CUDA=1 pip install --no-build-isolation -e ."
)


def _load_extension():
    """Import fusedrnn._C_cuda (registers the ops); returns None and a reason when that is not possible here."""
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU-only build; {HOW_TO_BUILD}"
    try:
        from . import _C_cuda  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)
    except ImportError as e:  # not built, or built against another torch (undefined symbols)
        if getattr(e, "name", None) == f"{__package__}._C_cuda":
            return None, HOW_TO_BUILD
        return None, f"fusedrnn._C_cuda failed to load ({e}); rebuild it: {HOW_TO_BUILD}"
    except Exception as e:  # noqa: BLE001  (a broken extension must not break `import fusedrnn`)
        return None, f"fusedrnn._C_cuda failed to load ({type(e).__name__}: {e}); rebuild it: {HOW_TO_BUILD}"
    return _C_cuda, ""


def _split(mode, weights, has_biases, num_directions):
    """(H, has_proj) from the flat weights list."""
    per = len(weights) // num_directions
    has_proj = per == 2 + 2 * int(has_biases) + 1
    return weights[1].shape[0] // GATES[mode], has_proj


def _forward_fake(mode, x, batch_sizes, hx, cx, weights, has_biases, num_directions, train):
    N, D, B, P = x.shape[0], num_directions, hx.shape[1], hx.shape[2]
    H, _ = _split(mode, weights, has_biases, num_directions)
    y = x.new_empty(N, D * P)
    hy = x.new_empty(D, B, P)
    cy = x.new_empty(D, B, H) if mode == "lstm" else x.new_empty(0)
    reserve = x.new_empty(D, N, _RESERVE[mode] * H) if train else x.new_empty(0)
    return y, hy, cy, reserve


def _backward_fake(mode, grad_y, grad_hy, grad_cy, x, batch_sizes, hx, cx, weights, has_biases, num_directions, y,
                   reserve):
    D, B = num_directions, hx.shape[1]
    H, _ = _split(mode, weights, has_biases, num_directions)
    gcx = x.new_empty(D, B, H) if mode == "lstm" else x.new_empty(0)
    return x.new_empty(x.shape), x.new_empty(hx.shape), gcx, [w.new_empty(w.shape) for w in weights]


class CudaBackend(Backend):
    """Per-step path: one GEMM for the input projection of all steps, then per step a cuBLAS recurrent GEMM into a
    preallocated float32 buffer and one fused pointwise kernel; both directions on two streams; variable lengths
    natively; backward in reverse with fused gradient kernels and the weight gradients as GEMMs after the loop.
    float32/float16/bfloat16 (float32 accumulation and carried state); LSTM (with proj_size), GRU, RNN tanh/relu.
    float64 is not supported (supports() is False: the reference backend runs it)."""

    name = "cuda"

    def supports(self, device: torch.device, dtype: torch.dtype, mode: str, has_proj: bool) -> bool:
        return device.type == "cuda" and dtype in _DTYPES and mode in MODES and (mode == "lstm" or not has_proj)

    def forward(self, mode, x, batch_sizes, hx, cx, weights, has_biases, num_directions, train):
        return tuple(torch.ops.fusedrnn.cuda_rnn_forward(mode, x, batch_sizes, hx, cx, list(weights), has_biases,
                                                         num_directions, train))

    def backward(self, mode, grad_y, grad_hy, grad_cy, x, batch_sizes, hx, cx, weights, has_biases,
                 num_directions, y, reserve):
        gx, ghx, gcx, gws = torch.ops.fusedrnn.cuda_rnn_backward(mode, grad_y, grad_hy, grad_cy, x, batch_sizes, hx,
                                                                 cx, list(weights), has_biases, num_directions, y,
                                                                 reserve)
        return gx, ghx, gcx, list(gws)


_C_cuda, _WHY_MISSING = _load_extension()
if _C_cuda is not None:
    torch.library.register_fake("fusedrnn::cuda_rnn_forward")(_forward_fake)
    torch.library.register_fake("fusedrnn::cuda_rnn_backward")(_backward_fake)
    register_backend(CudaBackend())
else:
    note_missing("cuda", _WHY_MISSING)
