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


def test_compile_packed_input_no_recompile_across_lengths():
    """Packed input compiles and is not recompiled for new lengths or batch sizes. It is not one full graph: the
    shape checks and the zero initial state need B = batch_sizes[0] as a Python int (a data-dependent .item(), the
    same code as torch.nn's check_forward_args), which breaks the graph there."""
    torch.manual_seed(0)
    model = fusedrnn.LSTM(4, 5, bidirectional=True, backend="reference")
    inputs = []
    for lengths in ([6, 4, 1], [3, 3, 2, 2], [8, 2], [5, 5, 5, 5, 5]):
        x = torch.randn(max(lengths), len(lengths), 4)
        inputs.append((pack_padded_sequence(x, lengths),))
    frames, outs = _frames(model, inputs, fullgraph=False, dynamic=True)
    assert frames[0] >= 1 and len(set(frames)) == 1, frames
    for (p,), out in zip(inputs, outs):
        for a, b in zip(flatten_out(out), flatten_out(model(p))):
            torch.testing.assert_close(a, b)


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
