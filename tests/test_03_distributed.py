"""03, issue 15: data parallel by hand. Two CPU processes (gloo) on a global batch of 8 must compute the
same steps as one process: same weights after a few steps, and a 1-rank checkpoint resumed by 2 ranks
continues exactly as one rank would. Tiny model; each process imports torch (a few seconds)."""
import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, load_script
from test_03_mdsm_train import tiny_dataset

m = load_script("03_mdsm_train.py")


def launch(tmp_path, out, extra, ranks):
    """What torchrun does on one node: start `ranks` processes with RANK/WORLD_SIZE/MASTER_* set."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, os.path.join(ROOT, "03_mdsm_train.py"), f"--dataset={tiny_dataset(tmp_path)}",
            f"--out_dir={tmp_path / out}", "--width=4", "--blocks_per_stage=1", "--batch_size=8", "--log_every=1",
            "--ckpt_every=3", "--grid_every=100", "--device=cpu", *extra]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(ranks),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(args, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(ranks)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    return outs


def weights(path):
    return m.load_checkpoint(str(path))["model"]


def test_two_ranks_resume_a_one_rank_run_and_compute_its_steps(tmp_path):
    base = [f"--dataset={tiny_dataset(tmp_path)}", "--width=4", "--blocks_per_stage=1", "--batch_size=8",
            "--log_every=1", "--ckpt_every=3", "--grid_every=100", "--device=cpu"]
    m.main(base + [f"--out_dir={tmp_path / 'one'}", "--steps=3"])
    (tmp_path / "two").mkdir()  # the same step-3 checkpoint, continued by 2 ranks and by 1
    (tmp_path / "two" / "ckpt.pt").write_bytes((tmp_path / "one" / "ckpt.pt").read_bytes())
    outs = launch(tmp_path, "two", ["--steps=6", "--resume"], 2)
    assert "resumed at step 3" in outs[0] and "step 6 |" in outs[0] and "step 6 |" not in outs[1]  # rank 0 logs
    m.main(base + [f"--out_dir={tmp_path / 'one'}", "--steps=6", "--resume"])
    one, two = weights(tmp_path / "one" / "ckpt.pt"), weights(tmp_path / "two" / "ckpt.pt")
    assert two.keys() == one.keys()
    for k in one:  # global batch 8 = 2 x 4 slots, the global noise sliced: the same steps to float rounding
        assert torch.allclose(one[k], two[k], rtol=1e-5, atol=1e-7), k


def test_a_global_batch_that_does_not_split_over_the_ranks_is_refused_up_front(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # what torchrun --nproc_per_node=3 sets: refused before any process group
    with pytest.raises(SystemExit, match=r"^error: --batch_size=8 is out of range; allowed: >= 1, a multiple of WORLD_SIZE=3$"):
        m.main(["--batch_size=8", f"--dataset={tmp_path / 'none.npz'}", f"--out_dir={tmp_path / 'out'}", "--device=cpu"])
    assert not (tmp_path / "out").exists()
