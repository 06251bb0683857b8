"""Shared fixtures: load a numbered script (its name starts with a digit) as a module."""
import importlib.util
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("MPLBACKEND", "Agg")  # figures render off-screen in tests
# The test models are tiny: one thread is as fast as two on a quiet machine and many times faster
# on a busy one, where two threads per process oversubscribe the cores.
torch.set_num_threads(1)


def load_script(filename):
    """Import e.g. '03_mdsm_train.py' under the module name '03_mdsm_train', the same name the
    scripts' own load_numbered() uses, so both share one module object."""
    name = os.path.splitext(filename)[0]
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, filename))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture
def script():
    """`script('01_score_matching.py')` returns that file as a module (main() not run)."""
    return load_script
