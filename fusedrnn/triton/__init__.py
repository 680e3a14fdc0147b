"""Triton backend of fusedrnn (registered as "triton" when triton is importable).

Run on CPU tensors for testing with TRITON_INTERPRET=1 set before triton is first imported in the process.
"""
from ..backends import note_missing, register_backend

try:
    import triton as _triton_lib  # noqa: F401
except ImportError:  # pragma: no cover - depends on the install
    note_missing("triton", "the Triton package is not installed: pip install triton (Linux, NVIDIA/AMD GPU)")
else:
    from .backend import TritonBackend

    register_backend(TritonBackend())
