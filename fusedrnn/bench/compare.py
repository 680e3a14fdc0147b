"""python -m fusedrnn.bench.compare OLD.json NEW.json: the change in time and speed-up between two runs."""
from __future__ import annotations

import argparse
import json
import sys

from .report import compare


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fusedrnn.bench.compare", description=__doc__)
    p.add_argument("old")
    p.add_argument("new")
    a = p.parse_args(argv)
    with open(a.old) as f:
        old = json.load(f)
    with open(a.new) as f:
        new = json.load(f)
    print(compare(old, new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
