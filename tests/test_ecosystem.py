"""fusedrnn with the rest of the PyTorch ecosystem: `python -m fusedrnn.info`, `fusedrnn.convert`, torch.compile with
dynamic shapes, autocast (AMP) and ONNX export."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fusedrnn
from conftest import assert_low_precision, rel_err
from helpers import NN_CLASS, flatten_out, make_pair

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUSED = tuple(getattr(fusedrnn, k) for k in NN_CLASS)


# ---------------------------------------------------------------------------------------------------- info
def test_info_collect_reports_versions_and_backends():
    from fusedrnn.info import collect
    info = collect()
    assert info["fusedrnn"] == fusedrnn.__version__ and info["torch"] == torch.__version__
    assert info["cuda"] == torch.version.cuda
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["backends"]["reference"] == {"usable": True, "reason": ""}
    for name in ("cpu", "cuda", "triton"):  # every backend of the project is listed, usable or with a reason
        assert name in info["backends"]
        b = info["backends"][name]
        assert b["usable"] == (name in fusedrnn.available_backends())
        assert b["usable"] or b["reason"]
    assert info["auto"]["cpu"] in fusedrnn.available_backends()
    assert isinstance(info["gpus"], list) and isinstance(info["fusedrnn_cuda_ext"]["present"], bool)
    json.dumps(info)  # the benchmark header stores it as JSON


def test_info_reports_archs_of_the_cuda_extension(monkeypatch):
    import types

    from fusedrnn.info import collect, format_info
    fake = types.ModuleType("fusedrnn._C_cuda")
    fake.CUDA_ARCH_LIST = ["sm_90", "sm_80"]
    fake.__file__ = "/x/_C_cuda.so"
    monkeypatch.setitem(sys.modules, "fusedrnn._C_cuda", fake)
    info = collect()
    assert info["fusedrnn_cuda_ext"] == {"present": True, "path": "/x/_C_cuda.so", "archs": ["sm_80", "sm_90"]}
    assert "fusedrnn._C_cuda archs  sm_80 sm_90" in format_info(info)


def test_info_command_line():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-m", "fusedrnn.info"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Warning" not in out.stderr, out.stderr  # e.g. runpy's, if fusedrnn/__init__ imported fusedrnn.info
    for needle in (f"fusedrnn        {fusedrnn.__version__}", f"torch           {torch.__version__}",
                   "CPU capability", "reference  usable", "cuda", "auto picks"):
        assert needle in out.stdout, out.stdout


# ---------------------------------------------------------------------------------------------------- convert
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(3, 5)
        self.lstm = nn.LSTM(5, 4, num_layers=2, bidirectional=True, batch_first=True, dropout=0.0, proj_size=2)
        self.blocks = nn.Sequential(nn.GRU(4, 6), nn.RNN(6, 3, nonlinearity="relu", bias=False))
        self.cells = nn.ModuleList([nn.LSTMCell(3, 4), nn.GRUCell(3, 4), nn.RNNCell(3, 4, nonlinearity="relu")])
        self.shared = self.blocks[0]  # the same module under two names stays one module

    def forward(self, x):
        y, (h, c) = self.lstm(self.emb(x))
        y, h1 = self.blocks[0](y.transpose(0, 1))
        y, h2 = self.blocks[1](y)
        return [y, h, c, h1, h2, *self.cells[0](x[:, 0]), self.cells[1](x[:, 1]), self.cells[2](x[:, 2])]


def test_convert_swaps_every_rnn_and_keeps_parameters_outputs_and_grads():
    torch.manual_seed(0)
    net = _Net().double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    ref_out = net(x)
    ref_grads = torch.autograd.grad(sum(o.sum() for o in ref_out), list(net.parameters()))
    params = {n: p for n, p in net.named_parameters()}
    net.lstm.weight_hh_l0.requires_grad_(False)
    net.eval()
    assert fusedrnn.convert(net, backend="reference") is net
    for name, m in net.named_modules():
        assert not isinstance(m, tuple(NN_CLASS.values())), name
    assert isinstance(net.lstm, fusedrnn.LSTM) and isinstance(net.cells[2], fusedrnn.RNNCell)
    assert net.shared is net.blocks[0] and isinstance(net.shared, fusedrnn.GRU)
    assert net.blocks[1].nonlinearity == "relu" and net.blocks[1].mode == "RNN_RELU" and not net.blocks[1].bias
    assert net.cells[2].nonlinearity == "relu"
    assert (net.lstm.proj_size, net.lstm.num_layers, net.lstm.bidirectional, net.lstm.batch_first) == (2, 2, True,
                                                                                                          True)
    assert all(m.backend == "reference" for m in net.modules() if isinstance(m, FUSED))
    assert not any(m.training for m in net.modules())
    assert {n: p for n, p in net.named_parameters()} == params  # the same Parameter objects: optimizers keep working
    assert not net.lstm.weight_hh_l0.requires_grad
    net.lstm.weight_hh_l0.requires_grad_(True)
    out = net(x)
    grads = torch.autograd.grad(sum(o.sum() for o in out), list(net.parameters()))
    for a, b in zip(out + list(grads), ref_out + list(ref_grads)):
        assert rel_err(a, b) <= 1e-8


def test_convert_top_level_module_returns_the_new_one():
    torch.manual_seed(0)
    old = nn.GRU(3, 4, num_layers=2).to(torch.float64).train()
    new = fusedrnn.convert(old)
    assert type(new) is fusedrnn.GRU and new.training and new.weight_ih_l1.dtype == torch.float64
    assert new.weight_ih_l1 is old.weight_ih_l1
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    assert rel_err(new(x)[0], old(x)[0]) <= 1e-8
    already = fusedrnn.LSTM(3, 4)
    assert fusedrnn.convert(already) is already


def test_convert_keeps_parametrizations_and_state_dict():
    from torch.nn.utils.parametrizations import weight_norm
    torch.manual_seed(0)
    old = weight_norm(nn.LSTM(3, 4).double(), "weight_hh_l0")
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    ref = old(x)[0]
    sd = {k: v.clone() for k, v in old.state_dict().items()}
    new = fusedrnn.convert(old)
    assert isinstance(new, fusedrnn.LSTM) and torch.nn.utils.parametrize.is_parametrized(new, "weight_hh_l0")
    assert new.state_dict().keys() == sd.keys() and all(torch.equal(new.state_dict()[k], sd[k]) for k in sd)
    assert rel_err(new(x)[0], ref) <= 1e-8
    with torch.no_grad():  # the parametrization is live: changing its magnitude changes the output
        new.parametrizations.weight_hh_l0.original0.mul_(2)
    assert rel_err(new(x)[0], ref) > 1e-3


def test_convert_old_style_weight_norm_is_a_clear_error():
    m = nn.Sequential(torch.nn.utils.weight_norm(nn.GRU(3, 4), "weight_hh_l0"))
    with pytest.raises(RuntimeError, match="parametrizations.weight_norm"):
        fusedrnn.convert(m)


def test_convert_checks_backend_name():
    with pytest.raises(ValueError, match="unknown fusedrnn backend"):
        fusedrnn.convert(nn.Sequential(nn.LSTM(3, 4)), backend="nope")


# ---------------------------------------------------------------------------------------------------- compile
def _frames(model, inputs, fullgraph=True, **compile_kw):
    """Compiles `model` with a frame-counting backend, runs it on each input; (frames after each call, outputs)."""
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=fullgraph, **compile_kw)
    frames, outs = [], []
    for args in inputs:
        outs.append(compiled(*args))
        frames.append(counter.frame_count)
    return frames, outs


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_compile_mark_dynamic_no_recompile_across_T_and_B(kind):
    torch.manual_seed(0)
    model = getattr(fusedrnn, kind)(5, 6, num_layers=2, batch_first=True, bidirectional=True, backend="reference")
    inputs = []
    for B, T in [(3, 7), (5, 4), (2, 9)]:
        x = torch.randn(B, T, 5)
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(x, 1)
        inputs.append((x,))
    frames, outs = _frames(model, inputs)
    assert frames == [1, 1, 1]  # one graph for every T and B
    for (x,), out in zip(inputs, outs):
        for a, b in zip(flatten_out(out), flatten_out(model(x))):
            torch.testing.assert_close(a, b)


class _PackedModel(nn.Module):
    """A recurrent layer fed a PackedSequence: a head on the last layer's final states, and the outputs padded back
    with fusedrnn.ops.pad_packed_sequence (torch's does not compile: fusedrnn/ops.py, packing)."""

    def __init__(self, kind, **kw):
        super().__init__()
        self.rnn = getattr(fusedrnn, kind)(4, 5, **kw)
        self.D = 2 if self.rnn.bidirectional else 1
        self.head = nn.Linear(self.D * (self.rnn.proj_size or 5), 3)

    def forward(self, p, hx=None):
        out, h = self.rnn(p, hx)
        hs = h[0] if isinstance(h, tuple) else h
        last = torch.cat(list(hs[-self.D:]), -1)  # [B, D*P], in the input's (unsorted) order
        padded, lengths = fusedrnn.ops.pad_packed_sequence(out, batch_first=True)
        return self.head(last), padded, h[1] if isinstance(h, tuple) else hs


def _pack_inside(model, enforce_sorted):
    """fn(x, lengths, *hx): packs inside the compiled function, as a model fed padded batches does."""
    def fn(x, lengths, *hx):
        p = fusedrnn.ops.pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
        return model(p, *hx)
    return fn


def _packed_args(enforce_sorted, hx_shapes=(), seed=0):
    """(x [T, B, 4], lengths, *hx) for three length patterns with different T and B."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for lengths in ([6, 4, 1], [3, 5, 5, 2], [2, 7]):
        if enforce_sorted:
            lengths = sorted(lengths, reverse=True)
        B = len(lengths)
        hx = [torch.randn(L, B, H, generator=g, dtype=torch.float64) for L, H in hx_shapes]
        out.append((torch.randn(max(lengths), B, 4, generator=g, dtype=torch.float64), torch.tensor(lengths), *hx))
    return out


def _outputs_and_grads(fn, args, params):
    leaves = [a.detach().clone().requires_grad_() if a.is_floating_point() else a for a in args]
    outs = fn(*leaves)
    loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view(o.shape)).sum() for o in outs)
    return [o.detach() for o in outs] + list(torch.autograd.grad(loss, [a for a in leaves if a.requires_grad] + params))


def _check_compiled_packed(fn, args_list, params, **compile_kw):
    """fn compiled with fullgraph=True (any graph break raises) and dynamic shapes: outputs and the gradients of the
    inputs and `params` as eager for every args, and no recompilation after the first."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(compile_kw.pop("backend", "aot_eager"))
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=counter, **compile_kw)
    frames = []
    for args in args_list:
        want = _outputs_and_grads(fn, args, params)
        got = _outputs_and_grads(compiled, args, params)
        frames.append(counter.frame_count)
        assert len(got) == len(want)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # one graph for every length pattern and batch size (a restart of dynamo's analysis may count twice)
    assert frames[0] >= 1 and len(set(frames)) == 1, frames


def _fused_backend():
    return "cpu" if "cpu" in fusedrnn.available_backends() else "reference"


PACKED_COMPILE_CASES = [("LSTM", dict(num_layers=2, bidirectional=True)), ("LSTM", dict(proj_size=2)),
                        ("GRU", dict(bidirectional=True)), ("RNN", dict(nonlinearity="relu", num_layers=2))]
PACKED_IDS = [f"{k}-{'-'.join(kw)}" for k, kw in PACKED_COMPILE_CASES]


@pytest.mark.parametrize("where", ["packed_inside", "packed_argument"])
@pytest.mark.parametrize("enforce_sorted", [False, True], ids=["unsorted", "sorted"])
@pytest.mark.parametrize("kind,kw", PACKED_COMPILE_CASES, ids=PACKED_IDS)
def test_compile_packed_input_fullgraph_matches_eager(kind, kw, enforce_sorted, where):
    """PackedSequence input under fullgraph=True, packed inside the compiled function (fusedrnn.ops's packing) or
    passed in (torch's packing, outside), with index tensors (enforce_sorted=False) or without (the batch size is then
    a run-time value): outputs and gradients as eager, no recompiles across lengths and batch sizes."""
    torch.manual_seed(0)
    model = _PackedModel(kind, backend=_fused_backend(), **kw).double()
    if where == "packed_inside":
        fn = _pack_inside(model, enforce_sorted)
    else:
        def fn(x, lengths):  # only the model is compiled; the packing runs in eager
            return compiled_model(pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted))
        from torch._dynamo.testing import CompileCounterWithBackend
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        compiled_model = torch.compile(model, fullgraph=True, dynamic=True, backend=counter)
        frames = []
        for args in _packed_args(enforce_sorted):
            want = _outputs_and_grads(_pack_inside(model, enforce_sorted), args, list(model.parameters()))
            got = _outputs_and_grads(fn, args, list(model.parameters()))
            frames.append(counter.frame_count)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert frames[0] >= 1 and len(set(frames)) == 1, frames
        return
    _check_compiled_packed(fn, _packed_args(enforce_sorted), list(model.parameters()))


@pytest.mark.parametrize("enforce_sorted", [False, True], ids=["unsorted", "sorted"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_compile_packed_input_with_hx_fullgraph(kind, enforce_sorted):
    """With an initial state (given in the input's order, permuted as torch.nn does): gradients reach hx too."""
    torch.manual_seed(0)
    model = _PackedModel(kind, bidirectional=True, backend=_fused_backend()).double()
    inner = _pack_inside(model, enforce_sorted)

    def fn(x, lengths, h0, c0=None):
        return inner(x, lengths, (h0, c0) if kind == "LSTM" else h0)
    shapes = [(2, 5), (2, 5)] if kind == "LSTM" else [(2, 5)]
    _check_compiled_packed(fn, _packed_args(enforce_sorted, shapes), list(model.parameters()))


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_compile_packed_input_graph_breaks_without_fullgraph(kind):
    """fullgraph=True makes dynamo capture Tensor.item() and ops with data-dependent output sizes; without it each is a
    graph break. The modules need neither when the PackedSequence has index tensors or hx is given: no break. A
    sorted sequence without hx reads B = batch_sizes[0] (a break), and packing inside the compiled function is an op
    whose output sizes depend on the lengths (a break; fusedrnn/ops.py, packing)."""
    model = getattr(fusedrnn, kind)(4, 5, bidirectional=True, backend=_fused_backend()).double()
    (x, lengths), = _packed_args(False)[:1]
    (xs, lengths_sorted), = _packed_args(True)[:1]
    h0 = torch.zeros(2, 3, 5, dtype=torch.float64)
    hx = (h0, h0) if kind == "LSTM" else h0
    cases = [(model, (pack_padded_sequence(x, lengths, enforce_sorted=False),), 0),
             (model, (pack_padded_sequence(xs, lengths_sorted), hx), 0),
             (model, (pack_padded_sequence(xs, lengths_sorted),), "Tensor.item()"),
             (_pack_inside(model, False), (x, lengths), "Dynamic shape operator")]
    for fn, args, breaks in cases:
        torch._dynamo.reset()
        explained = torch._dynamo.explain(fn)(*args)
        reasons = [b.reason for b in explained.break_reasons]
        if breaks == 0:
            assert explained.graph_break_count == 0, reasons
        else:
            assert explained.graph_break_count >= 1 and all(breaks in r for r in reasons), reasons


def test_compiled_pad_total_length_is_checked_at_run_time():
    model = fusedrnn.GRU(4, 5, backend=_fused_backend()).double()

    def fn(x, lengths):
        out, _ = model(fusedrnn.ops.pack_padded_sequence(x, lengths, enforce_sorted=False))
        return fusedrnn.ops.pad_packed_sequence(out, batch_first=True, total_length=8)[0]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=True)
    x, lengths = torch.randn(6, 3, 4, dtype=torch.float64), torch.tensor([6, 4, 1])
    torch.testing.assert_close(compiled(x, lengths), fn(x, lengths), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="Expected total_length to be at least"):
        compiled(torch.randn(9, 3, 4, dtype=torch.float64), torch.tensor([9, 4, 1]))


@pytest.mark.parametrize("enforce_sorted", [False, True], ids=["unsorted", "sorted"])
def test_compile_packed_input_inductor(enforce_sorted):
    """The same with the default backend (inductor generates code around the ops, with unbacked sizes)."""
    torch.manual_seed(0)
    model = _PackedModel("LSTM", bidirectional=True, backend=_fused_backend()).double()
    _check_compiled_packed(_pack_inside(model, enforce_sorted), _packed_args(enforce_sorted)[:2],
                           list(model.parameters()), backend="inductor")


def test_compiled_inconsistent_packed_sequence_fails_at_run_time():
    """Under compile the data-dependent PackedSequence checks cannot run at trace time; the layer op's own
    batch_sizes check still rejects a hand-built sequence whose index tensors do not match batch_sizes[0]."""
    p = pack_padded_sequence(torch.randn(3, 2, 4, dtype=torch.float64), [3, 1], enforce_sorted=False)
    bad = type(p)(p.data, p.batch_sizes, torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]))  # B 3, batch_sizes[0] 2
    for backend in fusedrnn.available_backends():
        if backend == "triton":
            continue
        model = fusedrnn.GRU(4, 5, backend=backend).double()
        with pytest.raises(ValueError, match="sorted_indices must be a 1-D int64 tensor of length batch_sizes"):
            model(bad)  # eager: the module's own check, before any op runs
        torch._dynamo.reset()
        with pytest.raises(RuntimeError, match=r"batch_sizes\[0\] == B = 3"):
            torch.compile(model, fullgraph=True, backend="aot_eager")(bad)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("enforce_sorted", [False, True], ids=["unsorted", "sorted"])
def test_packing_helpers_match_torch(enforce_sorted, batch_first):
    """fusedrnn.ops.pack_padded_sequence / pad_packed_sequence: torch's results, gradients and errors, in eager."""
    from torch.nn.utils.rnn import pad_packed_sequence
    lengths = [6, 4, 1] if enforce_sorted else [4, 6, 1]
    x = torch.randn(3, 6, 2, 4, dtype=torch.float64) if batch_first else torch.randn(6, 3, 2, 4, dtype=torch.float64)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ours = fusedrnn.ops.pack_padded_sequence(xs[0], lengths, batch_first=batch_first, enforce_sorted=enforce_sorted)
    ref = pack_padded_sequence(xs[1], lengths, batch_first=batch_first, enforce_sorted=enforce_sorted)
    for a, b in zip(ours, ref):
        assert (a is None and b is None) or torch.equal(a, b)
    po, lo = fusedrnn.ops.pad_packed_sequence(ours, batch_first=batch_first, padding_value=-1, total_length=8)
    pr, lr = pad_packed_sequence(ref, batch_first=batch_first, padding_value=-1, total_length=8)
    assert torch.equal(po, pr) and torch.equal(lo, lr) and lo.dtype == lr.dtype
    w = torch.randn_like(pr)
    assert torch.equal(*(torch.autograd.grad((p * w).sum(), x_)[0] for p, x_ in ((po, xs[0]), (pr, xs[1]))))
    with pytest.raises(ValueError, match="Expected total_length to be at least"):
        fusedrnn.ops.pad_packed_sequence(ours, total_length=5)
    if enforce_sorted:
        with pytest.raises(RuntimeError, match="must be sorted in decreasing order"):
            fusedrnn.ops.pack_padded_sequence(x, [1, 4, 6], batch_first=batch_first)


# ---------------------------------------------------------------------------------------------------- autocast
AMP_CASES = [("LSTM", dict(num_layers=2, bidirectional=True)), ("LSTM", dict(proj_size=3)),
             ("GRU", dict(num_layers=2)), ("RNN", dict(nonlinearity="relu")), ("LSTMCell", {}), ("GRUCell", {}),
             ("RNNCell", {})]


def _dtypes(out):
    return [t.dtype for t in flatten_out(out)]


@pytest.mark.parametrize("kind,kw", AMP_CASES, ids=[f"{k}-{'-'.join(kw) or 'plain'}" for k, kw in AMP_CASES])
def test_autocast_cpu_bf16_matches_torch_nn(kind, kw):
    """Output dtypes as torch.nn's under CPU autocast for float32 and bfloat16 inputs; values within the
    low-precision rule; float32 parameter gradients. nn.LSTM's oneDNN path fails on CPUs without bf16 support, so
    nn runs with oneDNN off there; with oneDNN on, nn.LSTM casts every output (checked against the rule)."""
    torch.manual_seed(0)
    ref, ours = make_pair(kind, 6, 8, dtype=torch.float32, **kw)
    ref64 = make_pair(kind, 6, 8, dtype=torch.float64, **kw)[0]
    x = torch.randn(2, 6) if kind.endswith("Cell") else torch.randn(7, 2, 6)
    for xd in (torch.float32, torch.bfloat16):
        with torch.backends.mkldnn.flags(enabled=False), torch.autocast("cpu", dtype=torch.bfloat16):
            want = ref(x.to(xd))
            got = ours(x.to(xd))
        assert _dtypes(got) == _dtypes(want), (xd, _dtypes(got), _dtypes(want))
        r64 = flatten_out(ref64(x.to(xd).double()))
        assert_low_precision([g.to(torch.bfloat16) for g in flatten_out(got)], flatten_out(want), r64, kind)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(x)
        loss = sum(o.float().sum() for o in flatten_out(out))
    loss.backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in ours.parameters())
    if kind == "LSTM" and "proj_size" not in kw and torch.backends.mkldnn.is_available():
        assert _dtypes(out) == [torch.bfloat16] * 3  # oneDNN's layer is in autocast's lower-precision list


def test_autocast_leaves_float64_and_disabled_autocast_alone():
    ref, ours = make_pair("GRU", 3, 4)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _dtypes(ours(x)) == [torch.float64] * 2 == _dtypes(ref(x))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert _dtypes(ours(x)) == [torch.float64] * 2


@pytest.mark.requires_cuda
@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind,kw", AMP_CASES, ids=[f"{k}-{'-'.join(kw) or 'plain'}" for k, kw in AMP_CASES])
def test_autocast_cuda_matches_torch_nn(kind, kw, amp_dtype):
    torch.manual_seed(0)
    ref, ours = make_pair(kind, 6, 8, dtype=torch.float32, **kw)
    ref64 = make_pair(kind, 6, 8, dtype=torch.float64, **kw)[0]
    ref, ours = ref.cuda(), ours.cuda()
    x = (torch.randn(2, 6) if kind.endswith("Cell") else torch.randn(7, 2, 6)).cuda()
    with torch.autocast("cuda", dtype=amp_dtype):
        want, got = ref(x), ours(x)
    assert _dtypes(got) == _dtypes(want) == [amp_dtype] * len(_dtypes(want))
    assert_low_precision(flatten_out(got), flatten_out(want), flatten_out(ref64(x.cpu().double())), kind)


# ---------------------------------------------------------------------------------------------------- ONNX
class _OnnxNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = fusedrnn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = fusedrnn.GRU(8, 5)
        self.rnn = fusedrnn.RNN(5, 3, nonlinearity="tanh")
        self.cell = fusedrnn.LSTMCell(3, 4)
        self.gcell = fusedrnn.GRUCell(3, 2)

    def forward(self, x):
        y, (h, c) = self.lstm(x)
        y, hg = self.gru(y.transpose(0, 1))
        y, hr = self.rnn(y)
        hc, cc = self.cell(x[:, 0])
        return y, h, c, hg, hr, hc, cc, self.gcell(x[:, 1])


def test_onnx_export_runs_in_onnxruntime_like_eager():
    """Default exporter (dynamo), no extra arguments besides dynamic batch and time; one graph run at two shapes."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = _OnnxNet().eval()
    x = torch.randn(2, 6, 3)
    # Dynamic batch; T stays static because aten::rnn_tanh (the RNN) has no ONNX translation in torch 2.13 and is
    # unrolled over time, for torch.nn.RNN exactly as here. LSTM/GRU alone export with a dynamic T too (docs).
    dims = {0: torch.export.Dim("B", min=1, max=64)}
    prog = torch.onnx.export(model, (x,), dynamo=True, verbose=False, dynamic_shapes=(dims,))
    ops = {n.op_type for n in prog.model_proto.graph.node}
    assert {"LSTM", "GRU"} <= ops, ops  # standard ONNX recurrent nodes, as nn.LSTM exports
    assert all(n.domain in ("", "ai.onnx") for n in prog.model_proto.graph.node)  # no custom ops
    sess = ort.InferenceSession(prog.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for inp in (x, torch.randn(3, 6, 3)):
        outs = sess.run(None, {sess.get_inputs()[0].name: inp.numpy()})
        with torch.no_grad():
            eager = model(inp)
        assert len(outs) == len(eager)
        for o, e in zip(outs, eager):
            torch.testing.assert_close(torch.from_numpy(o), e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_spectral_norm_in_training_advances_as_with_torch_nn(kind):
    """spectral_norm has state: a power iteration each time the weight is computed in training mode. torch.nn's
    forward computes a changed (parametrized) weight twice (_update_flat_weights); the modules read the weights the
    same way, so the power iterations, the weights and the outputs stay torch.nn's over several training steps
    (before: one iteration a forward, outputs 1.5e-5 apart after one step)."""
    from torch.nn.utils.parametrizations import spectral_norm
    ref, ours = make_pair(kind, 5, 6, num_layers=2, bidirectional=True)
    for module in (ref, ours):
        torch.manual_seed(7)  # spectral_norm's random start vector
        for name in ("weight_hh_l0", "weight_ih_l1_reverse"):
            spectral_norm(module, name)
    x = torch.randn(4, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for step in range(3):
        outs = [flatten_out(m(x)) for m in (ref, ours)]
        for o, r in zip(*outs[::-1]):
            torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-12, msg=f"step {step}")
        for m, o in zip((ref, ours), outs):
            sum(t.sum() for t in o).backward()
    for name in ("weight_hh_l0", "weight_ih_l1_reverse"):
        pr, po = ref.parametrizations[name], ours.parametrizations[name]
        torch.testing.assert_close(po[0]._u, pr[0]._u, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(po.original.grad, pr.original.grad, rtol=1e-9, atol=1e-10)
    ref.eval(), ours.eval()
    torch.testing.assert_close(flatten_out(ours(x)), flatten_out(ref(x)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind,layers", [(k, n) for k in NN_CLASS for n in ((1,) if k.endswith("Cell") else (1, 2))])
def test_jit_trace_save_load_matches_torch_nn(kind, layers):
    """torch.jit.trace (its own check on: it re-traces in another grad mode, which the op's `train` flag made a
    different graph), run on another batch and sequence length, backward through the trace, torch.jit.save/load:
    outputs and parameter gradients are torch.nn's. A loaded trace needs `import fusedrnn` (its ops). One layer
    too: its states skip the slices and the cat, and its batch sizes must not be a traced constant (_steps)."""
    import io
    ref, ours = make_pair(kind, 5, 6, **({} if kind.endswith("Cell") else {"num_layers": layers}))
    g = torch.Generator().manual_seed(4)
    shape = (lambda T, B: (B, 5)) if kind.endswith("Cell") else (lambda T, B: (T, B, 5))
    traced = torch.jit.trace(ours, (torch.randn(shape(4, 3), generator=g, dtype=torch.float64),))
    x = torch.randn(shape(6, 2), generator=g, dtype=torch.float64)
    got, want = flatten_out(traced(x)), flatten_out(ref(x))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    sum(t.sum() for t in got).backward()
    sum(t.sum() for t in want).backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-10, msg=name)
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    buf.seek(0)
    torch.testing.assert_close(flatten_out(torch.jit.load(buf)(x)), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", list(NN_CLASS))
def test_jit_script_is_a_clear_error(kind):
    """torch.jit.script cannot compile the modules' Python forward: the error names the module and what works
    (it was an unsupported import deep in torch.onnx), also for a fusedrnn module inside a model."""
    ours = make_pair(kind, 5, 6)[1]
    with pytest.raises(RuntimeError, match=rf"fusedrnn\.{kind} cannot be compiled by torch\.jit\.script.*jit\.trace"):
        torch.jit.script(nn.Sequential(ours))


class _Scale(nn.Module):
    def forward(self, w):
        return 2 * w


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("name", ["weight_hh", "bias_ih"])
def test_cell_parametrizations_as_torch_nn(kind, name):
    """A parametrized cell weight (torch.nn.utils.parametrize: the module becomes a subclass whose property computes
    the weight) is read through the parametrization, not from the stored original (the cells read their weights from
    _parameters only on the classes themselves): outputs and the original's gradient as torch.nn's, and a change of
    the original shows."""
    from torch.nn.utils import parametrize
    ref, ours = make_pair(kind, 5, 6)
    for m in (ref, ours):
        parametrize.register_parametrization(m, name, _Scale())
    x, h = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    hx = (h, h.flip(0)) if kind == "LSTMCell" else h  # (W_hh multiplies h: a zero state would hide it)
    outs = [flatten_out(m(x, hx)) for m in (ref, ours)]
    for o, r in zip(outs[1], outs[0]):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)
    for m, out in zip((ref, ours), outs):
        sum(o.sum() for o in out).backward()
    orig = [getattr(m.parametrizations, name).original for m in (ref, ours)]
    torch.testing.assert_close(orig[1].grad, orig[0].grad, rtol=1e-12, atol=1e-12)
    before = flatten_out(ours(x, hx))[0]
    with torch.no_grad():
        orig[1].mul_(3)
    assert not torch.allclose(flatten_out(ours(x, hx))[0], before)


def test_cell_weights_follow_swaps_and_deletions():
    """Cells read their weights at every call: a weight replaced in _parameters (as torch.func.functional_call swaps
    them) is used, and a deleted one is torch.nn's AttributeError."""
    ref, ours = make_pair("GRUCell", 4, 3)
    x = torch.randn(2, 4, dtype=torch.float64)
    new = nn.Parameter(torch.randn_like(ours.weight_ih))
    for m in (ref, ours):
        m.weight_ih = new
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)
    for m in (ref, ours):
        del m.weight_ih
    with pytest.raises(AttributeError, match="weight_ih"):
        ref(x)
    with pytest.raises(AttributeError, match="weight_ih"):
        ours(x)


def test_onnx_export_flag_follows_torch():
    """The modules' export check (fusedrnn.onnx.in_export, which reads the two exporter flags directly) says what
    torch.onnx.is_in_onnx_export says, with either flag set."""
    from fusedrnn.onnx import _export_flags, in_export
    try:
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:  # this torch keeps them elsewhere: in_export calls torch.onnx's own function
        assert _export_flags() is None and in_export() is torch.onnx.is_in_onnx_export()
        return
    assert in_export() is False and torch.onnx.is_in_onnx_export() is False
    for flag in ("dynamo", "torchscript"):
        try:
            if flag == "dynamo":
                _flags._is_onnx_exporting = True
            else:
                GLOBALS.in_onnx_export = True
            assert torch.onnx.is_in_onnx_export() is True
            assert in_export() is True
        finally:
            _flags._is_onnx_exporting = False
            GLOBALS.in_onnx_export = False
    assert in_export() is False
