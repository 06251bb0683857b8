"""05 - Dual score matching: normalized log-probabilities from one forward pass.
Guth, Kadkhodaie & Simoncelli, "Learning normalized image densities via dual score matching",
arXiv 2506.05310. The default run is the toy of their Figure 1; the second command learns the
density of 16x16 digits on a CPU; the third is the paper's ImageNet64 setting with their energy
(64x64 images saved as x_train, x_test in an .npz; days on a GPU); the fourth scores the shipped
16x16 digits model by one pass and by the probability-flow ODE (part 3):
    python 05_dual_score.py
    python 05_dual_score.py --dataset=mnist --data_dir=data --image_size=16 --width=16 --lr=1e-3 --lr_halve_every=1500 --steps=4000 --eval_every=500
    python 05_dual_score.py --dataset=imagenet64.npz --width=64 --batch=128 --steps=1000000 --log_normalizer=false --sqrt_t_output=false --time_features=raw
    python 05_dual_score.py --dataset=mnist --image_size=16 --width=16 --eval_only --ckpt=checkpoints/dual_score_mnist16.pt --ode --out_dir=out/05_shipped
Expected from the first: RMS error of the normalized log p, dual 0.182 dB/dim, single 5.993.

Time t is the noise VARIANCE: y = x + sqrt(t) z with z ~ N(0, I), and U(y, t) = -log p_t(y) in
nats, so the score is -grad_y U. Denoising score matching (DSM) learns grad_y U at every t, hence
U(., t) only up to a constant c(t) that is free to drift with t. Dual score matching adds a loss on
the TIME score, which has its own identity
    d_t U(y, t) = E[ d/(2t) - ||y - x||^2 / (2 t^2) | y ],
and that ties the constants of all t together: ONE constant, fixed at a large t = T where p_T is
nearly Gaussian, normalizes the model at every t:
    log p(x) = -(U(x, 0) + c),   c = (d/2) log(2 pi e T) - E_{y ~ p_T} U(y, T).
Both parts minimize E_t E_{x,z}[L_DSM + TSM_WEIGHT L_TSM], t log-uniform, one t per sample:
    L_DSM = (1/d) ||z - sqrt(t) grad_y U(y, t)||^2,
    L_TSM = (0.5 (1 - ||z||^2 / d) - t d_t U(y, t) / d)^2.

Part 1 (toy): p = 0.5 N(0, I) + 0.5 N(0, 16 I) in d = 1000, a radial energy trained twice, with DSM
only (single) and with DSM + TSM (dual). Single SM gets the score about right on the two data
shells, but not the relative level of the two modes; dual SM gets the normalized log p.
Part 2 (images): U(y, t) = 0.5 <y, s(y, t)> with s the authors' bias-free UNet, trained with the
same two losses on dequantized images, and read as test bits/dim beside trivial baselines. Two
additions, each a knob, are on by default: a learned log-normalizer d b(t) added to U, and the
network's output divided by sqrt(t); with both off and --time_features=raw, U is the authors'.
Part 3 (--ode): the same network's likelihood by the probability-flow ODE (Song et al. 2021,
eq. 13, with sigma^2 = t). The heat equation d_t p = 1/2 Lap p is the continuity equation of
    dy/dt = -1/2 grad_y log p_t(y) = +1/2 grad_y U(y, t),
and along one path d/dt log p_t(y_t) = -1/2 Lap_y U(y_t, t) (Chen et al. 2018, thm. 1), so
    log p_{t_min}(x) = log p_T(y(T)) + int_{t_min}^{T} 1/2 Lap_y U(y_t, t) dt,
by RK4 in log t, Lap U by Hutchinson's estimator (probes fixed along the path) or the exact trace.
On the same test images and the same dequantization draw it prints bits/dim by:
  one pass      -(U(x, t_min) + c): the headline's estimator (one draw here), 1 forward pass;
  ODE, -(U+c)   the ODE ending in -(U(y(T), T) + c), the one pass's own normalization at T. Then c
                cancels: its log p minus the one pass's is the path integral of U's heat-equation
                residual 1/2 Lap U - 1/2 ||grad U||^2 - d_t U, printed by ranges of t;
  ODE, Gaussian the ODE ending in N(m, (s^2 + T) I), exactly normalized: the flow's own density
                whatever c is (m, s^2: the training pixels' mean and variance).
None is a bound; the ODE's solver error (Richardson) and probe standard error are printed with it.
"""

import functools
import importlib
import math
import os
import signal
import sys
import time
import types

import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ---- config: every knob can be overridden with --key=value (see --help) ----
DATASET = "toy"  # toy | mnist | fashion-mnist | cifar10 | path/to/images.npz
DATA_DIR = "data"  # folder holding mnist/ and cifar-10-batches-py/ (see 03)
IMAGE_SIZE = 0  # 0 = native (28x28 digits, no padding); 8, 16, 24...: area-downsampled (16: CPU)
SEED = 0  # random seed for data, initialization and noise
DEVICE = "auto"  # auto | cpu | cuda | mps (the toy always runs on the CPU)
OUT_DIR = "out/05_dual_score"  # figures and checkpoints go here
TSM_WEIGHT = 1.0  # weight of the time-score loss, 0 to 1000; 0 = single (space-only) score matching
TOY_DIM = 1000  # toy: dimension d of the scale mixture 0.5 N(0, I) + 0.5 N(0, 16 I)
TOY_SAMPLES = 100_000  # toy: fixed training set size n (paper 1e5)
TOY_STEPS = 3000  # toy: Adam steps per model (paper 20,000)
TOY_BATCH = 512  # toy: samples per step, one t each (paper 512)
TOY_LR = 1e-3  # toy: Adam learning rate (paper 1e-4 with 20,000 steps)
TOY_HALVE_EVERY = 1000  # toy: halve the learning rate every this many steps (paper 2,000)
TOY_T_MIN = 1e-2  # toy: smallest noise variance; log p is read off here ("t = 0")
TOY_T_MAX = 1e2  # toy: largest noise variance = T where the model is normalized
STEPS = 400  # images: training steps (paper 1M on ImageNet64)
BATCH = 32  # images per step (paper 128)
LR = 5e-4  # Adam learning rate, at most 1 (paper 5e-4), halved every LR_HALVE_EVERY steps
LR_HALVE_EVERY = 100_000  # steps between halvings (paper 100k)
WIDTH = 8  # UNet base width C: blocks of C, 2C, 4C channels, middle 8C (paper 64): the CPU knob
LOG_NORMALIZER = True  # U += d b(t), a learned log-normalizer; false: U = 0.5 <y, s> (the authors')
SQRT_T_OUTPUT = True  # s = UNet(y, t) / sqrt(t); false: s = UNet(y, t) (the authors')
TIME_FEATURES = "log"  # log: sinusoids of log10 t | raw: of t itself (the authors')
T_MIN = 1e-9  # smallest noise variance (PSNR 90 dB), >= 1e-12; log p is read off here
T_MAX = 1e3  # largest noise variance (PSNR -30 dB), <= 1e6: the normalization point T
N_TEST = 1000  # test images for the final evaluation
N_DRAWS = 4  # dequantization draws per test image in the final evaluation
ODE = False  # also score test images by the probability-flow ODE (part 3), beside the one pass
ODE_IMAGES = 200  # test images the ODE scores: the first ones of the N_TEST
ODE_STEPS = 32  # RK4 steps, equal in log t from T_MIN to T_MAX; even (Richardson halves it)
ODE_PROBES = 2  # Hutchinson probes per image, fixed along the path, >= 2; 0 = exact trace (slow)
ODE_PROBE = "rademacher"  # rademacher | gaussian: the probes' law (Rademacher: lower variance)
ODE_CHECK = 2  # images for the checks (Hutchinson vs exact trace, RK4 error); 0 = none
EVAL_EVERY = 0  # steps between points of the bits/dim curve (1 draw each); 0 = end only
RESUME = False  # continue from OUT_DIR/<dataset><size>.pt (an error if there is none)
CKPT_EVERY = 1000  # steps between checkpoints (one more at the end)
EVAL_ONLY = False  # load that checkpoint and only evaluate
CKPT = ""  # checkpoint for --eval_only; empty = OUT_DIR/<dataset><size>.pt
STRONG_GEN = ""  # e.g. 10,100,1000: per N, two models on disjoint halves of 2N images, compared

# 03 and 05 train on the same images: 03's data loaders and atomic checkpoints are reused.
mdsm = importlib.import_module("03_mdsm_train")
# 04's bits/dim conventions (dequantized, single pass, baselines): lesson 04's density evaluation.
langevin = importlib.import_module("04_langevin_sampling")


# ============================ the two losses, shared by both parts ============================
def energy_and_scores(energy, y, t, create_graph=False):
    """U(y, t) (B,) and both of its scores by one autograd call: grad_y U (B, ...) and d_t U (B,).
    energy(y, t) -> U (B,); the time input must be differentiable, so t gets requires_grad."""
    y = y.detach().requires_grad_()
    t = t.detach().clone().requires_grad_()
    U = energy(y, t)  # (B,)
    grad_y, grad_t = torch.autograd.grad(U.sum(), (y, t), create_graph=create_graph)
    return U, grad_y, grad_t


def dual_score_losses(energy, x, t, z, create_graph=True):
    """Per-sample L_DSM and L_TSM for y = x + sqrt(t) z, and (U, y, grad_y U, d_t U)."""
    d = x[0].numel()
    st = t.sqrt().view(-1, *[1] * (x.dim() - 1))  # (B, 1, ...)
    y = (x + st * z).detach()
    U, grad_y, grad_t = energy_and_scores(energy, y, t, create_graph)
    # L_DSM = (1/d) ||z - sqrt(t) grad_y U||^2 = (1/(d t)) ||D(y, t) - x||^2, D = y - t grad_y U
    dsm = (z - st * grad_y).pow(2).flatten(1).sum(1) / d
    # L_TSM = (0.5 (1 - ||y - x||^2 / (d t)) - t d_t U / d)^2, with ||y - x||^2 / t = ||z||^2
    tsm = (0.5 * (1 - z.pow(2).flatten(1).sum(1) / d) - t * grad_t / d) ** 2
    return dsm, tsm, U, y, grad_y, grad_t


def log_uniform(n, t_min, t_max, generator=None):
    """t log-uniform on [t_min, t_max] (PSNR = -10 log10 t uniform), one per sample. (n,)"""
    u = torch.rand(n, generator=generator)
    return torch.exp(math.log(t_min) + math.log(t_max / t_min) * u)


def energies(energy, x, t_val, device="cpu", chunk=250):
    """U(x, t) at one t for all x (no graph), float64 on the CPU. (N,)"""
    parts = []
    with torch.no_grad():
        for xb in x.split(chunk):
            t = torch.full((len(xb),), float(t_val), device=device)
            parts.append(energy(xb.to(device), t).double().cpu())
    return torch.cat(parts)


def normalizing_constant(energy_at_T, d, T, data_var=0.0):
    """c = (d/2) log(2 pi e (data_var + T)) - mean U(y, T) over y ~ p_T. data_var = 0: the paper's
    constant; data_var = E||x||^2 / d: a Gaussian with the data's second moment (derived; better
    when T is not much larger than the data's variance)."""
    gaussian = d / 2 * math.log(2 * math.pi * math.e * (data_var + T))
    return gaussian - energy_at_T.double().mean().item()


# ============================ part 1: the toy of Figure 1 ============================
TOY_SIGMA2 = (1.0, 16.0)  # variances sigma_k^2 of the two mixture components
TOY_WEIGHT = (0.5, 0.5)  # their weights pi_k


def toy_norms(n, d, seed):
    """||x||^2 of n fixed mixture samples (n,). Directions are drawn afresh at each use: the same
    law as fixed samples, with 1/d of the memory."""
    rng = np.random.default_rng(seed)
    component = (rng.random(n) < TOY_WEIGHT[1]).astype(int)
    return torch.tensor(np.array(TOY_SIGMA2)[component] * rng.chisquare(d, n)).float()


def toy_points(xx, d, generator):
    """Points with squared norms xx (B,) in uniformly random directions. (B, d)"""
    g = torch.randn(len(xx), d, generator=generator)
    return g / g.norm(dim=1, keepdim=True) * xx.sqrt()[:, None]


def true_toy_energy(y, t):
    """Exact U_t(y) = -logsumexp_k [log pi_k - ||y||^2 / (2 v_k) - (d/2) log(2 pi v_k)],
    v_k = sigma_k^2 + t. (B,)"""
    r2, d = y.pow(2).sum(1), y.shape[1]
    terms = []
    for w, s2 in zip(TOY_WEIGHT, TOY_SIGMA2):
        terms.append(math.log(w) - r2 / (2 * (s2 + t)) - d / 2 * torch.log(2 * math.pi * (s2 + t)))
    return -torch.logsumexp(torch.stack(terms, dim=1), dim=1)


class RadialEnergy(nn.Module):
    """The paper's toy model: U(y, t) = -logsumexp_k -(a_k(t) ||y||^2 + d b_k(t)) with
    [a1, a2, b1, b2] = MLP(log(t + 1e-2)), 4 hidden layers of width 256 with GELU."""

    def __init__(self, d, width=256, depth=4):
        super().__init__()
        layers = []
        for i in range(depth):
            layers += [nn.Linear(1 if i == 0 else width, width), nn.GELU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(width, 4))
        self.d = d

    def forward(self, y, t):  # y (B, d), t (B,) -> U (B,)
        ab = self.mlp(torch.log(t + 1e-2)[:, None])  # (B, 4)
        e = ab[:, :2] * y.pow(2).sum(1, keepdim=True) + self.d * ab[:, 2:]  # (B, 2)
        return -torch.logsumexp(-e, dim=1)


def train_toy(xx, tsm_weight, cfg, generator):
    """Adam on E_t E_{x,z}[L_DSM + tsm_weight L_TSM], t log-uniform: the loss of the images too."""
    model = RadialEnergy(cfg.TOY_DIM)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.TOY_LR)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.TOY_HALVE_EVERY, gamma=0.5)
    name = "dual" if tsm_weight > 0 else "single"
    print(f"-- training the {name} score model ({'DSM + TSM' if tsm_weight > 0 else 'DSM only'})")
    t_start = time.time()
    for step in range(1, cfg.TOY_STEPS + 1):
        idx = torch.randint(len(xx), (cfg.TOY_BATCH,), generator=generator)
        x = toy_points(xx[idx], cfg.TOY_DIM, generator)  # (B, d)
        t = log_uniform(len(x), cfg.TOY_T_MIN, cfg.TOY_T_MAX, generator)
        z = torch.randn(x.shape, generator=generator)
        dsm, tsm, *_ = dual_score_losses(model, x, t, z)
        loss = (dsm + tsm_weight * tsm).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        progress(step, cfg.TOY_STEPS, t_start, name)
        if not math.isfinite(loss.item()):
            raise SystemExit(
                f"error: the toy's {name} model diverged (loss {loss.item()} at step {step});"
                f" lower --toy_lr (now {cfg.TOY_LR:g})"
            )
        if step % max(1, cfg.TOY_STEPS // 5) == 0 or step == cfg.TOY_STEPS:
            losses = {"dsm": dsm.mean().item(), "tsm": tsm.mean().item()}
            log_line(step, {"model": name, **losses, "it/s": step / (time.time() - t_start)})
    return model


def toy_experiment(cfg):
    """Train single and dual SM, normalize each with c at T, compare log p with the truth."""
    d, T, t0, n = cfg.TOY_DIM, cfg.TOY_T_MAX, cfg.TOY_T_MIN, min(10000, cfg.TOY_SAMPLES)
    db = 10 / math.log(10) / d  # log p in nats -> dB/dim (10 log10 p / d), the paper's unit
    gen = torch.Generator().manual_seed(cfg.SEED)
    xx = toy_norms(cfg.TOY_SAMPLES, d, cfg.SEED)  # (n,) squared norms of the training set
    models = {}
    for name, weight in (("single", 0.0), ("dual", cfg.TSM_WEIGHT or 1.0)):
        models[name] = train_toy(xx, weight, cfg, gen)
    # c from noisy training points at T; log p read at t0 on other training points
    y_T = toy_points(xx[:n], d, gen) + math.sqrt(T) * torch.randn(n, d, generator=gen)
    y_0 = toy_points(xx[-n:], d, gen) + math.sqrt(t0) * torch.randn(n, d, generator=gen)
    outer = xx[-n:] / d > 2.5**2  # points of the sigma^2 = 16 shell
    s2 = xx.mean().item() / d  # the data's second moment per dimension (8.5)
    rho = torch.linspace(0.02, 5, 250)  # r / sqrt(d)
    y_grid = F.pad(rho[:, None] * math.sqrt(d), (0, d - 1))  # (250, d) along the first axis
    curves = {"true": -energies(true_toy_energy, y_grid, t0)}
    summary = {}
    y, t = y_0.clone().requires_grad_(), torch.full((n,), t0)
    (g_true,) = torch.autograd.grad(true_toy_energy(y, t).sum(), y)
    for name, model in models.items():
        U_T = energies(model, y_T, T)
        c_paper = normalizing_constant(U_T, d, T)
        c_better = normalizing_constant(U_T, d, T, s2)
        # log p_true - log p_model = U_model + c - U_true: the gap below, minus c
        gap = energies(true_toy_energy, y_0, t0) - energies(model, y_0, t0)
        curves[name] = -(energies(model, y_grid, t0) + c_paper)
        (g_model,) = torch.autograd.grad(model(y, t).sum(), y)
        s_err = (g_model - g_true).norm(dim=1) / g_true.norm(dim=1)  # relative score error
        summary[name] = {
            "rms_paper_c": (db * (gap - c_paper)).pow(2).mean().sqrt().item(),
            "rms_better_c": (db * (gap - c_better)).pow(2).mean().sqrt().item(),
            "score_inner": s_err[~outer].mean().item(),
            "score_outer": s_err[outer].mean().item(),
        }
    print(
        f"\nOn {n} data points: RMS error of log p (dB/dim) with the paper's"
        " c = (d/2) log(2 pi e T) - mean U_T and with c = (d/2) log(2 pi e (s^2 + T)) - mean U_T,"
        f" s^2 = {s2:.2f}; relative error of the score grad U:"
    )
    for name, s in summary.items():
        print(
            f"{name:>6}: log p error {s['rms_paper_c']:.3f} (paper's c) / {s['rms_better_c']:.3f}"
            f" (s^2 + T) dB/dim; score error inner shell {100 * s['score_inner']:.1f} %,"
            f" outer shell {100 * s['score_outer']:.1f} %"
        )
    if not all(math.isfinite(v) for row in summary.values() for v in row.values()):
        raise SystemExit(f"error: the toy's log p is not finite: {summary}; lower --toy_lr")
    logp_db = {k: (db * v).numpy() for k, v in curves.items()}
    plot_toy(rho.numpy(), logp_db, cfg)
    return summary


# ============================ part 2: images ============================
class HomogeneousNorm(nn.Module):
    """The authors' "homogeneous" normalization with input statistics, per sample: centre each
    channel, equalize the channels' variances, keep their mean (so the input's overall scale is
    kept, up to eps); then a learned per-channel weight (no bias) and the gain (1 + g(t))."""

    def __init__(self, channels, emb_dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.gain = nn.Linear(emb_dim, channels)  # g(t): with a bias, PyTorch's default init

    def forward(self, h, emb):  # (B, C, H, W), (B, E) -> (B, C, H, W)
        h = h - h.mean(dim=(2, 3), keepdim=True)
        v = h.pow(2).mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1) each channel's variance
        # h_c <- (h_c - mean_c) sqrt(mean_c' v_c' / (v_c + eps) + eps)
        h = h * (v.mean(dim=1, keepdim=True) / (v + self.eps) + self.eps).sqrt()
        # h_c <- h_c w_c (1 + g_c(t))
        return h * self.weight[:, None, None] * (1 + self.gain(emb))[:, :, None, None]


class Layer(nn.Module):
    """One layer of the UNet: bias-free conv -> homogeneous normalization modulated by t -> GELU.
    The network's last layer (output=True) is the conv alone."""

    def __init__(self, conv, emb_dim, output=False):
        super().__init__()
        self.conv = conv
        self.norm = None if output else HomogeneousNorm(conv.out_channels, emb_dim)

    def forward(self, h, emb):
        h = self.conv(h)
        if self.norm is None:
            return h
        return F.gelu(self.norm(h, emb))


def conv3x3(c_in, c_out):
    return nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)


def down2x2(c_in, c_out):  # half the side: 2x2 conv with stride 2
    return nn.Conv2d(c_in, c_out, 2, stride=2, bias=False)


def up2x2(c_in, c_out):  # twice the side: 2x2 transposed conv with stride 2
    return nn.ConvTranspose2d(c_in, c_out, 2, stride=2, bias=False)


class ScoreUNet(nn.Module):
    """The authors' bias-free UNet (their "deep" configuration): 3 scales of width C, 2C, 4C and a
    middle block of 8C; every block has 3 layers, the resampling layer being one of them:
      encoder 0: 3x3 in -> C, 3x3, 3x3         encoder 1, 2: 2x2 down -> 2C (4C), 3x3, 3x3
      middle:    2x2 down -> 8C, 3x3, 2x2 up -> 4C
      decoder 2, 1 (input: [running, encoder output]): 3x3, 3x3, 2x2 up -> 2C (C)
      decoder 0: 3x3, 3x3, then the output: a plain 3x3 conv to the image channels.
    Time enters through sinusoidal features -> MLP 64 -> E -> E (SiLU) -> each layer's gain.
    Sides are zero-padded to a multiple of 8 inside and cropped back.
    Energy U(y, t) = 0.5 <y, s(y, t)>, plus two measured additions (each can be switched off):
    log_normalizer: U += d b(t), a learned b like the toy's energy. 0.5 <y, s> is 0 at y = 0 for
      every t, so without b the (d/2) log(2 pi (s^2 + t)) part of -log p_t must be built out of y;
    sqrt_t_output: s = UNet(y, t) / sqrt(t), since the score of p_t is ~ z / sqrt(t).
    time_features: "log" (sinusoids of log10 t) or the authors' "raw" (of t, frequencies 1...0.01),
      which are nearly constant below t ~ 0.01."""

    def __init__(
        self,
        in_channels=1,
        width=16,
        emb_dim=256,
        log_normalizer=True,
        sqrt_t_output=True,
        time_features="log",
    ):
        super().__init__()
        self.model_args = dict(  # the design, recorded in checkpoints
            in_channels=in_channels,
            width=width,
            emb_dim=emb_dim,
            log_normalizer=log_normalizer,
            sqrt_t_output=sqrt_t_output,
            time_features=time_features,
        )
        self.sqrt_t_output = sqrt_t_output
        self.time_features = time_features
        C, E = width, emb_dim
        self.register_buffer("freqs", torch.logspace(0, -2, 32))  # 1 ... 0.01
        self.embed = nn.Sequential(nn.Linear(64, E), nn.SiLU(), nn.Linear(E, E), nn.SiLU())

        def block(*convs, output=False):  # the last conv of the last block is the output
            layers = [Layer(conv, E) for conv in convs[:-1]]
            return nn.ModuleList(layers + [Layer(convs[-1], E, output)])

        self.enc = nn.ModuleList(
            [
                block(conv3x3(in_channels, C), conv3x3(C, C), conv3x3(C, C)),
                block(down2x2(C, 2 * C), conv3x3(2 * C, 2 * C), conv3x3(2 * C, 2 * C)),
                block(down2x2(2 * C, 4 * C), conv3x3(4 * C, 4 * C), conv3x3(4 * C, 4 * C)),
            ]
        )
        self.mid = block(down2x2(4 * C, 8 * C), conv3x3(8 * C, 8 * C), up2x2(8 * C, 4 * C))
        self.dec = nn.ModuleList(  # decoder blocks by scale: 0, 1, 2 (run in reverse)
            [
                block(conv3x3(2 * C, C), conv3x3(C, C), conv3x3(C, in_channels), output=True),
                block(conv3x3(4 * C, 2 * C), conv3x3(2 * C, 2 * C), up2x2(2 * C, C)),
                block(conv3x3(8 * C, 4 * C), conv3x3(4 * C, 4 * C), up2x2(4 * C, 2 * C)),
            ]
        )
        self.log_norm = None
        if log_normalizer:  # b(t) per dimension, starting at 0
            self.log_norm = nn.Sequential(nn.Linear(E, E), nn.SiLU(), nn.Linear(E, 1))
            nn.init.zeros_(self.log_norm[2].weight)
            nn.init.zeros_(self.log_norm[2].bias)

    def time_embedding(self, t):  # (B,) -> (B, E)
        if self.time_features == "raw":  # the authors': t itself at frequencies 1 ... 0.01
            a = t[:, None] * self.freqs  # (B, 32)
        else:  # log10 t, distinct at every t in [1e-9, 1e3]
            a = torch.log10(t)[:, None] * (math.pi * self.freqs)  # (B, 32)
        return self.embed(torch.cat([a.cos(), a.sin()], dim=1))

    def score(self, y, t, emb=None):  # (B, C, H, W), (B,) -> s (B, C, H, W)
        emb = self.time_embedding(t) if emb is None else emb
        H, W = y.shape[2:]
        h = F.pad(y, (0, -W % 8, 0, -H % 8))
        skips = []
        for block in self.enc:  # scales 0, 1, 2
            for layer in block:
                h = layer(h, emb)
            skips.append(h)
        for layer in self.mid:  # 1/8 of the side, back to 1/4
            h = layer(h, emb)
        for block in reversed(self.dec):  # scales 2, 1, 0
            h = torch.cat([h, skips.pop()], dim=1)
            for layer in block:
                h = layer(h, emb)
        s = h[:, :, :H, :W]
        if self.sqrt_t_output:
            s = s / t.sqrt().view(-1, 1, 1, 1)  # the score of p_t is ~ z / sqrt(t)
        return s

    def forward(self, y, t):  # (B, C, H, W), (B,) -> U (B,)
        emb = self.time_embedding(t)
        # U(y, t) = 0.5 <y, s(y, t)>
        U = 0.5 * (y * self.score(y, t, emb)).flatten(1).sum(dim=1)
        if self.log_norm is not None:
            # U(y, t) += d b(t)
            U = U + y[0].numel() * self.log_norm(emb)[:, 0]
        return U


def dequantize(x_uint8, generator=None):
    """x = (k + u) / 256, u ~ U[0,1): the continuous data whose density the headline measures."""
    return (x_uint8.float() + torch.rand(x_uint8.shape, generator=generator)) / 256


def normalized_log_p(energy, x, c, t0, device="cpu"):
    """log p(x) = -(U(x, t0) + c) in nats, float64 (B,): one forward pass at t0 ~ 0."""
    return -(energies(energy, x, t0, device) + c)


def image_density(energy, x_uint8, t0, T, n_draws=4, generator=None, device="cpu"):
    """The constant c (one noise draw per image), then per-image bits/dim in both conventions:
    dequantized (the headline; 04's estimator, real pixels only) and the paper's single pass at
    x = k/255, the latter also at t = 0.01."""
    x = dequantize(x_uint8, generator)
    y_T = x + math.sqrt(T) * torch.randn(x.shape, generator=generator)  # y ~ p_T, one per image
    # c = (d/2) log(2 pi e T) - mean U(y_T, T)
    c = normalizing_constant(energies(energy, y_T, T, device), x_uint8[0].numel(), T)
    log_p = functools.partial(normalized_log_p, energy, c=c, t0=t0, device=device)
    log_p_smooth = functools.partial(normalized_log_p, energy, c=c, t0=0.01, device=device)
    return {
        "c": c,
        "deq": langevin.dequantized_bits_per_dim(log_p, x_uint8, n_draws, generator),
        "single": langevin.continuous_bits_per_dim(log_p, x_uint8),
        "t=0.01": langevin.continuous_bits_per_dim(log_p_smooth, x_uint8),
    }


def mass_conservation(model, x_uint8, cfg, device, n_levels=7):
    """Mean over y ~ p_t of t d_t U / d at each t: 0 for any normalized density. [(t, value)]"""
    gen, rows = torch.Generator().manual_seed(2), []
    for t_val in np.logspace(math.log10(cfg.T_MIN), math.log10(cfg.T_MAX), n_levels):
        x, t = dequantize(x_uint8, gen), torch.full((len(x_uint8),), float(t_val))
        z = torch.randn(x.shape, generator=gen)
        *_, g_t = dual_score_losses(model, x.to(device), t.to(device), z.to(device), False)
        rows.append((float(t_val), (t_val * g_t / x[0].numel()).mean().item()))
    return rows


# ============== part 3: the same network's likelihood by the probability-flow ODE ==============
def energy_gradient(energy, y, t):
    """grad_y U(y, t), kept differentiable in y (create_graph) for the divergence; y must require
    grad (energy_and_scores detaches y, and the probes need the graph back to it). (B, ...)"""
    with torch.enable_grad():
        U = energy(y, t)  # (B,)
        (grad_y,) = torch.autograd.grad(U.sum(), y, create_graph=True)
    return grad_y


def draw_probes(shape, n_probes, kind="rademacher", generator=None, dtype=torch.float32):
    """n_probes vectors eps per image with E[eps] = 0, E[eps eps^T] = I: Rademacher (+-1 with
    probability 1/2 each) or N(0, I). (K, B, ...)"""
    if kind == "rademacher":
        bits = torch.randint(0, 2, (n_probes, *shape), generator=generator)
        return (2 * bits - 1).to(dtype)
    if kind == "gaussian":
        return torch.randn((n_probes, *shape), generator=generator, dtype=dtype)
    raise ValueError(f"probe kind {kind!r}: use rademacher or gaussian")


def quadratic_forms(grad_y, y, probes):
    """eps^T J eps for each probe eps, J = d grad_y / d y (for grad_y = grad_y U, the Hessian of U):
    one backward pass per probe, the vector-Jacobian product eps^T J.
    grad_y (B, ...) with its graph to y, probes (K, B, ...) -> (B, K)."""
    forms = []
    for eps in probes:
        (eps_J,) = torch.autograd.grad(grad_y, y, grad_outputs=eps, retain_graph=True)
        forms.append((eps_J * eps).flatten(1).sum(1))
    return torch.stack(forms, dim=1)


def exact_trace(grad_y, y):
    """tr J = sum_i e_i^T J e_i over the D basis vectors e_i: D backward passes. (B,)"""
    D = y[0].numel()
    trace = torch.zeros(len(y), dtype=grad_y.dtype, device=y.device)
    for i in range(D):
        e_i = torch.zeros_like(y).flatten(1)  # (B, D)
        e_i[:, i] = 1
        trace += quadratic_forms(grad_y, y, e_i.view(1, *y.shape))[:, 0]
    return trace


def flow_and_divergence(grad_U, y, t, probes):
    """The ODE's right-hand side at (y, t): f = 1/2 grad_y U (B, ...) and div f = 1/2 Lap_y U,
    one value per probe (B, K), or the exact one (B, 1) when probes is None."""
    y = y.detach().requires_grad_()
    with torch.enable_grad():
        grad_y = grad_U(y, t)  # (B, ...), differentiable in y
        # Lap U = tr H, H = d grad_y U / d y; E[eps^T H eps] = tr(H E[eps eps^T]) = tr H
        if probes is None:
            lap = exact_trace(grad_y, y)[:, None]
        else:
            lap = quadratic_forms(grad_y, y, probes)
    # f = -1/2 grad log p_t = +1/2 grad U;  div f = 1/2 Lap U
    return 0.5 * grad_y.detach(), 0.5 * lap.detach()


def probability_flow_log_p(grad_U, log_p_T, x, t_min, T, steps, probes=None, energy=None):
    """log p_{t_min}(x) by the probability-flow ODE, integrated from y(t_min) = x up to y(T).

    grad_U(y, t) -> grad_y U (B, ...), differentiable in y; log_p_T(y) -> log p_T(y) (B,), the
    density at T the path ends in; probes (K, B, ...), fixed along the whole path, or None for the
    exact trace. Returns float64 (B,) log_p (the mean over probes), se (its standard error across
    the K probes; 0 for the exact trace), log_p_T and integral; y_T (B, ...); t_grid (steps + 1,),
    each step's share of the integral (B, steps) and, with energy(y, t) -> U (B,) given (one more
    forward pass per grid point), U along the path at the grid points (B, steps + 1)."""
    B = len(x)
    s_grid = torch.linspace(math.log(t_min), math.log(T), steps + 1, dtype=torch.float64)
    n_forms = 1 if probes is None else len(probes)
    integral = torch.zeros(B, n_forms, dtype=torch.float64, device=x.device)  # (B, K)
    shares = []
    levels = []
    y = x.detach()

    def level(y, s):  # U(y, e^s) without a graph (B,)
        with torch.no_grad():
            return energy(y, torch.full((B,), math.exp(s), dtype=y.dtype, device=y.device)).double()

    def rhs(y, s):
        # in s = log t: dy/ds = t f, d(integral)/ds = t div f = t/2 Lap U
        t = math.exp(s)
        t_batch = torch.full((B,), t, dtype=y.dtype, device=y.device)
        f, div = flow_and_divergence(grad_U, y, t_batch, probes)
        return t * f, t * div.double()

    # Classical RK4 with equal steps in s = log t. Along s the flow changes on the scale of s
    # itself: each data scale of variance s_k^2 hands over from data to noise across t ~ 0.1 ...
    # 10 s_k^2, one sigmoid in s per scale, and beyond the largest one y - mean grows like
    # sqrt(t) = e^(s/2). So equal steps in log t spend the same effort on each decade of
    # 1e-9 ... 1e3, where equal steps in t would leave all but a few above t = 1. RK4 is 4th
    # order: its error falls 16x per doubling of the steps (Heun's, 2nd order, 4x) and every
    # evaluation costs the same in both, so RK4 reaches a given error with fewer network passes.
    for i in range(steps):
        s = s_grid[i].item()
        h = (s_grid[i + 1] - s_grid[i]).item()
        if energy is not None:
            levels.append(level(y, s))
        # k1 at s, k2 and k3 at s + h/2, k4 at s + h; weights 1/6, 2/6, 2/6, 1/6
        dy1, dl1 = rhs(y, s)
        dy2, dl2 = rhs(y + h / 2 * dy1, s + h / 2)
        dy3, dl3 = rhs(y + h / 2 * dy2, s + h / 2)
        dy4, dl4 = rhs(y + h * dy3, s + h)
        y = y + h / 6 * (dy1 + 2 * dy2 + 2 * dy3 + dy4)
        share = h / 6 * (dl1 + 2 * dl2 + 2 * dl3 + dl4)  # (B, K)
        integral = integral + share
        shares.append(share.mean(dim=1))
    if energy is not None:
        levels.append(level(y, s_grid[-1].item()))
    # log p_{t_min}(x) = log p_T(y(T)) + int_{t_min}^{T} 1/2 Lap U dt, one value per probe (B, K)
    end = log_p_T(y).double().to(integral.device)  # (B,)
    log_p = end[:, None] + integral
    se = torch.zeros_like(end)
    if n_forms > 1:
        se = log_p.std(dim=1) / math.sqrt(n_forms)
    return {
        "log_p": log_p.mean(dim=1),
        "se": se,
        "log_p_T": end,
        "integral": integral.mean(dim=1),
        "y_T": y,
        "t_grid": s_grid.exp(),
        "shares": torch.stack(shares, dim=1),
        "levels": torch.stack(levels, dim=1) if levels else None,
    }


def gaussian_log_p_T(y, T, data_mean=0.0, data_var=0.0):
    """log N(y; m, (s^2 + T) I), float64 (B,), m = data_mean (a number or a (C, H, W) image),
    s^2 = data_var: the Gaussian behind 05's constant (m = s^2 = 0: c's (d/2) log(2 pi e T)).
    Normalized exactly, so it makes the ODE number a density whatever U's level at T is."""
    d = y[0].numel()
    v = data_var + T
    # -log N(y; m, v I) = ||y - m||^2 / (2 v) + (d/2) log(2 pi v)
    r2 = (y.double() - data_mean).pow(2).flatten(1).sum(1)
    return -(r2 / (2 * v) + d / 2 * math.log(2 * math.pi * v))


def bits_per_dim(log_p, d):
    """04's convention for log p (nats) of x = (k + u)/256: 8 - log p / (d ln 2)."""
    return 8.0 - log_p / (d * math.log(2))


def check_hutchinson(grad_U, y, t, n_probes, kind="rademacher", generator=None):
    """Hutchinson against the exact trace of H = d grad_y U / d y at (y, t), per input: the exact
    tr H, the mean of n_probes forms eps^T H eps, its standard error, and z = (mean - exact) / se,
    each float64 (B,). |z| beyond ~4 on several inputs means a biased estimator."""
    y = y.detach().requires_grad_()
    probes = draw_probes(y.shape, n_probes, kind, generator, y.dtype).to(y.device)
    with torch.enable_grad():
        grad_y = grad_U(y, t)
        exact = exact_trace(grad_y, y).double()
        forms = quadratic_forms(grad_y, y, probes).double()  # (B, K)
    mean = forms.mean(dim=1)
    se = forms.std(dim=1) / math.sqrt(n_probes)
    return {"exact": exact, "hutchinson": mean, "se": se, "z": (mean - exact) / se}


def solver_error(grad_U, log_p_T, x, t_min, T, steps, probes=None):
    """Richardson's estimate of the RK4 error of log p at an even number of steps, with the same
    probes: an error e ~ h^4 is 16 e at half the steps. float64 (B,)"""
    fine = probability_flow_log_p(grad_U, log_p_T, x, t_min, T, steps, probes)
    coarse = probability_flow_log_p(grad_U, log_p_T, x, t_min, T, steps // 2, probes)
    # log p(steps / 2) - log p(steps) = 16 e - e = 15 e
    return (coarse["log_p"] - fine["log_p"]) / 15


def level_gap(out):
    """ODE - one pass in log p (nats), step by step along the path (B, steps), for the ODE ending
    in 05's -(U(y(T), T) + c): each step's int 1/2 Lap U dt minus the rise of U along the path,
    U(y_k+1, t_k+1) - U(y_k, t_k). The steps add up to int 1/2 Lap U dt - U(y(T), T) + U(x, t_min),
    the whole gap, c cancelling. Along the flow dU/dt = d_t U + 1/2 ||grad U||^2, so a step holds
    int (1/2 Lap U - 1/2 ||grad U||^2 - d_t U) dt: the model's own heat-equation residual, which
    is 0 where its levels across t (the time score) agree with its space score."""
    return out["shares"] - out["levels"].diff(dim=1)


def one_pass_and_ode(
    energy,
    x_uint8,
    c,
    t_min,
    T,
    steps,
    n_probes,
    kind,
    generator,
    device,
    data_mean=0.0,
    data_var=0.0,
    batch=50,
):
    """Both estimators on the same test images and the same dequantization draw x = (k + u)/256
    (the headline's convention, u drawn as 04 draws it), per image, with their costs. The ODE's
    density at T is taken two ways: -(U(y(T), T) + c), the one pass's own normalization, and the
    Gaussian N(data_mean, (data_var + T) I), normalized exactly whatever c is. Returns per-image
    bits/dim (float64 (N,)), the ODE's per-image standard errors in bits/dim, ODE - one pass per
    step of the path in bits/dim (N, steps) with the t grid, where the flow ends (shell, (N,)),
    passes per image and seconds per 100 images."""
    d = x_uint8[0].numel()
    u = torch.rand(x_uint8.shape, generator=generator, dtype=torch.float64)
    x_all = ((x_uint8.double() + u) / 256).float()  # (N, C, H, W), the dequantized test images
    grad_U = functools.partial(energy_gradient, energy)
    log_p_T = functools.partial(normalized_log_p, energy, c=c, t0=T, device=device)
    rows = {"one_pass": [], "ode": [], "ode_gaussian": [], "se": [], "gap": [], "shell": []}
    seconds = {"one_pass": 0.0, "ode": 0.0}
    for x in x_all.split(batch):
        x = x.to(device)
        start = time.perf_counter()
        # the one pass: log p(x) = -(U(x, t_min) + c)
        rows["one_pass"].append(normalized_log_p(energy, x, c, t_min, device))
        seconds["one_pass"] += wall_clock(start, device)
        probes = None  # drawn on the CPU generator: the same probes on every device
        if n_probes > 0:
            probes = draw_probes(x.shape, n_probes, kind, generator).to(device)
        start = time.perf_counter()
        out = probability_flow_log_p(grad_U, log_p_T, x, t_min, T, steps, probes, energy)
        seconds["ode"] += wall_clock(start, device)
        rows["ode"].append(out["log_p"].cpu())
        # the same path ended in the Gaussian: only the end term changes
        end = gaussian_log_p_T(out["y_T"], T, data_mean, data_var)
        rows["ode_gaussian"].append((out["log_p"] - out["log_p_T"] + end).cpu())
        rows["se"].append(out["se"].cpu())
        rows["gap"].append(level_gap(out).cpu())
        # ||y(T) - m||^2 / (d (s^2 + T)): ~1 if the flow carries the data onto p_T's shell
        r2 = (out["y_T"].double() - data_mean).pow(2).flatten(1).sum(1)
        rows["shell"].append((r2 / (d * (data_var + T))).cpu())
    log_p = {k: torch.cat(v) for k, v in rows.items()}
    return {
        "one_pass": bits_per_dim(log_p["one_pass"], d),
        "ode": bits_per_dim(log_p["ode"], d),
        "ode_gaussian": bits_per_dim(log_p["ode_gaussian"], d),
        "se": log_p["se"] / (d * math.log(2)),  # bits/dim, per image
        # ODE - one pass in bits/dim, the opposite sign of the gap in log p (N, steps)
        "gap_by_step": -log_p["gap"] / (d * math.log(2)),
        "t_grid": out["t_grid"],
        "shell": log_p["shell"],
        "passes": {
            "one_pass": {"forward": 1, "backward": 0},
            "ode": ode_cost(steps, n_probes, d, levels=True),
        },
        "seconds_per_100": {k: 100 * v / len(x_uint8) for k, v in seconds.items()},
    }


def print_one_pass_and_ode(res, steps, n_probes, kind, solver_error=0.0):
    """The side-by-side table: mean and per-image SD of bits/dim by each estimator, the probes'
    standard error, where the flow ends, the gap by range of t, passes and time; a NOTE line when
    the one pass is below the ODE by more than the errors (solver_error: the RK4 error in bits/dim,
    e.g. from print_ode_checks)."""
    n = len(res["ode"])
    # standard error of the mean over images from the probes alone: sqrt(sum_i se_i^2) / N
    se_probes = res["se"].pow(2).sum().sqrt().item() / n
    gap = res["ode"] - res["one_pass"]
    trace = "exact trace"
    if n_probes > 0:
        trace = f"Hutchinson, {n_probes} {kind} probes"
    sd = {k: res[k].std().item() if n > 1 else 0.0 for k in ("one_pass", "ode", "ode_gaussian")}

    def row(label, key):  # mean over the images and the SD across them
        return f"  {label:<40} {res[key].mean().item():8.4f} {sd[key]:8.4f}"

    print(f"log-likelihood of {n} test images, dequantized bits/dim (the same draw of u for all):")
    print(f"  {'':<40} {'mean':>8} {'SD':>8}  (SD: across the images)")
    print(row("one pass, -(U(x, t_min) + c)", "one_pass"))
    print(f"  ODE, RK4 {steps} steps in log t, {trace}, ending in")
    print(row("  05's -(U(y(T), T) + c)", "ode"))
    print(row("  N(m, (s^2 + T) I)", "ode_gaussian"))
    print(f"  {'  standard error of the mean, probes':<40} {se_probes:8.4f}")
    shell = res["shell"]
    print(
        f"  flow's end points: ||y(T) - m||^2 / (d (s^2 + T)) = {shell.mean().item():.3f} "
        f"(min {shell.min().item():.3f}, max {shell.max().item():.3f}; ~1 on p_T's shell)"
    )
    corr = 0.0
    if n > 2 and sd["one_pass"] > 0 and sd["ode"] > 0:
        corr = torch.corrcoef(torch.stack([res["one_pass"], res["ode"]]))[0, 1].item()
    print(
        f"  ODE - one pass: mean {gap.mean().item():+.4f}, per-image SD {gap.std().item():.4f};"
        f" correlation of the two across images {corr:+.3f}"
    )
    # where along t it arises: the model's heat-equation residual, summed over ranges of steps
    by_step = res["gap_by_step"].mean(dim=0)  # (steps,)
    t = res["t_grid"]
    parts = []
    for idx in torch.arange(len(by_step)).tensor_split(min(6, len(by_step))):
        parts.append(f"t {t[idx[0]]:.0e}-{t[idx[-1] + 1]:.0e} {by_step[idx].sum().item():+.4f}")
    print("    by range of t: " + ", ".join(parts))
    # the gap's errors: probes, the images drawn (paired, so the SD of the gap), the solver
    se_gap = se_probes
    if n > 1:
        se_gap = math.sqrt(se_probes**2 + gap.var().item() / n)
    margin = 2 * se_gap + abs(solver_error)
    if gap.mean().item() > margin:
        print(
            f"NOTE: the one-pass number is BELOW the ODE's by {gap.mean().item():.3f} bits/dim, "
            f"more than 2 standard errors + the solver error ({margin:.3f})"
        )
    for name in ("one_pass", "ode"):
        p = res["passes"][name]
        seconds = res["seconds_per_100"][name]
        print(
            f"  cost, {name:<8}: {p['forward']} forward + {p['backward']} backward passes per "
            f"image, {seconds:.1f} s per 100 images"
        )


def print_ode_checks(energy, x, c, t_min, T, steps, n_probes, kind, generator):
    """On a few dequantized images x: Hutchinson (32 probes, so that z is near-normal) against the
    exact trace at t_min, sqrt(t_min T) and T, and Richardson's RK4 error at `steps` in bits/dim
    (returned: the largest)."""
    d = x[0].numel()
    grad_U = functools.partial(energy_gradient, energy)
    for t_val in (t_min, math.sqrt(t_min * T), T):
        t = torch.full((len(x),), t_val, dtype=x.dtype, device=x.device)
        res = check_hutchinson(grad_U, x, t, 32, kind, generator)
        z = " ".join(f"{v:+.1f}" for v in res["z"].tolist())
        print(
            f"  Hutchinson vs exact trace of Hess U at t = {t_val:.0e}: z = {z} (|z| < 4 expected)"
        )
    probes = None
    if n_probes > 0:
        probes = draw_probes(x.shape, n_probes, kind, generator, x.dtype).to(x.device)
    log_p_T = functools.partial(normalized_log_p, energy, c=c, t0=T, device=x.device)
    err = solver_error(grad_U, log_p_T, x, t_min, T, steps, probes) / (d * math.log(2))
    print(f"  RK4 error at {steps} steps (Richardson): {err.abs().max().item():.1e} bits/dim")
    return err.abs().max().item()


# ============================ training and evaluation on images ============================
def training_batch(x_train, batch, generator):
    """Dequantized images drawn with replacement; colour images flipped left-right at random."""
    x = dequantize(x_train[torch.randint(len(x_train), (batch,), generator=generator)], generator)
    if x.shape[1] == 3:  # flips: colour only (a mirrored digit is not a digit)
        x = torch.where(torch.rand(len(x), 1, 1, 1, generator=generator) < 0.5, x.flip(3), x)
    return x


def train_images(cfg, x_train, x_curve, device, ckpt_path):
    """Adam on E_t E_{x,z}[L_DSM + TSM_WEIGHT L_TSM] over dequantized images; every EVAL_EVERY
    steps a point of the bits/dim-versus-steps curve on x_curve (1 draw). Returns (model, curve)."""
    model, opt, sched, start, curve, gen = start_model(cfg, x_train.shape[1], device, ckpt_path)
    if cfg.EVAL_ONLY:
        return model, curve
    stop = catch_stop_signals()  # Ctrl-C or SIGTERM: save at the end of the step, then exit
    try:
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"ScoreUNet width {cfg.WIDTH}: {n_params / 1e6:.3f} M parameters, "
            f"{len(x_train)} training images, fp32 on {device}",
            flush=True,
        )
        t_start = time.time()
        for step in range(start + 1, cfg.STEPS + 1):
            x = training_batch(x_train, cfg.BATCH, gen)  # (B, C, H, W)
            t = log_uniform(len(x), cfg.T_MIN, cfg.T_MAX, gen)  # (B,) one noise variance per image
            z = torch.randn(x.shape, generator=gen)
            dsm, tsm, *_ = dual_score_losses(model, x.to(device), t.to(device), z.to(device))
            loss = (dsm + cfg.TSM_WEIGHT * tsm).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            progress(step - start, cfg.STEPS - start, t_start)
            stop_if_diverged(loss.item(), step, ckpt_path)
            if step % 100 == 0 or step == cfg.STEPS:
                speed = (step - start) / (time.time() - t_start)
                metrics = {"loss": loss.item(), "dsm": dsm.mean().item(), "tsm": tsm.mean().item()}
                log_line(step, {**metrics, "it/s": speed})
            if (cfg.EVAL_EVERY and step % cfg.EVAL_EVERY == 0) or step == cfg.STEPS:
                curve.append(curve_point(model, x_curve, cfg, device, step, time.time() - t_start))
            if step % cfg.CKPT_EVERY == 0 or step == cfg.STEPS or stop.signal:
                save_run(model, opt, sched, gen, cfg, step, curve, ckpt_path)
            if stop.signal:
                exit_interrupted(stop.signal, step, ckpt_path)
    finally:
        release_stop_signals(stop)
    return model, curve


def curve_point(model, x_curve, cfg, device, step, seconds):
    """(step, seconds, dequantized bits/dim of x_curve with one draw), logged."""
    gen = torch.Generator().manual_seed(1)
    bpd = image_density(model, x_curve, cfg.T_MIN, cfg.T_MAX, 1, gen, device)["deq"].mean().item()
    stop_if_not_finite(bpd, step)
    log_line(step, {"dequantized bits/dim": bpd, "test images": len(x_curve)})
    return (step, seconds, bpd)


def report(model, x_train, x_test, cfg, device, curve):
    """Headline (dequantized) and single-pass bits/dim beside the baselines, mass conservation."""
    gen = torch.Generator().manual_seed(cfg.SEED + 1)
    res = image_density(model, x_test, cfg.T_MIN, cfg.T_MAX, cfg.N_DRAWS, gen, device)
    base = langevin.baseline_bits_per_dim(x_train, x_test, gen)
    bpd = res["deq"].mean().item()
    stop_if_not_finite(bpd, curve[-1][0] if curve else 0)
    shape, d = tuple(x_test.shape[1:]), x_test[0].numel()
    print(f"test NLL in bits/dim, {len(x_test)} test images of {shape} (d = {d}):")
    print(f"  dual score model, dequantized ({cfg.N_DRAWS} draws; the headline)  {bpd:7.3f}")
    print(
        f"  dual score model, paper's single pass at x = k/255   {res['single'].mean().item():7.3f}"
    )
    print(
        "  (the same model at t = 0.01, i.e. the digits + N(0, 0.1^2) noise 04's AIS measures: "
        f"{res['t=0.01'].mean().item():.3f})"
    )
    for name, v in base.items():
        print(f"  baseline: {name:<41} {v:7.3f}")
    if bpd > base["diagonal Gaussian"]:
        print("WARNING: the model is WORSE than a diagonal Gaussian fitted to the training pixels")
    mass = mass_conservation(model, x_test[:100], cfg, device)
    table = "  ".join(f"t={t:.0e}: {v:+.3f}" for t, v in mass)
    print("mass conservation, mean t d_t U / d (0 for a density): " + table)
    if cfg.ODE:
        ode_report(model, x_train, x_test, res["c"], cfg, device, gen)
    plot_report(curve, base, mass, os.path.join(cfg.OUT_DIR, f"05_dual_score_{cfg.NAME}.png"))
    return bpd


def ode_report(model, x_train, x_test, c, cfg, device, gen):
    """--ode: the checks (Hutchinson against the exact trace, RK4's error by Richardson) on
    ODE_CHECK images, then one pass and ODE side by side on the first ODE_IMAGES test images, with
    the headline's constant c (never re-estimated)."""
    for p in model.parameters():
        p.requires_grad_(False)  # gradients in y only: a smaller graph, the same numbers
    print(f"probability-flow ODE: checks on {min(cfg.ODE_CHECK, len(x_test))} test images")
    err = 0.0
    if cfg.ODE_CHECK > 0:
        x_check = dequantize(x_test[: cfg.ODE_CHECK], gen).to(device)
        args = (cfg.T_MIN, cfg.T_MAX, cfg.ODE_STEPS, cfg.ODE_PROBES, cfg.ODE_PROBE, gen)
        err = print_ode_checks(model, x_check, c, *args)
    # m and s^2 of the dequantized training pixels (k + u)/256, u ~ U[0, 1): exact, no draw
    k = x_train.double()
    m = (k.mean().item() + 0.5) / 256
    s2 = (k.var().item() + 1 / 12) / 256**2
    args = (cfg.T_MIN, cfg.T_MAX, cfg.ODE_STEPS, cfg.ODE_PROBES, cfg.ODE_PROBE, gen, device)
    res = one_pass_and_ode(model, x_test[: cfg.ODE_IMAGES], c, *args, m, s2, batch=cfg.BATCH)
    stop_if_ode_not_finite(res, cfg)
    print_one_pass_and_ode(res, cfg.ODE_STEPS, cfg.ODE_PROBES, cfg.ODE_PROBE, err)
    return res


def strong_generalization(cfg, x_train, device):
    """The authors' test, per N: model A trained on training images 0 ... N-1, model B on
    N ... 2N-1, both scoring A's images (up to 500, one dequantization draw). B never saw them:
    it generalizes if it gives them A's log p."""
    sizes = [int(n) for n in cfg.STRONG_GEN.split(",")]
    if 2 * max(sizes) > len(x_train):
        raise SystemExit(
            f"error: --strong_gen needs 2 N <= {len(x_train)} training images; "
            f"the largest N is {max(sizes)}"
        )
    rms, panels = {}, []
    for n in sizes:
        x_eval, db = x_train[: min(n, 500)], []
        for k, half in enumerate("AB"):  # A: training images 0 ... N-1, B: N ... 2N-1
            path = os.path.join(cfg.OUT_DIR, f"{cfg.NAME}_N{n}{half}.pt")
            model, _ = train_images(cfg, x_train[k * n : (k + 1) * n], x_eval, device, path)
            gen = torch.Generator().manual_seed(1)
            bpd = image_density(model, x_eval, cfg.T_MIN, cfg.T_MAX, 1, gen, device)["deq"]
            # log p in dB/dim, from bits/dim = 8 - log2 p / d
            db.append(-10 * math.log10(2) * (bpd - 8))
        rms[n] = (db[0] - db[1]).pow(2).mean().sqrt().item()
        print(
            f"N = {n}: mean log p of A's {len(x_eval)} training images under A {db[0].mean():.3f},"
            f" under B {db[1].mean():.3f} dB/dim; RMS difference {rms[n]:.3f}"
        )
        panels.append((n, db[0], db[1], rms[n]))
    name = f"05_strong_generalization_{cfg.NAME}.png"
    plot_strong_generalization(panels, os.path.join(cfg.OUT_DIR, name))
    return rms


def image_experiment(cfg):
    device = pick_device(cfg.DEVICE)
    x_train = load_split(cfg, "train")
    x_test = load_split(cfg, "test")[: cfg.N_TEST]
    check_data(cfg, x_train, x_test, device)
    size = str(cfg.IMAGE_SIZE) if cfg.IMAGE_SIZE else ""
    cfg.NAME = os.path.splitext(os.path.basename(cfg.DATASET))[0] + size
    ckpt_path = cfg.CKPT or os.path.join(cfg.OUT_DIR, f"{cfg.NAME}.pt")  # e.g. mnist16.pt
    shape = tuple(x_train.shape[1:])
    print(f"data: {len(x_train)} train / {len(x_test)} test images of shape {shape}")
    if cfg.STRONG_GEN:
        return strong_generalization(cfg, x_train, device)
    model, curve = train_images(cfg, x_train, x_test, device, ckpt_path)
    return report(model, x_train, x_test, cfg, device, curve)


def main(argv=None):
    cfg = parse_config(globals(), argv)
    validate(cfg)
    torch.manual_seed(cfg.SEED)
    if cfg.DATASET == "toy":
        return toy_experiment(cfg)
    return image_experiment(cfg)


# ==== plumbing: nothing below this line is about the method ====
def load_split(cfg, split):
    """uint8 (N, C, H, W), real pixels only: 03 zero-pads 28x28 digits to 32x32, and padding is not
    data."""
    x = mdsm.load_images(cfg.DATASET, cfg.DATA_DIR, split, cfg.IMAGE_SIZE)
    if cfg.IMAGE_SIZE == 0 and cfg.DATASET in mdsm.IDX_FILES:
        return x[:, :, 2:-2, 2:-2]
    return x


def check_data(cfg, x_train, x_test, device):
    """Enough images for the baselines, and a run that fits in memory, before any training."""
    if len(x_train) < 2:
        raise SystemExit(
            f"error: --dataset={cfg.DATASET} holds {len(x_train)} training image(s); 05 needs at"
            " least 2 (the baselines fit Gaussians to the training pixels)"
        )
    if len(x_test) < 1:
        raise SystemExit(f"error: --dataset={cfg.DATASET} holds no test images")
    check_memory(cfg, device, tuple(x_train.shape[1:]))


def start_model(cfg, channels, device, ckpt_path):
    """(model, optimizer, scheduler, step, curve, generator of batches, t and noise): fresh, or the
    checkpoint's with --resume or --eval_only."""
    design = dict(
        log_normalizer=cfg.LOG_NORMALIZER,
        sqrt_t_output=cfg.SQRT_T_OUTPUT,
        time_features=cfg.TIME_FEATURES,
    )
    model = ScoreUNet(channels, cfg.WIDTH, **design).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.LR)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.LR_HALVE_EVERY, gamma=0.5)
    gen = torch.Generator().manual_seed(cfg.SEED)
    load = cfg.RESUME or cfg.EVAL_ONLY
    flag = "--eval_only" if cfg.EVAL_ONLY else "--resume"
    if load and not os.path.isfile(ckpt_path):  # never a silent fresh start
        raise SystemExit(f"error: {flag}: no checkpoint at {ckpt_path}; train one")
    if not load and os.path.isfile(ckpt_path):  # never an overwrite
        raise SystemExit(
            f"error: {ckpt_path} already exists; pass --resume to continue, --eval_only to "
            "evaluate, or another --out_dir"
        )
    if not load:
        return model, opt, sched, 0, [], gen
    ck = mdsm.load_checkpoint(ckpt_path, kind="dual-score")
    if ck["model_args"] != model.model_args:
        raise SystemExit(
            f"error: {ckpt_path} holds a ScoreUNet{ck['model_args']} but this run builds "
            f"{model.model_args}; pass the same --width, --log_normalizer, --sqrt_t_output, "
            "--time_features and --dataset, or another --out_dir"
        )
    model.load_state_dict(ck["model"])
    if cfg.EVAL_ONLY:  # the weights suffice: a checkpoint may be shipped without the optimizer
        print(f"evaluating the model of step {ck.get('step', '?')} from {ckpt_path}", flush=True)
        return model, opt, sched, ck.get("step", 0), ck.get("curve", []), gen
    check_resume(cfg, ck, ckpt_path)
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    gen.set_state(ck["rng"])
    print(f"resumed at step {ck['step']} from {ckpt_path}", flush=True)
    return model, opt, sched, ck["step"], ck["curve"], gen


def check_resume(cfg, ck, path):
    """More steps, and the optimizer's lr schedule unchanged: it comes back from the checkpoint."""
    if cfg.STEPS <= ck["step"]:
        raise SystemExit(
            f"error: {path} is at step {ck['step']}; --resume needs --steps above it (got"
            f" --steps={cfg.STEPS}); --eval_only evaluates it as it is"
        )
    changed = [
        f"--{k.lower()}" for k in ("LR", "LR_HALVE_EVERY") if ck["config"].get(k) != getattr(cfg, k)
    ]
    if changed:
        raise SystemExit(
            f"error: --resume keeps the optimizer and lr schedule of {path}, but "
            f"{', '.join(changed)} differ from that run's; start a new run (another --out_dir) "
            "to change them"
        )


def save_run(model, opt, sched, gen, cfg, step, curve, path):
    """One checkpoint: weights, optimizer, schedule, config, step, the curve so far and the state of
    the generator, so that a resumed run draws what an uninterrupted one draws."""
    ckpt = mdsm.make_checkpoint(
        model, vars(cfg), step, opt, sched, kind="dual-score", curve=curve, rng=gen.get_state()
    )
    mdsm.save_checkpoint(ckpt, path)


def catch_stop_signals():
    """During training, SIGINT (Ctrl-C) and SIGTERM (a scheduler's notice) only record themselves;
    the loop saves at the end of the step. Returns the record (.signal, .previous handlers)."""
    stop = types.SimpleNamespace(signal=None, previous={})

    def record(signum, frame):
        stop.signal = signum

    for sig in (signal.SIGINT, signal.SIGTERM):
        stop.previous[sig] = signal.signal(sig, record)
    return stop


def release_stop_signals(stop):
    for sig, handler in stop.previous.items():
        signal.signal(sig, handler)


def exit_interrupted(signum, step, path):
    print(f"interrupted at step {step}; saved {path}; continue with --resume", flush=True)
    raise SystemExit(128 + signum)  # 130 for SIGINT, 143 for SIGTERM


def stop_if_diverged(loss, step, ckpt_path):
    """A diverged model is never saved; the message says whether an earlier checkpoint exists."""
    if math.isfinite(loss) and loss < 1e6:
        return
    kept = "no checkpoint was saved"
    if os.path.isfile(ckpt_path):
        kept = f"the checkpoint {ckpt_path} from before is kept"
    raise SystemExit(
        f"error: the training loss diverged ({loss:.3g} at step {step}); stopped without saving,"
        f" {kept}. Start a new run with a lower --lr"
    )


def stop_if_not_finite(bpd, step):
    if not math.isfinite(bpd):
        raise SystemExit(
            f"error: the model of step {step} gives a test bits/dim of {bpd}: its energy is not"
            " finite on the test images. Start a new run with a lower --lr"
        )


def stop_if_ode_not_finite(res, cfg):
    bad = ~torch.isfinite(res["ode"]) | ~torch.isfinite(res["ode_gaussian"])
    bad = bad | ~torch.isfinite(res["one_pass"])
    if bad.any():
        raise SystemExit(
            f"error: the ODE's or the one pass's log p is not finite on {int(bad.sum())} of"
            f" {len(bad)} images; raise --ode_steps (now {cfg.ODE_STEPS}), or the model's energy"
            " is not finite there"
        )


def ode_cost(steps, n_probes, D, levels=False):
    """Network passes per image of one ODE likelihood: 4 gradients per RK4 step (a forward and a
    backward pass each), one more backward pass per probe and gradient (D of them for the exact
    trace), one forward pass for U(y(T), T), and steps + 1 for U along the path if recorded."""
    n_forms = D if n_probes == 0 else n_probes
    forward = 4 * steps + 1
    if levels:
        forward += steps + 1
    return {"forward": forward, "backward": 4 * steps * (1 + n_forms)}


def wall_clock(start, device):
    """Seconds since start, once the device has finished its queued work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def validate(cfg):
    """Every knob checked before any work: one line naming the knob and what is allowed."""
    at_least_1 = "STEPS BATCH LR_HALVE_EVERY WIDTH N_TEST N_DRAWS CKPT_EVERY TOY_SAMPLES TOY_STEPS"
    at_least_1 += " TOY_BATCH TOY_HALVE_EVERY"
    rules = [(k, getattr(cfg, k) >= 1, ">= 1") for k in at_least_1.split()]
    rules += [(k, getattr(cfg, k) >= 0, ">= 0") for k in ("SEED", "EVAL_EVERY")]
    rules += [(k, 0 < getattr(cfg, k) <= 1, "0 < lr <= 1") for k in ("LR", "TOY_LR")]
    sizes_ok = all(v.isdigit() and int(v) > 0 for v in cfg.STRONG_GEN.split(","))
    rules += [
        ("TSM_WEIGHT", 0 <= cfg.TSM_WEIGHT <= 1000, "0 to 1000 (0 = single score matching)"),
        ("TOY_DIM", cfg.TOY_DIM >= 2, ">= 2"),
        ("T_MIN", cfg.T_MIN >= 1e-12, ">= 1e-12 (float32 noise variances)"),
        ("T_MAX", cfg.T_MIN < cfg.T_MAX <= 1e6, "t_min < t_max <= 1e6"),
        ("TOY_T_MIN", cfg.TOY_T_MIN > 0, "> 0"),
        ("TOY_T_MAX", cfg.TOY_T_MIN < cfg.TOY_T_MAX <= 1e6, "toy_t_min < toy_t_max <= 1e6"),
        (
            "IMAGE_SIZE",
            cfg.IMAGE_SIZE >= 0 and cfg.IMAGE_SIZE % 8 == 0,
            "0 (native) or 8, 16, 24, ...",
        ),
        ("TIME_FEATURES", cfg.TIME_FEATURES in ("log", "raw"), "log or raw"),
        ("STRONG_GEN", not cfg.STRONG_GEN or sizes_ok, "sizes > 0, e.g. 10,100,1000"),
        ("EVAL_ONLY", not (cfg.EVAL_ONLY and cfg.STRONG_GEN), "not with --strong_gen (it trains)"),
        ("CKPT", not cfg.CKPT or cfg.EVAL_ONLY, "only with --eval_only (training writes OUT_DIR)"),
        (
            "ODE",
            not (cfg.ODE and cfg.DATASET == "toy"),
            "with an image --dataset (it scores images)",
        ),
        ("ODE", not (cfg.ODE and cfg.STRONG_GEN), "not with --strong_gen"),
        ("ODE_IMAGES", cfg.ODE_IMAGES >= 1, ">= 1"),
        ("ODE_STEPS", cfg.ODE_STEPS >= 2 and cfg.ODE_STEPS % 2 == 0, "even, >= 2"),
        ("ODE_PROBES", cfg.ODE_PROBES == 0 or cfg.ODE_PROBES >= 2, "0 (exact trace) or >= 2"),
        ("ODE_PROBE", cfg.ODE_PROBE in ("rademacher", "gaussian"), "rademacher or gaussian"),
        ("ODE_CHECK", 0 <= cfg.ODE_CHECK <= cfg.ODE_IMAGES, f"0 to --ode_images={cfg.ODE_IMAGES}"),
    ]
    for key, ok, allowed in rules:
        if not ok:
            raise SystemExit(
                f"error: --{key.lower()}={getattr(cfg, key)} is out of range; allowed: {allowed}"
            )
    if cfg.CKPT and not os.path.isfile(cfg.CKPT):
        raise SystemExit(f"error: --ckpt={cfg.CKPT}: no such file")
    device = torch.device("cpu") if cfg.DATASET == "toy" else pick_device(cfg.DEVICE)
    check_memory(cfg, device)
    langevin.check_writable(cfg.OUT_DIR)  # before any training time is spent


def memory_estimate(cfg, image_shape=None):
    """Bytes a run needs at its peak, roughly, from the sizes alone: to refuse an impossible size
    before allocating it. Without the image shape, the model's share only."""
    if cfg.DATASET == "toy":  # the training set's norms; a training step; the evaluation points
        n_eval = min(10_000, cfg.TOY_SAMPLES)
        return 50 * cfg.TOY_SAMPLES + 4 * cfg.TOY_DIM * (16 * cfg.TOY_BATCH + 12 * n_eval + 1000)
    params = 2100 * cfg.WIDTH**2 + 160_000
    need = 24 * params  # weights, gradients, Adam's two moments, a checkpoint copy (fp32)
    if image_shape is not None:  # activations with the graph of both scores
        c, h, w = image_shape
        pixels = (h + -h % 8) * (w + -w % 8)
        need += 1200 * cfg.WIDTH * pixels * (cfg.BATCH + 100)
    return need


def check_memory(cfg, device, image_shape=None):
    if device.type == "cuda":
        have = torch.cuda.get_device_properties(device).total_memory
    elif hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    else:
        return
    need = memory_estimate(cfg, image_shape)
    knobs = (
        "--toy_batch, --toy_dim or --toy_samples" if cfg.DATASET == "toy" else "--width or --batch"
    )
    if need > have:
        raise SystemExit(
            f"error: this run needs about {need / 2**30:.3g} GiB of memory, and the {device.type}"
            f" has {have / 2**30:.3g} GiB; lower {knobs}"
        )


def save_figure(fig, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    print(f"figure: {path}")


def plot_toy(rho, logp_db, cfg):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = (
        ("true", "k", "-", "true"),
        ("single", "tab:red", "--", "single SM (DSM only)"),
        ("dual", "tab:blue", ":", "dual SM (DSM + TSM)"),
    )
    for k, color, ls, label in styles:
        axes[0].plot(rho, logp_db[k], color=color, ls=ls, lw=2, label=label)
        axes[1].plot(rho, logp_db[k] - logp_db["true"], color=color, ls=ls, lw=2)
    for ax in axes:
        ax.axvspan(0.97, 1.03, color="0.85", zorder=0)  # the two data shells
        ax.axvspan(3.9, 4.1, color="0.85", zorder=0)
        ax.set(xlabel="r / sqrt(d)  (grey bands: the data shells)", xlim=(0, 5))
    title = f"normalized log p at t = {cfg.TOY_T_MIN:g}, d = {cfg.TOY_DIM}"
    axes[0].set(ylabel="log p(x)  [dB/dim]", title=title)
    axes[1].set(ylabel="model - true  [dB/dim]", title="error of the normalized log p (paper's c)")
    axes[0].legend(loc="lower left")
    save_figure(fig, os.path.join(cfg.OUT_DIR, "05_dual_score.png"))


def plot_report(curve, base, mass, path):
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.2))
    ax[0].plot([c[0] for c in curve], [c[2] for c in curve], "o-", label="dual score model")
    for (name, v), ls in zip(base.items(), ("-", "--", "-.", ":")):
        ax[0].axhline(v, color="k", ls=ls, lw=0.8, label=f"{name} {v:.2f}")
    ax[0].set(
        xlabel="training step", ylabel="test bits/dim (dequantized)", title="NLL during training"
    )
    ax[0].legend(fontsize=7)
    ax[1].semilogx([t for t, _ in mass], [v for _, v in mass], "o-")
    ax[1].axhline(0, color="k", lw=0.5)
    ax[1].set(
        xlabel="t (noise variance)",
        ylabel="mean t d_t U / d",
        title="mass conservation (0 for a density)",
    )
    save_figure(fig, path)


def plot_strong_generalization(panels, path):
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
    for ax, (n, db_a, db_b, rms) in zip(axes[0], panels):
        ax.scatter(db_a, db_b, s=4)
        ax.axline((db_a.mean().item(),) * 2, slope=1, color="k", lw=0.5)
        ax.set(
            title=f"N = {n}: RMS difference {rms:.2f} dB/dim",
            xlabel="log p under A (trained on them) [dB/dim]",
            ylabel="log p under B [dB/dim]",
        )
    save_figure(fig, path)


# ==== shared helpers: the same text in every numbered file (tests/test_shared_helpers.py) ====
def pick_device(name="auto"):  # auto: cuda, then Apple's mps, then the cpu; TF32 stays off
    ok = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    name = next(d for d in ok if ok[d]) if name == "auto" else name
    if not ok.get(name.split(":")[0]):
        raise SystemExit(f"error: --device={name} is not here; use auto, cpu, cuda, cuda:N or mps")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    return torch.device(name)


def parse_config(namespace, argv=None):  # --key=value overrides of the UPPER_CASE constants
    cfg = {k: v for k, v in namespace.items() if k.isupper() and isinstance(v, (int, float, str))}
    for arg in sys.argv[1:] if argv is None else argv:
        if arg in ("-h", "--help"):  # the docstring's first paragraph, then the config block
            lines = [line for line in open(namespace["__file__"]) if line.split(" ")[0] in cfg]
            print(namespace["__doc__"].split("\n\n")[0] + "\n\nOptions (--key=value):")
            print("".join(lines), end="")
            raise SystemExit(0)
        key, _, text = arg.partition("=")
        name = key[2:].upper()
        if name not in cfg or key != "--" + name.lower():
            raise SystemExit(f"error: unknown option {arg}; valid: --{' --'.join(cfg).lower()}")
        kind, bools = type(cfg[name]), {"": 1, "true": 1, "1": 1, "false": 0, "0": 0}
        try:  # bools: bare, true/false or 1/0; numbers: finite, an int whole (3e5 = 300_000)
            value = bools[text.lower()] if kind is bool else text if kind is str else float(text)
            ok = kind in (bool, str) or abs(value) < 2**62 and (kind is float or value % 1 == 0)
        except (KeyError, ValueError):
            ok = False
        if not ok:
            raise SystemExit(f"error: {arg}: not a valid {kind.__name__} (finite, below 2**62)")
        cfg[name] = kind(value)
    print("config: " + " ".join(f"{k.lower()}={v}" for k, v in cfg.items()), flush=True)
    return types.SimpleNamespace(**cfg)


def log_line(step, metrics):  # the one log format: 'step 1200 | loss 0.41 | 38.2 it/s'
    text = {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in metrics.items()}
    parts = [f"{v} {k}" if k.endswith("/s") else f"{k} {v}" for k, v in text.items()]
    print("\r\033[K" * sys.stderr.isatty() + " | ".join([f"step {step}", *parts]), flush=True)


def progress(i, total, t_start, note=""):  # '[####    ] 120/300 41s<62s note', on terminals only
    if sys.stderr.isatty() and (i % max(1, total // 200) == 0 or i == total):
        spent, bar = time.time() - t_start, "#" * (30 * i // max(total, 1))
        left, end = spent * (total - i) / max(i, 1), "\n" if i == total else ""
        sys.stderr.write(f"\r[{bar:<30}] {i}/{total} {spent:.0f}s<{left:.0f}s {note}\033[K{end}")


def save_image_grid(images, path, nrow=8):  # (N, C, H, W) in [0, 1], C = 1 or 3 -> one PNG
    s = max(1, 32 // images.shape[-1])  # nearest-neighbour enlargement: 8x8 is drawn 32x32
    x = images.detach().float().cpu().clamp(0, 1).repeat_interleave(s, -1).repeat_interleave(s, -2)
    x = torch.nn.functional.pad(x, (1, 1, 1, 1), value=1.0)  # a white frame around each image
    (n, c, h, w), cols = x.shape, min(nrow, len(x))
    x = torch.cat([x, torch.ones(-n % cols, c, h, w)]).view(-1, cols, c, h, w)
    grid = x.permute(0, 3, 1, 4, 2).reshape(-1, cols * w, c).numpy()  # (rows * h, cols * w, C)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    matplotlib.image.imsave(path, grid[..., 0] if c == 1 else grid, cmap="gray", vmin=0, vmax=1)


# ==== end of shared helpers ====

if __name__ == "__main__":
    main()
