"""03: data parallel by hand. Two CPU processes (gloo) on a global batch of 8 compute the same
steps as one process: a 1-rank checkpoint resumed by 2 ranks continues as one rank would, and a
signal to one rank stops both at the same step with one checkpoint. Only rank 0 prints. Tiny
model; each process imports torch (a few seconds)."""

import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, load_script
from test_03_mdsm_train import tiny_dataset

m = load_script("03_mdsm_train.py")


def net_args(tmp_path):
    return [f"--dataset={tiny_dataset(tmp_path)}", "--width=4", "--blocks_per_stage=1"] + [
        "--batch_size=8",
        "--log_every=1",
        "--ckpt_every=3",
        "--grid_every=100",
        "--device=cpu",
    ]


def start(tmp_path, out, extra, ranks):
    """What torchrun does on one node: start `ranks` processes with RANK/WORLD_SIZE/MASTER_* set."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = os.path.join(ROOT, "03_mdsm_train.py")
    args = [sys.executable, script, *net_args(tmp_path), f"--out_dir={tmp_path / out}", *extra]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    env.update(WORLD_SIZE=str(ranks), OMP_NUM_THREADS="1")
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ranked = [{**env, "RANK": str(r), "LOCAL_RANK": str(r)} for r in range(ranks)]
    return [subprocess.Popen(args, env=rank_env, **pipes) for rank_env in ranked]


def weights(path):
    return m.load_checkpoint(str(path))["model"]


def assert_same_steps(one, two):  # global batch 8 = 2 x 4 slots: the same steps to float rounding
    assert two.keys() == one.keys()
    for k in one:
        assert torch.allclose(one[k], two[k], rtol=1e-5, atol=1e-7), k


def test_two_ranks_resume_a_one_rank_run_and_compute_its_steps(tmp_path):
    m.main(net_args(tmp_path) + [f"--out_dir={tmp_path / 'one'}", "--steps=3"])
    (tmp_path / "two").mkdir()  # the same step-3 checkpoint, continued by 2 ranks and by 1
    (tmp_path / "two" / "ckpt.pt").write_bytes((tmp_path / "one" / "ckpt.pt").read_bytes())
    procs = start(tmp_path, "two", ["--steps=6", "--resume"], 2)
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert "config: " in outs[0] and "resumed at step 3" in outs[0] and "step 6 |" in outs[0]
    assert outs[1] == ""  # rank 0 alone prints, from the config line on
    m.main(net_args(tmp_path) + [f"--out_dir={tmp_path / 'one'}", "--steps=6", "--resume"])
    assert_same_steps(weights(tmp_path / "one" / "ckpt.pt"), weights(tmp_path / "two" / "ckpt.pt"))


def test_a_signal_to_one_rank_stops_both_at_one_step_that_resumes(tmp_path, capsys):
    procs = start(tmp_path, "two", ["--steps=300"], 2)
    for line in procs[0].stdout:
        if line.startswith("step 3 |"):
            procs[1].send_signal(signal.SIGTERM)  # rank 1 alone, as a scheduler might
            break
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [143, 143], outs
    step = m.load_checkpoint(str(tmp_path / "two" / "ckpt.pt"))["step"]
    assert 3 <= step < 300
    saved = (
        f"interrupted at step {step}; saved {tmp_path / 'two' / 'ckpt.pt'}; continue with --resume"
    )
    assert saved in outs[0].splitlines() and "Traceback" not in outs[0] + outs[1]
    resume = [f"--out_dir={tmp_path / 'two'}", f"--steps={step + 2}", "--resume"]
    assert m.main(net_args(tmp_path) + resume)[-1][0] == step + 2
    assert f"resumed at step {step} " in capsys.readouterr().out


def test_a_global_batch_that_does_not_split_over_the_ranks_is_refused_up_front(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun --nproc_per_node=3: before any group
    message = r"^error: --batch_size=8 is out of range; allowed: >= 1, a multiple of WORLD_SIZE=3$"
    with pytest.raises(SystemExit, match=message):
        m.main(["--batch_size=8", f"--dataset={tmp_path / 'none.npz'}", f"--out_dir={tmp_path}/o"])
    assert not (tmp_path / "o").exists()
