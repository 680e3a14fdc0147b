"""The `cpu` backend: fused C++ kernels (csrc/cpu) behind torch.ops.fusedrnn.cpu_rnn_forward / cpu_rnn_backward.

Importing this module never fails: when the extension `fusedrnn._C` is not built, the backend is recorded as missing
with the command that builds it. Shapes of every argument: docs/design.md (the layer-op contract, minus `backend`).
`set_capability("default" | "avx2" | "avx512" | "auto")` picks the kernel build (tests use it to run every build the
CPU can).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backends import GATES, Backend, masked_grads_fake, note_missing, register_backend

BUILD_HINT = "the C++ extension fusedrnn._C is not built; run `pip install --no-build-isolation -e .` in the repository"

try:
    from . import _C  # noqa: F401  (its import registers torch.ops.fusedrnn.cpu_*)
except ImportError as _e:  # not built, or built against another torch
    _C = None
    _IMPORT_ERROR = str(_e)
else:
    _IMPORT_ERROR = ""

# Reserve row width per mode, in units of H (docs/design.md).
_RESERVE = {"lstm": 5, "gru": 4, "rnn_tanh": 0, "rnn_relu": 0}
# bfloat16 / float16 run the float32 kernels on float32 copies (csrc/cpu/layer_loops.h, half_precision).
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def set_capability(name: str) -> None:
    """Kernel build for the next calls: 'auto' (the best this CPU runs, the default), 'default' (baseline), 'avx2'
    or 'avx512'. RuntimeError if that build is not compiled in or the CPU (as torch reports it) cannot run it."""
    _C.set_cpu_capability(name)


def amx_available() -> bool:
    """Whether bfloat16 layers can run their recurrent product on AMX (CPU with AMX-BF16, tile state granted);
    False when the extension is not built."""
    return _C is not None and bool(_C.amx_available())


def gemm_library() -> str:
    """What the float32 layers' input projections (the forward's large GEMMs) run on now: 'onednn'
    (torch's oneDNN matmul; the default on AMD CPUs with AVX-512, where it is faster than MKL's sgemm) or 'blas'
    (ATen's BLAS, MKL in torch's x86 wheels). FUSEDRNN_CPU_GEMM=onednn|blas overrides the choice. Where it is
    'onednn', LSTM's backward GEMMs (FUSEDRNN_CPU_GEMM_BWD=onednn|blas) and the per-step products of batches above
    64 (FUSEDRNN_CPU_GEMM_STEP=onednn|blas) run there too."""
    return _C.gemm_library()


def loop_threads() -> int:
    """Threads the small-batch loops (the per-step barrier loops of batches up to 64) split into now:
    torch.get_num_threads(), but never more than the CPUs this process can use (its affinity mask, and a cgroup
    CPU quota where one is set): more threads than CPUs would leave every step waiting for a descheduled thread.
    FUSEDRNN_CPU_THREADS=n sets the CPU count instead."""
    return int(_C.loop_threads())


def empty_cache() -> int:
    """Frees the idle blocks of the cpu backend's block cache and returns their bytes (0 when the extension is not
    built). A layer's buffers of 64 KiB or more (the training forward's reserve and y, the backward's weight
    gradients and grad_x, the loops' workspaces) come from that cache and go back to it when freed, so that a
    training loop reuses them instead of having the kernel map and zero fresh pages at every step; it keeps at most
    64 idle blocks and an eighth of the machine's memory (2 GiB at most). FUSEDRNN_CPU_CACHE=0 bypasses it."""
    return int(_C.empty_cache()) if _C is not None else 0


def cache_info() -> dict:
    """{'idle_bytes', 'idle_blocks', 'limit_bytes', 'min_block_bytes', 'max_idle_blocks'} of the cpu backend's
    block cache (see empty_cache): what it holds now, the most idle bytes it keeps, the least bytes of a buffer it
    serves and the most idle blocks it keeps."""
    b, n, lim, least, most = _C.cache_info() if _C is not None else (0, 0, 0, 0, 0)
    return {"idle_bytes": int(b), "idle_blocks": int(n), "limit_bytes": int(lim), "min_block_bytes": int(least),
            "max_idle_blocks": int(most)}


def read_bandwidth(bytes_per_thread: int) -> Optional[float]:
    """GB/s that the small-batch loops' threads (loop_threads()) read together, each from its own buffer of
    `bytes_per_thread` bytes, from wherever a buffer of that size stays between passes (L1, L2 or beyond): the
    best of five runs of about 64 MiB of reads a thread, with the kernels' vector build. The benchmark's probe for
    how fast a step can stream the recurrent weights (its ceiling column); None when the extension is not built."""
    if _C is None:
        return None
    return float(_C.read_bandwidth(int(bytes_per_thread)))


def capability() -> str:
    """The kernel build in use: 'DEFAULT', 'AVX2' or 'AVX512'."""
    return _C.cpu_capability()


class CpuBackend(Backend):
    name = "cpu"
    lazy_zero_grads = True  # layer_backward.cpp: an expanded grad_y is read as one row, empty state grads as zeros
    takes_output_mask = True  # gradients not asked for are skipped (csrc/cpu/layer.h, GradMask)

    def available(self) -> bool:
        return _C is not None

    def why_unavailable(self) -> str:
        return f"{BUILD_HINT} ({_IMPORT_ERROR})" if _IMPORT_ERROR else ""

    def supports(self, device: torch.device, dtype: torch.dtype, mode: str, has_proj: bool) -> bool:
        return torch.device(device).type == "cpu" and dtype in _DTYPES and mode in GATES

    def forward(self, mode, x, batch_sizes, hx, cx, weights, has_biases, num_directions, train):
        return torch.ops.fusedrnn.cpu_rnn_forward(mode, x, batch_sizes, hx, cx, list(weights), has_biases,
                                                  num_directions, train)

    def backward(self, mode, grad_y, grad_hy, grad_cy, x, batch_sizes, hx, cx, weights, has_biases,
                 num_directions, y, reserve, output_mask=(True, True, True)):
        gx, ghx, gcx, gws = torch.ops.fusedrnn.cpu_rnn_backward(mode, grad_y, grad_hy, grad_cy, x, batch_sizes, hx,
                                                                cx, list(weights), has_biases, num_directions, y,
                                                                reserve, list(output_mask))
        return gx, ghx, gcx, list(gws)


def _register_fakes() -> None:
    @torch.library.register_fake("fusedrnn::cpu_rnn_forward")
    def _forward_fake(mode: str, x: Tensor, batch_sizes: Tensor, hx: Tensor, cx: Optional[Tensor],
                      weights: list[Tensor], has_biases: bool, num_directions: int, train: bool):
        N, D, B, P = x.shape[0], num_directions, hx.shape[1], hx.shape[2]
        H = weights[1].shape[0] // GATES[mode]
        cy = x.new_empty(D, B, H) if mode == "lstm" else x.new_empty(0)
        reserve = x.new_empty(D, N, _RESERVE[mode] * H) if train else x.new_empty(0)
        return x.new_empty(N, D * P), x.new_empty(D, B, P), cy, reserve

    @torch.library.register_fake("fusedrnn::cpu_rnn_backward")
    def _backward_fake(mode: str, grad_y: Tensor, grad_hy: Tensor, grad_cy: Tensor, x: Tensor, batch_sizes: Tensor,
                       hx: Tensor, cx: Optional[Tensor], weights: list[Tensor], has_biases: bool,
                       num_directions: int, y: Tensor, reserve: Tensor, output_mask: list[bool]):
        return masked_grads_fake(mode, x, hx, cx, weights, output_mask)

    # One cell step (csrc/cpu/cell.cpp): x [B, I], hx [B, H], cx [B, H] (LSTM) -> h [B, H], c [B, H] or [0],
    # reserve [1, B, R] (train) or [0].
    @torch.library.register_fake("fusedrnn::cpu_cell")
    def _cell_fake(mode: str, x: Tensor, hx: Tensor, cx: Optional[Tensor], weights: list[Tensor], has_biases: bool,
                   train: bool):
        B, H = hx.shape[0], weights[1].shape[0] // GATES[mode]
        reserve = x.new_empty(1, B, _RESERVE[mode] * H) if train else x.new_empty(0)
        return x.new_empty(B, H), x.new_empty(B, H) if mode == "lstm" else x.new_empty(0), reserve

    @torch.library.register_fake("fusedrnn::cpu_cell_backward")
    def _cell_backward_fake(mode: str, grad_h: Tensor, grad_c: Tensor, x: Tensor, hx: Tensor, cx: Optional[Tensor],
                            weights: list[Tensor], has_biases: bool, h: Tensor, reserve: Tensor,
                            output_mask: list[bool]):
        return masked_grads_fake(mode, x, hx, cx, weights, output_mask)


if _C is not None:
    _register_fakes()
    register_backend(CpuBackend())
else:
    note_missing("cpu", BUILD_HINT + (f" ({_IMPORT_ERROR})" if _IMPORT_ERROR else ""))
