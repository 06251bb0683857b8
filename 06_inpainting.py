"""06 - Inpainting and other linear inverse problems with a learned energy.

Given measurements m = M x of an image x (M: a pixel mask, 2x2 block averages, random projections)
we sample the posterior p(x | M x = m) using only the prior that the energy E(x) of 03 learned:
1. Masked annealed Langevin (Li, Chen & Sommer, arXiv 1910.07762, "Inpainting"): only the unknown
   pixels (mask = 1) move, x <- x - 0.5 s^2 grad E(x) * mask + sqrt(T) s xi * mask, and before each
   energy evaluation the known pixels are re-noised to x_known + sigma0 sqrt(T) z, the noise level
   of exp(-E/T) ~ q_sigma at the MDSM optimum (the authors' code: 0.1 T^(1/4), --known_noise=quarter).
2. Kadkhodaie & Simoncelli's coarse-to-fine projected ascent (NeurIPS 2021, Alg. 2), which needs only
   a blind denoiser; MDSM gives one for every level: D(y) = y - sigma0^2 grad E(y).
With no arguments both are checked against the EXACT posterior of a Gaussian prior on 8x8 images for
inpainting and 2x2 block averaging, beside exact draws (the Monte Carlo floor) and unconstrained
samplers that ignore m. Expected: posterior-mean errors 0.05-0.2 (floor ~0.04); unconstrained ~2-3.

  python 06_inpainting.py                                   # CPU, ~40 s: exact Gaussian checks
  python 06_inpainting.py --ckpt=out/03_mdsm_train/ckpt.pt  # restore test images (GPU: minutes)
  python 06_inpainting.py --ckpt=CKPT --tasks=right,centre,random,sr2,sr4 \\
      --n_samples=2                                         # 16x16 laptop model of 03: ~7 min on 2 CPU cores
Outputs in out/06_inpainting/: toy_gaussian.png; with --ckpt a grid per task, PSNR beside trivial fills.
"""
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch

# ---- config: every knob can be overridden with --key=value (see --help) ----
SEED = 0                  # random seed for the toy, the masks and the samplers
DEVICE = "auto"           # auto | cpu | cuda | mps, for --ckpt runs (the 64-pixel toy always runs on the cpu)
OUT_DIR = "out/06_inpainting"  # where figures and grids go
CKPT = ""                 # path to a 03 checkpoint; empty = run the exact Gaussian checks only
USE_EMA = False           # load the checkpoint's EMA weights (if it has them)
# -- the Gaussian toy (exact posteriors) --
TOY_SIZE = 8              # toy images are TOY_SIZE x TOY_SIZE, one channel (even, >= 4)
TOY_LENGTH = 3.0          # correlation length of the stationary covariance, pixels
TOY_STD = 0.2             # pixel standard deviation of the toy prior (mean 0.5)
TOY_NUGGET = 0.02         # independent pixel noise std added to S (keeps S well conditioned)
TOY_CHAINS = 500          # parallel chains per sampler; Monte Carlo error ~ 1/sqrt(TOY_CHAINS)
TOY_STEP_SIZE = 0.05      # a second masked Langevin run with this step (faster mixing, less freeze-out)
# -- masked annealed Langevin (MDSM schedule, 2700 steps by default) --
SIGMA0 = 0.1              # MDSM's small noise scale (with --ckpt the checkpoint's value is used)
N_HOT = 500               # steps at T = T_MAX
N_ANNEAL = 2000           # steps of geometric cooling T_MAX -> 1
N_COOL = 200              # steps of linear cooling 1 -> 0
T_MAX = 100.0             # starting temperature (sigma = SIGMA0 * sqrt(T_MAX) = 1.0)
STEP_SIZE = 0.02          # Langevin step s in x <- x - 0.5 s^2 grad E + sqrt(T) s xi
KNOWN_NOISE = "sqrt"      # noise std on known pixels: sqrt = sigma0*sqrt(T) (derived) | quarter = 0.1*T^(1/4) (authors' code)
# -- projected coarse-to-fine sampler (Kadkhodaie & Simoncelli) --
KS_SIGMA_START = 1.0      # std of the initial image y0 ~ N(0.5, KS_SIGMA_START^2 I)
KS_SIGMA_END = 0.01       # stop when the estimated noise level sigma_k falls below this
KS_H0 = 0.01              # initial step h0 in (0, 1]; h_k = h0 k / (1 + h0 (k - 1)) grows to 1
KS_BETA = 0.01            # noise injection in (0, 1]: 1 = none (deterministic ascent), small = much
KS_MAX_STEPS = 3000       # safety cap on iterations
# -- checkpoint mode --
DATASET = ""              # images to restore; empty = the checkpoint's own DATASET
DATA_DIR = ""             # folder of the datasets; empty = the checkpoint's own DATA_DIR
N_IMAGES = 8              # test images per task
N_SAMPLES = 4             # posterior samples per image (their mean is the estimate)
TASKS = "right,centre,random,sr2,sr4,cs"  # comma list of: right, centre, random, sr2, sr4, cs
RANDOM_KEEP = 0.3         # fraction of pixels observed for the 'random' mask, in (0, 1)
CS_KEEP = 0.25            # measurements / pixels for compressive sensing ('cs'), in (0, 1]
MASK_SAMPLER = "langevin" # sampler for the pixel masks: langevin (MDSM) | projected (K&S)
BATCH = 64                # images per sampler call (memory knob)

# The helpers every file repeats (device, seed, --key=value overrides, logging, image grids) are at the end.
ALL_TASKS = ("right", "centre", "random", "sr2", "sr4", "cs")


# ---- measurement operators (the data of an inverse problem): m = M x, M with orthonormal rows ----
def mask_operator(mask):
    """Pixel mask (C, H, W), 1 = unknown, 0 = observed -> M (m, d): the rows of I reading observed pixels."""
    keep = (mask.flatten() == 0).nonzero().squeeze(1)
    return torch.eye(mask.numel())[keep]  # (m, d)


def block_average_operator(shape, factor):
    """Super-resolution: each row averages a factor x factor block of one channel, entries 1/factor so
    that M M^T = I; m = factor * block means, M^T m repeats them over the block (nearest neighbour)."""
    c, h, w = shape
    idx = torch.arange(c * h * w).view(c, h // factor, factor, w // factor, factor)
    rows = idx.permute(0, 1, 3, 2, 4).reshape(-1, factor * factor)  # (m, factor^2) pixel indices
    return torch.zeros(rows.shape[0], c * h * w).scatter_(1, rows, 1.0 / factor)  # (m, d)


def named_mask(kind, shape, keep, generator):
    """right half unknown | centre square of half the side | random: each pixel observed w.p. keep."""
    c, h, w = shape
    mask = torch.zeros(1, h, w)
    if kind == "right":
        mask[:, :, w // 2:] = 1
    elif kind == "centre":
        mask[:, h // 4:h - h // 4, w // 4:w - w // 4] = 1
    else:  # random
        mask = (torch.rand(1, h, w, generator=generator) > keep).float()
    return mask.expand(c, h, w).contiguous()


def orthogonal_completion(M):
    """Q (d, d) orthogonal with first rows M: in z = Q x the measurements are the first m coordinates."""
    m, d = M.shape
    q, _ = torch.linalg.qr(torch.cat([M.T, torch.randn(d, d - m, dtype=M.dtype)], 1))
    q = q.T.contiguous()
    q[:m] = M  # QR may flip signs of the first columns; put M back exactly
    return q


# ---- the Gaussian toy: prior N(mu, S) over TOY_SIZE x TOY_SIZE images, all answers exact ----
def gaussian_prior(cfg):
    """S_ij = v exp(-|p_i - p_j| / l) + nugget^2 delta_ij: an exponential kernel, rough enough that a
    missing pixel is predicted by its observed neighbours, not by derivatives no noisy sampler reads."""
    n = cfg.TOY_SIZE
    yy, xx = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    p = torch.stack([yy.flatten(), xx.flatten()], 1).double()  # (d, 2) pixel coordinates
    S = cfg.TOY_STD**2 * torch.exp(-torch.cdist(p, p) / cfg.TOY_LENGTH) + cfg.TOY_NUGGET**2 * torch.eye(n * n)
    return torch.full((n * n,), 0.5, dtype=torch.float64), S  # mu (d,), S (d, d)


def gaussian_posterior(mu, S, M, m):
    """p(x | M x = m) for x ~ N(mu, S): mean mu + S M^T (M S M^T)^-1 (m - M mu),
    covariance S - S M^T (M S M^T)^-1 M S (noise-free measurements)."""
    SMt = S @ M.T  # (d, m)
    gain = torch.linalg.solve(M @ SMt, SMt.T).T  # (d, m) = S M^T (M S M^T)^-1
    return mu + gain @ (m - M @ mu), S - gain @ SMt.T


def gaussian_mdsm_energy(x, T, mu, eig, sigma0):
    """The ideal MDSM energy at temperature T for data N(mu, S), x (B, ...) -> (B,), sigma = sigma0 sqrt(T):
    E_T(x) = T (-log q_sigma(x)) = (T/2) (x - mu)^T (S + sigma^2 I)^-1 (x - mu) + const, so that
    sigma0^2 grad E_T = x - D(x) (Tweedie). eig = (lam, U) = torch.linalg.eigh(S) in float32."""
    lam, U = eig
    u = (x.reshape(x.shape[0], -1) - mu.float()) @ U  # (B, d) coordinates in S's eigenbasis
    return 0.5 * (u * u * (float(T) / (lam + sigma0**2 * float(T)))).sum(1)


def gaussian_blind_denoise(y, mu, S):
    """D(y) = E[x | y] for an unknown noise level, y (B, d) -> (B, d): sigma^2 by maximum likelihood under
    y ~ N(mu, S + sigma^2 I) (bisection), then mu + S (S + sigma^2 I)^-1 (y - mu). Reads the noise off y."""
    lam, U = (t.float() for t in torch.linalg.eigh(S))
    u = (y - mu.float()) @ U  # (B, d) coordinates in S's eigenbasis
    lo, hi = torch.full((y.shape[0], 1), -20.0), torch.full((y.shape[0], 1), 5.0)
    for _ in range(40):  # d/ds2 log N = 0.5 sum(u^2/(lam+s2)^2 - 1/(lam+s2)), decreasing in s2
        mid = (lo + hi) / 2
        v = lam + mid.exp()
        up = ((u * u / v - 1) / v).sum(1, keepdim=True) > 0
        lo, hi = torch.where(up, mid, lo), torch.where(up, hi, mid)
    shrink = lam / (lam + ((lo + hi) / 2).exp())  # (B, d) per-eigendirection Wiener gain
    return mu.float() + (u * shrink) @ U.T


# ---- the two samplers ----
def masked_langevin(energy_fn, x_known, mask, temperatures, step_size, sigma0, rule="sqrt", show_progress=False):
    """MDSM inpainting: annealed Langevin in which only the pixels with mask = 1 move. energy_fn(x, T)
    -> (B,) (a trained MDSM net ignores T); x_known (B, ...) holds the known pixels (mask = 0); a mask
    of ones is the unconstrained sampler. Returns x with the known pixels exactly x_known."""
    sampler = load_numbered("04_langevin_sampling.py")  # 04's grad_energy and langevin_step, reused
    x = torch.where(mask > 0, 0.5 + torch.randn_like(x_known), x_known)  # MDSM's init 0.5 + N(0, I)
    t_start = time.time()
    for k, T in enumerate(temperatures):  # T: a 0-dim tensor (on the device for a model)
        # the known pixels get fresh noise of the current level sigma0 sqrt(T) (or the authors' 0.1 T^(1/4))
        std = 0.1 * T.clamp(min=0) ** 0.25 if rule == "quarter" else sigma0 * T.clamp(min=0) ** 0.5
        x = mask * x + (1 - mask) * (x_known + std * torch.randn_like(x))
        grad = sampler.grad_energy(lambda z: energy_fn(z, T), x)  # grad_x E, like x
        # x <- x - 0.5 s^2 grad E(x) * mask + sqrt(T) s xi * mask
        x = sampler.langevin_step(x, grad * mask, T, step_size, torch.randn_like(x) * mask)
        if show_progress:
            progress(k + 1, len(temperatures), t_start, "Langevin steps")
    return mask * x + (1 - mask) * x_known


def projected_sampler(denoise, M, m, cfg, constrained=True):
    """Kadkhodaie & Simoncelli's stochastic coarse-to-fine ascent projected onto M x = m: denoise (B, d)
    -> (B, d), M (m, d) orthonormal rows, m (B, m). Returns (B, d) with M x = m exactly, and the steps."""
    B, d = m.shape[0], M.shape[1]
    y = 0.5 + cfg.KS_SIGMA_START * torch.randn(B, d, device=M.device)  # y0 ~ N(0.5, sigma^2 I)
    active = torch.ones(B, 1, dtype=torch.bool, device=M.device)
    for k in range(1, cfg.KS_MAX_STEPS + 1):
        f = denoise(y) - y  # f(y) = D(y) - y, the denoiser residual (a scaled score)
        if constrained:  # d_k = (I - M^T M) f(y_k) + M^T (m - M y_k)
            f = f - (f @ M.T) @ M + (m - y @ M.T) @ M
        sigma = f.norm(dim=1, keepdim=True) / math.sqrt(d)  # sigma_k = ||d_k|| / sqrt(N)
        active = active & (sigma > cfg.KS_SIGMA_END)
        if not active.any():
            break
        h = cfg.KS_H0 * k / (1 + cfg.KS_H0 * (k - 1))  # h_k = h0 k / (1 + h0 (k - 1))
        # gamma_k = sigma_k sqrt((1 - beta h_k)^2 - (1 - h_k)^2): total noise shrinks by (1 - beta h)
        gamma = sigma * math.sqrt((1 - cfg.KS_BETA * h) ** 2 - (1 - h) ** 2)
        y = torch.where(active, y + h * f + gamma * torch.randn_like(y), y)
    if constrained:
        y = y - (y @ M.T) @ M + m @ M  # measured components = m exactly
    return y, k


# ---- exact comparison on the Gaussian toy ----
def posterior_errors(samples, mean, cov):
    """(||mean_hat - mean|| / sqrt(tr C), ||C_hat - C||_F / ||C||_F): samples vs the exact posterior."""
    x = samples.double().reshape(samples.shape[0], -1)  # (N, d)
    return float((x.mean(0) - mean).norm() / cov.trace().sqrt()), float((torch.cov(x.T) - cov).norm() / cov.norm())


def toy_task(name, M, truth, mu, S, cfg, mask=None):
    """Sample p(x | M x = m) several ways (plus exact draws) and compare with the closed form."""
    N, (m_dim, d) = cfg.TOY_CHAINS, M.shape
    meas = M.double() @ truth  # (m,) noise-free measurements
    mean, cov = gaussian_posterior(mu, S, M.double(), meas)
    # any orthonormal M becomes a pixel mask after the rotation z = Q x (identity for a pixel mask)
    Q = torch.eye(d) if mask is not None else orthogonal_completion(M)  # (d, d)
    mask_z = torch.cat([torch.zeros(m_dim), torch.ones(d - m_dim)]) if mask is None else mask.flatten()
    known = (Q @ truth.float()) * (1 - mask_z)  # (d,) the known coordinates of z (M x = m), 0 elsewhere
    eig = tuple(t.float() for t in torch.linalg.eigh(S))  # (lam (d,), U (d, d))
    temps = load_numbered("04_langevin_sampling.py").mdsm_schedule(cfg.N_HOT, cfg.N_ANNEAL, cfg.N_COOL, cfg.T_MAX)

    def langevin(mask_run, rule="sqrt", step_size=cfg.STEP_SIZE):  # chains in z, returned as images x
        z = masked_langevin(lambda z, T: gaussian_mdsm_energy(z @ Q, T, mu, eig, cfg.SIGMA0),
                            known.expand(N, d), mask_run, temps, step_size, cfg.SIGMA0, rule)
        return z @ Q

    meas_b = meas.float().expand(N, m_dim)
    L = torch.linalg.cholesky(cov + 1e-10 * torch.eye(d, dtype=cov.dtype))
    runs = {"exact draws (Monte Carlo floor)": mean + torch.randn(N, d, dtype=cov.dtype) @ L.T}
    t0 = time.time()
    runs["masked Langevin (MDSM), sigma0*sqrt(T)"] = langevin(mask_z)
    t_lang = time.time() - t0
    runs["masked Langevin, authors' 0.1*T^(1/4)"] = langevin(mask_z, "quarter")
    runs[f"masked Langevin, step {cfg.TOY_STEP_SIZE} (not {cfg.STEP_SIZE})"] = langevin(mask_z, "sqrt", cfg.TOY_STEP_SIZE)
    t0 = time.time()
    denoise = lambda y: gaussian_blind_denoise(y, mu, S)  # noqa: E731 (one line, no nesting)
    runs["projected coarse-to-fine (K&S)"], steps = projected_sampler(denoise, M, meas_b, cfg)
    t_ks = time.time() - t0
    runs["unconstrained Langevin (ignores m)"] = langevin(torch.ones(d))
    runs["unconstrained coarse-to-fine"] = projected_sampler(denoise, M, meas_b, cfg, False)[0]
    print(f"\n{name}: {m_dim} measurements of {d} pixels, {N} chains "
          f"(Langevin {len(temps)} steps {t_lang:.1f} s, K&S {steps} steps {t_ks:.1f} s)")
    print(f"  {'sampler':<42} {'mean err':>9} {'cov err':>9} {'max|Mx-m|':>10}")
    results = {}
    for label, xs in runs.items():
        err_m, err_c = posterior_errors(xs, mean, cov)
        gap = float((xs.double() @ M.double().T - meas).abs().max())
        results[label] = (err_m, err_c, gap)
        print(f"  {label:<42} {err_m:9.3f} {err_c:9.3f} {gap:10.2e}")
    return dict(results=results, runs=runs, mean=mean, cov=cov, meas=meas)


def toy_experiment(cfg):
    """The default run: exact posteriors of a Gaussian prior for inpainting and 2x2 averaging."""
    n = cfg.TOY_SIZE
    torch.set_num_threads(1)  # 64-pixel images: threads cost more than they save here
    mu, S = gaussian_prior(cfg)
    truth = mu + torch.linalg.cholesky(S) @ torch.randn(n * n, dtype=S.dtype)  # one test image
    print(f"toy prior: N(0.5, S) over {n}x{n} images, S_ij = {cfg.TOY_STD}^2 exp(-r/{cfg.TOY_LENGTH})"
          f" + {cfg.TOY_NUGGET}^2 delta_ij; errors: mean ||m_hat-m||/sqrt(tr C), cov ||C_hat-C||_F/||C||_F")
    mask = named_mask("right", (1, n, n), 0.0, None)
    ops = {"inpainting (right half unknown)": (mask_operator(mask), mask),
           "2x2 block averages (super-resolution)": (block_average_operator((1, n, n), 2), None)}
    tasks = {name: toy_task(name, M, truth, mu, S, cfg, pixel_mask) for name, (M, pixel_mask) in ops.items()}
    plot_toy(tasks, truth, mask, cfg)
    return tasks


def plot_toy(tasks, truth, mask, cfg):
    import matplotlib.pyplot as plt
    n = cfg.TOY_SIZE
    lang, ks = "masked Langevin (MDSM), sigma0*sqrt(T)", "projected coarse-to-fine (K&S)"
    fig, axes = plt.subplots(len(tasks), 11, figsize=(19, 2.1 * len(tasks) + 0.6), layout="constrained")
    for row, (name, t) in enumerate(tasks.items()):
        runs = {k: v.detach().double().reshape(-1, n, n) for k, v in t["runs"].items()}
        M = block_average_operator((1, n, n), 2).double()  # row 1 shows the low-resolution M^T m
        observed = np.where(mask[0] > 0, np.nan, truth.view(n, n)) if row == 0 else (M.T @ t["meas"]).view(n, n)
        panels = [("observed (white: unknown)", observed), ("truth", truth.view(n, n)), ("exact mean", t["mean"].view(n, n)),
                  ("Langevin mean", runs[lang].mean(0)), ("K&S mean", runs[ks].mean(0)),
                  ("Langevin sample", runs[lang][0]), ("K&S sample", runs[ks][0]),
                  ("unconstrained sample", runs["unconstrained Langevin (ignores m)"][0]),
                  ("exact std", t["cov"].diagonal().clamp(min=0).sqrt().view(n, n)),
                  ("Langevin std", runs[lang].std(0)), ("K&S std", runs[ks].std(0))]
        handles = {}
        for col, (title, a) in enumerate(panels):
            ax, is_std = axes[row, col], "std" in title
            im = ax.imshow(np.asarray(a), cmap="magma" if is_std else "gray", vmin=0, vmax=1.25 * cfg.TOY_STD if is_std else 1)
            ax.set_xticks([0, n - 1]), ax.set_yticks([0, n - 1]), ax.tick_params(labelsize=7)
            ax.set_title(title, fontsize=9) if row == 0 else None
            handles[is_std] = im  # one image of each kind for the colour bars
        axes[row, 0].set_ylabel(name.split(" (")[0] + "\nrow (pixel)", fontsize=9)
        fig.colorbar(handles[False], ax=axes[row, :8], shrink=0.9, pad=0.01).set_label("pixel value", fontsize=8)
        fig.colorbar(handles[True], ax=axes[row, 8:], shrink=0.9, pad=0.01).set_label("posterior std", fontsize=8)
    fig.supxlabel("column (pixel)", fontsize=8)
    fig.suptitle("Posterior of a Gaussian prior: samplers vs the closed form (std maps on the right)", fontsize=10)
    path = os.path.join(cfg.OUT_DIR, "toy_gaussian.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    print(f"\nwrote {path}")


# ---- checkpoint mode: restore test images with a trained 03 energy ----
def psnr(a, b):
    """Peak signal-to-noise ratio in dB for images in [0, 1], averaged over images."""
    mse = ((a.clamp(0, 1) - b) ** 2).flatten(1).mean(1)
    return float((-10 * torch.log10(mse.clamp(min=1e-10))).mean())


def task_operator(task, shape, cfg, generator):
    """(M (m, d) with orthonormal rows, pixel mask (C, H, W) or None) for one task name."""
    c, h, w = shape
    if task in ("right", "centre", "random"):
        mask = named_mask(task, shape, cfg.RANDOM_KEEP, generator)
        return mask_operator(mask), mask
    if task in ("sr2", "sr4"):
        return block_average_operator(shape, int(task[2])), None
    # cs, compressive sensing: random orthonormal rows (QR of a Gaussian matrix)
    return torch.linalg.qr(torch.randn(c * h * w, int(cfg.CS_KEEP * c * h * w), generator=generator))[0].T, None


def restore(model, M, mask, truth, cfg, sigma0):
    """Posterior samples (B, C, H, W) for the images truth (B, C, H, W) measured by M."""
    sampler = load_numbered("04_langevin_sampling.py")  # 04's schedule and Tweedie denoiser, reused
    if mask is not None and cfg.MASK_SAMPLER == "langevin":
        mask = mask.expand_as(truth)
        known = truth * (1 - mask)  # the sampler only ever reads the known pixels of truth
        temps = sampler.mdsm_schedule(cfg.N_HOT, cfg.N_ANNEAL, cfg.N_COOL, cfg.T_MAX).to(truth.device)
        x = masked_langevin(lambda x, T: model(x), known, mask, temps, cfg.STEP_SIZE, sigma0, cfg.KNOWN_NOISE,
                            show_progress=True)  # a trained MDSM net: one E for every T
        # MDSM's final one-step denoise x - sigma0^2 grad E(x) (Tweedie at sigma0), generated pixels only
        return torch.where(mask > 0, sampler.tweedie_denoise(model, x, sigma0), known), len(temps)
    shape, m = truth.shape[1:], truth.flatten(1) @ M.T  # (B, m) measurements
    # D(y) = y - sigma0^2 grad E(y): a blind denoiser for every noise level MDSM was trained on
    denoise = lambda y: sampler.tweedie_denoise(model, y.view(-1, *shape), sigma0).flatten(1)  # noqa: E731
    y, steps = projected_sampler(denoise, M, m, cfg)
    return y.view_as(truth), steps


def checkpoint_experiment(cfg):
    mdsm = load_numbered("03_mdsm_train.py")  # 03's data loading, EnergyNet and checkpoints, reused
    device = pick_device(cfg.DEVICE)
    model, ckpt = mdsm.load_model(cfg.CKPT, device=device, use_ema=cfg.USE_EMA)
    model.requires_grad_(False)  # the samplers need grad_x E only
    conf = ckpt.get("config", {})
    sigma0 = float(conf.get("SIGMA0", cfg.SIGMA0))
    dataset, data_dir = cfg.DATASET or conf.get("DATASET", ""), cfg.DATA_DIR or conf.get("DATA_DIR", "data")
    if not dataset:
        raise SystemExit("error: the checkpoint names no DATASET; pass --dataset=cifar10 (or mnist, a .npz path)")
    size = int(conf.get("IMAGE_SIZE", 0))
    images = mdsm.images_to_float(mdsm.load_images(dataset, data_dir, "test", size))[:cfg.N_IMAGES]
    for what, have, key in (("channels", images.shape[1], "in_channels"), ("pixels wide", images.shape[-1], "image_size")):
        if have != model.model_args.get(key, have):
            raise SystemExit(f"error: {dataset} images have {have} {what} but the model was built for "
                             f"{model.model_args[key]}; pass the --dataset it was trained on")
    # the trivial baseline's fill: the mean training image (what a model with no structure would guess)
    mean_image = mdsm.images_to_float(mdsm.load_images(dataset, data_dir, "train", size)).mean(0).to(device)
    n, shape = images.shape[0], tuple(images.shape[1:])
    print(f"model: {cfg.CKPT} (step {ckpt.get('step', '?')}, sigma0 {sigma0}); {n} test images of "
          f"{dataset} {shape}, {cfg.N_SAMPLES} samples each, device {device}")
    g = torch.Generator().manual_seed(cfg.SEED)
    print(f"  {'task':<8} {'sampler':<10} {'measured':>9} {'PSNR mean':>10} {'PSNR 1 smp':>11} "
          f"{'0.5-fill':>9} {'mean-fill':>10} {'max|Mx-m|':>10} {'steps':>6} {'time':>7}")
    results = {}
    for task in cfg.TASKS.split(","):
        M, mask = task_operator(task, shape, cfg, g)
        M, mask = M.to(device), None if mask is None else mask.to(device)
        truth = images.to(device).repeat_interleave(cfg.N_SAMPLES, 0)  # (n*S, C, H, W)
        t0, parts = time.time(), []
        for i in range(0, len(truth), cfg.BATCH):
            x_hat, steps = restore(model, M, mask, truth[i:i + cfg.BATCH], cfg, sigma0)
            parts.append(x_hat.detach())
        samples = torch.cat(parts).view(n, cfg.N_SAMPLES, *shape)
        x = images.to(device)
        m = x.flatten(1) @ M.T
        # naive answers: the measurements put back (M^T m) plus (I - M^T M) fill, fill = 0.5 or the mean image
        fill = [torch.full_like(x.flatten(1), 0.5), mean_image.flatten().expand_as(x.flatten(1))]
        half, mean_fill = ((m @ M + f - (f @ M.T) @ M).view_as(x) for f in fill)
        gap = float((samples.flatten(2) @ M.T - m[:, None]).abs().max())
        results[task] = r = dict(psnr_mean=psnr(samples.mean(1), x), psnr_sample=psnr(samples[:, 0], x), gap=gap,
                                 psnr_half=psnr(half, x), psnr_mean_fill=psnr(mean_fill, x), seconds=time.time() - t0)
        print(f"  {task:<8} {cfg.MASK_SAMPLER if mask is not None else 'projected':<10} {M.shape[0]:>9} "
              f"{r['psnr_mean']:>10.2f} {r['psnr_sample']:>11.2f} {r['psnr_half']:>9.2f} {r['psnr_mean_fill']:>10.2f} "
              f"{gap:>10.2e} {steps:>6} {r['seconds']:>6.0f}s", flush=True)
        rows = torch.cat([half[:, None], mean_fill[:, None], samples, samples.mean(1, keepdim=True), x[:, None]], 1)
        save_image_grid(rows.flatten(0, 1).cpu(), os.path.join(cfg.OUT_DIR, f"{task}.png"), nrow=cfg.N_SAMPLES + 4)
    print(f"grids in {cfg.OUT_DIR}/<task>.png; rows: 0.5-fill, mean-fill, {cfg.N_SAMPLES} samples, their mean, truth")
    return results


def check_config(cfg):
    """Every knob checked before any work (issue 16): one line naming the knob and what is allowed."""
    positive = ("TOY_LENGTH", "TOY_STD", "TOY_STEP_SIZE", "SIGMA0", "T_MAX", "STEP_SIZE", "KS_SIGMA_START", "KS_SIGMA_END")
    rules = [(k, getattr(cfg, k) > 0, "a number > 0") for k in positive]
    rules += [(k, getattr(cfg, k) >= 0, "an integer >= 0") for k in ("N_HOT", "N_ANNEAL", "N_COOL")]
    rules += [(k, getattr(cfg, k) >= 1, "an integer >= 1") for k in ("KS_MAX_STEPS", "N_IMAGES", "N_SAMPLES", "BATCH")]
    rules += [("TOY_SIZE", cfg.TOY_SIZE >= 4 and cfg.TOY_SIZE % 2 == 0, "an even integer >= 4"),
              ("TOY_CHAINS", cfg.TOY_CHAINS >= 2, "an integer >= 2"), ("TOY_NUGGET", cfg.TOY_NUGGET >= 0, "a number >= 0"),
              ("N_COOL", cfg.N_HOT + cfg.N_ANNEAL + cfg.N_COOL >= 1, "n_hot + n_anneal + n_cool >= 1"),
              ("KS_H0", 0 < cfg.KS_H0 <= 1, "0 < ks_h0 <= 1"), ("KS_BETA", 0 < cfg.KS_BETA <= 1, "0 < ks_beta <= 1"),
              ("RANDOM_KEEP", 0 < cfg.RANDOM_KEEP < 1, "0 < random_keep < 1"),
              ("CS_KEEP", 0 < cfg.CS_KEEP <= 1, "0 < cs_keep <= 1"),
              ("KNOWN_NOISE", cfg.KNOWN_NOISE in ("sqrt", "quarter"), "sqrt or quarter"),
              ("MASK_SAMPLER", cfg.MASK_SAMPLER in ("langevin", "projected"), "langevin or projected"),
              ("TASKS", all(t in ALL_TASKS for t in cfg.TASKS.split(",")), "a comma list of " + ", ".join(ALL_TASKS))]
    for knob, ok, allowed in rules:
        if not ok:
            raise SystemExit(f"error: --{knob.lower()}={getattr(cfg, knob)} is not allowed; allowed: {allowed}")
    try:  # the out folder must take files before any sampling time is spent
        os.makedirs(cfg.OUT_DIR, exist_ok=True)
        tempfile.TemporaryFile(dir=cfg.OUT_DIR).close()
    except OSError as e:
        raise SystemExit(f"error: --out_dir={cfg.OUT_DIR} is not writable ({e.strerror}); pass a folder you can write")


def main(argv=None):
    cfg = parse_config(globals(), argv)
    check_config(cfg)
    set_seed(cfg.SEED)
    if not cfg.CKPT:
        return toy_experiment(cfg)
    return checkpoint_experiment(cfg)


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
