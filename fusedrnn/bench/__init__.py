"""fusedrnn's benchmark report: `python -m fusedrnn.bench [--quick] [--device cuda] [--out DIR]`.

Compares every available fusedrnn backend with torch.nn (cuDNN on CUDA, oneDNN/ATen on the CPU) over a grid of
cases (cases.py), timing them interleaved (timing.py), checking errors and memory (metrics.py, harness.py), and
writes report.md, results.json (schema.py) and PNG plots (plots.py) into --out. `python -m fusedrnn.bench.readme
results.json` prints the README performance section; `python -m fusedrnn.bench.compare old.json new.json` the
change between two runs.
"""
from .schema import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION"]
