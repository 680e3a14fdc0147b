"""Environment variables read at every call (FUSEDRNN_BACKEND, FUSEDRNN_DEBUG_NAN), cheaply.

os.environ.get costs about 1 us (the key encoded, the value decoded, through the Mapping machinery): twice a cell's
step in a decoder loop, a tenth of its fixed cost. On POSIX CPython os.environ keeps its bytes dict (`_data`), which
its __setitem__/__delitem__ (and so monkeypatch.setenv, os.putenv aside) update; reading it directly gives the same
answer in a twentieth of the time. Elsewhere (Windows, other interpreters) the plain lookup.
"""
from __future__ import annotations

import os

_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None
_FAST = isinstance(_DATA, dict) and all(isinstance(k, bytes) for k in list(_DATA)[:1])
_KEYS: dict[str, bytes] = {}


def env(name: str, default: str = "") -> str:
    """os.environ.get(name, default)."""
    if not _FAST:
        return os.environ.get(name, default)
    key = _KEYS.get(name)
    if key is None:
        key = _KEYS[name] = os.fsencode(name)
    value = _DATA.get(key)
    return default if value is None else os.fsdecode(value)
