"""Hypothesis profiles for the fuzz tests, chosen by the HYPOTHESIS_PROFILE environment variable (default "ci").

    ci       200 examples per fuzz test, the default: tests/test_fuzz.py in about 40 s on 2 busy cores
    release  3000 examples per fuzz test (about 10x the CI time): before a release, or after a kernel change
    dev      20 examples, for a quick local loop

No deadline (the machines are shared and timings are noisy); failures are shrunk and printed with the notes that
tests/test_fuzz.py attaches (constructor arguments and a copy-pasteable reproduction).
"""
import os

from hypothesis import HealthCheck, Phase, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
               print_blob=True)

settings.register_profile("ci", max_examples=200, derandomize=True, **_COMMON)
settings.register_profile("release", max_examples=3000, **_COMMON)
settings.register_profile("dev", max_examples=20, phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
                          **_COMMON)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci") or "ci"
settings.load_profile(PROFILE)
