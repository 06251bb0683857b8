"""05 - Dual score matching: normalized log-probabilities from one forward pass.

Guth, Kadkhodaie & Simoncelli, "Learning normalized image densities via dual score matching", arXiv
2506.05310. Time t is the noise VARIANCE, y = x + sqrt(t) z, U(y, t) = -log p_t(y) in nats, score -grad_y U.
Denoising score matching learns grad_y U at each t, so U(., t) only up to a constant c(t) free to drift
with t. Dual score matching adds a loss on the TIME score, which has its own identity
    d_t U(y, t) = E[ d/(2t) - ||y - x||^2 / (2 t^2) | y ],
tying the constants of all t together: ONE constant, fixed at a large t = T where p_T is nearly Gaussian,
normalizes the model at every t:  log p(x) = -(U(x, 0) + c),  c = (d/2) log(2 pi e T) - E_{y~p_T} U(y, T).
Toy (default): the paper's Figure 1; single SM gets the score about right, not the modes' levels. Images below.
  python 05_dual_score.py      # toy, 1 thread ~3-5 min: log p error on data dual 0.11, single 5.8 dB/dim
  python 05_dual_score.py --dataset=mnist --image_size=16 --width=16 --lr=1e-3 --lr_halve_every=1500 --steps=4000 --eval_every=500
  # -> 2.19 bits/dim after 26 min on a 2-core CPU; full-covariance Gaussian 5.03, histograms 2.71 (README)
Paper: 3.36 bits/dim on ImageNet64 with --width=64 --batch=128 --steps=1000000 (4-5 H100 days).
"""
import functools
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
IMAGE_SIZE = 0             # 0 = native (28x28 digits, no padding); 16 = area-downsampled 16x16 (CPU)
SEED = 0                   # random seed for data, initialization and noise
DEVICE = "auto"            # auto | cpu | cuda | mps (the toy always runs on the CPU)
OUT_DIR = "out/05_dual_score"  # figures and checkpoints go here
TSM_WEIGHT = 1.0           # weight of the time-score loss; 0 = single (space-only) score matching
TOY_DIM = 1000             # toy: dimension d of the scale mixture 0.5 N(0, I) + 0.5 N(0, 16 I)
TOY_SAMPLES = 100_000      # toy: fixed training set size n (paper 1e5)
TOY_STEPS = 3000           # toy: Adam steps per model (paper 20,000)
TOY_BATCH = 512            # toy: samples per step, one t each (paper 512)
TOY_LR = 1e-3              # toy: Adam learning rate (paper 1e-4 with 20,000 steps)
TOY_HALVE_EVERY = 1000     # toy: halve the learning rate every this many steps (paper 2,000)
TOY_T_MIN = 1e-2           # toy: smallest noise variance; log p is read off here ("t = 0")
TOY_T_MAX = 1e2            # toy: largest noise variance = T where the model is normalized
STEPS = 400                # images: training steps (paper 1M on ImageNet64)
BATCH = 32                 # images per step (paper 128)
LR = 5e-4                  # Adam learning rate (paper 5e-4), halved every LR_HALVE_EVERY steps
LR_HALVE_EVERY = 100_000   # steps between halvings (paper 100k)
WIDTH = 8                  # UNet base width C (C, 2C, 4C, middle 8C; paper 64): the CPU knob
T_MIN = 1e-9               # smallest noise variance (PSNR 90 dB); log p is read off here
T_MAX = 1e3                # largest noise variance (PSNR -30 dB) = normalization point T
N_TEST = 1000              # test images for the final evaluation
N_DRAWS = 4                # dequantization draws per test image in the final evaluation
EVAL_EVERY = 0             # steps between bits/dim-versus-steps points (1 draw on the test images; 0 = end only)
RESUME = False             # continue from OUT_DIR/<dataset><size>.pt (an error if there is none)
CKPT_EVERY = 1000          # steps between checkpoints (one more at the end)
EVAL_ONLY = False          # load that checkpoint and only evaluate
STRONG_GEN = ""            # e.g. "10,100,1000": per N, two models (STEPS each) on disjoint halves of N images, compared

# The helpers every file repeats (device, seed, --key=value overrides, logging, image grids) are at the end.

def dual_score_losses(energy, x, t, z, create_graph=True):
    """Per-sample L_DSM, L_TSM and the scores for y = x + sqrt(t) z; energy(y, t) -> U (B,). One autograd call
    gives both scores (grad_y U, d_t U). L_DSM = (1/d) ||z - sqrt(t) grad_y U||^2 and
    L_TSM = (0.5 (1 - ||y - x||^2 / (d t)) - t d_t U / d)^2, with ||y - x||^2 / t = ||z||^2."""
    d = x[0].numel()
    st = t.sqrt().view(-1, *[1] * (x.dim() - 1))                                  # (B, 1, ...)
    y, t = (x + st * z).detach().requires_grad_(), t.detach().clone().requires_grad_()  # both differentiable
    U = energy(y, t)                                                               # (B,)
    grad_y, grad_t = torch.autograd.grad(U.sum(), (y, t), create_graph=create_graph)
    dsm = (z - st * grad_y).pow(2).flatten(1).sum(1) / d
    tsm = (0.5 * (1 - z.pow(2).flatten(1).sum(1) / d) - t * grad_t / d) ** 2
    return dsm, tsm, U, y, grad_y, grad_t

def log_uniform(n, t_min, t_max, generator=None):
    """t log-uniform on [t_min, t_max] (PSNR = -10 log10 t uniform), one per sample. (n,)"""
    return torch.exp(math.log(t_min) + math.log(t_max / t_min) * torch.rand(n, generator=generator))

def energies(energy, x, t_val, device="cpu", chunk=250):
    """U(x, t) at one t for all x (no graph), float64 on the CPU. (N,)"""
    with torch.no_grad():
        return torch.cat([energy(xb.to(device), torch.full((len(xb),), float(t_val), device=device)).double().cpu()
                          for xb in x.split(chunk)])

def normalizing_constant(energy_at_T, d, T, data_var=0.0):
    """c = (d/2) log(2 pi e (data_var + T)) - mean U(y, T) over y ~ p_T. data_var = 0: the paper's constant;
    data_var = E||x||^2 / d: a Gaussian with the data's second moment (derived, better when T is small)."""
    return d / 2 * math.log(2 * math.pi * math.e * (data_var + T)) - energy_at_T.double().mean().item()

# ============================ part 1: the toy of Figure 1 ============================
TOY_SIGMA2, TOY_WEIGHT = (1.0, 16.0), (0.5, 0.5)  # variances sigma_k^2 and weights pi_k of the two mixture components

def toy_norms(n, d, seed):
    """||x||^2 of n fixed mixture samples (n,); directions are drawn afresh at each use (same law, 1/d memory)."""
    rng = np.random.default_rng(seed)
    return torch.tensor(np.array(TOY_SIGMA2)[(rng.random(n) < TOY_WEIGHT[1]).astype(int)] * rng.chisquare(d, n)).float()

def toy_points(xx, d, generator):
    """Points with squared norms xx (B,) in uniformly random directions. (B, d)"""
    g = torch.randn(len(xx), d, generator=generator)
    return g / g.norm(dim=1, keepdim=True) * xx.sqrt()[:, None]

def true_toy_energy(y, t):
    """Exact U_t(y) = -logsumexp_k [log pi_k - ||y||^2/(2 v_k) - (d/2) log(2 pi v_k)], v_k = sigma_k^2 + t. (B,)"""
    r2, d = y.pow(2).sum(1), y.shape[1]
    terms = [math.log(w) - r2 / (2 * (s2 + t)) - d / 2 * torch.log(2 * math.pi * (s2 + t))
             for w, s2 in zip(TOY_WEIGHT, TOY_SIGMA2)]
    return -torch.logsumexp(torch.stack(terms, dim=1), dim=1)

class RadialEnergy(nn.Module):
    """U(y,t) = -logsumexp_k -(a_k(t) ||y||^2 + d b_k(t)),  [a1, a2, b1, b2] = MLP(log(t + 1e-2)),
    4 hidden layers of width 256 with GELU (the paper's toy model)."""
    def __init__(self, d, width=256, depth=4):
        super().__init__()
        layers = [m for i in range(depth) for m in (nn.Linear(1 if i == 0 else width, width), nn.GELU())]
        self.mlp, self.d = nn.Sequential(*layers, nn.Linear(width, 4)), d
    def forward(self, y, t):  # y (B, d), t (B,) -> U (B,)
        ab = self.mlp(torch.log(t + 1e-2)[:, None])                                 # (B, 4)
        e = ab[:, :2] * y.pow(2).sum(1, keepdim=True) + self.d * ab[:, 2:]          # (B, 2)
        return -torch.logsumexp(-e, dim=1)

def train_toy(xx, tsm_weight, cfg, generator):
    """Adam on E_t E_{x,z}[L_DSM + tsm_weight L_TSM], t log-uniform: the same loss as the images."""
    model = RadialEnergy(cfg.TOY_DIM)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.TOY_LR)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.TOY_HALVE_EVERY, gamma=0.5)
    t_start, name = time.time(), "dual" if tsm_weight > 0 else "single"
    print(f"-- training the {name} score model ({'DSM + TSM' if tsm_weight > 0 else 'DSM only'})", flush=True)
    for step in range(1, cfg.TOY_STEPS + 1):
        x = toy_points(xx[torch.randint(len(xx), (cfg.TOY_BATCH,), generator=generator)], cfg.TOY_DIM, generator)
        t = log_uniform(len(x), cfg.TOY_T_MIN, cfg.TOY_T_MAX, generator)
        dsm, tsm, *_ = dual_score_losses(model, x, t, torch.randn(x.shape, generator=generator))
        loss = (dsm + tsm_weight * tsm).mean()
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()  # noqa: E702
        progress(step, cfg.TOY_STEPS, t_start, name)
        if step % max(1, cfg.TOY_STEPS // 5) == 0 or step == cfg.TOY_STEPS:
            log_line(step, {"model": name, "dsm": dsm.mean().item(), "tsm": tsm.mean().item(), "it/s": step / (time.time() - t_start)})
    return model

def toy_main(cfg):
    d, T, t0, n = cfg.TOY_DIM, cfg.TOY_T_MAX, cfg.TOY_T_MIN, min(10000, cfg.TOY_SAMPLES)
    db = 10 / math.log(10) / d                     # log p in nats -> dB/dim (10 log10 p / d), the paper's unit
    gen, xx = torch.Generator().manual_seed(cfg.SEED), toy_norms(cfg.TOY_SAMPLES, d, cfg.SEED)  # xx: (n,) ||x||^2
    models = {name: train_toy(xx, w, cfg, gen) for name, w in (("single", 0.0), ("dual", cfg.TSM_WEIGHT or 1.0))}
    y_T = toy_points(xx[:n], d, gen) + math.sqrt(T) * torch.randn(n, d, generator=gen)  # c from noisy training points at T
    y_0 = toy_points(xx[-n:], d, gen) + math.sqrt(t0) * torch.randn(n, d, generator=gen)
    outer, s2 = xx[-n:] / d > 2.5 ** 2, xx.mean().item() / d                          # sigma^2 = 16 shell; 8.5
    rho = torch.linspace(0.02, 5, 250)                                                 # r / sqrt(d)
    y_grid = F.pad(rho[:, None] * math.sqrt(d), (0, d - 1))                           # (250, d) along axis 1
    curves, summary = {"true": -energies(true_toy_energy, y_grid, t0)}, {}
    y, t = y_0.clone().requires_grad_(), torch.full((n,), t0)
    for name, m in models.items():
        U_T = energies(m, y_T, T)
        consts = {"paper": normalizing_constant(U_T, d, T), "better": normalizing_constant(U_T, d, T, s2)}
        err = {k: db * (energies(true_toy_energy, y_0, t0) - energies(m, y_0, t0) - c) for k, c in consts.items()}
        curves[name] = -(energies(m, y_grid, t0) + consts["paper"])
        g_model, g_true = (torch.autograd.grad(f(y, t).sum(), y)[0] for f in (m, true_toy_energy))
        s_err = (g_model - g_true).norm(dim=1) / g_true.norm(dim=1)  # relative error of the score on data points
        summary[name] = dict(rms_paper_c=err["paper"].pow(2).mean().sqrt().item(), score_inner=s_err[~outer].mean().item(),
                             rms_better_c=err["better"].pow(2).mean().sqrt().item(), score_outer=s_err[outer].mean().item())
    print(f"\nOn {n} data points: RMS error of log p (dB/dim) with the paper's c = (d/2) log(2 pi e T) - mean U_T and "
          f"with c = (d/2) log(2 pi e (s^2 + T)) - mean U_T, s^2 = {s2:.2f}; relative error of the score grad U:")
    for name, s in summary.items():
        print(f"{name:>6}: log p error {s['rms_paper_c']:.3f} (paper's c) / {s['rms_better_c']:.3f} (s^2 + T) dB/dim; "
              f"score error inner shell {100 * s['score_inner']:.1f} %, outer shell {100 * s['score_outer']:.1f} %")
    plot_toy(rho.numpy(), {k: (db * v).numpy() for k, v in curves.items()}, cfg)
    return summary

def plot_toy(rho, logp_db, cfg):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for k, c, ls, label in (("true", "k", "-", "true"), ("single", "tab:red", "--", "single SM (DSM only)"),
                            ("dual", "tab:blue", ":", "dual SM (DSM + TSM)")):
        axes[0].plot(rho, logp_db[k], color=c, ls=ls, lw=2, label=label)
        axes[1].plot(rho, logp_db[k] - logp_db["true"], color=c, ls=ls, lw=2)
    for ax in axes:
        ax.axvspan(0.97, 1.03, color="0.85", zorder=0), ax.axvspan(3.9, 4.1, color="0.85", zorder=0)  # data shells
        ax.set(xlabel="r / sqrt(d)  (grey bands: the data shells)", xlim=(0, 5))
    axes[0].set(ylabel="log p(x)  [dB/dim]", title=f"normalized log p at t = {cfg.TOY_T_MIN:g}, d = {cfg.TOY_DIM}")
    axes[1].set(ylabel="model - true  [dB/dim]", title="error of the normalized log p (paper's c)"), axes[0].legend(loc="lower left")
    save_figure(fig, os.path.join(cfg.OUT_DIR, "05_dual_score.png"))

def save_figure(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"figure: {path}")

# ============================ part 2: images ============================
class HomogeneousNorm(nn.Module):
    """The authors' "homogeneous" normalization, per sample: centre each channel, divide by its std, multiply
    by sqrt(mean channel variance): the input's overall scale is KEPT. Per-channel weight, no bias, x (1 + g(t))."""
    def __init__(self, channels, emb_dim):
        super().__init__()
        self.weight, self.gain = nn.Parameter(torch.ones(channels)), nn.Linear(emb_dim, channels, bias=False)
        nn.init.zeros_(self.gain.weight)                                            # gain starts at 1
    def forward(self, h, emb):  # (B, C, H, W), (B, E) -> (B, C, H, W)
        var = h.var(dim=(2, 3), keepdim=True, unbiased=False) + 1e-12             # (B, C, 1, 1)
        h = (h - h.mean(dim=(2, 3), keepdim=True)) * (var.mean(1, keepdim=True) / var).sqrt()
        return h * (self.weight * (1 + self.gain(emb)))[:, :, None, None]

class Block(nn.Module):
    """3 x (bias-free 3x3 conv -> homogeneous normalization modulated by t -> GELU)."""
    def __init__(self, c_in, c_out, emb_dim):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(c_out if i else c_in, c_out, 3, padding=1, bias=False) for i in range(3)])
        self.norms = nn.ModuleList([HomogeneousNorm(c_out, emb_dim) for _ in range(3)])
    def forward(self, h, emb):
        for conv, norm in zip(self.convs, self.norms):
            h = F.gelu(norm(conv(h), emb))
        return h

class ScoreUNet(nn.Module):
    """s(y, t): bias-free UNet, 3 scales (C, 2C, 4C) + a middle block (8C), 2x2 strided conv down, transposed conv
    up; sides zero-padded to a multiple of 8 inside, cropped back. Two additions to the authors' design make it
    learn in CPU minutes (README): the output is divided by sqrt(t), as the score of p_t is ~ z / sqrt(t); and U
    gets a learned d b(t), like the paper's toy energy. 0.5 <y, s> is 0 at y = 0 for every t, so without b the
    (d/2) log(2 pi (s^2 + t)) part of -log p_t must be built out of y, the slowest thing the time score learns."""
    def __init__(self, in_channels=1, width=16, emb_dim=256, design=None):  # design: a tag, so older checkpoints are refused
        super().__init__()
        self.model_args = dict(in_channels=in_channels, width=width, emb_dim=emb_dim, design="s/sqrt(t), d b(t)")
        C, E, chans = width, emb_dim, [width, 2 * width, 4 * width]
        # t -> sinusoids of log10 t -> MLP 64 -> E -> E (SiLU); the authors' raw-t sinusoids are flat below t ~ 1e-2
        self.register_buffer("freqs", torch.logspace(0, -2, 32) * math.pi)
        self.embed = nn.Sequential(nn.Linear(64, E), nn.SiLU(), nn.Linear(E, E), nn.SiLU())
        self.enc = nn.ModuleList([Block(c_in, c, E) for c_in, c in zip([in_channels] + chans[1:], chans)])
        self.down = nn.ModuleList([nn.Conv2d(c, 2 * c, 2, stride=2, bias=False) for c in chans])
        self.mid = Block(8 * C, 8 * C, E)
        self.up = nn.ModuleList([nn.ConvTranspose2d(2 * c, c, 2, stride=2, bias=False) for c in chans])
        self.dec = nn.ModuleList([Block(2 * c, c, E) for c in chans])
        self.out = nn.Conv2d(C, in_channels, 3, padding=1, bias=False)
        self.log_norm = nn.Sequential(nn.Linear(E, E), nn.SiLU(), nn.Linear(E, 1))  # b(t), per dimension
        nn.init.zeros_(self.log_norm[2].weight), nn.init.zeros_(self.log_norm[2].bias)  # b starts at 0
    def time_embedding(self, t):  # (B,) -> (B, E)
        a = torch.log10(t)[:, None] * self.freqs                                   # (B, 32)
        return self.embed(torch.cat([a.sin(), a.cos()], dim=1))
    def score(self, y, t):  # (B, C, H, W), (B,) -> s (B, C, H, W)
        emb = self.time_embedding(t)
        H, W = y.shape[2:]
        h, skips = F.pad(y, (0, -W % 8, 0, -H % 8)), []
        for block, down in zip(self.enc, self.down):                               # 3 scales, then 1/8
            skips.append(block(h, emb))
            h = down(skips[-1])
        h = self.mid(h, emb)
        for block, up in zip(reversed(self.dec), reversed(self.up)):
            h = block(torch.cat([up(h), skips.pop()], dim=1), emb)
        return self.out(h)[:, :, :H, :W] / t.sqrt().view(-1, 1, 1, 1)             # the score is ~ z / sqrt(t)
    def forward(self, y, t):  # energy U(y, t) = 0.5 <y, s(y, t)> + d b(t), (B,)
        return 0.5 * (y * self.score(y, t)).flatten(1).sum(dim=1) + y[0].numel() * self.log_norm(self.time_embedding(t))[:, 0]

def dequantize(x_uint8, generator=None):
    """x = (k + u) / 256, u ~ U[0,1): the continuous data whose density the headline NLL measures."""
    return (x_uint8.float() + torch.rand(x_uint8.shape, generator=generator)) / 256

def normalized_log_p(energy, x, c, t0, device="cpu"):
    """log p(x) = -(U(x, t0) + c) in nats, float64 (B,): one forward pass at t0 ~ 0."""
    return -(energies(energy, x, t0, device) + c)

def image_density(energy, x_uint8, t0, T, n_draws=4, generator=None, device="cpu"):
    """The constant c (one noise draw per image), then per-image bits/dim in both conventions: dequantized
    (headline; 04's estimator, real pixels only) and the paper's single pass at x = k/255; the latter also at t = 0.01."""
    dq = load_numbered("04_langevin_sampling.py")
    y_T = dequantize(x_uint8, generator) + math.sqrt(T) * torch.randn(x_uint8.shape, generator=generator)
    c = normalizing_constant(energies(energy, y_T, T, device), x_uint8[0].numel(), T)
    log_p = functools.partial(normalized_log_p, energy, c=c, t0=t0, device=device)
    return {"c": c, "deq": dq.dequantized_bits_per_dim(log_p, x_uint8, n_draws, generator),
            "single": dq.continuous_bits_per_dim(log_p, x_uint8),
            "t=0.01": dq.continuous_bits_per_dim(functools.partial(normalized_log_p, energy, c=c, t0=0.01, device=device), x_uint8)}

def load_split(mdsm, cfg, split):
    """uint8 (N, C, H, W), real pixels only: 03 zero-pads 28x28 digits to 32x32, and padding is not data."""
    x = mdsm.load_images(cfg.DATASET, cfg.DATA_DIR, split, cfg.IMAGE_SIZE)
    return x[:, :, 2:-2, 2:-2] if cfg.IMAGE_SIZE == 0 and cfg.DATASET in mdsm.IDX_FILES else x

def start_model(cfg, channels, device, ckpt_path, mdsm):
    """(model, optimizer, scheduler, step, curve): fresh, or the checkpoint's with --resume."""
    model = ScoreUNet(channels, cfg.WIDTH).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.LR)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.LR_HALVE_EVERY, gamma=0.5)
    if cfg.RESUME != os.path.isfile(ckpt_path):  # never a silent fresh start, never an overwrite
        raise SystemExit(f"error: --{'eval_only' if cfg.EVAL_ONLY else 'resume'}: no checkpoint at {ckpt_path}; train one" if cfg.RESUME else
                         f"error: {ckpt_path} already exists; pass --resume to continue, --eval_only to evaluate, or another --out_dir")
    if not cfg.RESUME:
        return model, opt, sched, 0, []
    ck = mdsm.load_checkpoint(ckpt_path, kind="dual-score")
    if ck["model_args"] != model.model_args:
        raise SystemExit(f"error: {ckpt_path} holds a ScoreUNet{ck['model_args']} but this run builds {model.model_args}; "
                         f"pass the same --width/--dataset, or another --out_dir")
    changed = [k for k in ("LR", "LR_HALVE_EVERY") if ck["config"].get(k) != getattr(cfg, k) and cfg.STEPS > ck["step"]]
    if changed:  # the optimizer and its schedule come back from the checkpoint: a new value would be ignored
        raise SystemExit(f"error: --resume keeps the optimizer and lr schedule of {ckpt_path}, but {', '.join('--' + k.lower() for k in changed)} "
                         f"differ from that run's; start a new run (another --out_dir) to change them")
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"]), sched.load_state_dict(ck["scheduler"])
    print(f"resumed at step {ck['step']} from {ckpt_path}")
    return model, opt, sched, ck["step"], ck["curve"]

def train_images(cfg, x_train, x_curve, device, ckpt_path, mdsm):
    """Adam on E_t E_{x,z}[L_DSM + TSM_WEIGHT L_TSM] over dequantized images; every EVAL_EVERY steps a
    point of the bits/dim-versus-steps curve on x_curve (1 draw). Returns (model, curve)."""
    model, opt, sched, start, curve = start_model(cfg, x_train.shape[1], device, ckpt_path, mdsm)
    print(f"ScoreUNet width {cfg.WIDTH}: {sum(p.numel() for p in model.parameters()) / 1e6:.3f} M parameters, "
          f"{len(x_train)} training images, fp32 on {device}")
    gen, t_start = torch.Generator().manual_seed(cfg.SEED + start), time.time()  # gen: batches, t and noise
    for step in range(start + 1, cfg.STEPS + 1):
        x = dequantize(x_train[torch.randint(len(x_train), (cfg.BATCH,), generator=gen)], gen)
        if x.shape[1] == 3:                                                         # flips: colour only
            x = torch.where(torch.rand(len(x), 1, 1, 1, generator=gen) < 0.5, x.flip(3), x)
        t, z = log_uniform(len(x), cfg.T_MIN, cfg.T_MAX, gen), torch.randn(x.shape, generator=gen)
        dsm, tsm, *_ = dual_score_losses(model, x.to(device), t.to(device), z.to(device))
        loss = (dsm + cfg.TSM_WEIGHT * tsm).mean()
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()  # noqa: E702
        progress(step - start, cfg.STEPS - start, t_start)
        if not math.isfinite(loss.item()) or loss.item() > 1e6:  # never save a diverged model
            raise SystemExit(f"error: the loss became {loss.item():.3g} at step {step}; stopped without saving "
                             f"(a previous checkpoint {ckpt_path} is kept). Try a lower --lr")
        if step % 100 == 0 or step == cfg.STEPS:
            log_line(step, {"loss": loss.item(), "dsm": dsm.mean().item(), "tsm": tsm.mean().item(), "it/s": (step - start) / (time.time() - t_start)})
        if (cfg.EVAL_EVERY and step % cfg.EVAL_EVERY == 0) or step == cfg.STEPS:
            bpd = image_density(model, x_curve, cfg.T_MIN, cfg.T_MAX, 1, torch.Generator().manual_seed(1), device)
            curve.append((step, time.time() - t_start, bpd["deq"].mean().item()))
            log_line(step, {"dequantized bits/dim": curve[-1][2], "test images": len(x_curve)})
        if step % cfg.CKPT_EVERY == 0 or step == cfg.STEPS:
            mdsm.save_checkpoint(mdsm.make_checkpoint(model, vars(cfg), step, opt, sched, kind="dual-score", curve=curve), ckpt_path)
    return model, curve

def mass_conservation(model, x_uint8, cfg, device, n_levels=7):
    """Mean over y ~ p_t of t d_t U / d at each t: 0 for any normalized density (spec, derived). [(t, value)]"""
    gen, rows = torch.Generator().manual_seed(2), []
    for t_val in np.logspace(math.log10(cfg.T_MIN), math.log10(cfg.T_MAX), n_levels):
        x, t = dequantize(x_uint8, gen), torch.full((len(x_uint8),), float(t_val))
        *_, g_t = dual_score_losses(model, x.to(device), t.to(device), torch.randn(x.shape, generator=gen).to(device), False)
        rows.append((float(t_val), (t_val * g_t / x[0].numel()).mean().item()))
    return rows

def report(model, x_train, x_test, cfg, device, curve):
    """Headline (dequantized) and single-pass bits/dim beside the baselines on the same split, mass conservation."""
    gen = torch.Generator().manual_seed(cfg.SEED + 1)
    res = image_density(model, x_test, cfg.T_MIN, cfg.T_MAX, cfg.N_DRAWS, gen, device)
    dq = load_numbered("04_langevin_sampling.py")
    base = dq.baseline_bits_per_dim(x_train, x_test, gen)
    bpd = res["deq"].mean().item()
    print(f"test NLL in bits/dim, {len(x_test)} test images of {tuple(x_test.shape[1:])} (d = {x_test[0].numel()}):")
    print(f"  dual score model, dequantized ({cfg.N_DRAWS} draws; the headline)  {bpd:7.3f}")
    print(f"  dual score model, paper's single pass at x = k/255   {res['single'].mean().item():7.3f}")
    print(f"  (the same model at t = 0.01, i.e. the digits + N(0, 0.1^2) noise 04's AIS measures: {res['t=0.01'].mean().item():.3f})")
    print("\n".join(f"  baseline: {name:<41} {v:7.3f}" for name, v in base.items()))
    if bpd > base["diagonal Gaussian"]:
        print("WARNING: the model is WORSE than a diagonal Gaussian fitted to the training pixels: not useful yet")
    mass = mass_conservation(model, x_test[:100], cfg, device)
    print("mass conservation, mean t d_t U / d (0 for a density): " + "  ".join(f"t={t:.0e}: {v:+.3f}" for t, v in mass))
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.2))
    ax[0].plot([c[0] for c in curve], [c[2] for c in curve], "o-", label="dual score model")
    for (name, v), ls in zip(base.items(), ("-", "--", "-.", ":")):
        ax[0].axhline(v, color="k", ls=ls, lw=0.8, label=f"{name} {v:.2f}")
    ax[0].set(xlabel="training step", ylabel="test bits/dim (dequantized)", title="NLL during training"), ax[0].legend(fontsize=7)
    ax[1].semilogx(*zip(*mass), "o-"), ax[1].axhline(0, color="k", lw=0.5)
    ax[1].set(xlabel="t (noise variance)", ylabel="mean t d_t U / d", title="mass conservation (0 for a density)")
    save_figure(fig, os.path.join(cfg.OUT_DIR, f"05_dual_score_{cfg.NAME}.png"))
    return bpd

def image_main(cfg):
    mdsm = load_numbered("03_mdsm_train.py")  # 03's data loaders and atomic checkpoints
    device = pick_device(cfg.DEVICE)
    x_train, x_test = load_split(mdsm, cfg, "train"), load_split(mdsm, cfg, "test")[:cfg.N_TEST]
    cfg.NAME = os.path.splitext(os.path.basename(cfg.DATASET))[0] + (str(cfg.IMAGE_SIZE) if cfg.IMAGE_SIZE else "")
    ckpt_path = os.path.join(cfg.OUT_DIR, f"{cfg.NAME}.pt")  # e.g. mnist16.pt
    print(f"data: {len(x_train)} train / {len(x_test)} test images of shape {tuple(x_train.shape[1:])}")
    if cfg.STRONG_GEN:
        return strong_generalization(cfg, x_train, device, mdsm)
    cfg.RESUME, cfg.STEPS = (True, 0) if cfg.EVAL_ONLY else (cfg.RESUME, cfg.STEPS)  # --eval_only: load as --resume does, no step
    model, curve = train_images(cfg, x_train, x_test, device, ckpt_path, mdsm)
    return report(model, x_train, x_test, cfg, device, curve)

def strong_generalization(cfg, x_train, device, mdsm):
    """The authors' test, per N: model A trained on training images 0 ... N-1, model B on N ... 2N-1, both scoring
    A's images (up to 500, one dequantization draw). B never saw them: it generalizes if it gives them A's log p."""
    import matplotlib.pyplot as plt
    sizes, rms = [int(n) for n in cfg.STRONG_GEN.split(",")], {}
    if 2 * max(sizes) > len(x_train):
        raise SystemExit(f"error: --strong_gen needs 2 N <= {len(x_train)} training images; the largest N is {max(sizes)}")
    fig, axes = plt.subplots(1, len(sizes), figsize=(4 * len(sizes), 4), squeeze=False)
    for ax, n in zip(axes[0], sizes):
        x_eval, db = x_train[:min(n, 500)], []
        for k, half in enumerate("AB"):  # A: training images 0 ... N-1, B: N ... 2N-1
            path = os.path.join(cfg.OUT_DIR, f"{cfg.NAME}_N{n}{half}.pt")
            model, _ = train_images(cfg, x_train[k * n:(k + 1) * n], x_eval, device, path, mdsm)
            bpd = image_density(model, x_eval, cfg.T_MIN, cfg.T_MAX, 1, torch.Generator().manual_seed(1), device)["deq"]
            db.append(-10 * math.log10(2) * (bpd - 8))  # log p in dB/dim (bits/dim = 8 - log2 p / d)
        rms[n] = (db[0] - db[1]).pow(2).mean().sqrt().item()
        print(f"N = {n}: mean log p of A's {len(x_eval)} training images under A {db[0].mean():.3f}, under B {db[1].mean():.3f} "
              f"dB/dim; RMS difference {rms[n]:.3f}")
        ax.scatter(db[0], db[1], s=4), ax.axline((db[0].mean().item(),) * 2, slope=1, color="k", lw=0.5)
        ax.set(title=f"N = {n}: RMS difference {rms[n]:.2f} dB/dim", xlabel="log p under A (trained on them) [dB/dim]",
               ylabel="log p under B [dB/dim]")
    save_figure(fig, os.path.join(cfg.OUT_DIR, f"05_strong_generalization_{cfg.NAME}.png"))
    return rms

def validate(cfg):
    """Every knob checked before any work: one line naming the knob and what is allowed."""
    rules = [(k, getattr(cfg, k) > 0, "> 0") for k in ("STEPS", "BATCH", "LR", "LR_HALVE_EVERY", "WIDTH", "N_TEST", "N_DRAWS",
             "CKPT_EVERY", "TOY_SAMPLES", "TOY_STEPS", "TOY_BATCH", "TOY_LR", "TOY_HALVE_EVERY",
             "T_MIN", "TOY_T_MIN")] + [(k, getattr(cfg, k) >= 0, ">= 0") for k in ("TSM_WEIGHT", "IMAGE_SIZE", "EVAL_EVERY")]
    sizes_ok = not cfg.STRONG_GEN or all(v.isdigit() and int(v) > 0 for v in cfg.STRONG_GEN.split(","))
    rules += [("TOY_DIM", cfg.TOY_DIM >= 2, ">= 2"), ("T_MAX", cfg.T_MAX > cfg.T_MIN, "> t_min"),
              ("TOY_T_MAX", cfg.TOY_T_MAX > cfg.TOY_T_MIN, "> toy_t_min"), ("STRONG_GEN", sizes_ok, "sizes > 0, e.g. 10,100,1000")]
    for key, ok, allowed in rules:
        if not ok:
            raise SystemExit(f"error: --{key.lower()}={getattr(cfg, key)} is out of range; allowed: {allowed}")
    load_numbered("04_langevin_sampling.py").check_writable(cfg.OUT_DIR)  # before any training time is spent

def main(argv=None):
    cfg = parse_config(globals(), argv)
    validate(cfg)
    set_seed(cfg.SEED)
    return toy_main(cfg) if cfg.DATASET == "toy" else image_main(cfg)


# ==== shared helpers: the same text in every numbered file (tests/test_shared_helpers.py) ====
# Device, seed, --key=value overrides, log line, progress bar, image grid, an earlier file (uses os, sys, time, np, torch).
def pick_device(name="auto"):  # 'auto' takes cuda, then Apple's mps, then the cpu
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    name = ("cuda" if available["cuda"] else "mps" if available["mps"] else "cpu") if name == "auto" else name
    if not available.get(name.split(":")[0]):
        raise SystemExit(f"error: --device={name} is not available here; use auto, cpu, cuda, cuda:N or mps")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # true fp32 unless a file opts in
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
