"""Each example in examples/ runs with --quick in a subprocess, exits 0 and prints what it promises: the loss went
down, the measured speed-up over torch.nn, and its own result (sampled text, accuracy, decoded strings).

The three run concurrently (they are independent processes) with one intra-op thread each, so that on a small
shared machine they neither oversubscribe the cores nor take three times as long."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = {
    "char_lm.py": [r"sample: 'The river .{20,}'"],
    "sentiment_packed.py": [r"test accuracy after training: (0\.[6-9]|1\.0)"],
    "seq2seq_reverse.py": [r"greedy decoding on 256 new strings: digit accuracy 0\.\d+", r"\n  \d{6} -> \d{6}\n"],
}


@pytest.fixture(scope="module")
def runs():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("FUSEDRNN_BACKEND", None)
    procs = {name: subprocess.Popen([sys.executable, os.path.join(ROOT, "examples", name), "--quick"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for name in EXAMPLES}
    out = {}
    for name, p in procs.items():
        try:
            stdout, stderr = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, stderr = p.communicate()
        out[name] = (p.returncode, stdout, stderr)
    return out


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_quick_mode(runs, name):
    rc, stdout, stderr = runs[name]
    assert rc == 0, f"{name} exited {rc}\n{stdout}\n{stderr}"
    m = re.search(r"loss decreased: ([\d.]+) -> ([\d.]+)", stdout)
    assert m and float(m.group(2)) < float(m.group(1)), stdout
    assert re.search(r"speed-up over torch\.nn: \d+\.\d\dx \(train step: fusedrnn [\d.]+ ms, torch\.nn [\d.]+ ms",
                     stdout), stdout
    assert re.search(r"fusedrnn [\d.]+\w*, backend '\w+' on ", stdout), stdout
    for pattern in EXAMPLES[name]:
        assert re.search(pattern, stdout), (pattern, stdout)


def test_examples_show_the_one_line_swap():
    for name in EXAMPLES:
        with open(os.path.join(ROOT, "examples", name)) as f:
            src = f.read()
        assert re.search(r"=fusedrnn\.(LSTM|GRU)\b", src) and re.search(r"was:? .*nn\.(LSTM|GRU)", src), name
        assert "--quick" in src or "parse_args" in src
