"""03: the MDSM loss against closed forms, the spec's settings, the real loaders on tiny files in
the official formats, checkpoints that never lose work (an interrupted run resumes exactly), and
the fast paths against fp32 eager."""

import gzip
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
import torch
from conftest import ROOT, load_script

m = load_script("03_mdsm_train.py")
SIGMA0 = 0.1


class Quadratic(torch.nn.Module):
    """E(x) = ||x - mu||^2 / (2a) per sample: grad E = (x - mu) / a."""

    def __init__(self, a, mu=0.3):
        super().__init__()
        self.log_a = torch.nn.Parameter(torch.tensor(float(np.log(a))))
        self.mu = mu

    def forward(self, x):
        return (x - self.mu).pow(2).flatten(1).sum(1) / (2 * self.log_a.exp())


def gaussian_batch(n, d, s, sigma, mu=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = mu + s * torch.randn(n, 1, 1, d, generator=g, dtype=torch.float64)
    eps = torch.randn(n, 1, 1, d, generator=g, dtype=torch.float64)
    return x, torch.full((n,), sigma, dtype=torch.float64), eps


def test_loss_value_and_sign_on_a_quadratic_energy():
    # One sample, by hand: || x - x~ + sigma0^2 grad E(x~) ||^2 / (sigma^2 sigma0^4)
    model = Quadratic(a=0.5).double()
    x, sigmas, eps = gaussian_batch(4, 6, s=0.2, sigma=0.7)
    x_noisy = x + 0.7 * eps
    expected = (x - x_noisy + SIGMA0**2 * (x_noisy - 0.3) / 0.5).pow(2).flatten(1).sum(1) / (
        0.7**2 * SIGMA0**4
    )
    loss = m.mdsm_loss(model, x, sigmas, eps, SIGMA0)
    assert torch.allclose(loss, expected.mean(), rtol=1e-10)


def test_loss_expectation_and_its_weight_gradient_match_closed_form():
    # Data N(mu, s^2 I_d). With c = sigma0^2 / a the residual is c*u + (c - 1)*sigma*eps, so
    # E[loss] = d (c^2 s^2 + (c - 1)^2 sigma^2) / (sigma^2 sigma0^4) and d/da follows.
    d, s, sigma, a = 16, 0.2, 0.6, 0.05
    model = Quadratic(a).double()
    x, sigmas, eps = gaussian_batch(20000, d, s, sigma)
    loss = m.mdsm_loss(model, x, sigmas, eps, SIGMA0)
    c = SIGMA0**2 / a
    analytic = d * (c**2 * s**2 + (c - 1) ** 2 * sigma**2) / (sigma**2 * SIGMA0**4)
    assert abs(loss.item() / analytic - 1) < 0.02
    (g,) = torch.autograd.grad(loss, model.log_a)  # double backprop through grad_x E
    dloss_dc = 2 * d * (c * s**2 + (c - 1) * sigma**2) / (sigma**2 * SIGMA0**4)
    analytic_g = dloss_dc * (-c)  # dc/dlog(a) = -c
    assert abs(g.item() / analytic_g - 1) < 0.03


def test_minimizer_is_tweedies_denoiser():
    # At one sigma the optimum is sigma0^2 grad E(x~) = x~ - E[x|x~]
    # = sigma^2/(s^2+sigma^2) (x~ - mu),
    # i.e. a* = sigma0^2 (s^2 + sigma^2) / sigma^2. A sigma-vs-sigma^2 slip moves a* by 2x or more.
    d, s, sigma = 8, 0.3, 0.5
    model = Quadratic(a=0.01).double()
    x, sigmas, eps = gaussian_batch(4000, d, s, sigma, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        m.mdsm_loss(model, x, sigmas, eps, SIGMA0).backward()
        opt.step()
    a_star = SIGMA0**2 * (s**2 + sigma**2) / sigma**2
    assert abs(model.log_a.exp().item() / a_star - 1) < 0.03


def test_sigma_layout_schedule_and_optimizer_follow_the_spec(tmp_path):
    sig = m.noise_levels(128, 0.05, 1.2)
    assert (
        sig.shape == (128,)
        and sig[0].item() == pytest.approx(0.05)
        and sig[-1].item() == pytest.approx(1.2)
    )
    assert torch.allclose(
        sig.diff(), torch.full((127,), 1.15 / 127), atol=1e-6
    )  # evenly stratified
    log_sig = m.noise_levels(64, 0.1, 3.0, "log")
    assert torch.allclose(log_sig.log().diff(), torch.full((63,), np.log(30) / 63), atol=1e-5)
    assert (m.SIGMA0, m.SIGMA_MIN, m.SIGMA_MAX, m.BATCH_SIZE, m.STEPS) == (
        0.1,
        0.05,
        1.2,
        128,
        300_000,
    )
    assert (m.LR, m.LR_MIN, m.BETA1, m.BETA2, m.EMA_DECAY) == (5e-5, 1e-6, 0.9, 0.95, 0.0)
    net = m.EnergyNet(3, 128, 3)
    assert 61e6 < sum(p.numel() for p in net.parameters()) < 63e6  # "about 62 M parameters"
    ckpt = run_tiny(tmp_path, ["--steps=8"])
    group = ckpt["optimizer"]["param_groups"][0]
    assert group["betas"] == (0.9, 0.95) and group["lr"] == pytest.approx(
        m.cosine_lr(7, 5e-5, 1e-6, 8)
    )


def test_cosine_lr_equals_the_authors_scheduler():
    # The authors step CosineAnnealingLR(T_max=STEPS, eta_min=LR_MIN) after every Adam step; step s
    # (1-based) runs at the lr after s - 1 scheduler steps, which is what train() sets.
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=5e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000, eta_min=1e-6)
    for i in range(1001):
        assert m.cosine_lr(i, 5e-5, 1e-6, 1000) == pytest.approx(
            opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15
        ), i
        opt.step()
        sched.step()


# ---- loaders on tiny files in the official formats ------------------------------------------
def write_cifar_batches(folder, n=10):
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, n, 32, 32, 3), dtype=np.uint8)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name, x in zip(names, images):
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(
                {b"data": x.transpose(0, 3, 1, 2).reshape(n, 3072), b"labels": [0] * n},
                f,
                protocol=2,
            )
    return images


def write_idx(path, images):
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">IIII", 2051, len(images), 28, 28) + images.tobytes())


def test_cifar10_loader_reads_the_python_batches(tmp_path):
    images = write_cifar_batches(tmp_path / "cifar-10-batches-py")
    train = m.load_images("cifar10", str(tmp_path), "train")
    assert train.shape == (50, 3, 32, 32) and train.dtype == torch.uint8
    assert torch.equal(
        train[10:20], torch.from_numpy(images[1]).permute(0, 3, 1, 2)
    )  # RGB planes, order kept
    assert m.load_images("cifar10", str(tmp_path), "test").shape == (10, 3, 32, 32)


def test_idx_loader_pads_to_32(tmp_path):
    os.makedirs(tmp_path / "fashion-mnist")
    digits = np.random.default_rng(1).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "fashion-mnist" / "t10k-images-idx3-ubyte.gz", digits)
    x = m.load_images("fashion-mnist", str(tmp_path), "test")
    assert x.shape == (5, 1, 32, 32)
    assert torch.equal(x[:, 0, 2:30, 2:30], torch.from_numpy(digits)) and x[:, :, :2].sum() == 0


def test_npz_and_npy_of_user_images(tmp_path):
    hwc = np.random.default_rng(2).integers(0, 256, (7, 16, 24, 3), dtype=np.uint8)
    np.savez(tmp_path / "mine.npz", x_train=hwc, x_test=hwc[:2])
    assert m.load_images(str(tmp_path / "mine.npz"), split="test").shape == (2, 3, 16, 24)
    np.save(tmp_path / "gray.npy", hwc[..., 0])
    assert m.load_images(str(tmp_path / "gray.npy")).shape == (7, 1, 16, 24)
    np.savez(tmp_path / "train_only.npz", x_train=hwc)
    with pytest.raises(SystemExit, match=r"no x_test array \(it has: x_train\)"):
        m.load_images(str(tmp_path / "train_only.npz"), split="test")
    np.savez(tmp_path / "unnamed.npz", hwc)  # never a silent guess of which array is which
    with pytest.raises(SystemExit, match=r"no x_train array \(it has: arr_0\)"):
        m.load_images(str(tmp_path / "unnamed.npz"))
    np.save(tmp_path / "bad.npy", hwc.astype(np.float32))
    with pytest.raises(SystemExit, match="expected uint8"):
        m.load_images(str(tmp_path / "bad.npy"))


def test_bad_data_gives_the_promised_messages(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not really a tar archive")
    with pytest.raises(
        SystemExit, match=r"corrupt or incomplete \(MD5 mismatch\). Delete it.*by hand"
    ):
        m.load_images("cifar10", str(tmp_path))
    os.makedirs(tmp_path / "mnist")
    (tmp_path / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00" * 40))
    with pytest.raises(SystemExit, match="not an IDX image file"):
        m.load_images("mnist", str(tmp_path))
    with pytest.raises(SystemExit, match="unknown --dataset=imagenet"):
        m.load_images("imagenet", str(tmp_path))


def test_a_failed_download_says_how_to_get_the_data_by_hand(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise OSError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(SystemExit) as info:
        m.load_images("cifar10", str(tmp_path / "data"))
    message = str(info.value)
    assert "download of" in message and "failed" in message and "by hand" in message
    assert "cifar-10-batches-py/" in message  # the extracted folder works too
    assert "Delete" not in message  # there is nothing to delete
    assert not (tmp_path / "data" / "cifar-10-python.tar.gz").exists()


def test_image_size_only_downsamples(tmp_path):
    np.savez(tmp_path / "wide.npz", x_train=np.zeros((3, 16, 24), np.uint8))
    assert m.load_images(str(tmp_path / "wide.npz"), image_size=16).shape == (3, 1, 16, 16)
    with pytest.raises(
        SystemExit, match=r"16x24; --image_size=24 would upsample them.* or at most 16$"
    ):
        m.load_images(str(tmp_path / "wide.npz"), image_size=24)
    os.makedirs(tmp_path / "mnist")
    write_idx(tmp_path / "mnist" / "train-images-idx3-ubyte.gz", np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(SystemExit, match=r"28x28; --image_size=32 would upsample.*padded to 32x32"):
        m.load_images("mnist", str(tmp_path), image_size=32)
    assert m.load_images("mnist", str(tmp_path)).shape == (2, 1, 32, 32)  # the paper's padding


# ---- training runs, checkpoints, resume ------------------------------------------------------
def tiny_dataset(tmp_path):
    path = tmp_path / "tiny.npz"
    if not path.exists():
        rng = np.random.default_rng(3)
        np.savez(path, x_train=rng.integers(0, 256, (48, 32, 32, 1), dtype=np.uint8))
    return str(path)


def run_tiny(tmp_path, extra, out="run"):
    args = [
        f"--dataset={tiny_dataset(tmp_path)}",
        f"--out_dir={tmp_path / out}",
        "--width=4",
        "--blocks_per_stage=1",
        "--batch_size=8",
        "--steps=6",
        "--log_every=1",
        "--ckpt_every=3",
        "--grid_every=100",
        "--device=cpu",
    ]
    m.main(args + extra)
    return m.load_checkpoint(str(tmp_path / out / "ckpt.pt"))


def logged_losses(text):
    return [
        float(line.split("| loss ")[1].split(" |")[0])
        for line in text.splitlines()
        if line.startswith("step ")
    ]


def signal_at_step(monkeypatch, step, signum):
    """Send `signum` to this process when the progress bar reaches `step` (as Ctrl-C or a
    scheduler's SIGTERM would, in the middle of training)."""
    real_progress = m.progress

    def progress_then_signal(i, total, t0, note=""):
        real_progress(i, total, t0, note)
        if i == step:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(m, "progress", progress_then_signal)


def log_lines(text):
    """The step lines without their speed: what two runs of the same steps print alike."""
    lines = [line for line in text.splitlines() if line.startswith("step ")]
    return [" | ".join(p for p in line.split(" | ") if not p.endswith("/s")) for line in lines]


def test_sigterm_saves_the_step_and_the_resumed_run_logs_and_ends_as_an_uninterrupted_one(
    tmp_path, capsys, monkeypatch
):
    args = ["--steps=9", "--log_every=2", "--ema_decay=0.9"]
    full = run_tiny(tmp_path, args, out="full")
    full_log = log_lines(capsys.readouterr().out)
    handler = signal.getsignal(signal.SIGTERM)
    signal_at_step(monkeypatch, 5, signal.SIGTERM)  # between two loss checks (4 and 6)
    with pytest.raises(SystemExit) as info:
        run_tiny(tmp_path, args, out="split")
    out = capsys.readouterr().out
    assert info.value.code == 143  # 128 + SIGTERM, as the shell reports a process it killed
    assert (
        f"interrupted at step 5; saved {tmp_path / 'split' / 'ckpt.pt'}; continue with --resume"
        in out
    )
    assert m.load_checkpoint(str(tmp_path / "split" / "ckpt.pt"))["step"] == 5
    assert signal.getsignal(signal.SIGTERM) == handler  # training's own handler is gone
    monkeypatch.undo()
    with pytest.raises(SystemExit, match="already exists; pass --resume"):
        run_tiny(tmp_path, args, out="split")  # never overwrites without --resume
    capsys.readouterr()
    resumed = run_tiny(tmp_path, args + ["--resume"], out="split")
    out = capsys.readouterr().out
    assert "resumed at step 5" in out
    # the same loss means (the window 5-6 spans the interrupt), E(data), E(noise) and lr, as text
    assert log_lines(out) == [line for line in full_log if int(line.split()[1]) > 5]
    for part in ("model", "ema"):
        for k, v in full[part].items():
            assert torch.equal(v, resumed[part][k]), (part, k)


def test_ctrl_c_stops_a_training_process_that_resumes_to_the_same_weights(tmp_path):
    # a real process gets a real SIGINT somewhere after step 3, saves that step and exits with 130
    args = [
        f"--dataset={tiny_dataset(tmp_path)}",
        "--image_size=8",
        "--width=2",
        "--blocks_per_stage=1",
        "--batch_size=4",
        "--steps=200",
        "--log_every=1",
        "--ckpt_every=1000",
        "--grid_every=1000",
        "--device=cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        os.path.join(ROOT, "03_mdsm_train.py"),
        *args,
        f"--out_dir={tmp_path / 'split'}",
    ]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    ) as proc:
        for line in proc.stdout:
            if line.startswith("step 3 |"):
                proc.send_signal(signal.SIGINT)
                break
        out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out
    stopped = re.search(
        r"^interrupted at step (\d+); saved (\S+); continue with --resume$", out, re.M
    )
    assert stopped and "Traceback" not in out, out
    step = int(stopped.group(1))
    assert 3 <= step < 200 and stopped.group(2) == str(tmp_path / "split" / "ckpt.pt")
    assert m.load_checkpoint(stopped.group(2))["step"] == step
    m.main(args + [f"--out_dir={tmp_path / 'split'}", "--resume"])
    m.main(args + [f"--out_dir={tmp_path / 'full'}"])
    resumed = m.load_checkpoint(str(tmp_path / "split" / "ckpt.pt"))["model"]
    full = m.load_checkpoint(str(tmp_path / "full" / "ckpt.pt"))["model"]
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_loss, calls = m.mdsm_loss, []

    def loss_that_breaks_at_step_5(*args):
        calls.append(1)
        loss = real_loss(*args)
        return loss * float("nan") if len(calls) >= 5 else loss

    monkeypatch.setattr(m, "mdsm_loss", loss_that_breaks_at_step_5)
    with pytest.raises(SystemExit, match="loss became nan.*last good checkpoint"):
        run_tiny(tmp_path, [])
    ckpt = m.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))
    assert ckpt["step"] == 3 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_foreign_and_mismatched_checkpoints_are_refused(tmp_path):
    run_tiny(tmp_path, ["--steps=3"])
    with pytest.raises(SystemExit, match="width.: 4.*pass the same --width"):
        run_tiny(tmp_path, ["--steps=3", "--width=8", "--resume"])
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage")
    with pytest.raises(SystemExit, match="not a readable checkpoint"):
        m.load_model(str(junk))
    torch.save({"weights": torch.zeros(2)}, junk)
    with pytest.raises(SystemExit, match="not a checkpoint of this repository"):
        m.load_model(str(junk))
    m.save_checkpoint({"kind": "dual-score", "model": {}}, str(junk))
    with pytest.raises(SystemExit) as info:
        m.load_model(str(junk))
    message = str(info.value)  # names the script that writes the kind needed, and no other
    assert (
        "'dual-score' checkpoint, but this needs 'mdsm-energy', which 03_mdsm_train.py writes"
        in message
    )
    assert "05" not in message
    with pytest.raises(SystemExit, match="no checkpoint at"):
        m.load_model(str(tmp_path / "missing.pt"))
    model, ckpt = m.load_model(str(tmp_path / "run" / "ckpt.pt"))
    assert ckpt["step"] == 3 and model(torch.rand(2, 1, 32, 32)).shape == (2,)
    # (the atomic write is tested by a save that fails halfway: test_03_bad_input.py)


# ---- fast paths against the fp32 eager reference ---------------------------------------------
def param_grads(model, loss):
    grads = torch.autograd.grad(
        loss, list(model.parameters()), allow_unused=True
    )  # lin3.bias: None
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).flatten().float()
            for g, p in zip(grads, model.parameters())
        ]
    )


def test_bf16_path_matches_the_fp32_reference():
    torch.manual_seed(0)
    model = m.EnergyNet(3, 8, 1)
    x = torch.rand(16, 3, 32, 32)
    eps = torch.randn_like(x)
    sigmas = m.noise_levels(16, 0.05, 1.2)
    ref = param_grads(model, m.mdsm_loss(model, x, sigmas, eps, SIGMA0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g16 = param_grads(model, m.mdsm_loss(model, x, sigmas, eps, SIGMA0))
        assert model(x).dtype == torch.float32  # the trunk in bf16, the head and energy in fp32
    assert ((g16 - ref).norm() / ref.norm()).item() < 0.05


def test_the_model_runs_in_float64_the_precision_to_check_it_against_a_reference():
    torch.manual_seed(0)
    model = m.EnergyNet(1, 4, 1, [16, 24])
    x = torch.rand(3, 1, 16, 24, dtype=torch.float64, requires_grad=True)
    energy32 = model(x.detach().float())
    model.double()
    energy = model(x)
    (grad,) = torch.autograd.grad(energy.sum(), x)
    assert energy.dtype == grad.dtype == torch.float64 and grad.shape == x.shape
    assert torch.allclose(energy.float(), energy32, rtol=1e-5, atol=1e-6)
    loss = m.mdsm_loss(
        model, x.detach(), m.noise_levels(3, 0.05, 1.2).double(), torch.randn_like(x), SIGMA0
    )
    assert loss.dtype == torch.float64


@pytest.mark.parametrize(
    "shape", [(3, 128, 3, 32, 32), (1, 64, 2, 32, 32), (1, 4, 1, 16, 24), (3, 8, 3, 8, 40)]
)
def test_the_memory_estimate_counts_the_parameters_exactly(shape):
    c, width, blocks, h, w = shape
    params, _ = m.network_counts(c, width, blocks, h, w)
    assert params == sum(p.numel() for p in m.EnergyNet(c, width, blocks, [h, w]).parameters())


def test_a_model_too_big_for_memory_gets_one_line_before_anything_is_allocated(
    tmp_path, monkeypatch
):
    with pytest.raises(
        SystemExit,
        match=r"^error: training EnergyNet\(3, width=1000000, .*needs about "
        r".* GiB .*more than the .* GiB of cpu; use a smaller --width, --batch_size or",
    ):
        m.main(
            [
                "--width=1000000",
                f"--data_dir={tmp_path / 'data'}",
                f"--out_dir={tmp_path / 'out'}",
                "--device=cpu",
            ]
        )
    assert not (tmp_path / "data").exists()  # refused before downloading CIFAR-10
    monkeypatch.setattr(
        m, "device_memory", lambda device: 2**20
    )  # a 1 MiB device: fits no real run
    with pytest.raises(
        SystemExit, match=r"EnergyNet\(1, width=4, blocks_per_stage=1\) on 32x32 images"
    ):
        run_tiny(tmp_path, [])
    assert not (tmp_path / "run" / "ckpt.pt").exists()


def test_smoke_run_writes_grid_and_ema(tmp_path):
    run_tiny(tmp_path, ["--steps=4", "--grid_every=2", "--ema_decay=0.9"])
    assert (tmp_path / "run" / "denoise_000004.png").exists()
    ckpt = m.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))
    assert set(ckpt["ema"]) == set(ckpt["model"])


# ---- the science behind what the run prints and draws -----------------------------------------
def test_ema_follows_its_rule_exactly():
    torch.manual_seed(0)
    model = m.EnergyNet(1, 4, 1)
    ema = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    expected = {
        k: 0.9 * ema[k] + 0.1 * v for k, v in model.state_dict().items()
    }  # ema <- d*ema + (1-d)*w
    m.ema_update(ema, model, 0.9)
    for k, v in expected.items():
        assert torch.allclose(ema[k], v, rtol=1e-6, atol=1e-7), k


def test_denoised_grid_row_is_one_tweedie_step_on_a_closed_form_energy(tmp_path):
    # Quadratic energy: grad E = (x - mu) / a, so the denoised row is x~ - sigma0^2 (x~ - mu) / a
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    rows = m.denoise_grid(Quadratic(a=0.05), x, SIGMA0, str(tmp_path / "grid.png")).view(
        9, 4, 1, 8, 8
    )
    assert torch.equal(rows[0], x) and (tmp_path / "grid.png").exists()
    for i, sigma in enumerate((0.1, 0.3, 0.6, 1.0)):
        noisy, denoised = rows[1 + 2 * i], rows[2 + 2 * i]
        assert abs((noisy - x).std().item() / sigma - 1) < 0.15  # the noisy row's noise level
        assert torch.allclose(denoised, noisy - SIGMA0**2 * (noisy - 0.3) / 0.05, atol=1e-6)


def test_loss_pairs_each_batch_slot_with_its_own_sigma():
    # per slot j: ||sigma0^2 grad E(x~_j) - sigma_j eps_j||^2 / (sigma_j^2 sigma0^4), then the mean
    model = Quadratic(a=0.5).double()
    g = torch.Generator().manual_seed(2)
    x, eps = (
        torch.rand(5, 1, 2, 3, generator=g, dtype=torch.float64),
        torch.randn(5, 1, 2, 3, generator=g, dtype=torch.float64),
    )
    sigmas = m.noise_levels(5, 0.05, 1.2).double()
    x_noisy = x + sigmas.view(-1, 1, 1, 1) * eps
    per_slot = (
        (SIGMA0**2 * (x_noisy - 0.3) / 0.5 - sigmas.view(-1, 1, 1, 1) * eps).pow(2).sum((1, 2, 3))
    )
    expected = (per_slot / (sigmas**2 * SIGMA0**4)).mean()
    assert torch.allclose(m.mdsm_loss(model, x, sigmas, eps, SIGMA0), expected, rtol=1e-9)


@pytest.mark.parametrize("spacing", ["linear", "log"])
def test_training_uses_the_sigma_layout_and_seeded_cpu_noise(tmp_path, monkeypatch, spacing):
    seen, real_loss = [], m.mdsm_loss

    def recording_loss(model, x, sigmas, eps, sigma0):
        seen.append((sigmas.clone(), eps.clone()))
        return real_loss(model, x, sigmas, eps, sigma0)

    monkeypatch.setattr(m, "mdsm_loss", recording_loss)
    run_tiny(tmp_path, ["--steps=2", f"--sigma_spacing={spacing}"])
    expected = m.noise_levels(8, 0.05, 1.2, spacing)  # slot j always gets the j-th level
    assert all(torch.equal(sigmas, expected) for sigmas, _ in seen)
    g = torch.Generator().manual_seed(
        0
    )  # --seed=0: the noise of step 1, then of step 2, on any device
    assert torch.equal(seen[0][1], torch.randn(8, 1, 32, 32, generator=g))
    assert torch.equal(seen[1][1], torch.randn(8, 1, 32, 32, generator=g))


def test_benchmark_starts_every_precision_from_the_same_weights(tmp_path, capsys):
    # tf32 changes nothing on a CPU: from the same start, data and noise it is fp32 to the last bit
    runs = m.main(
        [
            f"--dataset={tiny_dataset(tmp_path)}",
            "--smoke",
            "--batch_size=8",
            "--benchmark",
            "--device=cpu",
            "--bench_steps=2",
            "--precision=tf32",
            f"--out_dir={tmp_path / 'bench'}",
        ]
    )
    assert list(runs) == ["fp32", "tf32"] and len(runs["tf32"]) == 2
    assert np.array_equal(runs["tf32"][:, :2], runs["fp32"][:, :2])  # the first step's loss too
    assert "benchmark tf32: " in capsys.readouterr().out


def test_benchmark_compares_each_precision_with_fp32_from_the_same_start(tmp_path, capsys):
    runs = m.main(
        [
            f"--dataset={tiny_dataset(tmp_path)}",
            "--smoke",
            "--batch_size=8",
            "--benchmark",
            "--device=cpu",
            "--bench_steps=4",
            f"--out_dir={tmp_path / 'bench'}",
        ]
    )
    out = capsys.readouterr().out
    assert "benchmark fp32: " in out and "loss vs fp32's: 0.0e+00 ok" in out
    assert "benchmark bf16: " in out and set(runs) == {"fp32", "bf16"}
    assert runs["fp32"][:, 1] == pytest.approx(
        runs["bf16"][:, 1], rel=0.05
    )  # same start, data and noise
    stray = np.abs(
        runs["bf16"][:, 1] / runs["fp32"][:, 1] - 1
    ).max()  # bf16 against fp32, not against itself
    assert 0 < stray and "benchmark bf16: " in out and f"loss vs fp32's: {stray:.1e} ok" in out
    assert not (
        tmp_path / "bench" / "ckpt.pt"
    ).exists()  # benchmark runs leave no checkpoint behind


def test_functional_loss_is_the_same_numbers_and_the_only_one_torch_compile_can_train():
    # +compile trains through mdsm_loss(functional=True): grad_x E by torch.func.grad, not
    # autograd.grad.
    torch.manual_seed(0)
    model = m.EnergyNet(1, 4, 1, 16)
    x, eps = torch.rand(6, 1, 16, 16), torch.randn(6, 1, 16, 16)
    sigmas = m.noise_levels(6, 0.05, 1.2)

    def loss_and_grads(loss_fn):
        model.zero_grad()
        loss = loss_fn(model, x, sigmas, eps, SIGMA0)
        loss.backward()  # the weights' gradient: a derivative of grad_x E (double backprop)
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    loss, grads = loss_and_grads(m.mdsm_loss)
    for loss_fn, rtol in (
        (lambda *a: m.mdsm_loss(*a, functional=True), 1e-6),  # eager: the same arithmetic
        (torch.compile(lambda *a: m.mdsm_loss(*a, functional=True), backend="aot_eager"), 1e-5),
    ):
        other_loss, other_grads = loss_and_grads(loss_fn)
        assert torch.allclose(other_loss, loss, rtol=rtol, atol=0) and len(other_grads) == len(
            grads
        )
        assert all(
            torch.allclose(a, b, rtol=rtol, atol=1e-6 * b.abs().max().item())
            for a, b in zip(other_grads, grads)
        )
    with pytest.raises(RuntimeError, match="double backward"):  # why the functional form exists
        loss_and_grads(torch.compile(m.mdsm_loss, backend="aot_eager"))


def test_benchmark_of_one_compiled_precision_prints_speed_memory_and_the_projected_run(
    tmp_path, capsys, monkeypatch
):
    real_compile = (
        torch.compile
    )  # aot_eager: the same tracing as inductor without a C++ build, fast enough for a test
    compiled = []
    monkeypatch.setattr(
        torch, "compile", lambda fn: compiled.append(fn) or real_compile(fn, backend="aot_eager")
    )
    runs = m.main(
        [
            f"--dataset={tiny_dataset(tmp_path)}",
            "--smoke",
            "--batch_size=8",
            "--benchmark",
            "--device=cpu",
            "--bench_steps=6",
            "--precision=fp32+compile",
            "--steps=300000",
            f"--out_dir={tmp_path / 'bench'}",
        ]
    )
    out = capsys.readouterr().out
    assert (
        list(runs) == ["fp32", "fp32+compile"] and len(compiled) == 1
    )  # fp32, then only the precision asked for
    assert runs["fp32+compile"][:, 1] == pytest.approx(
        runs["fp32"][:, 1], rel=1e-5
    )  # compiling changes no number
    line = next(x for x in out.splitlines() if x.startswith("benchmark fp32+compile: "))
    ms, img_s, hours = (
        float(line.split(sep)[0].split()[-1]) for sep in (" ms/step", " img/s", " h |")
    )
    true_ms = 1000 / np.median(runs["fp32+compile"][1:, 2])  # past the first window (compilation)
    assert ms == pytest.approx(true_ms, abs=0.051) and img_s == pytest.approx(
        8 * 1000 / true_ms, abs=0.51
    )  # as printed
    assert hours == pytest.approx(300000 * true_ms / 3.6e6, abs=0.0051)
    assert "peak memory: CUDA only" in line and line.endswith(" ok")


def test_fp32_means_true_fp32_and_tf32_is_an_opt_in(tmp_path):
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        run_tiny(tmp_path, ["--steps=1"], out="fp32")  # the default precision
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (
            False,
            False,
        )
        run_tiny(tmp_path, ["--steps=1", "--precision=tf32"], out="tf32")
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (
            True,
            True,
        )
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
