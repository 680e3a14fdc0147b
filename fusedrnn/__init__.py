"""fusedrnn: fused LSTM/GRU/RNN for PyTorch, a drop-in for torch.nn.LSTM/GRU/RNN and their cells.

    import fusedrnn
    lstm = fusedrnn.LSTM(256, 512, num_layers=2, batch_first=True)   # same arguments as torch.nn.LSTM

Backends (fusedrnn.available_backends()): `reference` (pure PyTorch, always), `cpu` (C++), `cuda`, `triton`.
Choose with the `backend=` keyword of each module or the FUSEDRNN_BACKEND environment variable; "auto" picks the
fastest one built for the input's device.
"""
__version__ = "0.1.0"


def _check_build_matches_torch() -> None:
    """Compiled extensions only load under the torch (major.minor) they were built against; say so clearly."""
    try:
        from ._build_info import TORCH_VERSION
    except ImportError:  # a source checkout that was never built: only the Python backends exist
        return
    import torch

    def mm(v):
        return tuple(v.split("+")[0].split(".")[:2])
    if mm(TORCH_VERSION) != mm(torch.__version__):
        raise ImportError(
            f"fusedrnn {__version__} was built for torch {TORCH_VERSION}, but torch {torch.__version__} is installed. "
            f"Install the fusedrnn build for torch {'.'.join(mm(torch.__version__))} or rebuild it against this torch "
            "(pip install --no-build-isolation . in the fusedrnn sources).")


_check_build_matches_torch()

from . import reference as _reference  # noqa: F401,E402  (always registered)
from .backends import available_backends  # noqa: E402
from .modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell  # noqa: E402
from .convert import convert  # noqa: E402
from .ops import pack_padded_sequence, pad_packed_sequence  # noqa: E402  (compile-friendly torch.nn.utils.rnn twins)


def _load_optional_backends() -> None:
    # Each module registers its backend if it can, or records how to get it; none may break `import fusedrnn`.
    import importlib

    for name in ("cpu", "cuda", "triton"):
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ImportError as e:  # the module itself is absent from this install
            from .backends import note_missing
            note_missing(name, f"fusedrnn.{name} could not be imported ({e})")


_load_optional_backends()

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "available_backends", "convert",
           "pack_padded_sequence", "pad_packed_sequence", "__version__"]
