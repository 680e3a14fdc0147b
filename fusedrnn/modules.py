"""Drop-in LSTM, GRU, RNN and their cells.

Same constructor arguments, parameter names and shapes, initialisation, `state_dict`, inputs, outputs and errors as
torch.nn, plus a `backend` keyword ("auto" by default). The sequence modules derive from `nn.RNNBase`, not from
`nn.LSTM`/`nn.GRU`/`nn.RNN`, on purpose: torch.compile graph-breaks on any instance of those three classes (an
isinstance check in torch/_dynamo/variables/builder.py), while RNNBase gives the same parameter machinery and stays
compilable. So `isinstance(m, nn.RNNBase)` holds and `isinstance(m, nn.LSTM)` does not.

Every layer runs as one `torch.ops.fusedrnn.rnn_layer` call (fusedrnn/ops.py; in plain eager mode through
ops.layer, an autograd.Function, the same code without the op's dispatch); weights are read at every forward as
torch.nn reads them (_weights), so parametrizations (weight_norm, spectral_norm, ...) and `functional_call` see
current values, evaluated as often as with torch.nn. On the CPU in plain eager mode the modules take shorter ways to
the cpu backend's ops where every check is one of torch.nn's passing (fusedrnn/fast_path.py: _cpu_sequence,
_cpu_cell_step); anything else goes the general way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .ops import layer as run_layer  # (its import registers torch.ops.fusedrnn.*)
from .amp import autocast_dtype, cast, output_dtypes
from .backends import check_backend_name, resolve
from .fast_path import (_CELL_STEP, _CELL_TYPES, _MODES, _cell_op_applies, _cell_step, _cpu_cell_forward,
                        _cpu_cell_step, _cpu_sequence, _steps)
from .onnx import export_forward, in_export

# ATen's names for dtypes, used where torch.nn's error comes from ATen ("mat1 and mat2 must have the same dtype").
_ATEN_DTYPE = {torch.float64: "Double", torch.float32: "Float", torch.float16: "Half", torch.bfloat16: "BFloat16",
               torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char",
               torch.uint8: "Byte", torch.bool: "Bool", torch.complex64: "ComplexFloat",
               torch.complex128: "ComplexDouble"}


def _dtype_name(dt: torch.dtype) -> str:
    return _ATEN_DTYPE.get(dt, str(dt))


def _check_same_dtype(t: Tensor, weight: Tensor) -> None:
    if t.dtype != weight.dtype and not torch._C._is_any_autocast_enabled():
        raise RuntimeError(f"mat1 and mat2 must have the same dtype, but got {_dtype_name(t.dtype)} and "
                           f"{_dtype_name(weight.dtype)}")


def _check_devices(input: Tensor, hiddens, weights) -> None:
    for name, ts in (("hidden", hiddens), ("parameter", weights)):
        for t in ts:
            if t is not None and t.device != input.device:
                raise RuntimeError(f"Input and {name} tensors are not at the same device, found input tensor at "
                                   f"{input.device} and {name} tensor at {t.device}")


def _check_packed(data: Tensor, batch_sizes: Tensor) -> None:
    """Hand-built PackedSequence objects must be consistent; torch.nn gives odd errors or silent garbage here."""
    if torch.compiler.is_compiling():
        return
    if batch_sizes.dim() != 1 or batch_sizes.dtype != torch.int64 or batch_sizes.device.type != "cpu":
        raise ValueError("PackedSequence.batch_sizes must be a 1-D int64 tensor on the CPU, got "
                         f"{batch_sizes.dim()}-D {batch_sizes.dtype} on {batch_sizes.device}")
    if batch_sizes.numel() == 0:
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
    bs = batch_sizes.tolist()
    if bs[-1] <= 0 or any(a < b for a, b in zip(bs, bs[1:])):
        raise ValueError(f"PackedSequence.batch_sizes must be positive and non-increasing, got {bs}")
    if sum(bs) != data.shape[0]:
        raise ValueError(f"PackedSequence.data has {data.shape[0]} rows but batch_sizes sum to {sum(bs)}")


def _check_packed_indices(sorted_indices, unsorted_indices, B: int) -> None:
    """A hand-built PackedSequence's index tensors must be inverse permutations of 0..B-1: torch.nn uses them
    unchecked (index_select), so a duplicate or a wrong length silently mixes or resizes the returned states."""
    if torch.compiler.is_compiling():
        return
    for name, idx in (("sorted_indices", sorted_indices), ("unsorted_indices", unsorted_indices)):
        if idx is None:
            continue
        if idx.dim() != 1 or idx.dtype != torch.int64 or idx.numel() != B:
            raise ValueError(f"PackedSequence.{name} must be a 1-D int64 tensor of length batch_sizes[0] = {B}, "
                             f"got {idx.dim()}-D {idx.dtype} of {idx.numel()} elements")
        if idx.device.type == "meta":
            continue
        if B and not torch.equal(torch.sort(idx.cpu()).values, torch.arange(B)):
            raise ValueError(f"PackedSequence.{name} must be a permutation of 0..{B - 1}, got {idx.tolist()}")
    if sorted_indices is not None and unsorted_indices is not None and B and sorted_indices.device.type != "meta" \
            and unsorted_indices.device.type != "meta" \
            and not torch.equal(sorted_indices.cpu()[unsorted_indices.cpu()], torch.arange(B)):
        raise ValueError("PackedSequence.unsorted_indices must be the inverse permutation of sorted_indices")


def _packed_batch(batch_sizes: Tensor, sorted_indices, unsorted_indices, hx):
    """B = batch_sizes[0], the batch size of a PackedSequence, as a Python int (a SymInt when compiling).

    Eager mode reads it from batch_sizes (already validated by _check_packed), as torch.nn does. Under torch.compile
    that read is data-dependent: a graph break, or with fullgraph=True (which makes dynamo capture Tensor.item()) a
    run-time size that no shape check can be proven against. So B comes from a shape the tracer knows instead: the
    index tensors, which are [B] (pack_padded_sequence with enforce_sorted=False and pack_sequence always set them),
    else the given hx [L*D, B, P]. Only with neither (sorted input packed with enforce_sorted=True and no hx) is B
    read from batch_sizes, once, so that every state shares the one run-time size. The checks that batch_sizes[0]
    really is that B are data-dependent too: under compile they run at run time in the layer op (the cpu kernels'
    and the reference backend's batch_sizes checks), not in _check_packed / _check_packed_indices.
    """
    if torch.compiler.is_compiling():
        for idx in (sorted_indices, unsorted_indices):
            if idx is not None:
                return idx.size(0)
        h = hx[0] if isinstance(hx, (tuple, list)) else hx
        if isinstance(h, Tensor) and h.dim() == 3:
            return h.size(1)
    return int(batch_sizes[0])


def _needs_grad(tensors) -> bool:
    """Whether the layers keep what their backward needs (the op's `train`). torch.jit.trace records it as a constant,
    and its check re-traces in another grad mode (a graph that differed was an error), so a trace says False: a
    backward through a traced module recomputes its layers' forward (the op does when train was False)."""
    if torch.jit.is_tracing():
        return False
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _refuse_script(module: nn.Module):
    """torch.jit.script calls __prepare_scriptable__ on every module before compiling it: a fusedrnn module's forward
    is Python TorchScript cannot compile (the op's eager path, PackedSequence handling, autocast rules), and what it
    failed on was an import deep in torch.onnx. Raise a clear error instead."""
    name = type(module).__name__
    raise RuntimeError(
        f"fusedrnn.{name} cannot be compiled by torch.jit.script (its forward is Python that TorchScript does not "
        f"support). Use torch.jit.trace, torch.compile or torch.export, which work; or script a model built with "
        f"torch.nn.{name} (same parameters and state_dict: load this module's state_dict into it).")


class _FusedRNNBase(nn.RNNBase):
    backend = "auto"  # class default, so modules pickled without the attribute still load

    def __init__(self, mode: str, *args, backend: str = "auto", **kwargs):
        super().__init__(mode, *args, **kwargs)
        self.backend = check_backend_name(backend)

    def __prepare_scriptable__(self):
        _refuse_script(self)

    def flatten_parameters(self) -> None:
        """Kept for compatibility; fusedrnn reads the parameters where they are, so there is nothing to do."""

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", backend={self.backend!r}" if self.backend != "auto" else "")

    def _weights(self) -> list[list[Tensor]]:
        """The weights of each layer, read as torch.nn's forward reads them: its _update_flat_weights, which
        evaluates a parametrized weight twice when it changed since the last call, then _flat_weights. So a
        parametrization with state (spectral_norm's power iteration in training mode) advances as with torch.nn,
        and gives the same weights. Under torch.compile, by name (torch.nn's weakref check is not traced)."""
        if torch.compiler.is_compiling():
            flat = [getattr(self, n) for n in self._flat_weights_names]
        else:
            self._update_flat_weights()
            flat = self._flat_weights
        n = len(flat) // self.num_layers
        return [list(flat[layer * n:(layer + 1) * n]) for layer in range(self.num_layers)]

    def _run(self, x: Tensor, batch_sizes: Tensor, hx: Tensor, cx: Tensor | None):
        """x [N, I] packed rows; hx [L*D, B, P]; cx [L*D, B, H] or None -> (y [N, D*P], hy, cy)."""
        D = 2 if self.bidirectional else 1
        mode = _MODES[self.mode]
        weights = self._weights()
        amp = autocast_dtype(x)
        if amp is not None:  # torch.autocast: cast as torch.nn's fused RNN ops do, outputs as torch.nn's (amp.py)
            out_dt = output_dtypes(mode, x.device.type, amp, hx.dtype, cx.dtype if cx is not None else None,
                                   self.proj_size > 0, False)
            x, hx, cx = cast(x, amp), cast(hx, amp), cast(cx, amp)
            weights = [[cast(w, amp) for w in ws] for ws in weights]
        flat = [w for ws in weights for w in ws]
        _check_devices(x, (hx, cx), flat)
        _check_same_dtype(hx, flat[1])
        if cx is not None:
            _check_same_dtype(cx, flat[1])
        backend = resolve(self.backend, x.device, x.dtype, mode, self.proj_size > 0)
        train = _needs_grad([x, hx, cx, *flat])
        if self.num_layers == 1:  # (the states whole: no slices, no cat)
            y, hy, cy, _ = run_layer(mode, x, batch_sizes, hx, cx, weights[0], self.bias, D, train, backend)
            if cx is None:
                cy = None
        else:
            hys, cys = [], []
            for layer in range(self.num_layers):
                sl = slice(layer * D, (layer + 1) * D)
                x, hy, cy, _ = run_layer(
                    mode, x, batch_sizes, hx[sl], cx[sl] if cx is not None else None, weights[layer], self.bias, D,
                    train, backend)
                hys.append(hy)
                cys.append(cy)
                if self.dropout and self.training and layer < self.num_layers - 1:
                    x = F.dropout(x, self.dropout, True)
            y, hy, cy = x, torch.cat(hys), (torch.cat(cys) if cx is not None else None)
        if amp is not None:
            y, hy, cy = y.to(out_dt[0]), hy.to(out_dt[0]), (cy.to(out_dt[1]) if cy is not None else None)
        return y, hy, cy

    def _check_forward_args(self, input: Tensor, hx, batch_sizes: Tensor | None, B: int) -> None:
        """torch.nn's check_forward_args (nn.RNNBase's, nn.LSTM's for an LSTM): the same checks, order and messages,
        with the batch size B given rather than read from batch_sizes[0] (see _packed_batch)."""
        self.check_input(input, batch_sizes)
        D = 2 if self.bidirectional else 1
        P = self.proj_size if self.proj_size > 0 else self.hidden_size
        if self.mode == "LSTM":
            self.check_hidden_size(hx[0], (self.num_layers * D, B, P), "Expected hidden[0] size {}, got {}")
            self.check_hidden_size(hx[1], (self.num_layers * D, B, self.hidden_size),
                                   "Expected hidden[1] size {}, got {}")
        else:
            self.check_hidden_size(hx, (self.num_layers * D, B, P))

    def _forward(self, input, hx):
        """Shared forward; hx is a Tensor (GRU/RNN) or a (h, c) pair (LSTM), already validated and batched."""
        raise NotImplementedError

    def _prepare(self, input, hx, name: str):
        """Mirrors torch.nn's forward preamble: returns (input, batch_sizes | None, hx, sorted, unsorted,
        is_batched, batch_dim); hx is a tuple (h,) or (h, c) with the batch dimension present."""
        is_lstm = self.mode == "LSTM"
        D = 2 if self.bidirectional else 1
        P = self.proj_size if self.proj_size > 0 else self.hidden_size
        if isinstance(input, PackedSequence):
            input, batch_sizes, sorted_indices, unsorted_indices = input
            _check_packed(input, batch_sizes)
            B = _packed_batch(batch_sizes, sorted_indices, unsorted_indices, hx)
            _check_packed_indices(sorted_indices, unsorted_indices, B)
            is_batched, batch_dim = True, 0
        else:
            batch_sizes = sorted_indices = unsorted_indices = None
            if input.dim() not in (2, 3):
                tensor = " tensor" if name == "RNN" else ""
                raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D{tensor} instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            if hx is not None:
                hs = (hx[0], hx[1]) if is_lstm else (hx,)  # indexed as torch.nn does (its IndexError for a bad hx)
                want = 3 if is_batched else 2
                if any(h.dim() != want for h in hs):
                    kind = "batched 3-D" if is_batched else "unbatched 2-D"
                    if is_lstm:
                        raise RuntimeError(f"For {kind} input, hx and cx should also be {want}-D but got "
                                           f"({hs[0].dim()}-D, {hs[1].dim()}-D) tensors")
                    raise RuntimeError(f"For {kind} input, hx should also be {want}-D but got "
                                       f"{hs[0].dim()}-D tensor")
                if not is_batched:
                    hx = tuple(h.unsqueeze(1) for h in hs) if is_lstm else hx.unsqueeze(1)
            B = input.size(0 if self.batch_first else 1)
        if hx is None:
            h = torch.zeros(self.num_layers * D, B, P, dtype=input.dtype, device=input.device)
            if is_lstm:
                hx = (h, torch.zeros(self.num_layers * D, B, self.hidden_size, dtype=input.dtype,
                                     device=input.device))
            else:
                hx = h
            hx_given = False
        else:
            hx_given = True
        self._check_forward_args(input, hx, batch_sizes, B)
        if hx_given:
            hx = self.permute_hidden(hx, sorted_indices)
        return input, batch_sizes, hx, unsorted_indices, is_batched, batch_dim

    def _sequence_forward(self, input, hx, name: str):
        if type(input) is Tensor and input.is_cpu and type(self) in _SEQ_CLASSES:
            out = _cpu_sequence(self, input, hx)
            if out is not None:
                return out
        if in_export():  # export as torch.nn does: standard ONNX LSTM/GRU/RNN nodes (onnx.py)
            return export_forward(self, input, hx, name)
        orig = input
        input, batch_sizes, hx, unsorted_indices, is_batched, batch_dim = self._prepare(input, hx, name)
        h0, c0 = (hx[0], hx[1]) if self.mode == "LSTM" else (hx, None)
        if batch_sizes is None:
            if input.size(0 if not self.batch_first else 1) == 0:
                raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
            x = input.transpose(0, 1) if self.batch_first else input
            T, B = x.shape[0], x.shape[1]
            steps = _steps(B, T)
            y, hy, cy = self._run(x.reshape(T * B, x.shape[2]), steps, h0, c0)
            y = y.view(T, B, y.shape[-1])
            if self.batch_first:
                y = y.transpose(0, 1)
            if not is_batched:
                y = y.squeeze(batch_dim)
                hy = hy.squeeze(1)
                cy = cy.squeeze(1) if cy is not None else None
            out = y
        else:
            y, hy, cy = self._run(input, batch_sizes, h0, c0)
            out = PackedSequence(y, batch_sizes, orig.sorted_indices, orig.unsorted_indices)
        hidden = (hy, cy) if self.mode == "LSTM" else hy
        return out, self.permute_hidden(hidden, unsorted_indices)


class LSTM(_FusedRNNBase):
    """Drop-in for torch.nn.LSTM: LSTM(input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
    dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None, backend="auto").

    input [T, B, I] ([B, T, I] with batch_first, [T, I] unbatched, or a PackedSequence), hx optional (h0, c0) with
    h0 [L*D, B, P], c0 [L*D, B, H] -> output [T, B, D*P], (h_n [L*D, B, P], c_n [L*D, B, H])."""

    def __init__(self, *args, **kwargs):
        super().__init__("LSTM", *args, **kwargs)

    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    def forward(self, input, hx=None):
        return self._sequence_forward(input, hx, "LSTM")


class GRU(_FusedRNNBase):
    """Drop-in for torch.nn.GRU: GRU(input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
    dropout=0.0, bidirectional=False, device=None, dtype=None, backend="auto").
    input [T, B, I] (or batch_first / unbatched / PackedSequence), hx [L*D, B, H] -> (output [T, B, D*H], h_n)."""

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, **kwargs)

    def forward(self, input, hx=None):
        return self._sequence_forward(input, hx, "GRU")


class RNN(_FusedRNNBase):
    """Drop-in for torch.nn.RNN: RNN(input_size, hidden_size, num_layers=1, nonlinearity='tanh', bias=True,
    batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None, backend="auto")."""

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if len(args) > 3:
            self.nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            self.nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if self.nonlinearity == "tanh":
            mode = "RNN_TANH"
        elif self.nonlinearity == "relu":
            mode = "RNN_RELU"
        else:
            raise ValueError(f"Unknown nonlinearity '{self.nonlinearity}'. Select from 'tanh' or 'relu'.")
        super().__init__(mode, *args, **kwargs)

    def forward(self, input, hx=None):
        return self._sequence_forward(input, hx, "RNN")


class _FusedCellBase(nn.RNNCellBase):
    backend = "auto"
    _mode = "?"
    _name = "?"

    def _init_backend(self, backend):
        self.backend = check_backend_name(backend)

    def __prepare_scriptable__(self):
        _refuse_script(self)

    def _weights(self) -> list[Tensor]:
        """[weight_ih, weight_hh(, bias_ih, bias_hh)] as they are now. Read from _parameters, where torch.func's
        functional_call swaps them too, on the classes themselves (about 2.5 us less a call than four
        nn.Module.__getattr__, which a cell step in a decoder loop pays); by attribute where a subclass may define
        them otherwise (parametrizations make a subclass, whose property computes the weight) or one is gone."""
        names = _CELL_PARAMS if self.bias else _CELL_PARAMS[:2]
        if type(self) in _CELL_CLASSES and not torch.compiler.is_compiling():
            params = self._parameters
            ws = [params.get(n) for n in names]
            if all(w is not None for w in ws):
                return ws
        return [getattr(self, n) for n in names]

    def _cell(self, input: Tensor, hx):
        """input [B, I], hx tuple of [B, H] -> tuple of [B, H] (h,) or (h, c)."""
        weights = self._weights()
        mode = self._mode
        if _cpu_cell_step(self, mode, input, hx, weights):
            return self._cpu_cell(mode, input, hx, weights)
        return self._cell_general(input, hx, weights, mode)

    def _cpu_cell(self, mode, input, hx, weights):
        """The step as the cpu_cell op, its autograd node in C++ (csrc/cpu/cell.cpp), called through
        fusedrnn._C.cell_step as _cpu_cell_forward calls it: a decoder loop pays this path's fixed cost at every
        step."""
        step = _CELL_STEP[0] if _CELL_STEP else _cell_step()
        out = step(mode, input, hx[0], hx[1] if len(hx) > 1 else None, weights, self.bias)
        return out if mode == "lstm" else (out,)

    def _cell_general(self, input: Tensor, hx, weights, mode):
        """_cell through the layer op, with torch.nn's errors for bad input."""
        if input.size(1) != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {input.size(1)} expected {self.input_size}")
        for k, h in enumerate(hx):
            if input.size(0) != h.size(0):
                raise RuntimeError(f"Input batch size {input.size(0)} doesn't match hidden{k} batch size "
                                   f"{h.size(0)}")
            if h.size(1) != self.hidden_size:
                raise RuntimeError(f"hidden{k} has inconsistent hidden_size: got {h.size(1)}, expected "
                                   f"{self.hidden_size}")
        _check_same_dtype(input, weights[0])
        for h in hx:
            _check_same_dtype(h, weights[1])
        _check_devices(input, hx, weights)
        amp = autocast_dtype(input)
        if amp is not None:  # torch.autocast: see amp.py
            out_dt = output_dtypes(mode, input.device.type, amp, hx[0].dtype, hx[-1].dtype, False, True)
            input, hx, weights = cast(input, amp), tuple(cast(h, amp) for h in hx), [cast(w, amp) for w in weights]
        backend = resolve(self.backend, input.device, input.dtype, mode, False)
        if backend == "cpu" and input.size(0) and _cell_op_applies((input, *hx, *weights)):  # (autocast, as cast)
            out = self._cpu_cell(mode, input, hx, weights)
            return out if amp is None else tuple(o.to(dt) for o, dt in zip(out, out_dt))
        cx = hx[1].unsqueeze(0) if len(hx) > 1 else None
        y, _, cy, _ = run_layer(
            mode, input, _steps(input.size(0)), hx[0].unsqueeze(0), cx, weights, self.bias, 1,
            _needs_grad([input, *hx, *weights]), backend)
        # The new h is y (one step: the same values as hy), not hy: the layer's backward keeps y, so returning hy
        # kept a second copy of h alive per step of a decoder loop (LSTMCell 9.3 H floats a row and step against
        # torch.nn's 8.1).
        out = (y, cy[0]) if mode == "lstm" else (y,)
        return out if amp is None else tuple(o.to(dt) for o, dt in zip(out, out_dt))

    def _cell_forward(self, input: Tensor, hx, n_states: int):
        out = _cpu_cell_forward(self, input, hx, n_states)
        if out is not None:
            return out
        if in_export():  # export as torch.nn does (onnx.py)
            return export_forward(self, input, hx, self._name)
        if input.dim() not in (1, 2):
            raise ValueError(f"{self._name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            hs = tuple(hx) if n_states == 2 else (hx,)
            for idx, value in enumerate(hs):
                if value.dim() not in (1, 2):
                    what = f"hx[{idx}]" if n_states == 2 else "hidden"
                    raise ValueError(f"{self._name}: Expected {what} to be 1D or 2D, got {value.dim()}D instead")
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
            hs = (zeros,) * n_states
        elif not is_batched:
            hs = tuple(h.unsqueeze(0) for h in hs)
        out = self._cell(input, hs)
        if not is_batched:
            out = tuple(o.squeeze(0) for o in out)
        return out if n_states == 2 else out[0]


_CELL_PARAMS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


class LSTMCell(_FusedCellBase):
    """Drop-in for torch.nn.LSTMCell: input [B, I] or [I], hx optional (h [B, H], c [B, H]) -> (h', c')."""
    _mode, _name = "lstm", "LSTMCell"

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None,
                 backend: str = "auto"):
        super().__init__(input_size, hidden_size, bias, num_chunks=4, device=device, dtype=dtype)
        self._init_backend(backend)

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        return self._cell_forward(input, hx, 2)


class GRUCell(_FusedCellBase):
    """Drop-in for torch.nn.GRUCell: input [B, I] or [I], hx optional [B, H] -> h'."""
    _mode, _name = "gru", "GRUCell"

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None,
                 backend: str = "auto"):
        super().__init__(input_size, hidden_size, bias, num_chunks=3, device=device, dtype=dtype)
        self._init_backend(backend)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        return self._cell_forward(input, hx, 1)


class RNNCell(_FusedCellBase):
    """Drop-in for torch.nn.RNNCell (nonlinearity 'tanh' or 'relu'): input [B, I] or [I], hx [B, H] -> h'."""
    _name = "RNNCell"

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh",
                 device=None, dtype=None, backend: str = "auto"):
        super().__init__(input_size, hidden_size, bias, num_chunks=1, device=device, dtype=dtype)
        self.nonlinearity = nonlinearity
        self._init_backend(backend)

    @property
    def _mode(self):
        if self.nonlinearity not in ("tanh", "relu"):
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        return "rnn_" + self.nonlinearity

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        return self._cell_forward(input, hx, 1)


_CELL_CLASSES = (LSTMCell, GRUCell, RNNCell)
_CELL_TYPES[0] = _CELL_CLASSES
_SEQ_CLASSES = (LSTM, GRU, RNN)
