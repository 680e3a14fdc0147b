"""`fusedrnn.convert(model)`: swap every torch.nn LSTM/GRU/RNN and cell in a model for its fusedrnn drop-in.

The new module takes over the old one's Parameter objects themselves (not copies), so weights, device, dtype,
`requires_grad` and an optimizer created before the conversion all carry over unchanged. Parametrizations
(torch.nn.utils.parametrize, e.g. parametrizations.weight_norm) move over with their state; the deprecated hook-based
torch.nn.utils.weight_norm / spectral_norm cannot and raise an error that says what to use instead.
"""
from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

from . import modules

# Exact torch.nn classes only: a user subclass of nn.LSTM may override forward, which the drop-in would drop.
_TARGETS = {nn.LSTM: modules.LSTM, nn.GRU: modules.GRU, nn.RNN: modules.RNN,
            nn.LSTMCell: modules.LSTMCell, nn.GRUCell: modules.GRUCell, nn.RNNCell: modules.RNNCell}
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _torch_class(m: nn.Module):
    """The torch.nn class of `m`, seeing through the subclass that parametrize.register_parametrization creates."""
    cls = type(m)
    if parametrize.is_parametrized(m):
        cls = cls.__bases__[0]
    return cls if cls in _TARGETS else None


def _check_hooks(m: nn.Module, path: str) -> None:
    for hook in list(m._forward_pre_hooks.values()):
        kind = type(hook).__name__
        if kind in ("WeightNorm", "SpectralNorm"):
            new = "weight_norm" if kind == "WeightNorm" else "spectral_norm"
            raise RuntimeError(
                f"fusedrnn.convert: module '{path or type(m).__name__}' uses the deprecated hook-based "
                f"torch.nn.utils.{new}, which cannot be moved to another module. Use "
                f"torch.nn.utils.parametrizations.{new} instead (convert keeps parametrizations), or remove it "
                f"with torch.nn.utils.remove_{new} before converting.")


def _kwargs(m: nn.Module, cls) -> dict:
    if issubclass(cls, nn.RNNBase):
        kw = dict(input_size=m.input_size, hidden_size=m.hidden_size, num_layers=m.num_layers, bias=m.bias,
                  batch_first=m.batch_first, dropout=float(m.dropout), bidirectional=m.bidirectional)
        if cls is nn.LSTM:
            kw["proj_size"] = m.proj_size
        if cls is nn.RNN:
            kw["nonlinearity"] = m.nonlinearity
        return kw
    kw = dict(input_size=m.input_size, hidden_size=m.hidden_size, bias=m.bias)
    if cls is nn.RNNCell:
        kw["nonlinearity"] = m.nonlinearity
    return kw


def convert_module(m: nn.Module, backend: str = "auto", path: str = "") -> nn.Module:
    """One torch.nn RNN module -> the fusedrnn module sharing its parameters (and parametrizations, hooks,
    training mode)."""
    cls = _torch_class(m)
    if cls is None:
        raise TypeError(f"fusedrnn.convert_module: expected a torch.nn LSTM/GRU/RNN or cell, got {type(m).__name__}")
    _check_hooks(m, path)
    # Built on the meta device: no allocation or random init; every tensor is replaced by the old module's below.
    new = _TARGETS[cls](**_kwargs(m, cls), device="meta", backend=backend)
    parametrized = dict(m.parametrizations.items()) if parametrize.is_parametrized(m) else {}
    for name, p in m._parameters.items():
        setattr(new, name, p)
    for name, plist in parametrized.items():
        # Register the same parametrization modules, then hand over the old list itself: it holds the `original`
        # Parameter(s), so state_dict keys, values and identity are those of the old module.
        for pm in plist:
            parametrize.register_parametrization(new, name, pm, unsafe=True)
        new.parametrizations[name] = plist
    for name, b in m._buffers.items():
        new.register_buffer(name, b, persistent=name not in m._non_persistent_buffers_set)
    leftover = [n for n, t in list(new.named_parameters()) + list(new.named_buffers()) if t.is_meta]
    if leftover and not any(t.is_meta for t in m.parameters()):
        raise RuntimeError(f"fusedrnn.convert: could not carry over {leftover} of '{path or type(m).__name__}'")
    for attr in _HOOK_DICTS:
        old = getattr(m, attr, None)
        if old:
            getattr(new, attr).update(old)
    new.train(m.training)
    return new


def convert(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace, in place and recursively, every torch.nn.LSTM/GRU/RNN/LSTMCell/GRUCell/RNNCell in `model` with the
    fusedrnn module of the same configuration, sharing the original Parameter objects.

    Returns the model; when `model` itself is one of those classes, returns the new module (the caller must use
    the return value in that case). A module shared at several places stays shared. `backend` is passed to every
    new module ("auto", "reference", "cpu", "cuda", "triton")."""
    memo: dict[int, nn.Module] = {}

    def swap(m: nn.Module, path: str) -> nn.Module:
        if _torch_class(m) is None:
            return m
        if id(m) not in memo:
            memo[id(m)] = convert_module(m, backend, path)
        return memo[id(m)]

    root = swap(model, "")
    if root is not model:
        return root
    for path, parent in list(model.named_modules(remove_duplicate=False)):
        if isinstance(parent, tuple(_TARGETS.values())):
            continue
        for name, child in list(parent._modules.items()):
            if child is None or name == "parametrizations" and parametrize.is_parametrized(parent):
                continue
            new = swap(child, f"{path}.{name}" if path else name)
            if new is not child:
                parent._modules[name] = new
    return model
