"""05 - Dual score matching: normalized log-probabilities from one forward pass.

Guth, Kadkhodaie & Simoncelli, "Learning normalized image densities via dual score matching",
arXiv 2506.05310 (NeurIPS 2025). Conventions: time t is the noise VARIANCE, y = x + sqrt(t) z,
U(y, t) = -log p_t(y) in nats (p_t = p_data * N(0, t I)), the score is -grad_y U.

Denoising score matching (03) learns grad_y U at each t, i.e. U(., t) up to a constant c(t) that
may drift freely with t. Dual score matching adds a second loss on the TIME score d_t U, which has
its own identity (Tweedie-like):  d_t U(y,t) = E[ d/(2t) - ||y - x||^2 / (2 t^2) | y ].
Learning both scores ties the constants of all noise levels together, so ONE constant, fixed at a
large t = T where p_T is nearly Gaussian, normalizes the model at every t, including t ~ 0:
    log p(x) = -(U(x, 0) + c),   c = (d/2) log(2 pi e T) - E_y~p_T U(y, T).

What this file shows:
  * default (toy, the paper's Figure 1, CPU ~2 min): the scale mixture 0.5 N(0,I) + 0.5 N(0,16 I)
    in d = 1000 with a radial energy model, trained with the space score alone ("single") and with
    both scores ("dual"). Single SM gets the score right on the two shells of data but not the
    relative level of the two modes; dual gets both. A table in dB/dim and a figure.
  * image mode (--dataset=mnist|fashion-mnist|cifar10|file.npz): U = 0.5 <y, s(y,t)> with a small
    noise-conditioned UNet s; bits/dim of the test set, per-noise losses, mass conservation,
    denoising PSNR, effective dimensionality, the most/least likely test images.

Commands:
  python 05_dual_score.py                                  # toy Figure 1, CPU ~2 min
  python 05_dual_score.py --toy_steps=20000 --toy_lr=1e-4 --toy_halve_every=2000   # paper budget
  python 05_dual_score.py --dataset=mnist --device=cpu          # CPU, ~5-10 min
  python 05_dual_score.py --dataset=cifar10 --width=64 --steps=200000            # GPU, hours
  python 05_dual_score.py --dataset=mnist --strong_gen --n_train=2000            # two halves
Outputs go to out/05_dual_score/ (figure, checkpoint). Paper: 3.36 bits/dim on ImageNet64 after
1M steps of an 8.65M-parameter UNet (4-5 H100 days); small runs here are far from that.
"""
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ---- config: every knob can be overridden with --key=value (see --help) ----
DATASET = "toy"            # toy | mnist | fashion-mnist | cifar10 | path/to/images.npz
DATA_DIR = "data"          # folder holding mnist/ and cifar-10-batches-py/ (see 03)
SEED = 0                   # random seed for data, initialization and noise
DEVICE = "auto"            # auto | cpu | cuda | mps (the toy always runs on the CPU)
OUT_DIR = "out/05_dual_score"  # figures and checkpoints go here
TSM_WEIGHT = 1.0           # weight of the time-score loss; 0 = single (space-only) score matching
# toy (Figure 1)
TOY_DIM = 1000             # dimension d of the scale mixture 0.5 N(0, I) + 0.5 N(0, 16 I)
TOY_SAMPLES = 100_000      # fixed training set size n (paper 1e5)
TOY_STEPS = 3000           # Adam steps per model (paper 20,000)
TOY_BATCH = 512            # samples per step (paper 512)
TOY_T_PER_BATCH = 64       # distinct noise levels per batch (the MLP only sees t: cheaper)
TOY_LR = 1e-3              # Adam learning rate (paper 1e-4 with 20,000 steps)
TOY_HALVE_EVERY = 1000     # halve the learning rate every this many steps (paper 2,000)
TOY_T_MIN = 1e-2           # smallest noise variance; log p is read off here ("t = 0")
TOY_T_MAX = 1e2            # largest noise variance = T where the model is normalized
# images
STEPS = 400                # training steps (paper 1M on ImageNet64)
BATCH = 32                 # images per step (paper 128)
LR = 5e-4                  # Adam learning rate (paper 5e-4), halved every LR_HALVE_EVERY steps
LR_HALVE_EVERY = 100_000   # steps between halvings (paper 100k)
WIDTH = 8                  # UNet base width C (C, 2C, 4C; paper 64); 8 for a CPU run, 64 on a GPU
T_MIN = 1e-9               # smallest noise variance (PSNR 90 dB)
T_MAX = 1e3                # largest noise variance (PSNR -30 dB) = normalization point T
N_TRAIN = 0                # training images used (0 = all)
N_TEST = 1000              # test images for the evaluation
FLIP = True                # random horizontal flips (off automatically for mnist-like data)
LOG_EVERY = 100            # steps between log lines
CKPT = ""                  # checkpoint path ("" = OUT_DIR/<dataset>.pt); --resume continues it
RESUME = False             # continue from CKPT if it exists
CKPT_EVERY = 1000          # steps between checkpoints (one more at the end)
EVAL_ONLY = False          # load CKPT and only evaluate
STRONG_GEN = False         # train two models on disjoint halves and compare their log p
BENCHMARK = False          # time a few training steps and print ms/step, then stop

# The shared helpers (device, seed, --key=value overrides, logging, image grids) are at the end of the file.


# ============================ part 1: the toy of Figure 1 ============================
# A radial model only sees r^2 = ||y||^2, and everything the losses need per sample is three
# scalars: r2 = ||y||^2, zy = <z, y>, zz = ||z||^2. They are sampled exactly without ever
# building a 1000-dim vector: with u = x/||x||, z = z1 u + z_perp, so <x, z> = ||x|| z1 and
# ||z||^2 = z1^2 + chi2_{d-1}.
TOY_SIGMA2 = (1.0, 16.0)   # variances of the two mixture components
TOY_WEIGHT = (0.5, 0.5)    # their weights pi_k


def toy_data(n, d, rng):
    """Squared norms ||x||^2 of n fixed samples of 0.5 N(0, I) + 0.5 N(0, 16 I) in d dims. (n,)"""
    k = (rng.random(n) < TOY_WEIGHT[1]).astype(int)
    return torch.tensor(np.array(TOY_SIGMA2)[k] * rng.chisquare(d, n), dtype=torch.float32)


def toy_noisy_stats(xx, t, d, rng):
    """Given ||x||^2 and t (same shape): r2 = ||y||^2, zy = <z,y>, zz = ||z||^2 for y = x + sqrt(t) z."""
    z1 = torch.tensor(rng.standard_normal(xx.shape), dtype=xx.dtype)
    zz = z1 ** 2 + torch.tensor(rng.chisquare(d - 1, xx.shape), dtype=xx.dtype)
    xz = xx.sqrt() * z1
    r2 = xx + 2 * t.sqrt() * xz + t * zz
    return r2, xz + t.sqrt() * zz, zz


def true_radial_energy(r2, t, d):
    """Exact U_t(y) = -log p_t(y) of the mixture:  -logsumexp_k [log pi_k - r^2/(2 v_k) - (d/2) log(2 pi v_k)],
    v_k = sigma_k^2 + t. Inputs (B,), output (B,)."""
    terms = [math.log(w) - r2 / (2 * (s2 + t)) - d / 2 * torch.log(2 * math.pi * (s2 + t))
             for w, s2 in zip(TOY_WEIGHT, TOY_SIGMA2)]
    return -torch.logsumexp(torch.stack(terms, dim=1), dim=1)


class RadialEnergy(nn.Module):
    """U(y,t) = -logsumexp_k -(a_k(t) r^2 + d b_k(t)),  [a1, a2, b1, b2] = MLP(log(t + 1e-2)),
    4 hidden layers of width 256 with GELU (the paper's toy model)."""

    def __init__(self, d, width=256, depth=4):
        super().__init__()
        layers, n_in = [], 1
        for _ in range(depth):
            layers += [nn.Linear(n_in, width), nn.GELU()]
            n_in = width
        self.mlp = nn.Sequential(*layers, nn.Linear(width, 4))
        self.d = d

    def coeffs(self, t):  # (B,) -> [a1, a2, b1, b2] (B, 4)
        return self.mlp(torch.log(t + 1e-2)[:, None])

    def energy_from(self, r2, ab):  # r2 (...), ab (..., 4) -> U (...)
        e = ab[..., :2] * r2[..., None] + self.d * ab[..., 2:]                    # (..., 2)
        return -torch.logsumexp(-e, dim=-1)

    def forward(self, r2, t):  # r2 (B,), t (B,) -> U (B,)
        return self.energy_from(r2, self.coeffs(t))


def radial_dual_losses(energy, r2, zy, zz, t, d):
    """Per-sample DSM and TSM losses, from the three scalars of each noisy sample.

    Both scores come from ONE autograd call on (r2, [a, b](t)); grad_y U = 2 (dU/dr2) y, so
    L_DSM = (1/d) ||z - sqrt(t) grad_y U||^2 = (zz - 4 sqrt(t) g <z,y> + 4 t g^2 r2) / d, g = dU/dr2,
    L_TSM = (0.5 (1 - ||y - x||^2/(d t)) - t d_t U / d)^2, with ||y - x||^2 = t zz.
    Samples come as (n_t, per_t): per_t samples share each of n_t noise levels, so the MLP runs
    n_t times only. d_t U then goes through the chain rule, per sample:
    d_t U = sum_j dU/d(ab_j) * d(ab_j)/dt, with ab = [a1, a2, b1, b2](t).
    """
    t = t.detach().requires_grad_()
    ab = energy.coeffs(t)                                                          # (n_t, 4)
    # row i of ab depends on t_i only, so the gradient of a column sum is the per-level derivative
    dab_dt = torch.stack([torch.autograd.grad(ab[:, j].sum(), t, create_graph=True)[0] for j in range(4)], 1)
    r2 = r2.detach().requires_grad_()
    ab_s = ab[:, None, :].expand(*r2.shape, 4)                                     # (n_t, per_t, 4)
    U = energy.energy_from(r2, ab_s)                                               # (n_t, per_t)
    g, dU_dab = torch.autograd.grad(U.sum(), (r2, ab_s), create_graph=True)      # one call, both
    dU_dt = (dU_dab * dab_dt[:, None, :]).sum(-1)                                  # (n_t, per_t)
    t = t[:, None]
    dsm = (zz - 4 * t.sqrt() * g * zy + 4 * t * g ** 2 * r2) / d
    tsm = (0.5 * (1 - zz / d) - t * dU_dt / d) ** 2
    return dsm, tsm


def train_toy(xx, tsm_weight, cfg, rng):
    """Adam on E_t E_{x,z}[L_DSM + tsm_weight L_TSM], t log-uniform on [TOY_T_MIN, TOY_T_MAX]."""
    d = cfg.TOY_DIM
    model = RadialEnergy(d)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.TOY_LR)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.TOY_HALVE_EVERY, gamma=0.5)
    n_t = min(cfg.TOY_T_PER_BATCH, cfg.TOY_BATCH)
    per_t = cfg.TOY_BATCH // n_t
    lo, hi = math.log(cfg.TOY_T_MIN), math.log(cfg.TOY_T_MAX)
    t_start, name = time.time(), "dual" if tsm_weight > 0 else "single"
    for step in range(1, cfg.TOY_STEPS + 1):
        idx = torch.from_numpy(rng.integers(len(xx), size=(n_t, per_t)))
        t = torch.tensor(np.exp(rng.uniform(lo, hi, n_t)), dtype=torch.float32)  # (n_t,) log-uniform
        r2, zy, zz = toy_noisy_stats(xx[idx], t[:, None].expand(n_t, per_t), d, rng)  # (n_t, per_t)
        dsm, tsm = radial_dual_losses(model, r2, zy, zz, t, d)
        loss = (dsm + tsm_weight * tsm).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        progress(step, cfg.TOY_STEPS, t_start, name)
        if step % max(1, cfg.TOY_STEPS // 5) == 0 or step == cfg.TOY_STEPS:
            log_line(step, {"model": name, "dsm": dsm.mean().item(), "tsm": tsm.mean().item(),
                            "it/s": step / (time.time() - t_start)})
    return model


def normalizing_constant(energy_at_T, y_second_moment, d, T):
    """c = 0.5 log det(2 pi e (Sigma + T I)) - E_{y~p_T} U(y, T), for isotropic Sigma = s2 I
    (spec, derived; the paper's (d/2) log(2 pi e T) drops s2: 0.17 dB/dim off for this toy).
    energy_at_T: U at samples y ~ p_T (N,); y_second_moment = E||x||^2 / d."""
    gauss_entropy = d / 2 * math.log(2 * math.pi * math.e * (y_second_moment + T))
    return gauss_entropy - energy_at_T.double().mean().item()


def db_per_dim(log_p, d):
    """log p in nats -> 10 log10(p) / d, the paper's dB/dim."""
    return 10 * log_p / (d * math.log(10))


def toy_main(cfg):
    d, T, t0 = cfg.TOY_DIM, cfg.TOY_T_MAX, cfg.TOY_T_MIN
    rng = np.random.default_rng(cfg.SEED)
    torch.set_num_threads(1)  # tiny matrices: extra threads only add overhead (and fight on shared CPUs)
    xx = toy_data(cfg.TOY_SAMPLES, d, rng)                                   # (n,) ||x||^2
    models = {}
    for name, w in (("single", 0.0), ("dual", cfg.TSM_WEIGHT or 1.0)):
        print(f"-- training the {name} score model ({'DSM only' if w == 0 else 'DSM + TSM'})", flush=True)
        models[name] = train_toy(xx, w, cfg, rng)

    # normalize each model at t = T with noisy copies of (up to) 20,000 training points
    s2 = xx.mean().item() / d                                                # E||x||^2/d = 8.5
    xs = xx[:20000]
    r2_T, _, _ = toy_noisy_stats(xs, torch.full_like(xs, T), d, rng)
    rho = torch.linspace(0.02, 5, 250, dtype=torch.float64)                 # r / sqrt(d)
    r2_grid = rho ** 2 * d
    true_U0 = true_radial_energy(r2_grid, torch.full_like(r2_grid, t0), d)
    curves, consts = {"true": -true_U0}, {}
    c_true = normalizing_constant(true_radial_energy(r2_T.double(), torch.full_like(r2_T, T).double(), d), s2, d, T)
    with torch.no_grad():
        for name, m in models.items():
            consts[name] = normalizing_constant(m(r2_T, torch.full_like(r2_T, T)), s2, d, T)
            U0 = m(r2_grid.float(), torch.full_like(r2_grid, t0).float()).double()
            curves[name] = -(U0 + consts[name])                               # log p, nats
    # radial derivative d log p / d rho (in dB/dim per unit of r/sqrt(d)), by finite differences
    slopes = {k: np.gradient(db_per_dim(v, d).numpy(), rho.numpy()) for k, v in curves.items()}

    print(f"\nnormalization at T = {T:g}: true energy gives c = {c_true:.2f} nats "
          f"(= {db_per_dim(c_true, d):.4f} dB/dim, the residual non-Gaussianity of p_T)")
    print(f"log p(x) at t = {t0:g} in dB/dim (10 log10 p / d) along the radius r/sqrt(d):")
    print(f"{'r/sqrt(d)':>9} | {'true':>8} | {'single':>8} {'error':>7} | {'dual':>8} {'error':>7} "
          f"| slope true  single  dual")
    table_rho = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0]
    for r in table_rho:
        i = int(torch.argmin((rho - r).abs()))
        tr, si, du = (db_per_dim(curves[k][i].item(), d) for k in ("true", "single", "dual"))
        print(f"{rho[i].item():9.2f} | {tr:8.3f} | {si:8.3f} {si - tr:+7.3f} | {du:8.3f} {du - tr:+7.3f} "
              f"| {slopes['true'][i]:+7.3f} {slopes['single'][i]:+7.3f} {slopes['dual'][i]:+7.3f}")
    # the two claims, with numbers: errors on the data (both shells) and the level gap of the modes
    xs_eval = xx[:20000].double()
    r2_0, _, _ = toy_noisy_stats(xs_eval, torch.full_like(xs_eval, t0), d, rng)
    U_true_data = true_radial_energy(r2_0, torch.full_like(r2_0, t0), d)
    shell = (xs_eval / d).sqrt() > 2.5                                     # True: sigma^2 = 16 shell
    i1, i4 = int(torch.argmin((rho - 1).abs())), int(torch.argmin((rho - 4).abs()))
    gap_true = db_per_dim((curves["true"][i1] - curves["true"][i4]).item(), d)
    summary = {}
    for name, m in models.items():
        with torch.no_grad():
            err = db_per_dim(-(m(r2_0.float(), torch.full_like(r2_0, t0).float()).double() + consts[name])
                             + U_true_data, d)
        gap = db_per_dim((curves[name][i1] - curves[name][i4]).item(), d)
        summary[name] = dict(rms=err.pow(2).mean().sqrt().item(), inner=err[~shell].mean().item(),
                             outer=err[shell].mean().item(), gap_err=gap - gap_true)
        print(f"{name:>6}: log p error on data {summary[name]['rms']:.3f} dB/dim rms "
              f"(inner shell {summary[name]['inner']:+.3f}, outer shell {summary[name]['outer']:+.3f}); "
              f"mode level gap logp(r=1)-logp(r=4) off by {summary[name]['gap_err']:+.3f} dB/dim "
              f"(true gap {gap_true:.3f}); slope error on shells "
              f"{slopes[name][i1] - slopes['true'][i1]:+.3f} / {slopes[name][i4] - slopes['true'][i4]:+.3f}")
    plot_toy(rho.numpy(), {k: db_per_dim(v, d).numpy() for k, v in curves.items()}, slopes,
             (xx / d).sqrt().numpy(), cfg)
    return summary


def plot_toy(rho, logp_db, slopes, data_rho, cfg):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    style = {"true": ("k", "-", "true"), "single": ("tab:red", "--", "single SM (DSM only)"),
             "dual": ("tab:blue", ":", "dual SM (DSM + TSM)")}
    for k, (c, ls, label) in style.items():
        axes[0].plot(rho, logp_db[k], color=c, ls=ls, lw=2, label=label)
        axes[1].plot(rho, slopes[k], color=c, ls=ls, lw=2, label=label)
        if k != "true":
            axes[2].plot(rho, logp_db[k] - logp_db["true"], color=c, ls=ls, lw=2, label=label)
    for ax in axes:
        h = ax.twinx()
        h.hist(data_rho, bins=200, color="0.8", density=True)
        h.set_yticks([])
        h.set_zorder(-1)
        ax.set_zorder(1)
        ax.patch.set_visible(False)
        ax.set_xlabel("r / sqrt(d)")
        ax.set_xlim(0, 5)
    axes[0].set_ylabel("log p(x)  [dB/dim]")
    axes[0].set_ylim(min(v.min() for v in logp_db.values()) - 1, max(v.max() for v in logp_db.values()) + 1)
    axes[1].set_ylabel("d log p / d(r/sqrt d)  [dB/dim]")
    axes[1].set_ylim(np.min(slopes["true"]) * 1.3, np.max(slopes["true"]) * 1.3 + 1)
    axes[2].set_ylabel("model - true  [dB/dim]")
    axes[2].axhline(0, color="k", lw=0.5)
    axes[0].legend(loc="lower left")
    axes[0].set_title(f"normalized log p, d = {cfg.TOY_DIM} (grey: data)")
    axes[1].set_title("radial derivative (the score)")
    axes[2].set_title("error of the normalized log p")
    fig.tight_layout()
    os.makedirs(cfg.OUT_DIR, exist_ok=True)
    path = os.path.join(cfg.OUT_DIR, "05_dual_score.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    print(f"figure: {path}")


# ============================ part 2: images ============================
class TimeEmbedding(nn.Module):
    """t -> embedding (B, E): sinusoids of log t (t spans 12 decades; raw-t features would be flat
    below t ~ 1e-2), then an MLP with SiLU. Kept in fp32 and differentiable in t."""

    def __init__(self, t_min, t_max, n_freq=16, dim=128):
        super().__init__()
        self.register_buffer("freqs", math.pi * torch.logspace(1, -1, n_freq))  # periods 0.2 ... 20 in u
        self.log_t_min, self.log_range = math.log(t_min), math.log(t_max / t_min)
        self.mlp = nn.Sequential(nn.Linear(2 * n_freq, dim), nn.SiLU(), nn.Linear(dim, dim), nn.SiLU())

    def forward(self, t):  # (B,) -> (B, E)
        u = 2 * (torch.log(t.float()) - self.log_t_min) / self.log_range - 1       # in [-1, 1]
        a = u[:, None] * self.freqs                                                # (B, n_freq)
        return self.mlp(torch.cat([a.sin(), a.cos()], dim=1))


class ConvNormAct(nn.Module):
    """Bias-free 3x3 conv -> per-sample per-channel RMS normalization with a gain set by t -> GELU."""

    def __init__(self, c_in, c_out, emb_dim):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.gain = nn.Linear(emb_dim, c_out, bias=False)
        nn.init.zeros_(self.gain.weight)                                            # gain starts at 1

    def forward(self, h, emb):  # (B, C_in, H, W), (B, E) -> (B, C_out, H, W)
        h = self.conv(h)
        rms = h.float().pow(2).mean(dim=(2, 3), keepdim=True).add(1e-6).sqrt()     # fp32 reduction
        return F.gelu(h / rms.to(h.dtype) * (1 + self.gain(emb)).to(h.dtype)[:, :, None, None])


class ScoreUNet(nn.Module):
    """s(y, t): bias-free UNet, 3 scales (C, 2C, 4C), 2x2 strided conv down, transposed conv up."""

    def __init__(self, in_channels=1, width=16, t_min=1e-9, t_max=1e3):
        super().__init__()
        self.model_args = dict(in_channels=in_channels, width=width, t_min=t_min, t_max=t_max)
        C, E = width, 128
        self.embed = TimeEmbedding(t_min, t_max, dim=E)
        self.enc1 = nn.ModuleList([ConvNormAct(in_channels, C, E), ConvNormAct(C, C, E)])
        self.down1 = nn.Conv2d(C, 2 * C, 2, stride=2, bias=False)
        self.enc2 = nn.ModuleList([ConvNormAct(2 * C, 2 * C, E), ConvNormAct(2 * C, 2 * C, E)])
        self.down2 = nn.Conv2d(2 * C, 4 * C, 2, stride=2, bias=False)
        self.mid = nn.ModuleList([ConvNormAct(4 * C, 4 * C, E), ConvNormAct(4 * C, 4 * C, E)])
        self.up2 = nn.ConvTranspose2d(4 * C, 2 * C, 2, stride=2, bias=False)
        self.dec2 = nn.ModuleList([ConvNormAct(4 * C, 2 * C, E), ConvNormAct(2 * C, 2 * C, E)])
        self.up1 = nn.ConvTranspose2d(2 * C, C, 2, stride=2, bias=False)
        self.dec1 = nn.ModuleList([ConvNormAct(2 * C, C, E), ConvNormAct(C, C, E)])
        self.out = nn.Conv2d(C, in_channels, 3, padding=1, bias=False)

    def score(self, y, t):  # (B, C, H, W), (B,) -> s (B, C, H, W) float32
        emb = self.embed(t)                                                        # fp32, outside autocast
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=y.is_cuda):    # bf16 trunk on CUDA only
            h = y
            for blocks, down in ((self.enc1, None), (self.enc2, self.down1), (self.mid, self.down2)):
                h = down(h) if down is not None else h
                for b in blocks:
                    h = b(h, emb)
                if blocks is not self.mid:
                    skips = [h] if blocks is self.enc1 else skips + [h]
            for blocks, up in ((self.dec2, self.up2), (self.dec1, self.up1)):
                h = torch.cat([up(h), skips.pop()], dim=1)
                for b in blocks:
                    h = b(h, emb)
            s = self.out(h)
        return s.float()

    def forward(self, y, t):  # energy U(y, t) = 0.5 <y, s(y, t)>, (B,) float32
        return 0.5 * (y * self.score(y, t)).flatten(1).sum(dim=1)


def dual_score_losses(energy, x, t, z, create_graph=True):
    """Per-image L_DSM, L_TSM and the scores, for y = x + sqrt(t) z. energy(y, t) -> U (B,).

    One autograd call gives both scores:  (grad_y U, d_t U) = grad(U.sum(), (y, t)).
    L_DSM = (1/d) ||z - sqrt(t) grad_y U||^2
    L_TSM = (0.5 (1 - ||y - x||^2 / (d t)) - t d_t U / d)^2,  with ||y - x||^2 / t = ||z||^2.
    """
    d = x[0].numel()
    st = t.sqrt().view(-1, *[1] * (x.dim() - 1))                                  # (B, 1, 1, 1)
    y = (x + st * z).requires_grad_()
    t = t.detach().clone().requires_grad_()
    U = energy(y, t)                                                               # (B,)
    grad_y, grad_t = torch.autograd.grad(U.sum(), (y, t), create_graph=create_graph)
    dsm = (z - st * grad_y).pow(2).flatten(1).sum(1) / d
    tsm = (0.5 * (1 - z.pow(2).flatten(1).sum(1) / d) - t * grad_t / d) ** 2
    return dsm, tsm, U, y, grad_y, grad_t


def log_uniform(n, t_min, t_max, device):
    """t log-uniform on [t_min, t_max] (PSNR = -10 log10 t uniform), one per image. (n,)"""
    return torch.exp(math.log(t_min) + math.log(t_max / t_min) * torch.rand(n, device=device))


def train_images(model, x_train, cfg, device, ckpt_path, mdsm):
    """Adam on E_t E_{x,z}[L_DSM + TSM_WEIGHT L_TSM]; resumes from ckpt_path if asked."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.LR)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.LR_HALVE_EVERY, gamma=0.5)
    start = 0
    if cfg.RESUME and os.path.exists(ckpt_path):
        ck = mdsm.load_checkpoint(ckpt_path, kind="dual-score")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        start = ck["step"]
        print(f"resumed at step {start}")
    elif os.path.exists(ckpt_path) and not cfg.BENCHMARK:
        raise SystemExit(f"error: {ckpt_path} already exists; pass --resume to continue it, --eval_only to "
                         f"evaluate it, or another --out_dir (nothing was overwritten)")
    x_train = x_train.to(device)  # the whole set stays on the device; batches are drawn there
    flip = cfg.FLIP and x_train.shape[1] == 3
    steps = 23 if cfg.BENCHMARK else cfg.STEPS
    t_start, timed = time.time(), None
    for step in range(start + 1, steps + 1):
        if cfg.BENCHMARK and step == start + 4:                                    # 3 warm-up steps
            if device.type == "cuda":
                torch.cuda.synchronize()
            timed = time.time()
        x = mdsm.images_to_float(x_train[torch.randint(len(x_train), (cfg.BATCH,), device=device)])
        if flip:
            x = torch.where(torch.rand(len(x), 1, 1, 1, device=device) < 0.5, x.flip(3), x)
        t = log_uniform(len(x), cfg.T_MIN, cfg.T_MAX, device)
        dsm, tsm, *_ = dual_score_losses(model, x, t, torch.randn_like(x))
        loss = (dsm + cfg.TSM_WEIGHT * tsm).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        progress(step - start, steps - start, t_start)
        save_now = not cfg.BENCHMARK and (step % cfg.CKPT_EVERY == 0 or step == steps)
        if step % cfg.LOG_EVERY == 0 or save_now:
            if not math.isfinite(loss.item()):  # never save a diverged model: the last checkpoint stays good
                raise SystemExit(f"error: the loss became {loss.item()} at step {step}; stopped without saving "
                                 f"(last checkpoint: {ckpt_path if os.path.exists(ckpt_path) else 'none'}). "
                                 f"Try a lower --lr")
        if step % cfg.LOG_EVERY == 0 or step == steps:
            log_line(step, {"loss": loss.item(), "dsm": dsm.mean().item(), "tsm": tsm.mean().item(),
                            "it/s": (step - start) / (time.time() - t_start)})
        if save_now:
            mdsm.save_checkpoint(mdsm.make_checkpoint(model, vars(cfg), step, opt, sched, kind="dual-score"), ckpt_path)
    if cfg.BENCHMARK:
        if device.type == "cuda":
            torch.cuda.synchronize()
        ms = (time.time() - timed) / (steps - start - 3) * 1000
        print(f"benchmark | {device} | width {cfg.WIDTH} | batch {cfg.BATCH} | {ms:.1f} ms/step")
        return None
    if steps > start:
        print(f"checkpoint: {ckpt_path}")
    return model


def normalized_log_p(model, x, cfg, device, chunk=100):  # x: uint8 (N, C, H, W)
    """log p(x) per image (nats, float64) and the constant c (spec, "Normalized log-probability"):
    c = (d/2) log(2 pi e T) - mean_x U(x + sqrt(T) z, T);  log p(x) = -(U(x, t~0) + c)."""
    d, T = x[0].numel(), cfg.T_MAX
    U_T, U_0 = [], []
    with torch.no_grad():
        for xb in x.split(chunk):
            xb = (xb.float() / 255).to(device)                                     # 03's images_to_float
            tT = torch.full((len(xb),), T, device=device)
            U_T.append(model(xb + math.sqrt(T) * torch.randn_like(xb), tT).double().cpu())
            # "t = 0" is read at T_MIN (1e-9: noise std 3e-5, far below one grey level)
            U_0.append(model(xb, torch.full_like(tT, cfg.T_MIN)).double().cpu())
    c = d / 2 * math.log(2 * math.pi * math.e * T) - torch.cat(U_T).mean().item()
    return -(torch.cat(U_0) + c), c


def bits_per_dim(log_p, d):
    """8-bit NLL estimate: 8 + mean(-log p) / (d ln 2), float64 (no dequantization: an estimate)."""
    return 8 + (-log_p.double()).mean().item() / (d * math.log(2))


def per_noise_report(model, x, cfg, device, n_levels=9, chunk=50):
    """At each t: DSM, TSM, mass conservation mean(t d_t U / d), denoising PSNR and d_eff / d."""
    d, rows = x[0].numel(), []
    for t_val in np.logspace(math.log10(cfg.T_MIN), math.log10(cfg.T_MAX), n_levels):
        acc = {"dsm": 0.0, "tsm": 0.0, "mass": 0.0, "psnr": 0.0, "deff": 0.0}
        for xb in x.split(chunk):
            xb = (xb.float() / 255).to(device)
            t = torch.full((len(xb),), float(t_val), device=device)
            dsm, tsm, U, y, g_y, g_t = dual_score_losses(model, xb, t, torch.randn_like(xb), create_graph=False)
            # Tweedie / Miyasawa denoiser D(y, t) = y - t grad_y U
            mse = (y - t_val * g_y - xb).detach().pow(2).flatten(1).mean(1).double()
            for k, v in (("dsm", dsm), ("tsm", tsm), ("mass", t * g_t / d),
                         ("psnr", -10 * torch.log10(mse)), ("deff", mse / t_val)):
                acc[k] += v.detach().double().sum().item() / len(x)
        rows.append(dict(t=float(t_val), **acc))  # deff above is d_eff / d (per-pixel MSE / t)
    return rows


def evaluate(model, x_test, cfg, device, out_dir, tag=""):
    model.eval()
    d = x_test[0].numel()
    log_p, c = normalized_log_p(model, x_test, cfg, device)
    bpd = bits_per_dim(log_p, d)
    print(f"normalization constant c = {c:.1f} nats at T = {cfg.T_MAX:g}; test log p = "
          f"{db_per_dim(log_p.mean().item(), d):.3f} dB/dim; NLL = {bpd:.3f} bits/dim "
          f"({len(x_test)} test images, 8-bit convention, no dequantization)")
    rows = per_noise_report(model, x_test[:200], cfg, device)
    print(f"{'t':>8} {'PSNR in':>8} | {'L_DSM':>7} {'L_TSM':>8} | {'t dtU/d':>8} | {'PSNR out':>8} | d_eff/d")
    for r in rows:
        print(f"{r['t']:8.1e} {-10 * math.log10(r['t']):8.1f} | {r['dsm']:7.4f} {r['tsm']:8.5f} | "
              f"{r['mass']:+8.4f} | {r['psnr']:8.2f} | {r['deff']:.4f}")
    plot_images_eval(rows, log_p, x_test, d, os.path.join(out_dir, f"05_dual_score_{cfg_name(cfg)}{tag}.png"))
    return bpd, log_p, rows


def plot_images_eval(rows, log_p, x_test, d, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    t = np.array([r["t"] for r in rows])
    fig, ax = plt.subplots(2, 3, figsize=(14, 8))
    ax[0, 0].loglog(t, [r["dsm"] for r in rows], "o-", label="L_DSM")
    ax[0, 0].loglog(t, [r["tsm"] for r in rows], "s-", label="L_TSM")
    ax[0, 0].set_title("losses per noise level")
    ax[0, 0].legend()
    ax[0, 1].semilogx(t, [r["mass"] for r in rows], "o-")
    ax[0, 1].axhline(0, color="k", lw=0.5)
    ax[0, 1].set_title("mass conservation: mean t d_t U / d (should be 0)")
    ax[0, 2].plot(-10 * np.log10(t), [r["psnr"] for r in rows], "o-", label="denoiser")
    ax[0, 2].plot(-10 * np.log10(t), -10 * np.log10(t), "k--", lw=0.8, label="identity")
    ax[0, 2].set_xlabel("input PSNR (dB)")
    ax[0, 2].set_title("denoising PSNR")
    ax[0, 2].legend()
    ax[1, 0].semilogx(t, [r["deff"] for r in rows], "o-")
    ax[1, 0].set_title("effective dimensionality d_eff(t) / d")
    for a in (ax[0, 0], ax[0, 1], ax[1, 0]):
        a.set_xlabel("t (noise variance)")
    bpd = 8 - log_p.numpy() / (d * math.log(2))
    ax[1, 1].hist(bpd, bins=40)
    ax[1, 1].set_xlabel("bits/dim of each test image")
    ax[1, 1].set_title("test NLL histogram")
    order = torch.argsort(log_p, descending=True)
    picks = torch.cat([order[:8], order[-8:]])                                  # most, least likely
    imgs = x_test[picks].float() / 255                                          # (16, C, H, W)
    grid = torch.cat([torch.cat(list(imgs[:8]), dim=2), torch.cat(list(imgs[8:]), dim=2)], dim=1)
    ax[1, 2].imshow(grid.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
    ax[1, 2].set_title("top row: most likely, bottom: least likely")
    ax[1, 2].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    print(f"figure: {path}")


def cfg_name(cfg):
    return os.path.splitext(os.path.basename(cfg.DATASET))[0]


def image_main(cfg):
    mdsm = load_numbered("03_mdsm_train.py")  # reuse 03's data loaders and checkpoint handling
    device = pick_device(cfg.DEVICE)
    x_train = mdsm.load_images(cfg.DATASET, cfg.DATA_DIR, "train")               # uint8 (N, C, H, W)
    x_test = mdsm.load_images(cfg.DATASET, cfg.DATA_DIR, "test")[:cfg.N_TEST]
    if cfg.N_TRAIN > 0:
        x_train = x_train[:cfg.N_TRAIN]
    if x_train.shape[2] % 4 or x_train.shape[3] % 4:
        raise SystemExit(f"error: images are {x_train.shape[2]}x{x_train.shape[3]}; the UNet needs sides divisible by 4")
    os.makedirs(cfg.OUT_DIR, exist_ok=True)
    ckpt_path = cfg.CKPT or os.path.join(cfg.OUT_DIR, f"{cfg_name(cfg)}.pt")
    d = x_train[0].numel()
    print(f"data: {len(x_train)} train / {len(x_test)} test images of shape {tuple(x_train.shape[1:])}, d = {d}")
    new_model = lambda: ScoreUNet(x_train.shape[1], cfg.WIDTH, cfg.T_MIN, cfg.T_MAX).to(device)
    if cfg.STRONG_GEN:  # two models on disjoint halves, compared on the same test images
        half, log_ps = len(x_train) // 2, []
        for k, part in enumerate((x_train[:half], x_train[half:2 * half])):
            print(f"-- model {k + 1} on {len(part)} training images")
            torch.manual_seed(cfg.SEED + k)
            model = train_images(new_model(), part, cfg, device, ckpt_path.replace(".pt", f"_half{k + 1}.pt"), mdsm)
            log_ps.append(evaluate(model, x_test, cfg, device, cfg.OUT_DIR, f"_half{k + 1}")[1])
        rms = db_per_dim(log_ps[0] - log_ps[1], d).pow(2).mean().sqrt().item()
        print(f"strong generalization: N = {half} per model, RMS difference of test log p = {rms:.3f} dB/dim "
              f"(paper: 0.19 dB/dim at N = 1e5 on ImageNet64)")
        return rms
    if cfg.EVAL_ONLY:
        ck = mdsm.load_checkpoint(ckpt_path, kind="dual-score")
        model = ScoreUNet(**ck["model_args"]).to(device)
        model.load_state_dict(ck["model"])
    else:
        model = new_model()
        print(f"ScoreUNet width {cfg.WIDTH}: {sum(p.numel() for p in model.parameters()) / 1e6:.3f} M parameters")
        model = train_images(model, x_train, cfg, device, ckpt_path, mdsm)
        if model is None:  # --benchmark
            return None
    return evaluate(model, x_test, cfg, device, cfg.OUT_DIR)[0]


def main(argv=None):
    cfg = parse_config(globals(), argv)
    set_seed(cfg.SEED)
    if cfg.DATASET == "toy":
        return toy_main(cfg)
    return image_main(cfg)


# ==== shared helpers: the same text in every numbered file (tests/test_shared_helpers.py) ====
# Device, seed, --key=value overrides, log line, progress bar, image grid, loading an earlier file.
# They use the file's own imports of os, sys, time, numpy as np and torch.
def pick_device(name="auto"):  # 'auto' takes cuda, then Apple's mps, then the cpu
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    name = ("cuda" if available["cuda"] else "mps" if available["mps"] else "cpu") if name == "auto" else name
    if not available.get(name.split(":")[0]):
        raise SystemExit(f"error: --device={name} is not available here; use auto, cpu, cuda, cuda:N or mps")
    return torch.device(name)

def set_seed(seed):
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds the CPU and every GPU

def parse_config(namespace, argv=None):
    """--key=value overrides of the UPPER_CASE constants, typed like their defaults; prints the result."""
    import argparse, re, types
    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line instead of argparse's usage block
            raise SystemExit(f"error: {message}; valid options: " + " ".join("--" + k.lower() for k in knobs))
    def typed(default):  # argparse calls cast(text) and turns a ValueError into "invalid int value: '1.5'"
        def cast(text):
            if isinstance(default, bool) and text.lower() in ("true", "false", "1", "0"):
                return text.lower() in ("true", "1")
            if isinstance(default, int) and not isinstance(default, bool) and float(text) % 1 == 0:
                return int(float(text))  # 300000, 300_000 and 3e5 all work
            if isinstance(default, (float, str)):
                return type(default)(text)
            raise ValueError(text)
        cast.__name__ = type(default).__name__
        return cast
    knobs = {k: v for k, v in namespace.items() if k.isupper() and isinstance(v, (bool, int, float, str))}
    comments = dict(re.findall(r"(?m)^([A-Z][A-Z0-9_]*) *=.*?# *(.*)$", open(namespace["__file__"]).read()))
    parser = Parser(prog=os.path.basename(namespace["__file__"]), allow_abbrev=False,
                    description=(namespace.get("__doc__") or "").strip().split("\n\n")[0])
    for key, default in knobs.items():
        bare = {"nargs": "?", "const": True} if isinstance(default, bool) else {}  # a bare --resume means true
        parser.add_argument("--" + key.lower(), dest=key, default=default, type=typed(default), **bare,
                            metavar=type(default).__name__,
                            help=comments.get(key, "").replace("%", "%%") + f" [default: {default}]")
    cfg = types.SimpleNamespace(**vars(parser.parse_args(sys.argv[1:] if argv is None else argv)))
    print("config: " + " ".join(f"{k.lower()}={v}" for k, v in vars(cfg).items()), flush=True)
    return cfg

def log_line(step, metrics):  # the one log format: 'step 1200 | loss 0.41 | 38.2 it/s'
    text = {k: f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in metrics.items()}
    parts = [f"step {step}"] + [f"{v} {k}" if k.endswith("/s") else f"{k} {v}" for k, v in text.items()]
    print(("\r\033[K" if sys.stderr.isatty() else "") + " | ".join(parts), flush=True)  # wipes a progress bar

def progress(i, total, t_start, note=""):  # a one-line bar with elapsed<remaining time, on terminals only
    if sys.stderr.isatty() and (i % max(1, total // 500) == 0 or i == total):
        frac, elapsed = i / max(total, 1), time.time() - t_start
        clock = lambda seconds: f"{int(seconds) // 60}m{int(seconds) % 60:02d}s"  # 125 -> '2m05s'
        left = clock(elapsed / frac * (1 - frac) if frac > 0 else 0)
        sys.stderr.write(f"\r[{'#' * int(30 * frac):<30}] {i}/{total} {clock(elapsed)}<{left} {note}\033[K"
                         + ("\n" if i == total else ""))

def save_image_grid(images, path, nrow=8, pad=2):  # (N, C, H, W) in [0, 1], C = 1 or 3 -> one PNG
    import matplotlib.image
    s = max(1, 32 // images.shape[-1])  # nearest-neighbour enlargement: an 8x8 digit is drawn 32x32
    x = images.detach().float().cpu().clamp(0, 1).repeat_interleave(s, -1).repeat_interleave(s, -2)
    x = torch.nn.functional.pad(x, (pad, 0, pad, 0), value=1.0)  # white gap left of and above each image
    (n, c, h, w), cols = x.shape, min(nrow, len(x))
    x = torch.cat([x, torch.ones(-n % cols, c, h, w)]).view(-1, cols, c, h, w).permute(2, 0, 3, 1, 4)
    grid = torch.nn.functional.pad(x.reshape(c, -1, cols * w), (0, pad, 0, pad), value=1.0)  # (C, H, W)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image = grid[0] if c == 1 else grid.permute(1, 2, 0)  # (H, W) or (H, W, 3)
    matplotlib.image.imsave(path, image.numpy(), cmap="gray", vmin=0, vmax=1)

def load_numbered(filename):
    """Import a sibling such as '03_mdsm_train.py' without running its main() (a name starting with a
    digit cannot be imported with `import`); every caller shares one module object."""
    import importlib.util
    name = os.path.splitext(filename)[0]
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(__file__), filename))
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]
# ==== end of shared helpers ====


if __name__ == "__main__":
    main()
