"""Running a torch.nn module and a fusedrnn module on the same input and collecting outputs and gradients."""
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import fusedrnn

NN_CLASS = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN, "LSTMCell": nn.LSTMCell, "GRUCell": nn.GRUCell,
            "RNNCell": nn.RNNCell}


class PassDispatchMode(TorchDispatchMode):
    """A dispatch mode that runs every op as it is (what rules the modules' fast paths out)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class PassFunctionMode(TorchFunctionMode):
    """A torch function mode that runs every function as it is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def make_pair(kind, *args, backend="auto", dtype=torch.float64, seed=0, **kwargs):
    """torch.nn module and fusedrnn module with identical parameters (same seed, then state_dict copied)."""
    torch.manual_seed(seed)
    ref = NN_CLASS[kind](*args, **kwargs).to(dtype)
    ours = getattr(fusedrnn, kind)(*args, backend=backend, **kwargs).to(dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def flatten_out(out):
    """Module output -> flat list of tensors (PackedSequence -> its data)."""
    if isinstance(out, PackedSequence):
        return [out.data]
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in flatten_out(o)]


def outputs_and_grads(module, make_input, hx=None, seed=1):
    """Forward with fresh leaf copies of the input/hx, then backward of a fixed random projection of every output.
    Returns (outputs, grads of input leaves, grads of parameters)."""
    inp, leaves = make_input()
    hx_leaves = []
    if hx is not None:
        if isinstance(hx, tuple):
            hx = tuple(h.detach().clone().requires_grad_() for h in hx)
            hx_leaves = list(hx)
        else:
            hx = hx.detach().clone().requires_grad_()
            hx_leaves = [hx]
    out = module(inp) if hx is None else module(inp, hx)
    outs = flatten_out(out)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, o.dtype)).sum()
               for o in outs)
    params = [p for p in module.parameters()]
    wrt = leaves + hx_leaves + params
    grads = torch.autograd.grad(loss, wrt, allow_unused=True) if loss.requires_grad else [None] * len(wrt)
    grads = [torch.zeros_like(w) if gr is None else gr for gr, w in zip(grads, wrt)]
    return [o.detach() for o in outs], grads


def sequence_input(kind_input, T, B, I, batch_first, dtype, seed=2, device="cpu"):
    """A factory for the input variants: 'padded', 'packed_sorted', 'packed_unsorted', 'unbatched'."""
    g = torch.Generator().manual_seed(seed)
    if kind_input == "unbatched":
        base = torch.randn(T, I, generator=g, dtype=torch.float64).to(device, dtype)
    else:
        shape = (B, T, I) if batch_first else (T, B, I)
        base = torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype)
    lengths = [max(1, T - (2 * k) % T) for k in range(B)] if B else []
    if kind_input == "packed_sorted":
        lengths = sorted(lengths, reverse=True)

    def make():
        x = base.clone().requires_grad_()
        if kind_input.startswith("packed"):
            return pack_padded_sequence(x, lengths, batch_first=batch_first,
                                        enforce_sorted=kind_input == "packed_sorted"), [x]
        return x, [x]
    return make


def low_precision_inputs(T, B, I, lengths, dtype, device="cpu"):
    """make_input factories (see outputs_and_grads) for the same unsorted packed input in `dtype` and, with exactly
    the same values, in float64."""
    base = torch.randn(T, B, I, generator=torch.Generator().manual_seed(2)).to(dtype)

    def factory(dt):
        def make():
            x = base.to(device, dt).requires_grad_()
            return pack_padded_sequence(x, lengths, enforce_sorted=False), [x]
        return make
    return factory(dtype), factory(torch.float64)


def check_2x_rule(kind, kw, I, H, T, B, lengths, dtype, device, backend, layers=1, bidirectional=True):
    """The flash-attention rule for fp16/bf16: ours (`backend`) and torch.nn in `dtype`, both against torch.nn in
    float64 run on the same (rounded) parameters and inputs; outputs and every gradient."""
    import copy

    from conftest import assert_low_precision

    nn_lp, ours = make_pair(kind, I, H, num_layers=layers, bidirectional=bidirectional, backend=backend,
                            dtype=dtype, **kw)
    nn_lp, ours = nn_lp.to(device), ours.to(device)
    nn64 = copy.deepcopy(nn_lp).double()
    make_lp, make64 = low_precision_inputs(T, B, I, lengths, dtype, device)
    o, g = outputs_and_grads(ours, make_lp)
    o_lp, g_lp = outputs_and_grads(nn_lp, make_lp)
    o64, g64 = outputs_and_grads(nn64, make64)
    assert_low_precision(o, o_lp, o64, f"{kind} {dtype} outputs")
    assert_low_precision(g, g_lp, g64, f"{kind} {dtype} grads")


# The backward ops' output masks (grad_x, state grads, weight grads) short of all three.
MASKS = [(x, s, w) for x in (True, False) for s in (True, False) for w in (True, False) if not (x and s and w)]


def assert_masked_grads(masked, full, mask, lstm):
    """A backward run with output_mask `mask` (x, the states, the weights) against the same backward run in full,
    both (grad_x, grad_hx, grad_cx, grad_weights): each gradient asked for is bitwise the full one (skipping the
    others' work changes nothing else), each one not asked for an empty [0]."""
    pairs = [(masked[0], full[0], mask[0]), (masked[1], full[1], mask[1]),
             *((m, f, mask[2]) for m, f in zip(masked[3], full[3], strict=True))]
    if lstm:
        pairs.append((masked[2], full[2], mask[1]))
    for got, want, asked in pairs:
        assert torch.equal(got, want) if asked else got.numel() == 0, mask
