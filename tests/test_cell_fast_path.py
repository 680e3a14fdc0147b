"""The cell modules' fast path (fusedrnn.fast_path._cpu_cell_step): when a CPU cell step may run as the cpu_cell op."""
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
