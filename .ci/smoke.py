"""Smoke test of an installed fusedrnn wheel, run from outside the source tree by .ci/cpu_wheel.sh and
.ci/cuda_build.sh: it imports, names its build, and runs CPU forward and backward against torch.nn."""
import importlib.metadata
import os
import sys

import torch

import fusedrnn

src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
assert not os.path.abspath(fusedrnn.__file__).startswith(src + os.sep), f"imported from the sources: {fusedrnn.__file__}"
version = importlib.metadata.version("fusedrnn")
torch_mm = "torch" + ".".join(torch.__version__.split("+")[0].split(".")[:2])
assert version.startswith(fusedrnn.__version__ + "+") and version.endswith(torch_mm), (version, torch.__version__)
assert "cpu" in fusedrnn.available_backends(), fusedrnn.backends._MISSING
want_cuda = len(sys.argv) > 1 and sys.argv[1] == "--cuda"
assert ("cuda" in fusedrnn.available_backends()) == want_cuda, fusedrnn.available_backends()

torch.manual_seed(0)
for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
    ref = torch.nn.LSTM(8, 16, num_layers=2, bidirectional=True).to(dtype)
    ours = fusedrnn.LSTM(8, 16, num_layers=2, bidirectional=True, backend="cpu").to(dtype)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(7, 3, 8, dtype=dtype, requires_grad=True)
    grads = []
    for m in (ref, ours):
        y, (h, c) = m(x)
        grads.append(torch.autograd.grad((y.sin().sum() + h.sum() + c.sum()), [x, *m.parameters()]))
        grads[-1] = (y.detach(),) + grads[-1]
    err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(grads[1], grads[0]))
    assert err < tol, (dtype, err)
print(f"smoke ok: fusedrnn {version} at {fusedrnn.__file__}, backends {fusedrnn.available_backends()}")
