"""The cell modules' fast paths (fusedrnn.fast_path._cpu_cell_forward, _cpu_cell_step): when a CPU cell step may run
as the cpu_cell op."""
import pytest
import torch

cpu = pytest.importorskip("fusedrnn.cpu")
pytestmark = pytest.mark.skipif(cpu._C is None, reason="fusedrnn._C is not built")


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # (the checks read shapes while jit traces)
def test_cell_fast_path_checks_agree_with_cell_op_applies(monkeypatch):
    """_cpu_cell_step inlines _cell_op_applies' conditions: both say yes in plain eager mode and both say no under
    each thing that rules the cell op out (a dispatch mode, a function mode, jit tracing, a functorch transform,
    the debug mode). Without the inlined checks, each of these cells would run the C++ Function they cannot see."""
    import fusedrnn
    import fusedrnn.modules as fm
    from helpers import PassDispatchMode as Dispatch, PassFunctionMode as Function

    cell = fusedrnn.RNNCell(4, 5)
    ws = cell._weights()
    seen = []

    def checks(x):
        h = torch.zeros(x.shape[0], 5)
        seen.append((fm._cpu_cell_step(cell, "rnn_tanh", x, (h,), ws), fm._cell_op_applies()))
        return x * 2

    x = torch.randn(3, 4)
    checks(x)
    assert seen.pop() == (True, True)
    with Dispatch():
        checks(x)
    assert seen.pop() == (False, False)
    with Function():
        checks(x)
    assert seen.pop() == (False, False)
    torch.jit.trace(checks, (x,), check_trace=False)
    assert seen.pop() == (False, False)
    torch.func.vmap(checks)(torch.randn(2, 3, 4))
    assert seen.pop() == (False, False)
    monkeypatch.setenv("FUSEDRNN_DEBUG_NAN", "1")
    checks(x)
    assert seen.pop() == (False, False)


CELL_CASES = {  # name: (makes the call's arguments from (x, h, c), whether _cpu_cell_forward takes it)
    "batched": (lambda x, h, c: (x, h if c is None else (h, c)), True),
    "unbatched": (lambda x, h, c: (x[0], h[0] if c is None else (h[0], c[0])), False),
    "no_state": (lambda x, h, c: (x, None), False),
    "state_as_list": (lambda x, h, c: (x, [h] if c is None else [h, c]), False),
}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", list(CELL_CASES))
@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cell_forward_fast_path_takes_the_common_case_only(kind, case, bias):
    """_cpu_cell_forward (a cell module's whole forward in one call) answers for a batched input with its state as
    torch.nn takes it, and leaves everything else to the general path: each way, torch.nn's results. A state given
    as a list is torch.nn's to accept or refuse (it unpacks an LSTMCell's; a list as h is an error)."""
    import fusedrnn.fast_path as fp
    from helpers import make_pair

    ref, ours = make_pair(kind, 4, 5, bias=bias)
    g = torch.Generator().manual_seed(0)
    x, h, c = (torch.randn(3, n, generator=g, dtype=torch.float64) for n in (4, 5, 5))
    make, taken = CELL_CASES[case]
    args = make(x, h, c if kind == "LSTMCell" else None)
    n_states = 2 if kind == "LSTMCell" else 1
    with torch.no_grad():
        assert (fp._cpu_cell_forward(ours, *args, n_states) is not None) == taken
        try:
            want = ref(*args)
        except Exception as e:  # noqa: BLE001
            with pytest.raises(type(e)):
                ours(*args)
            return
        got = ours(*args)
    for a, b in zip(got if n_states == 2 else (got,), want if n_states == 2 else (want,)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_cell_forward_fast_path_leaves_subclasses_and_missing_weights():
    """A subclass may compute its weights (a parametrization makes one: its weight is a property), and a weight
    may be gone from _parameters: both take the general path, which reads them by attribute as torch.nn does."""
    import fusedrnn
    import fusedrnn.fast_path as fp
    from torch.nn.utils.parametrizations import weight_norm

    x, h = torch.randn(2, 4), torch.randn(2, 5)
    cell = weight_norm(fusedrnn.GRUCell(4, 5), "weight_hh")
    assert fp._cpu_cell_forward(cell, x, h, 1) is None
    cell(x, h).sum().backward()
    assert cell.parametrizations.weight_hh.original0.grad is not None
    plain = fusedrnn.GRUCell(4, 5)
    del plain._parameters["bias_hh"]
    assert fp._cpu_cell_forward(plain, x, h, 1) is None
