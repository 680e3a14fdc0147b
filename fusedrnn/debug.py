"""Debug mode for unwritten outputs: FUSEDRNN_DEBUG_NAN=1.

With the variable set (to anything but "" or "0"; it is read at every call, so a test can flip it with
monkeypatch.setenv), every output and workspace buffer a backend allocates is filled with NaN before a kernel runs,
so an element that a kernel forgets to write shows up as NaN in the result instead of as whatever the allocator
happened to hand out (often a plausible stale value from the previous call, which passes a tolerance check).
On top of that the op layer (fusedrnn/ops.py) checks every result: when all inputs of a call are finite and an
output still holds a NaN, it raises an error naming the backend, the op and the output.

How each backend honours it:
- reference (Python): every `new_empty`/`empty_like` of an output or workspace goes through `empty(shape, like)`.
- triton / any Python launcher: allocate outputs and workspaces with `fusedrnn.debug.empty(shape, like)` (or call
  `fill_nan_(t)` on a buffer from elsewhere) *before* the kernel launch; buffers that must start at zero stay
  `zeros`. Cached workspaces that outlive a call must be refilled at every call while the mode is on.
- C++ (csrc/cpu) and CUDA (csrc/cuda): read the variable at call time, once per op call, with
  `const char* v = std::getenv("FUSEDRNN_DEBUG_NAN"); bool on = v && *v && std::string(v) != "0";` and, when on,
  `t.fill_(std::numeric_limits<double>::quiet_NaN())` every `at::empty` output/workspace (y, hy, cy, reserve,
  XG, gate-gradient buffers, grad_x, grad_hx, grad_cx, grad_weights, per-thread scratch) right after allocating it.
  On CUDA the fill is queued on the current stream, so it is ordered before the kernels that follow on that stream;
  raw workspaces from a caching allocator or cudaMalloc get `cudaMemsetAsync(p, 0xFF, bytes, stream)` (all-ones
  bits are a NaN for fp16, bf16, fp32 and fp64). Buffers the algorithm accumulates into must stay zero-initialised:
  the point is to poison only memory that is supposed to be fully overwritten.
- Integer and bool buffers have no NaN and are left as allocated.
The mode costs one extra memory pass per buffer; it is for tests (tests/test_debug_nan.py), not for production.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._env import env

ENV_VAR = "FUSEDRNN_DEBUG_NAN"


def nan_fill_enabled() -> bool:
    """True when FUSEDRNN_DEBUG_NAN is set to a value other than "" or "0" (read now, not at import)."""
    return env(ENV_VAR, "") not in ("", "0")


def fill_nan_(t: Tensor) -> Tensor:
    """Fills a floating-point (or complex) tensor with NaN in place, when the debug mode is on; returns it."""
    if nan_fill_enabled() and (t.is_floating_point() or t.is_complex()) and t.device.type != "meta":
        t.fill_(math.nan)
    return t


def empty(shape, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """`like.new_empty(shape, dtype=dtype)`: same device (and dtype unless given) as `like`; NaN-filled in the
    debug mode. `shape` is a tuple/list/torch.Size of ints."""
    t = like.new_empty(tuple(shape), dtype=dtype if dtype is not None else like.dtype)
    return fill_nan_(t)


def empty_like(t: Tensor) -> Tensor:
    """`torch.empty_like(t)` (contiguous), NaN-filled in the debug mode."""
    return empty(t.shape, t)


def _all_finite(tensors) -> bool:
    for t in tensors:
        if isinstance(t, (list, tuple)):
            if not _all_finite(t):
                return False
        elif isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex()) and t.device.type != "meta":
            if t.numel() and not bool(torch.isfinite(t).all()):
                return False
    return True


def check_written(backend: str, op: str, inputs, outputs: dict) -> None:
    """In the debug mode: if every floating input is finite, no output may contain NaN (an unwritten element).
    `inputs` is a list of tensors / lists of tensors / other values; `outputs` maps names to tensors or lists."""
    if not nan_fill_enabled() or not _all_finite(inputs):
        return
    for name, out in outputs.items():
        items = out if isinstance(out, (list, tuple)) else [out]
        for k, t in enumerate(items):
            if isinstance(t, Tensor) and t.device.type != "meta" and t.is_floating_point() and t.numel() \
                    and bool(torch.isnan(t).any()):
                where = f"{name}[{k}]" if isinstance(out, (list, tuple)) else name
                idx = torch.isnan(t).nonzero()[0].tolist()
                raise RuntimeError(
                    f"fusedrnn debug ({ENV_VAR}=1): backend '{backend}' left {int(torch.isnan(t).sum())} element(s) "
                    f"of {op} output {where} (shape {tuple(t.shape)}) unwritten (NaN from the fill), first at "
                    f"index {idx}, although every input was finite")
