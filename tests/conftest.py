"""Shared fixtures: load a numbered script (its name starts with a digit) as a module."""

import importlib
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the scripts import each other by name, as they do when run from ROOT
os.environ.setdefault("MPLBACKEND", "Agg")  # figures render off-screen in tests
# The test models are tiny: one thread is as fast as two on a quiet machine and many times faster
# on a busy one, where two threads per process oversubscribe the cores.
torch.set_num_threads(1)


def load_script(filename):
    """Import e.g. '03_mdsm_train.py' as the module '03_mdsm_train' (its main() does not run): the
    same module object the scripts get from importlib.import_module('03_mdsm_train')."""
    return importlib.import_module(os.path.splitext(filename)[0])


@pytest.fixture
def script():
    """`script('01_score_matching.py')` returns that file as a module (main() not run)."""
    return load_script


@pytest.fixture
def tiny_npz(tmp_path):
    """96 random 8x8 grey images as a .npz (80 training, 16 test): enough for 05's image runs."""
    rng = np.random.default_rng(0)
    x = (rng.random((96, 8, 8)) * 255).astype(np.uint8)
    path = tmp_path / "tiny.npz"
    np.savez(path, x_train=x[:80], x_test=x[80:])
    return path


def tiny_dual_score_args(tiny_npz, out_dir, steps=3):
    """05's smallest image run on tiny_npz."""
    return [
        f"--dataset={tiny_npz}",
        f"--steps={steps}",
        "--batch=4",
        "--width=2",
        "--n_test=8",
        "--n_draws=1",
        "--device=cpu",
        f"--out_dir={out_dir}",
    ]
