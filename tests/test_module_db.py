"""PyTorch's own sample and error inputs for nn.LSTM/GRU/RNN and the cells (torch.testing._internal.common_modules
module_db), used as a checklist: every sample forward and backward against torch.nn, every error input rejected with
the same exception type and a message matching PyTorch's regex."""
import re

import pytest
import torch
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db

import fusedrnn
from conftest import assert_close_all, conformance_backends
from helpers import flatten_out

NAMES = {"nn.LSTM": "LSTM", "nn.GRU": "GRU", "nn.RNN": "RNN", "nn.LSTMCell": "LSTMCell", "nn.GRUCell": "GRUCell",
         "nn.RNNCell": "RNNCell"}
INFOS = [m for m in module_db if m.name in NAMES]


def test_checklist_is_complete():
    assert sorted(m.name for m in INFOS) == sorted(NAMES)


def _clone_args(args, kwargs):
    def c(a):
        if isinstance(a, torch.Tensor):
            return a.detach().clone().requires_grad_(a.requires_grad)
        if isinstance(a, tuple):
            return tuple(c(x) for x in a)
        if isinstance(a, list):
            return [c(x) for x in a]
        return a
    return c(args), {k: c(v) for k, v in kwargs.items()}


def _leaves(args):
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.requires_grad:
            out.append(a)
        elif isinstance(a, (tuple, list)):
            out += _leaves(a)
    return out


@pytest.mark.parametrize("backend", conformance_backends())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("info", INFOS, ids=lambda m: m.name)
def test_samples_forward_backward(info, training, backend):
    samples = info.module_inputs_func(info, device="cpu", dtype=torch.float64, requires_grad=True,
                                      training=training)
    assert samples
    for s in samples:
        cargs, ckw = s.constructor_input.args, s.constructor_input.kwargs
        torch.manual_seed(0)
        ref = info.module_cls(*cargs, **ckw).to(torch.float64).train(training)
        ours = getattr(fusedrnn, NAMES[info.name])(*cargs, backend=backend, **ckw).to(torch.float64)
        ours.train(training)
        assert ours.state_dict().keys() == ref.state_dict().keys()
        ours.load_state_dict(ref.state_dict())
        results = []
        for m in (ref, ours):
            args, kwargs = _clone_args(s.forward_input.args, s.forward_input.kwargs)
            torch.manual_seed(1)  # dropout masks: both draw the same stream only when dropout is 0
            outs = flatten_out(m(*args, **kwargs))
            loss = sum((o * (1 + torch.arange(o.numel(), dtype=o.dtype).view(o.shape).sin())).sum() for o in outs)
            wrt = _leaves(args) + _leaves(list(kwargs.values())) + list(m.parameters())
            grads = torch.autograd.grad(loss, wrt, allow_unused=True)
            grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]
            results.append(([o.detach() for o in outs], grads))
        if training and ckw.get("dropout", 0) and ckw.get("num_layers", 1) > 1:
            continue  # different (valid) dropout masks; dropout is tested in test_modules.py
        what = f"{info.name} {ckw} {s.desc}"
        assert_close_all(results[1][0], results[0][0], torch.float64, what + " outputs")
        assert_close_all(results[1][1], results[0][1], torch.float64, what + " grads")


@pytest.mark.parametrize("info", INFOS, ids=lambda m: m.name)
def test_error_inputs(info):
    errs = info.module_error_inputs_func(info, device="cpu", dtype=torch.float64, requires_grad=False,
                                         training=True)
    assert errs
    for e in errs:
        mi = e.module_error_input
        cls = getattr(fusedrnn, NAMES[info.name])
        cargs, ckw = mi.constructor_input.args, mi.constructor_input.kwargs
        if e.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
            with pytest.raises(e.error_type, match=e.error_regex):
                info.module_cls(*cargs, **ckw)  # the checklist itself holds for torch.nn
            with pytest.raises(e.error_type, match=e.error_regex):
                cls(*cargs, **ckw)
            continue
        m = cls(*cargs, **ckw).to(torch.float64)
        args, kwargs = mi.forward_input.args, mi.forward_input.kwargs
        with pytest.raises(e.error_type) as exc:
            m(*args, **kwargs)
        assert re.search(e.error_regex, str(exc.value)), (str(exc.value), e.error_regex)
