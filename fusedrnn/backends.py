"""Backend registry: which implementation of the layer op runs, and how `auto` is resolved.

The contract every backend implements is in docs/design.md. A backend registers itself when its module is imported;
`fusedrnn/__init__.py` imports all of them. Only finished backends are registered.
"""
from __future__ import annotations

import torch

from ._env import env

MODES = ("lstm", "gru", "rnn_tanh", "rnn_relu")
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
# Order `auto` tries, per device type. The GPU backends (`cuda`, then `triton`) join it once their kernels have
# run and passed on a GPU (csrc/cuda/NOTES.md, fusedrnn/triton: neither has yet); until then they run only when asked
# for by name, and `auto` on CUDA tensors runs the reference, which is correct on any device.
GPU_VERIFIED: tuple[str, ...] = ()
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": (*GPU_VERIFIED, "reference")}


class Backend:
    """Base class; see docs/design.md for the shapes of forward/backward arguments."""

    name = "?"
    # Whether backward() takes the lazy zeros ops._backward passes for unused states: grad_hy and grad_cy with no
    # elements (else ops._layer_backward makes them whole). Every backend takes an expanded grad_y (strides (0, 0),
    # y.sum()'s gradient), which is also what an unused y gets.
    lazy_zero_grads = False
    # Whether backward takes output_mask (x, the states, the weights) and skips the gradients not asked for
    # (returning empty [0] tensors for them); otherwise fusedrnn/ops.py drops them after the fact.
    takes_output_mask = False

    def available(self) -> bool:
        return True

    def why_unavailable(self) -> str:
        return ""

    def supports(self, device: torch.device, dtype: torch.dtype, mode: str, has_proj: bool) -> bool:
        raise NotImplementedError

    def forward(self, mode, x, batch_sizes, hx, cx, weights, has_biases, num_directions, train):
        raise NotImplementedError

    def backward(self, mode, grad_y, grad_hy, grad_cy, x, batch_sizes, hx, cx, weights, has_biases,
                 num_directions, y, reserve):
        raise NotImplementedError


def masked_grads_fake(mode, x, hx, cx, weights, output_mask):
    """Fake gradients (grad_x, grad_hx, grad_cx, grad_weights) of a backward given output_mask (x, the states,
    the weights): each one not asked for an empty [0], as the kernels return it."""
    need_x, need_state, need_w = output_mask
    gcx = x.new_empty(cx.shape if mode == "lstm" and need_state else 0)
    return (x.new_empty(x.shape if need_x else 0), x.new_empty(hx.shape if need_state else 0), gcx,
            [w.new_empty(w.shape if need_w else 0) for w in weights])


_BACKENDS: dict[str, Backend] = {}
# Backends that exist in the project but are not registered on this machine, with the reason (for error messages).
_MISSING: dict[str, str] = {}


# Bumped at every change of the registry, so that a cache of resolved names (fusedrnn/modules.py) can tell.
GENERATION = [0]


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend
    _MISSING.pop(backend.name, None)
    GENERATION[0] += 1


def note_missing(name: str, how_to_get_it: str) -> None:
    """Record that backend `name` is not usable here and how a user gets it."""
    GENERATION[0] += 1
    if name not in _BACKENDS:
        _MISSING[name] = how_to_get_it


def get_backend(name: str) -> Backend:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise RuntimeError(_unavailable_message(name)) from None


def available_backends() -> list[str]:
    """Names of the backends usable in this process (compiled, importable), `reference` always among them."""
    return [n for n, b in _BACKENDS.items() if b.available()]


def _unavailable_message(name: str) -> str:
    known = sorted(set(_BACKENDS) | set(_MISSING) | {"auto"})
    if name in _MISSING:
        return f"fusedrnn backend '{name}' is not available: {_MISSING[name]}"
    if name in _BACKENDS:
        return f"fusedrnn backend '{name}' is not available: {_BACKENDS[name].why_unavailable()}"
    return f"unknown fusedrnn backend '{name}'; choose one of {known}"


def check_backend_name(name: str) -> str:
    """Validate a backend name given to a module (at construction); 'auto' and None mean automatic."""
    if name is None:
        return "auto"
    if not isinstance(name, str):
        raise TypeError(f"backend should be a str, got: {type(name).__name__}")
    if name != "auto" and name not in _BACKENDS and name not in _MISSING:
        raise ValueError(_unavailable_message(name))
    return name


def resolve(requested: str, device: torch.device, dtype: torch.dtype, mode: str, has_proj: bool) -> str:
    """The backend name to run for this call.

    `requested` is the module's `backend` argument; the environment variable FUSEDRNN_BACKEND overrides `auto`.
    An explicit request is never silently replaced: if it cannot run this input, the error says why.
    """
    if requested == "auto":
        requested = env("FUSEDRNN_BACKEND", "auto") or "auto"
    if requested != "auto":
        b = get_backend(requested)
        if not b.available():
            raise RuntimeError(_unavailable_message(requested))
        if not b.supports(device, dtype, mode, has_proj):
            raise RuntimeError(
                f"fusedrnn backend '{requested}' does not support mode={mode}, dtype={dtype}, "
                f"device={device.type}{', proj_size > 0' if has_proj else ''}; use backend='auto' or 'reference'"
            )
        return requested
    for name in AUTO_ORDER.get(device.type, ("reference",)):
        b = _BACKENDS.get(name)
        if b is not None and b.available() and b.supports(device, dtype, mode, has_proj):
            return name
    return "reference"
