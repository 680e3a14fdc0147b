"""The modules' short ways to the `cpu` backend's ops (fusedrnn/modules.py calls them): a CPU cell step as one
`torch.ops.fusedrnn.cpu_cell` call, a sequence module's inference as `cpu_rnn_forward` calls, a one-step training
call as the cell op, any other CPU training call through the general path's autograd.Function. Each decides in a
few attribute reads whether it applies; anything else takes the modules' general path, whose checks and errors are
torch.nn's (docs/design.md, cell steps)."""
from __future__ import annotations

import torch
from torch import Tensor

from . import debug
from ._env import env
from .backends import AUTO_ORDER, GENERATION, resolve
from .onnx import in_export
from .ops import _PLAIN, _EagerLayer, _plain_eager, forward_ad_active

_CPU = torch.device("cpu")
_MODES = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}


def _cell_op_applies(tensors=()) -> bool:
    """Whether a cpu cell step on these tensors may run as torch.ops.fusedrnn.cpu_cell: in plain eager mode only
    (the op's autograd is a C++ Function, which functorch transforms refuse; torch.compile, tracing, modes and tensor
    subclasses see the layer op as before), and not in the debug mode (whose checks wrap the layer op)."""
    return (_plain_eager(tensors) and torch._C._functorch.maybe_current_level() is None
            and not debug.nan_fill_enabled() and not forward_ad_active())


def _cpu_cell_step(cell, mode: str, input: Tensor, hx, weights) -> bool:
    """Whether this step runs as torch.ops.fusedrnn.cpu_cell straight away: the common case (CPU tensors of one
    dtype, shapes that fit, no autocast, `cpu` the backend, _cell_op_applies), told apart in a few attribute reads.
    Anything else takes _cell_general, whose checks give torch.nn's errors (each condition here is one of them
    passing, or a case it handles)."""
    if type(input) is not Tensor or not input.is_cpu:
        return False
    B, n_in = input.shape
    if n_in != cell.input_size or B == 0 or torch._C._is_any_autocast_enabled():
        return False
    dt, shape = input.dtype, (B, cell.hidden_size)
    for h in hx:
        if type(h) is not Tensor or h.shape != shape or h.dtype != dt or not h.is_cpu:
            return False
    for w in weights:
        if type(w) not in _PLAIN or w.dtype != dt or not w.is_cpu:
            return False
    backend = _cpu_backend(cell.backend, dt, mode, False)
    # _cell_op_applies() (the tensors' types are checked above), its calls inlined: a decoder loop pays each Python
    # call level at every step (torch.jit.is_scripting is left out: the modules refuse scripting).
    return (backend == "cpu" and not torch.compiler.is_compiling() and not torch._C._is_tracing()
            and not torch._C._len_torch_dispatch_stack() and not torch._C._is_torch_function_mode_enabled()
            and torch._C._functorch.maybe_current_level() is None and not debug.nan_fill_enabled()
            and not forward_ad_active())


def _cpu_cell_forward(cell, input: Tensor, hx, n_states: int):
    """A cell module's whole forward where the step runs as the cpu_cell op: a batched (2-D) input and its state
    given as torch.nn takes it (h, or (h, c)), weights as the module holds them, and _cpu_cell_step's conditions.
    Returns what the forward returns, or None for the general path (which handles everything else: 1-D input, no
    state, bad input with torch.nn's errors). A decoder loop pays this at every step: it is _cell_forward, _cell
    and _weights folded into one call (forward at B1 H64, paired call by call, the three calls / this: RNNCell 12.7
    / 11.2 us, GRUCell 14.4 / 12.7, LSTMCell 15.3 / 13.6; 2-core Xeon)."""
    if type(input) is not Tensor or input.dim() != 2:
        return None
    if n_states == 2:
        if type(hx) is not tuple or len(hx) != 2:
            return None
        hs = hx
    elif hx is None:
        return None
    else:
        hs = (hx,)
    if type(cell) not in _CELL_TYPES[0]:  # (a subclass may define the weights otherwise: cell._weights())
        return None
    params = cell._parameters
    w_ih, w_hh = params.get("weight_ih"), params.get("weight_hh")
    if cell.bias:
        b_ih, b_hh = params.get("bias_ih"), params.get("bias_hh")
        if w_ih is None or w_hh is None or b_ih is None or b_hh is None:
            return None
        weights = [w_ih, w_hh, b_ih, b_hh]
    else:
        if w_ih is None or w_hh is None:
            return None
        weights = [w_ih, w_hh]
    mode = cell._mode
    if not _cpu_cell_step(cell, mode, input, hs, weights) or in_export():
        return None
    step = _CELL_STEP[0] if _CELL_STEP else _cell_step()
    return step(mode, input, hs[0], hs[1] if n_states == 2 else None, weights, cell.bias)


_CELL_TYPES = [()]  # (the cell classes, set by fusedrnn/modules.py)


def _cpu_sequence(m, input: Tensor, hx):
    """A sequence module's forward as the cpu layer op's calls straight away, or None where the general path must
    run (_sequence_forward). The common inference case: a padded CPU input (batched, unbatched or batch_first), hx
    absent or of the right shapes, one dtype throughout, no autograd graph to record (grad off, or nothing requiring
    grad), `cpu` the backend, plain eager mode, the module's parameters in place (no parametrization; the caller
    takes this way only for the library's own classes, not subclasses), no dropout between layers. Each condition
    is one of torch.nn's checks passing or a case the general path handles; anything else (bad input included,
    whose errors the general path gives as torch.nn does) returns None before anything is computed or evaluated.
    Why: a decoder calling the module one step at a time pays the general path's Python at every call, about 35 us
    against the op's 12-22 us at T = 1, B = 1 (2-core Xeon), and a cold cache (any work between calls) multiplies
    it.

    With a graph to record, a single step of a one-layer, one-direction module without projection (a decoder trained
    one step at a time) runs as the cells' op (torch.ops.fusedrnn.cpu_cell, whose autograd node is C++: the same
    kernels with T = 1, so the same values and gradients as the layer op); y and h_n are then separate tensors, as
    torch.nn's. Anything else with a graph runs the general path's autograd.Function (ops._EagerLayer) per layer,
    as ops.layer would, without the general path's Python around it."""
    if torch.compiler.is_compiling() or torch._C._is_tracing():  # (first: nothing below is traced)
        return None
    nd = input.dim()
    if nd != 3 and nd != 2 or input.shape[-1] != m.input_size or torch._C._is_any_autocast_enabled():
        return None
    if m.dropout and m.training and m.num_layers > 1:
        return None
    grad = torch.is_grad_enabled()
    record = grad and input.requires_grad
    batched = nd == 3
    if not batched:
        T, B = input.shape[0], 1
    elif m.batch_first:
        B, T = input.shape[0], input.shape[1]
    else:
        T, B = input.shape[0], input.shape[1]
    if T == 0 or B == 0:
        return None
    dt, H = input.dtype, m.hidden_size
    D = 2 if m.bidirectional else 1
    LD, P = m.num_layers * D, (m.proj_size if m.proj_size > 0 else H)
    lstm = m.mode == "LSTM"
    params = m._parameters
    flat = [params.get(n) for n in m._flat_weights_names]
    for w in flat:
        if type(w) not in _PLAIN or w.dtype != dt or not w.is_cpu:
            return None
        record = record or grad and w.requires_grad
    if hx is not None:
        if lstm:
            if type(hx) is not tuple or len(hx) != 2:
                return None
            h0, c0 = hx
            states = ((h0, P), (c0, H))
        else:
            h0, c0 = hx, None
            states = ((h0, P),)
        for h, width in states:
            if (type(h) is not Tensor or h.dtype != dt or not h.is_cpu
                    or h.shape != ((LD, B, width) if batched else (LD, width))):
                return None
            record = record or grad and h.requires_grad
    backend = _cpu_backend(m.backend, dt, _MODES[m.mode], m.proj_size > 0)
    if (backend != "cpu" or torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
            or torch._C._functorch.maybe_current_level() is not None or debug.nan_fill_enabled() or in_export()
            or forward_ad_active()):
        return None
    if hx is None:
        h0 = torch.zeros(LD, B, P, dtype=dt)
        c0 = torch.zeros(LD, B, H, dtype=dt) if lstm else None
    elif not batched:
        h0 = h0.unsqueeze(1)
        c0 = c0.unsqueeze(1) if lstm else None
    if record and T == 1 and m.num_layers == 1 and D == 1 and m.proj_size == 0:  # the cell op; x [B, I]
        x = input if not batched else input[:, 0] if m.batch_first else input[0]
        op = _CPU_CELL[0] if _CPU_CELL else _cpu_cell()
        h, c, _ = op(_MODES[m.mode], x, h0[0], c0[0] if lstm else None, flat, m.bias, True)
        y = h if not batched else h.unsqueeze(1 if m.batch_first else 0)
        hy = h.clone().unsqueeze(0)  # (not a second view of y: torch.nn's outputs share no memory)
        if not batched:
            hy = hy.squeeze(1)
        cy = (c.unsqueeze(0) if batched else c) if lstm else None
        return (y, (hy, cy)) if lstm else (y, hy)
    x = input if batched else input.unsqueeze(1)
    if m.batch_first and batched:
        x = x.transpose(0, 1)
    x = x.reshape(T * B, m.input_size)
    mode, steps, bias = _MODES[m.mode], _steps(B, T), m.bias
    if record:  # the general path's autograd.Function, called as it would call it (ops.layer)
        def op(mode, x, steps, h, c, ws, bias, D, _train):
            return _EagerLayer.apply(mode, x, steps, h, c, bias, D, True, "cpu", *ws)
    else:
        op = _CPU_LAYER[0] if _CPU_LAYER else _cpu_layer()
    if m.num_layers == 1:
        y, hy, cy, _ = op(mode, x, steps, h0, c0, flat, bias, D, False)
    else:
        n = len(flat) // m.num_layers
        hys, cys = [], []
        for layer in range(m.num_layers):
            sl = slice(layer * D, (layer + 1) * D)
            x, hy, cy, _ = op(mode, x, steps, h0[sl], c0[sl] if lstm else None, flat[layer * n:(layer + 1) * n],
                              bias, D, False)
            hys.append(hy)
            cys.append(cy)
        y, hy, cy = x, torch.cat(hys), (torch.cat(cys) if lstm else None)
    y = y.view(T, B, y.shape[-1])
    if not batched:
        y, hy = y.squeeze(1), hy.squeeze(1)
        cy = cy.squeeze(1) if lstm else None
    elif m.batch_first:
        y = y.transpose(0, 1)
    return (y, (hy, cy)) if lstm else (y, hy)


# resolve()'s answers for CPU cells and sequences, keyed by what they depend on (the registry by its generation).
_RESOLVED: dict = {}


def _cpu_backend(requested: str, dtype, mode: str, has_proj: bool):
    """resolve()'s answer for a CPU input, remembered by what it depends on; None where resolve() raises (the
    general path raises it again, with its message)."""
    key = (requested, env("FUSEDRNN_BACKEND"), dtype, mode, has_proj, GENERATION[0], AUTO_ORDER.get("cpu"))
    backend = _RESOLVED.get(key)
    if backend is None:
        if len(_RESOLVED) > 64:
            _RESOLVED.clear()
        try:
            backend = _RESOLVED[key] = resolve(requested, _CPU, dtype, mode, has_proj)
        except RuntimeError:
            return None
    return backend
_CPU_CELL = []
_CPU_LAYER = []
_CELL_STEP = []


def _cpu_layer():
    if not _CPU_LAYER:
        _CPU_LAYER.append(torch.ops.fusedrnn.cpu_rnn_forward.default)
    return _CPU_LAYER[0]


def _cpu_cell():
    if not _CPU_CELL:
        _CPU_CELL.append(torch.ops.fusedrnn.cpu_cell.default)
    return _CPU_CELL[0]


def _cell_step():
    """fusedrnn._C.cell_step: the cpu_cell op's Autograd kernel called without the boxed dispatcher call
    torch.ops makes (csrc/fusedrnn.cpp), (h, c) for lstm, else h. 2.5 us less a step (RNNCell B1 H64 6.2 -> 3.6 us,
    LSTMCell 8.2 -> 5.6, the call alone); the op itself still runs through the dispatcher beneath it, so the
    profiler sees fusedrnn::cpu_cell as before."""
    if not _CELL_STEP:
        from . import _C
        _CELL_STEP.append(_C.cell_step)
    return _CELL_STEP[0]


# batch_sizes [T] of T steps of B rows (a cell's one step: T = 1), per (B, T) (eager only; up to _STEPS_MAX_T steps,
# so the cache holds at most 2 MiB): torch.full was about 1 us of a cell step's fixed cost, and several in a cold
# cache. The tensors never leave the modules (the ops only read them). Under torch.jit.trace sizes are tensors, so a
# trace records torch.full, not a constant.
_STEPS: dict[tuple[int, int], Tensor] = {}
_STEPS_MAX_T = 1024


def _steps(B, T=1) -> Tensor:
    # (never cached from inference mode: an inference tensor cannot be saved for a later training call's backward;
    # nor inside a functorch transform, whose jvp makes even a new tensor its wrapper, dead once the transform ends)
    if (torch.compiler.is_compiling() or not isinstance(B, int) or not isinstance(T, int) or T > _STEPS_MAX_T
            or torch.is_inference_mode_enabled() or torch._C._functorch.maybe_current_level() is not None):
        return torch.full((T,), B, dtype=torch.int64)
    t = _STEPS.get((B, T))
    if t is None:
        if len(_STEPS) >= 256:
            _STEPS.clear()
        t = _STEPS[(B, T)] = torch.full((T,), B, dtype=torch.int64)
    return t
