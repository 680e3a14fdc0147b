"""The layer op: `torch.ops.fusedrnn.rnn_layer` and its backward, as torch.library custom ops.

One call runs one layer of an LSTM/GRU/RNN over the whole sequence, both directions, variable lengths taken from the
packed batch sizes. Shapes and the reserve layout: docs/design.md. The `backend` argument names the implementation
(fusedrnn/backends.py); the modules resolve `auto` before calling, so a compiled graph holds a fixed backend.
Registered here: the fake (meta) functions, so torch.compile can trace without running kernels, and the autograd
formula, which calls the backward op.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad as _fwad

from . import debug
from .backends import GATES, get_backend, masked_grads_fake
from .reference import RESERVE_WIDTH, check_batch_sizes

# Backends whose forward checks batch_sizes against hx and x itself (csrc/common.h, csrc/cuda/torch_ops.cpp, the
# reference). For any other the op checks it: under torch.compile the modules cannot (fusedrnn/modules.py,
# _packed_batch), and a kernel given a batch_sizes that does not match B or N would read or write out of bounds.
_CHECKS_BATCH_SIZES = ("cpu", "cuda", "reference")


def _impl(backend: str, x: Tensor):
    """The backend to run. An empty batch (no rows) has no work for a kernel, and BLAS rejects zero leading
    dimensions: the reference's loop over zero rows gives the exact, empty result for every backend."""
    return get_backend("reference" if x.shape[0] == 0 else backend)


def _layer_forward(mode, x, batch_sizes, hx, cx, weights, has_biases, num_directions, train, backend):
    """The body of rnn_layer (and of the eager path, _EagerLayer)."""
    if backend not in _CHECKS_BATCH_SIZES:
        check_batch_sizes(batch_sizes.tolist(), hx.shape[1], x.shape[0])
    out = tuple(_impl(backend, x).forward(mode, x, batch_sizes, hx, cx, weights, has_biases, num_directions, train))
    if debug.nan_fill_enabled():  # FUSEDRNN_DEBUG_NAN=1: outputs were NaN-filled; none may stay unwritten
        debug.check_written(backend, "rnn_layer", [x, hx, cx, weights],
                            {"y": out[0], "hy": out[1], "cy": out[2], "reserve": out[3]})
    return out


@torch.library.custom_op("fusedrnn::rnn_layer", mutates_args=())
def rnn_layer(mode: str, x: Tensor, batch_sizes: Tensor, hx: Tensor, cx: Optional[Tensor], weights: list[Tensor],
              has_biases: bool, num_directions: int, train: bool, backend: str
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x [N, I], batch_sizes [T] (int64, CPU), hx [D, B, P], cx [D, B, H] (LSTM) or None, weights per direction
    (w_ih, w_hh[, b_ih, b_hh][, w_hr]) -> y [N, D*P], hy [D, B, P], cy [D, B, H] or [0], reserve [D, N, R] or [0]."""
    return _layer_forward(mode, x, batch_sizes, hx, cx, weights, has_biases, num_directions, train, backend)


def _hidden_size(mode: str, weights) -> int:
    return weights[1].shape[0] // GATES[mode]


@rnn_layer.register_fake
def _rnn_layer_fake(mode, x, batch_sizes, hx, cx, weights, has_biases, num_directions, train, backend):
    N, D, B, P = x.shape[0], num_directions, hx.shape[1], hx.shape[2]
    H = _hidden_size(mode, weights)
    y = x.new_empty(N, D * P)
    hy = x.new_empty(D, B, P)
    cy = x.new_empty(D, B, H) if mode == "lstm" else x.new_empty(0)
    reserve = x.new_empty(D, N, RESERVE_WIDTH[mode] * H) if train else x.new_empty(0)
    return y, hy, cy, reserve


def _layer_backward(mode, grad_y, grad_hy, grad_cy, x, batch_sizes, hx, cx, weights, has_biases, num_directions, y,
                    reserve, backend, output_mask=None):
    """The body of rnn_layer_backward (and of the eager path's backward). Gradients of unused states may come as
    lazy zeros (see _backward); they are made whole here for a backend that does not take them. output_mask
    (x, the states, the weights; None: all): the gradients to compute, each other one an empty [0] (a backend with
    takes_output_mask skips their work; for any other they are dropped here)."""
    impl = _impl(backend, x)
    if not impl.lazy_zero_grads:  # (an expanded grad_y every backend takes: it is y.sum()'s gradient)
        if grad_hy.numel() == 0:
            grad_hy = torch.zeros_like(hx)
        if mode == "lstm" and grad_cy.numel() == 0:
            grad_cy = torch.zeros_like(cx)
    mask = (True, True, True) if output_mask is None else tuple(output_mask)
    if impl.takes_output_mask:
        gx, ghx, gcx, gws = impl.backward(mode, grad_y, grad_hy, grad_cy, x, batch_sizes, hx, cx, weights,
                                          has_biases, num_directions, y, reserve, mask)
    else:
        gx, ghx, gcx, gws = impl.backward(mode, grad_y, grad_hy, grad_cy, x, batch_sizes, hx, cx, weights,
                                          has_biases, num_directions, y, reserve)
        if not all(mask):  # (each its own tensor: outputs of a custom op may not alias each other)
            gx, ghx, gcx = (g if need else x.new_empty(0)
                            for g, need in ((gx, mask[0]), (ghx, mask[1]), (gcx, mask[1])))
            gws = gws if mask[2] else [w.new_empty(0) for w in weights]
    if debug.nan_fill_enabled():
        debug.check_written(backend, "rnn_layer_backward", [grad_y, grad_hy, grad_cy, x, hx, cx, weights, y, reserve],
                            {"grad_x": gx, "grad_hx": ghx, "grad_cx": gcx, "grad_weights": list(gws)})
    return gx, ghx, gcx, list(gws)


@torch.library.custom_op("fusedrnn::rnn_layer_backward", mutates_args=())
def rnn_layer_backward(mode: str, grad_y: Tensor, grad_hy: Tensor, grad_cy: Tensor, x: Tensor, batch_sizes: Tensor,
                       hx: Tensor, cx: Optional[Tensor], weights: list[Tensor], has_biases: bool,
                       num_directions: int, y: Tensor, reserve: Tensor, backend: str,
                       output_mask: Optional[list[bool]] = None) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """grad_y [N, D*P], grad_hy [D, B, P] or [0] (zeros), grad_cy [D, B, H] or [0] -> grad_x [N, I], grad_hx
    [D, B, P], grad_cx [D, B, H] or [0], weight grads shaped as `weights` (docs/design.md, Backward); output_mask
    [x, states, weights] (None: all): those not asked for come back as empty [0] tensors, their work skipped."""
    return _layer_backward(mode, grad_y, grad_hy, grad_cy, x, batch_sizes, hx, cx, weights, has_biases,
                           num_directions, y, reserve, backend, output_mask)


@rnn_layer_backward.register_fake
def _rnn_layer_backward_fake(mode, grad_y, grad_hy, grad_cy, x, batch_sizes, hx, cx, weights, has_biases,
                             num_directions, y, reserve, backend, output_mask=None):
    return masked_grads_fake(mode, x, hx, cx, weights, (True, True, True) if output_mask is None else output_mask)


# ---------------------------------------------------------------------------------------------------- vmap
# torch.vmap and the torch.func transforms built on it (jacrev, per-sample gradients as vmap(grad(...)), model
# ensembles over stacked weights) reach the layer through these rules: the layer runs once per vmapped entry and the
# results are stacked, as functorch's own fallback does for an op without a batching rule (torch.nn's layers get
# that fallback where it can be generated: per-sample gradients of nn.LSTM, jacrev of any of them). The entries are
# independent sequences, so each call is the exact unbatched result, on whatever backend the layer names.

def _entry(arg, dim, i):
    if dim is None:
        return arg
    if isinstance(arg, (list, tuple)):
        return [_entry(a, d, i) for a, d in zip(arg, dim)]
    return arg.select(dim, i) if i is not None else arg.new_zeros(arg.shape[:dim] + arg.shape[dim + 1:])


def _stack(parts):
    if isinstance(parts[0], (list, tuple)):
        return [_stack(list(p)) for p in zip(*parts)]
    return torch.stack(parts)


def _zero_dims(out):
    return [_zero_dims(o) for o in out] if isinstance(out, (list, tuple)) else 0


def _per_entry(op, fake, info, in_dims, args):
    """vmap rule for op: (results stacked along dim 0, their out_dims). An empty vmapped dimension gives empty
    results shaped by fake (the op's fake function) on one zero entry."""
    if info.batch_size == 0:
        out = _stack([fake(*[_entry(a, d, None) for a, d in zip(args, in_dims)])])
        out = [o[:0] if isinstance(o, Tensor) else [t[:0] for t in o] for o in out]
    else:
        out = _stack([op(*[_entry(a, d, i) for a, d in zip(args, in_dims)]) for i in range(info.batch_size)])
    return tuple(out), tuple(_zero_dims(out))


@torch.library.register_vmap("fusedrnn::rnn_layer")
def _rnn_layer_vmap(info, in_dims, *args):
    return _per_entry(torch.ops.fusedrnn.rnn_layer, _rnn_layer_fake, info, in_dims, args)


@torch.library.register_vmap("fusedrnn::rnn_layer_backward")
def _rnn_layer_backward_vmap(info, in_dims, *args, **kwargs):
    args = args + tuple(kwargs.values())
    in_dims = tuple(in_dims) + (None,) * (len(args) - len(in_dims))
    return _per_entry(torch.ops.fusedrnn.rnn_layer_backward, _rnn_layer_backward_fake, info, in_dims, args)


def _vmapped(t) -> bool:
    """Whether t is vmapped: a functorch BatchedTensor, possibly inside other transforms' wrappers (a grad
    transform's inside vmap, as in per-sample gradients)."""
    F = torch._C._functorch
    while t is not None and F.is_functorch_wrapped_tensor(t):
        if F.is_batchedtensor(t):
            return True
        t = F.get_unwrapped(t)
    return False


def _legacy_vmapped(tensors) -> bool:
    """Whether a gradient is batched by torch's older vmap (torch._vmap_internals), which
    torch.autograd.grad(is_grads_batched=True) and torch.autograd.functional's vectorize=True run the backward under:
    its fallback cannot batch an op taking a list of tensors, so the layer's gradients come from the reference's
    PyTorch ops there (_graph_grads), which it batches."""
    return any(t is not None and torch._C._functorch.is_legacy_batchedtensor(t) for t in tensors)


def _batched(tensors) -> bool:
    return any(_vmapped(t) for t in tensors)


def _func_forward(mode, x, batch_sizes, hx, cx, weights, has_biases, num_directions, train, backend):
    """_layer_forward under a functorch transform: through the op (and its vmap rule) where a tensor is vmapped."""
    body = rnn_layer if _batched((x, batch_sizes, hx, cx, *weights)) else _layer_forward
    return body(mode, x, batch_sizes, hx, cx, list(weights), has_biases, num_directions, train, backend)


def _func_backward(mode, grad_y, grad_hy, grad_cy, x, batch_sizes, hx, cx, weights, has_biases, num_directions, y,
                   reserve, backend, output_mask=None):
    """_layer_backward under a functorch transform (as _func_forward)."""
    vmapped = _batched((grad_y, grad_hy, grad_cy, x, batch_sizes, hx, cx, *weights, y, reserve))
    body = rnn_layer_backward if vmapped else _layer_backward
    return body(mode, grad_y, grad_hy, grad_cy, x, batch_sizes, hx, cx, list(weights), has_biases, num_directions, y,
                reserve, backend, None if output_mask is None else list(output_mask))


def _setup_context(ctx, inputs, output):
    mode, x, batch_sizes, hx, cx, weights, has_biases, num_directions, train, backend = inputs
    y, _, _, reserve = output
    ctx.mode, ctx.has_biases, ctx.num_directions, ctx.backend = mode, has_biases, num_directions, backend
    ctx.train = train
    ctx.n_weights = len(weights)
    ctx.save_for_backward(x, batch_sizes, hx, cx, y, reserve, *weights)
    # Unused outputs get None, not a materialised zero gradient: the reserve's alone would be a [D, N, R] tensor of
    # zeros per layer (as large as the reserve itself). _backward makes the zeros it needs, and only those.
    ctx.set_materialize_grads(False)


def _graph_grads(ctx, grad_y, grad_hy, grad_cy):
    """The layer's gradients as a graph (create_graph=True: a gradient penalty, second-order MAML), so that a
    backward through them is right: the reference forward (pure PyTorch ops, float32
    for a half-precision layer) run again on the saved inputs and differentiated by autograd with create_graph.
    Slower than the kernels' backward (a Python loop over the steps), and only taken when a graph is asked for.
    Returns (gx, ghx, gcx, gws), None where an input needs no gradient."""
    from .reference import forward as reference_forward
    x, batch_sizes, hx, cx, _, _, *weights = ctx.saved_tensors
    half = x.dtype in (torch.float16, torch.bfloat16)
    up = (lambda t: t.float() if t is not None and half else t)
    inputs = [x, hx, cx if ctx.mode == "lstm" else None, *weights]
    with torch.enable_grad():
        y, hy, cy, _ = reference_forward(ctx.mode, up(x), batch_sizes, up(hx), up(inputs[2]), [up(w) for w in weights],
                                         ctx.has_biases, ctx.num_directions, False)
    pairs = [(o, g) for o, g in ((y, grad_y), (hy, grad_hy), (cy if ctx.mode == "lstm" else None, grad_cy))
             if o is not None and g is not None and g.numel() and o.requires_grad]
    wrt = [i for i, t in enumerate(inputs) if t is not None and t.requires_grad]
    grads = [None] * len(inputs)
    if pairs and wrt:
        got = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wrt], [g.to(o.dtype) for o, g in pairs],
                                  create_graph=True, allow_unused=True)
        for i, g in zip(wrt, got):
            grads[i] = g
    gx, ghx, gcx, *gws = grads
    return gx, ghx, gcx, gws


def _output_mask(needs_x, needs_hx, needs_cx, needs_weights) -> list[bool]:
    """rnn_layer_backward's output_mask from which inputs need a gradient (ctx.needs_input_grad)."""
    return [bool(needs_x), bool(needs_hx or needs_cx), any(needs_weights)]


def _backward(ctx, grad_y, grad_hy, grad_cy, _grad_reserve, forward=None, backward=None, output_mask=None):
    """The layer's gradients, in the op's argument order. forward / backward: what computes them (default: the
    ops, as autograd of the op must; the eager path passes the plain bodies). output_mask: the gradients asked for
    (default: from ctx.needs_input_grad, laid out as the op's arguments); None is returned for the others."""
    if output_mask is None:
        n = ctx.needs_input_grad
        output_mask = _output_mask(n[1], n[3], n[4], n[5])
    forward = forward or torch.ops.fusedrnn.rnn_layer
    if torch.is_grad_enabled():  # create_graph=True
        gx, ghx, gcx, gws = _graph_grads(ctx, grad_y, grad_hy, grad_cy)
        return (None, gx, None, ghx, gcx if ctx.mode == "lstm" else None, gws, None, None, None, None)
    backward = backward or torch.ops.fusedrnn.rnn_layer_backward
    x, batch_sizes, hx, cx, y, reserve, *weights = ctx.saved_tensors
    if not ctx.train:  # the forward kept no reserve (the modules never do this): recompute it
        y, _, _, reserve = forward(ctx.mode, x, batch_sizes, hx, cx, weights, ctx.has_biases, ctx.num_directions, True,
                                   ctx.backend)
    # Unused outputs' gradients as lazy zeros: grad_y one zero expanded to y's shape (strides 0; a loss on the last
    # hidden state alone, as a classifier's, would otherwise allocate a zero gradient as large as y), grad_hy and
    # grad_cy empty. _layer_backward makes them whole for a backend that does not take them.
    if grad_y is None:
        grad_y = y.new_zeros(()).expand(y.shape)
    if grad_hy is None:
        grad_hy = x.new_zeros(0)
    if ctx.mode != "lstm" or grad_cy is None:
        grad_cy = x.new_zeros(0)
    gx, ghx, gcx, gws = backward(ctx.mode, grad_y, grad_hy, grad_cy, x, batch_sizes, hx, cx, weights, ctx.has_biases,
                                 ctx.num_directions, y, reserve, ctx.backend, output_mask)
    need_x, need_state, need_w = output_mask
    return (None, gx if need_x else None, None, ghx if need_state else None,
            gcx if ctx.mode == "lstm" and need_state else None, list(gws) if need_w else [None] * len(gws),
            None, None, None, None)


rnn_layer.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------- eager path
# In plain eager mode the layer runs through this autograd.Function instead of the custom op: the same bodies, the
# same saved tensors and gradients, without the custom op's Python dispatch (argument pytrees, defaults, the dynamo
# wrapper), which costs about 60 us a forward call and 250 us a forward+backward, as much as a whole small layer
# (an LSTMCell step in a decoder loop). Whenever something may be watching the op itself (torch.compile / export,
# TorchScript tracing, a torch function or dispatch mode such as FakeTensorMode, tensor subclasses), `layer` calls
# the op as before; functorch transforms take this path too (_FuncLayer). With grad mode off (no_grad,
# inference_mode) there is no graph to record, and the eager path calls the body directly, without the
# autograd.Function either.

def _eager_mask(ctx) -> list[bool]:
    """_output_mask of the eager path, whose arguments are (mode, x, batch_sizes, hx, cx, has_biases,
    num_directions, train, backend, *weights)."""
    n = ctx.needs_input_grad
    return _output_mask(n[1], n[3], n[4], n[9:])


class _EagerLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mode, x, batch_sizes, hx, cx, has_biases, num_directions, train, backend, *weights):
        inputs = (mode, x, batch_sizes, hx, cx, list(weights), has_biases, num_directions, train, backend)
        out = _layer_forward(*inputs)
        _setup_context(ctx, inputs, out)
        ctx.mark_non_differentiable(out[3])
        return out

    @staticmethod
    def backward(ctx, grad_y, grad_hy, grad_cy, grad_reserve):  # (with create_graph=True, _graph_grads)
        if _legacy_vmapped((grad_y, grad_hy, grad_cy)):
            with torch.enable_grad():  # (the differentiable recomputation is what batches there)
                gx, ghx, gcx, gws = _graph_grads(ctx, grad_y, grad_hy, grad_cy)
            return (None, gx, None, ghx, gcx if ctx.mode == "lstm" else None, None, None, None, None, *gws)
        _, gx, _, ghx, gcx, gws, *_ = _backward(ctx, grad_y, grad_hy, grad_cy, grad_reserve, _layer_forward,
                                                _layer_backward, _eager_mask(ctx))
        return (None, gx, None, ghx, gcx, None, None, None, None, *gws)


class _FuncLayer(_EagerLayer):
    """_EagerLayer under functorch transforms (torch.func.grad, vjp over functional_call, as for torch.nn.LSTM):
    forward and setup_context apart, the only form torch.func takes. The custom op cannot serve them in torch
    2.11-2.13: the autograd.Function that register_autograd generates lacks setup_context, and torch.func refuses it
    (pytorch/pytorch#170834). Plain eager autograd keeps _EagerLayer: this form's apply costs 15-25 us more a call.
    Under vmap, functorch runs forward and backward with vmapped tensors (generate_vmap_rule), which go through the
    ops' vmap rules (_func_forward, _func_backward)."""
    generate_vmap_rule = True

    @staticmethod
    def forward(mode, x, batch_sizes, hx, cx, has_biases, num_directions, train, backend, *weights):
        return _func_forward(mode, x, batch_sizes, hx, cx, weights, has_biases, num_directions, train, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        mode, x, batch_sizes, hx, cx, has_biases, num_directions, train, backend, *weights = inputs
        _setup_context(ctx, (mode, x, batch_sizes, hx, cx, weights, has_biases, num_directions, train, backend),
                       output)
        ctx.mark_non_differentiable(output[3])

    @staticmethod
    def backward(ctx, grad_y, grad_hy, grad_cy, grad_reserve):
        """The kernels' gradients, refusing a second derivative when a graph is asked for (functorch's backward
        always asks): _graph_grads cannot serve here, the saved inputs are the transform's wrappers, and autograd
        inside its backward found no path to them (zero gradients)."""
        with torch.no_grad():
            _, gx, _, ghx, gcx, gws, *_ = _backward(ctx, grad_y, grad_hy, grad_cy, grad_reserve, _func_forward,
                                                    _func_backward, _eager_mask(ctx))
        if torch.is_grad_enabled():
            gx, ghx, gcx, *gws = _NoDoubleBackward.apply(3 + len(gws), gx, ghx, gcx, *gws, *ctx.saved_tensors)
        return (None, gx, None, ghx, gcx, None, None, None, None, *gws)


class _NoDoubleBackward(torch.autograd.Function):
    """Identity on the layer's gradients whose own backward raises (_FuncLayer): gradients without a graph would
    make a nested transform silently miss that term."""
    generate_vmap_rule = True

    @staticmethod
    def forward(n, *tensors):
        """tensors: the n gradients, then the layer's saved inputs (what makes the results part of the graph)."""
        return tuple(g.view_as(g) if g is not None else None for g in tensors[:n])

    @staticmethod
    def setup_context(ctx, inputs, output):  # (the form functorch transforms take, see _FuncLayer)
        pass

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError("fusedrnn: double backward (a backward through the gradients of an RNN layer, as "
                           "create_graph=True asks for) is not implemented")



_PLAIN = (Tensor, torch.nn.Parameter)


def _plain_eager(tensors) -> bool:
    if torch.compiler.is_compiling() or torch.jit.is_scripting() or torch._C._is_tracing():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    return all(t is None or type(t) in _PLAIN for t in tensors)  # (functorch's wrapped tensors are Tensors)


def forward_ad_active() -> bool:
    """Whether a torch.autograd.forward_ad.dual_level is open (dual tensors may be about)."""
    return _fwad._current_level >= 0


def _nested_grad() -> bool:
    """Whether two or more functorch grad transforms are active (torch.func.grad of grad, jacrev of jacrev)."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    return sum(i.key() == TransformType.Grad for i in retrieve_all_functorch_interpreters()) > 1


def _has_tangent(tensors) -> bool:
    return any(t is not None and _fwad.unpack_dual(t).tangent is not None for t in tensors)


def layer(mode: str, x: Tensor, batch_sizes: Tensor, hx: Tensor, cx: Optional[Tensor], weights: list[Tensor],
          has_biases: bool, num_directions: int, train: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One layer: torch.ops.fusedrnn.rnn_layer (same arguments and results), through the eager path when nothing
    but eager autograd is running (see above). Forward-mode AD (torch.autograd.forward_ad: an input, a state or a
    weight carrying a tangent) runs the reference's PyTorch ops instead, whatever the backend: no kernel has a
    forward derivative, and the reference's ops carry the tangents (and record autograd's graph where one is asked
    for), as torch.nn's layers do. Without this the kernels returned outputs with no tangent, silently. So do
    functorch transforms that differentiate it forward (jvp, jacfwd, hessian) or twice (grad of grad): functorch
    composes the ops' derivatives to any order, the kernels' backward only once. vmap and one grad (per-sample
    gradients, jacrev, ensembles) keep the kernels: the ops' vmap rules above."""
    functorch = torch._C._functorch.maybe_current_level() is not None
    if (forward_ad_active() and (functorch or _has_tangent((x, hx, cx, *weights)))) or \
            (functorch and _nested_grad()):
        from .reference import forward as reference_forward
        return reference_forward(mode, x, batch_sizes, hx, cx, list(weights), has_biases, num_directions, False)
    if _plain_eager((x, batch_sizes, hx, cx, *weights)):
        if not torch.is_grad_enabled():  # no graph to record (no_grad, inference_mode): the body alone
            if torch._C._functorch.maybe_current_level() is not None:  # (vmap under no_grad)
                return _func_forward(mode, x, batch_sizes, hx, cx, weights, has_biases, num_directions, train,
                                     backend)
            return _layer_forward(mode, x, batch_sizes, hx, cx, weights, has_biases, num_directions, train, backend)
        fn = _EagerLayer if torch._C._functorch.maybe_current_level() is None else _FuncLayer
        return fn.apply(mode, x, batch_sizes, hx, cx, has_biases, num_directions, train, backend, *weights)
    return torch.ops.fusedrnn.rnn_layer(mode, x, batch_sizes, hx, cx, weights, has_biases, num_directions, train,
                                        backend)


# ---------------------------------------------------------------------------------------------------- packing
# torch.nn.utils.rnn.pack_padded_sequence / pad_packed_sequence cannot run inside a torch.compile(fullgraph=True)
# function in torch 2.13: torch/nn is on dynamo's skip list (a graph break), and with that lifted
# (torch._dynamo.dont_skip_tracing) the fake kernel of aten._pack_padded_sequence (torch/_subclasses/fake_impls.py)
# gives the packed data the shape [T, *] instead of [sum(lengths), *] and batch_sizes the input's dtype, so inductor
# fails its size assertion and AOT autograd its backward; aten._pad_packed_sequence has no fake kernel at all
# (pytorch/pytorch#162375). These two do the same through custom ops whose data-dependent sizes (the number of packed
# rows, the number of steps, the batch size when no index tensor holds it) are run-time values (unbacked SymInts).

@torch.library.custom_op("fusedrnn::pack_padded", mutates_args=())
def _pack_padded(input: Tensor, lengths: Tensor, batch_first: bool) -> tuple[Tensor, Tensor]:
    data, batch_sizes = torch.ops.aten._pack_padded_sequence(input, lengths, batch_first)
    return data, batch_sizes


@_pack_padded.register_fake
def _pack_padded_fake(input, lengths, batch_first):
    ctx = torch.library.get_ctx()
    N, T = ctx.new_dynamic_size(), ctx.new_dynamic_size()
    return input.new_empty(N, *input.shape[2:]), torch.empty(T, dtype=torch.int64)


@torch.library.custom_op("fusedrnn::pack_padded_backward", mutates_args=())
def _pack_padded_backward(grad: Tensor, input_size: list[int], batch_sizes: Tensor, batch_first: bool) -> Tensor:
    return torch.ops.aten._pack_padded_sequence_backward(grad, input_size, batch_sizes, batch_first)


@_pack_padded_backward.register_fake
def _pack_padded_backward_fake(grad, input_size, batch_sizes, batch_first):
    return grad.new_empty(input_size)


def _pack_padded_setup(ctx, inputs, output):
    ctx.input_size, ctx.batch_first = list(inputs[0].shape), inputs[2]
    ctx.save_for_backward(output[1])


def _pack_padded_grad(ctx, grad_data, _grad_batch_sizes):
    (batch_sizes,) = ctx.saved_tensors
    return torch.ops.fusedrnn.pack_padded_backward(grad_data.contiguous(), ctx.input_size, batch_sizes,
                                                   ctx.batch_first), None, None


_pack_padded.register_autograd(_pack_padded_grad, setup_context=_pack_padded_setup)


@torch.library.custom_op("fusedrnn::pad_packed", mutates_args=())
def _pad_packed(data: Tensor, batch_sizes: Tensor, batch_first: bool, padding_value: float, total_length: int,
                batch: int) -> tuple[Tensor, Tensor]:
    """`batch` is B when the caller knows it (from the index tensors), else -1."""
    if batch >= 0 and batch_sizes.numel() and batch != int(batch_sizes[0]):
        raise ValueError(f"PackedSequence.sorted_indices has {batch} elements but batch_sizes[0] is "
                         f"{int(batch_sizes[0])}")
    return torch.ops.aten._pad_packed_sequence(data, batch_sizes, batch_first, padding_value, total_length)


@_pad_packed.register_fake
def _pad_packed_fake(data, batch_sizes, batch_first, padding_value, total_length, batch):
    B = batch if batch >= 0 else torch.library.get_ctx().new_dynamic_size()
    padded = data.new_empty(total_length, B, *data.shape[1:])  # time-major, transposed for batch_first as ATen's
    return padded.transpose(0, 1) if batch_first else padded, torch.empty(B, dtype=torch.int64)


@torch.library.custom_op("fusedrnn::pad_packed_backward", mutates_args=())
def _pad_packed_backward(grad: Tensor, batch_sizes: Tensor, batch_first: bool, data_size: list[int]) -> Tensor:
    """The gradient of the padded output -> that of the packed rows: the rows pad_packed wrote, in packed order."""
    g = grad.transpose(0, 1) if batch_first else grad
    mask = torch.arange(g.shape[1]).unsqueeze(0) < batch_sizes.unsqueeze(1)  # [T, B]: step t holds rows 0..bs[t]-1
    return g[:batch_sizes.numel()][mask.to(g.device)].reshape(data_size)


@_pad_packed_backward.register_fake
def _pad_packed_backward_fake(grad, batch_sizes, batch_first, data_size):
    return grad.new_empty(data_size)


def _pad_packed_setup(ctx, inputs, output):
    ctx.batch_first, ctx.data_size = inputs[2], list(inputs[0].shape)
    ctx.save_for_backward(inputs[1])


def _pad_packed_grad(ctx, grad_padded, _grad_lengths):
    (batch_sizes,) = ctx.saved_tensors
    grad = torch.ops.fusedrnn.pad_packed_backward(grad_padded, batch_sizes, ctx.batch_first, ctx.data_size)
    return grad, None, None, None, None, None


_pad_packed.register_autograd(_pad_packed_grad, setup_context=_pad_packed_setup)


def pack_padded_sequence(input: Tensor, lengths, batch_first: bool = False, enforce_sorted: bool = True):
    """torch.nn.utils.rnn.pack_padded_sequence (same arguments, result and errors), which also compiles with
    torch.compile(fullgraph=True), forward and backward, and with any backend (see above for why torch's does not)."""
    from torch.nn.utils.rnn import PackedSequence
    if not isinstance(lengths, Tensor):
        lengths = torch.as_tensor(lengths, dtype=torch.int64, device="cpu")
    else:
        lengths = lengths.to(dtype=torch.int64)
    sorted_indices = None
    if not enforce_sorted:
        lengths, sorted_indices = torch.sort(lengths, descending=True)
        sorted_indices = sorted_indices.to(input.device)
        input = input.index_select(0 if batch_first else 1, sorted_indices)
    data, batch_sizes = torch.ops.fusedrnn.pack_padded(input, lengths, batch_first)
    return PackedSequence(data, batch_sizes, sorted_indices, None)


def pad_packed_sequence(sequence, batch_first: bool = False, padding_value: float = 0.0,
                        total_length: Optional[int] = None):
    """torch.nn.utils.rnn.pad_packed_sequence (same arguments, result and errors), which also compiles with
    torch.compile(fullgraph=True), forward and backward (see above for why torch's does not)."""
    max_seq_length = sequence.batch_sizes.size(0)
    if total_length is not None:
        if torch.compiler.is_compiling():  # the number of steps may be a run-time size: a run-time check
            torch._check(total_length >= max_seq_length, lambda: "Expected total_length to be at least the length "
                         "of the longest sequence in input")
        elif total_length < max_seq_length:
            raise ValueError("Expected total_length to be at least the length of the longest sequence in input, but "
                             f"got total_length={total_length} and max sequence length being {max_seq_length}")
        max_seq_length = total_length
    idx = sequence.sorted_indices if sequence.sorted_indices is not None else sequence.unsorted_indices
    if not isinstance(padding_value, float):  # (float() of a float would make dynamo restart its analysis)
        padding_value = float(padding_value)
    padded, lengths = torch.ops.fusedrnn.pad_packed(sequence.data, sequence.batch_sizes, batch_first, padding_value,
                                                    max_seq_length, idx.size(0) if idx is not None else -1)
    if sequence.unsorted_indices is not None:
        batch_dim = 0 if batch_first else 1
        return (padded.index_select(batch_dim, sequence.unsorted_indices),
                lengths[sequence.unsorted_indices.cpu()])
    return padded, lengths
