"""A build made for another torch must say so, naming both versions, instead of failing with a symbol trace."""
import sys
import types

import pytest
import torch

import fusedrnn


def test_mismatched_torch_build_is_a_clear_import_error(monkeypatch):
    fake = types.ModuleType("fusedrnn._build_info")
    fake.TORCH_VERSION = "1.13.1+cu117"
    monkeypatch.setitem(sys.modules, "fusedrnn._build_info", fake)
    with pytest.raises(ImportError) as e:
        fusedrnn._check_build_matches_torch()
    assert "1.13.1+cu117" in str(e.value) and torch.__version__ in str(e.value)


def test_matching_build_imports(monkeypatch):
    fake = types.ModuleType("fusedrnn._build_info")
    fake.TORCH_VERSION = torch.__version__.split("+")[0] + "+whatever"
    monkeypatch.setitem(sys.modules, "fusedrnn._build_info", fake)
    fusedrnn._check_build_matches_torch()
