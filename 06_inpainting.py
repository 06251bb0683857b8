"""06 - Inpainting and other linear inverse problems, sampled with a learned energy as the prior.

Given measurements m = M x of an image x (M: a pixel mask, 2x2 block averages, random
projections), sample the posterior p(x | M x = m) using only the prior that 03's energy E(x)
learned. Two samplers, both tested here against exact posteriors:

  1. Masked annealed Langevin (Li, Chen & Sommer, arXiv 1910.07762, the inpainting experiment, as
     in the authors' code). Only the unknown pixels (mask = 1) move,
       x <- x - 0.5 s^2 grad E(x) * mask + sqrt(T) s xi * mask,   T annealed from 100 to 0,
     and before each energy evaluation the known pixels get fresh noise, x_known + std(T) z, with
     std = sigma0 sqrt(T), the level at which exp(-E/T) matches the data smoothed by
     N(0, sigma^2 I) at the MDSM optimum (--known_noise=sqrt), or the authors' 0.1 T^(1/4)
     (--known_noise=quarter).
     With --ckpt it ends with one Tweedie denoise of the unknown pixels (--final_denoise; the
     authors' masked sampler has none).
  2. Kadkhodaie & Simoncelli's stochastic coarse-to-fine ascent projected onto M x = m (NeurIPS
     2021, Alg. 2). It needs only a blind denoiser, and MDSM gives one at every noise level:
       D(y) = y - sigma0^2 grad E(y)   (Tweedie; sigma0^2 grad E = x~ - E[x | x~] at the optimum).

With no arguments both run on a Gaussian prior over 8x8 images, where p(x | M x = m) is a closed
form, for inpainting and for 2x2 block averaging, beside exact draws (the Monte Carlo floor) and
samplers that ignore m. With --ckpt they restore test images with a model trained by 03.

Run:  python 06_inpainting.py                                   # CPU: the exact Gaussian checks
      python 06_inpainting.py --ckpt=out/03_mdsm_train/ckpt.pt  # restore test images (GPU)
      python 06_inpainting.py --ckpt=out/mnist16/ckpt.pt --tasks=right,centre,random,sr2,sr4
      python 06_inpainting.py --help                            # every knob and its meaning
Expected (seed 0): posterior-mean errors 0.05-0.2 (exact draws 0.04, samplers ignoring m 2-2.9).
Output in out/06_inpainting/: toy_gaussian.png; with --ckpt a grid per task and a PSNR table.
"""

import importlib
import math
import os
import sys
import tempfile
import time
import types

import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import torch

# ---- config: every knob can be overridden with --key=value (see --help) ----
SEED = 0  # random seed for the toy, the masks and the samplers
DEVICE = "auto"  # auto | cpu | cuda | cuda:N | mps, for --ckpt runs (the toy runs on the cpu)
OUT_DIR = "out/06_inpainting"  # where figures and grids go
CKPT = ""  # path to a checkpoint of 03; empty = run the exact Gaussian checks only
USE_EMA = False  # --ckpt: sample with the checkpoint's EMA weights (it must have them)
# -- the Gaussian toy (exact posteriors; without --ckpt only) --
TOY_SIZE = 8  # toy images are TOY_SIZE x TOY_SIZE, one channel (even, 4 to 32)
TOY_LENGTH = 3.0  # correlation length of the prior's covariance, in pixels
TOY_STD = 0.2  # pixel standard deviation of the toy prior (mean 0.5), in (0, 1]
TOY_NUGGET = 0.02  # independent pixel noise std added to the covariance (keeps it invertible)
TOY_CHAINS = 500  # parallel chains per sampler; Monte Carlo error ~ 1/sqrt(TOY_CHAINS)
TOY_STEP_SIZE = 0.05  # a second masked Langevin run with this step (faster mixing)
# -- masked annealed Langevin (MDSM's schedule: 2700 steps by default) --
SIGMA0 = 0.1  # MDSM's small noise scale, in (0, 1] (with --ckpt: the checkpoint's own)
N_HOT = 500  # steps at T = T_MAX
N_ANNEAL = 2000  # steps of geometric cooling T_MAX -> 1
N_COOL = 200  # steps of linear cooling 1 -> 0
T_MAX = 100.0  # starting temperature, >= 1 (noise sigma0 * sqrt(T_MAX) = 1.0)
STEP_SIZE = 0.02  # Langevin step s in x <- x - 0.5 s^2 grad E + sqrt(T) s xi, below 2 * sigma0
KNOWN_NOISE = "sqrt"  # known pixels' noise: sqrt = sigma0*sqrt(T) | quarter = authors' 0.1*T^(1/4)
FINAL_DENOISE = True  # --ckpt: end with x - sigma0^2 grad E(x) on unknown pixels (authors': none)
# -- projected coarse-to-fine sampler (Kadkhodaie & Simoncelli) --
KS_SIGMA_START = 1.0  # std of the initial image y0 ~ N(0.5, KS_SIGMA_START^2 I)
KS_SIGMA_END = 0.01  # stop when the estimated noise level falls below this (< KS_SIGMA_START)
KS_H0 = 0.01  # initial step h0 in (0, 1]; h_k = h0 k / (1 + h0 (k - 1)) grows to 1
KS_BETA = 0.01  # noise injection in (0, 1]: 1 = none (deterministic ascent), small = much
KS_MAX_STEPS = 3000  # safety cap on iterations
# -- checkpoint mode (with --ckpt only) --
DATASET = ""  # images to restore; empty = the checkpoint's own DATASET
DATA_DIR = ""  # folder of the datasets; empty = the checkpoint's own DATA_DIR
N_IMAGES = 8  # test images per task
N_SAMPLES = 4  # posterior samples per image (their mean is the estimate)
TASKS = "right,centre,random,sr2,sr4,cs"  # comma list of: right, centre, random, sr2, sr4, cs
RANDOM_KEEP = 0.3  # fraction of pixels observed for the 'random' mask, in (0, 1)
CS_KEEP = 0.25  # measurements / pixels for compressive sensing ('cs'), in (0, 1]
MASK_SAMPLER = "langevin"  # sampler for the pixel masks: langevin (MDSM) | projected (K&S)
BATCH = 64  # images per sampler call (memory knob)

# 03's trained energy: its network, checkpoints and the images it was trained on.
mdsm = importlib.import_module("03_mdsm_train")
# 04's MDSM sampler: its temperature schedule, Langevin step and Tweedie denoiser.
langevin = importlib.import_module("04_langevin_sampling")

ALL_TASKS = ("right", "centre", "random", "sr2", "sr4", "cs")


# ---- measurement operators: m = M x, M (m, d) with orthonormal rows, so M^+ = M^T ----
def mask_operator(mask):
    """Pixel mask (C, H, W), 1 = unknown, 0 = observed -> M (m, d): the rows of I reading the
    observed pixels."""
    keep = (mask.flatten() == 0).nonzero().squeeze(1)
    return torch.eye(mask.numel())[keep]  # (m, d)


def block_average_operator(shape, factor):
    """Super-resolution: each row averages a factor x factor block of one channel with entries
    1/factor, so that M M^T = I; m = factor * block means, and M^T m repeats them over the block
    (nearest neighbour)."""
    c, h, w = shape
    idx = torch.arange(c * h * w).view(c, h // factor, factor, w // factor, factor)
    rows = idx.permute(0, 1, 3, 2, 4).reshape(-1, factor * factor)  # (m, factor^2) pixel indices
    return torch.zeros(rows.shape[0], c * h * w).scatter_(1, rows, 1.0 / factor)  # (m, d)


def named_mask(kind, shape, keep, generator):
    """right half unknown | centre rectangle of half the sides | random: each pixel observed with
    probability keep. (C, H, W), the same in every channel."""
    c, h, w = shape
    mask = torch.zeros(1, h, w)
    if kind == "right":
        mask[:, :, w // 2 :] = 1
    elif kind == "centre":
        mask[:, h // 4 : h - h // 4, w // 4 : w - w // 4] = 1
    else:  # random
        mask = (torch.rand(1, h, w, generator=generator) > keep).float()
    return mask.expand(c, h, w).contiguous()


def task_operator(task, shape, cfg, generator):
    """(M (m, d) with orthonormal rows, pixel mask (C, H, W) or None) for one task name."""
    c, h, w = shape
    if task in ("right", "centre", "random"):
        mask = named_mask(task, shape, cfg.RANDOM_KEEP, generator)
        return mask_operator(mask), mask
    if task in ("sr2", "sr4"):
        return block_average_operator(shape, int(task[2])), None
    # cs, compressive sensing: random orthonormal rows (QR of a Gaussian matrix)
    gaussian = torch.randn(c * h * w, cs_measurements(cfg, shape), generator=generator)
    return torch.linalg.qr(gaussian)[0].T, None


def cs_measurements(cfg, shape):
    """Number of random projections for the 'cs' task."""
    return int(cfg.CS_KEEP * math.prod(shape))


def orthogonal_completion(M):
    """Q (d, d) orthogonal with first rows M: in z = Q x the measurements are the first m
    coordinates, so any M becomes a pixel mask on z."""
    m, d = M.shape
    q, _ = torch.linalg.qr(torch.cat([M.T, torch.randn(d, d - m, dtype=M.dtype)], 1))
    q = q.T.contiguous()
    q[:m] = M  # QR may flip the signs of the first columns; put M back exactly
    return q


# ---- the two samplers ----
def masked_langevin(energy_fn, x_known, mask, temperatures, step_size, sigma0, rule="sqrt"):
    """MDSM inpainting: annealed Langevin in which only the pixels with mask = 1 move.
    energy_fn(x, T) -> (B,) (a trained MDSM net ignores T); x_known (B, ...) holds the known pixels
    (mask = 0); a mask of ones is the unconstrained sampler. Returns x with the known pixels exactly
    x_known."""
    # MDSM's init 0.5 + N(0, I) on the unknown pixels
    x = torch.where(mask > 0, 0.5 + torch.randn_like(x_known), x_known)
    t_start = time.time()
    for k, T in enumerate(temperatures):  # T: a 0-dim tensor (on the model's device)
        # known pixels: x_known + std z, fresh z, std = sigma0 sqrt(T) (or the authors' 0.1 T^(1/4))
        if rule == "quarter":
            std = 0.1 * T.clamp(min=0) ** 0.25
        else:
            std = sigma0 * T.clamp(min=0) ** 0.5
        x = mask * x + (1 - mask) * (x_known + std * torch.randn_like(x))
        grad = langevin.grad_energy(lambda z: energy_fn(z, T), x)  # grad_x E, like x
        # x <- x - 0.5 s^2 grad E(x) * mask + sqrt(T) s xi * mask
        x = langevin.langevin_step(x, grad * mask, T, step_size, torch.randn_like(x) * mask)
        progress(k + 1, len(temperatures), t_start, "Langevin steps")
    return mask * x + (1 - mask) * x_known


def projected_sampler(denoise, M, m, cfg, constrained=True):
    """Kadkhodaie & Simoncelli's stochastic coarse-to-fine ascent (Alg. 2) projected onto M x = m:
    denoise (B, d) -> (B, d), M (m, d) with orthonormal rows, m (B, m). Returns (B, d) with
    M x = m exactly, and the number of steps."""
    B, d = m.shape[0], M.shape[1]
    # y_0 ~ N(0.5, sigma_start^2 I)
    y = 0.5 + cfg.KS_SIGMA_START * torch.randn(B, d, device=M.device)
    active = torch.ones(B, 1, dtype=torch.bool, device=M.device)
    for k in range(1, cfg.KS_MAX_STEPS + 1):
        # f(y) = D(y) - y, the denoiser residual (a scaled score)
        f = denoise(y) - y
        if constrained:
            # d_k = (I - M^T M) f(y_k) + M^T (m - M y_k)
            f = f - (f @ M.T) @ M + (m - y @ M.T) @ M
        # sigma_k = ||d_k|| / sqrt(N), the noise level left in y_k
        sigma = f.norm(dim=1, keepdim=True) / math.sqrt(d)
        active = active & (sigma > cfg.KS_SIGMA_END)
        if not active.any():
            break
        # h_k = h0 k / (1 + h0 (k - 1))
        h = cfg.KS_H0 * k / (1 + cfg.KS_H0 * (k - 1))
        # gamma_k = sigma_k sqrt((1 - beta h_k)^2 - (1 - h_k)^2): the noise shrinks by 1 - beta h_k
        gamma = sigma * math.sqrt((1 - cfg.KS_BETA * h) ** 2 - (1 - h) ** 2)
        # y_k+1 = y_k + h_k d_k + gamma_k z
        y = torch.where(active, y + h * f + gamma * torch.randn_like(y), y)
    if constrained:
        y = y - (y @ M.T) @ M + m @ M  # the measured components = m exactly
    return y, k


# ---- the Gaussian toy: prior N(mu, S) over TOY_SIZE x TOY_SIZE images, every answer exact ----
def gaussian_prior(cfg):
    """S_ij = v exp(-|p_i - p_j| / l) + nugget^2 delta_ij: an exponential kernel, rough enough that
    a missing pixel is predicted by its observed neighbours, not by derivatives that no noisy
    sampler reads. Returns mu (d,), S (d, d) in float64."""
    n = cfg.TOY_SIZE
    yy, xx = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    p = torch.stack([yy.flatten(), xx.flatten()], 1).double()  # (d, 2) pixel coordinates
    kernel = torch.exp(-torch.cdist(p, p) / cfg.TOY_LENGTH)
    S = cfg.TOY_STD**2 * kernel + cfg.TOY_NUGGET**2 * torch.eye(n * n)
    return torch.full((n * n,), 0.5, dtype=torch.float64), S


def gaussian_posterior(mu, S, M, m):
    """p(x | M x = m) for x ~ N(mu, S), noise-free measurements:
    mean mu + S M^T (M S M^T)^-1 (m - M mu), covariance S - S M^T (M S M^T)^-1 M S."""
    SMt = S @ M.T  # (d, m)
    gain = torch.linalg.solve(M @ SMt, SMt.T).T  # (d, m) = S M^T (M S M^T)^-1
    return mu + gain @ (m - M @ mu), S - gain @ SMt.T


def gaussian_mdsm_energy(x, T, mu, eig, sigma0):
    """The ideal MDSM energy at temperature T for data N(mu, S), x (B, ...) -> (B,), with
    sigma = sigma0 sqrt(T) and eig = (lam, U) = torch.linalg.eigh(S) in float32:
    E_T(x) = T (-log q_sigma(x)) = (T/2) (x - mu)^T (S + sigma^2 I)^-1 (x - mu) + const,
    so that sigma0^2 grad E_T = x - D(x) (Tweedie)."""
    lam, U = eig
    u = (x.reshape(x.shape[0], -1) - mu.float()) @ U  # (B, d) coordinates in S's eigenbasis
    return 0.5 * (u * u * (float(T) / (lam + sigma0**2 * float(T)))).sum(1)


def gaussian_blind_denoise(y, mu, S):
    """D(y) = E[x | y] for an unknown noise level, y (B, d) -> (B, d): sigma^2 by maximum
    likelihood under y ~ N(mu, S + sigma^2 I) (bisection on log sigma^2), then
    mu + S (S + sigma^2 I)^-1 (y - mu). The denoiser reads the noise level off y."""
    lam, U = (t.float() for t in torch.linalg.eigh(S))
    u = (y - mu.float()) @ U  # (B, d) coordinates in S's eigenbasis
    lo = torch.full((y.shape[0], 1), -20.0)
    hi = torch.full((y.shape[0], 1), 5.0)
    for _ in range(40):
        # d/ds2 log N(y; mu, S + s2 I) = 0.5 sum(u^2 / (lam + s2)^2 - 1 / (lam + s2)), decreasing
        mid = (lo + hi) / 2
        v = lam + mid.exp()
        up = ((u * u / v - 1) / v).sum(1, keepdim=True) > 0
        lo = torch.where(up, mid, lo)
        hi = torch.where(up, hi, mid)
    shrink = lam / (lam + ((lo + hi) / 2).exp())  # (B, d) Wiener gain per eigendirection
    return mu.float() + (u * shrink) @ U.T


def posterior_errors(samples, mean, cov):
    """(||mean_hat - mean|| / sqrt(tr C), ||C_hat - C||_F / ||C||_F): samples vs the exact
    posterior N(mean, C)."""
    x = samples.double().reshape(samples.shape[0], -1)  # (N, d)
    err_mean = (x.mean(0) - mean).norm() / cov.trace().sqrt()
    err_cov = (torch.cov(x.T) - cov).norm() / cov.norm()
    return float(err_mean), float(err_cov)


# ---- the default run: every sampler against the closed-form posterior ----
def toy_task(name, M, truth, mu, S, cfg, mask=None):
    """Sample p(x | M x = m) several ways (and by exact draws) and compare with the closed form.
    M: (m, d) with orthonormal rows; mask: the pixel mask when M reads pixels."""
    N, (m_dim, d) = cfg.TOY_CHAINS, M.shape
    meas = M.double() @ truth  # (m,) noise-free measurements
    mean, cov = gaussian_posterior(mu, S, M.double(), meas)
    # any orthonormal M becomes a pixel mask after the rotation z = Q x (Q = I for a pixel mask)
    if mask is not None:
        Q = torch.eye(d)
        mask_z = mask.flatten()
    else:
        Q = orthogonal_completion(M)  # (d, d)
        mask_z = torch.cat([torch.zeros(m_dim), torch.ones(d - m_dim)])
    known = (Q @ truth.float()) * (1 - mask_z)  # (d,) the measured coordinates of z, 0 elsewhere
    eig = tuple(t.float() for t in torch.linalg.eigh(S))  # (lam (d,), U (d, d))
    temps = langevin.mdsm_schedule(cfg.N_HOT, cfg.N_ANNEAL, cfg.N_COOL, cfg.T_MAX)

    def energy_z(z, T):  # the toy's energy of the image x = z Q
        return gaussian_mdsm_energy(z @ Q, T, mu, eig, cfg.SIGMA0)

    def run_langevin(mask_run, rule, step_size, knob):  # chains in z, returned as images x
        z = masked_langevin(
            energy_z, known.expand(N, d), mask_run, temps, step_size, cfg.SIGMA0, rule
        )
        stop_if_not_finite(z, "masked Langevin", f"--{knob}={step_size}")
        return z @ Q

    def denoise(y):
        return gaussian_blind_denoise(y, mu, S)

    def run_projected(constrained):
        y, steps = projected_sampler(denoise, M, meas_b, cfg, constrained)
        stop_if_not_finite(y, "the projected sampler", f"--ks_sigma_start={cfg.KS_SIGMA_START}")
        return y, steps

    meas_b = meas.float().expand(N, m_dim)
    L = torch.linalg.cholesky(cov + 1e-10 * torch.eye(d, dtype=cov.dtype))
    runs = {"exact draws (Monte Carlo floor)": mean + torch.randn(N, d, dtype=cov.dtype) @ L.T}
    t0 = time.time()
    runs["masked Langevin (MDSM), sigma0*sqrt(T)"] = run_langevin(
        mask_z, "sqrt", cfg.STEP_SIZE, "step_size"
    )
    t_lang = time.time() - t0
    runs["masked Langevin, authors' 0.1*T^(1/4)"] = run_langevin(
        mask_z, "quarter", cfg.STEP_SIZE, "step_size"
    )
    runs[f"masked Langevin, step {cfg.TOY_STEP_SIZE} (not {cfg.STEP_SIZE})"] = run_langevin(
        mask_z, "sqrt", cfg.TOY_STEP_SIZE, "toy_step_size"
    )
    t0 = time.time()
    runs["projected coarse-to-fine (K&S)"], steps = run_projected(True)
    t_ks = time.time() - t0
    runs["unconstrained Langevin (ignores m)"] = run_langevin(
        torch.ones(d), "sqrt", cfg.STEP_SIZE, "step_size"
    )
    runs["unconstrained coarse-to-fine"] = run_projected(False)[0]
    print(
        f"\n{name}: {m_dim} measurements of {d} pixels, {N} chains "
        f"(Langevin {len(temps)} steps {t_lang:.1f} s, K&S {steps} steps {t_ks:.1f} s)"
    )
    print(f"  {'sampler':<42} {'mean err':>9} {'cov err':>9} {'max|Mx-m|':>10}")
    results = {}
    for label, xs in runs.items():
        err_m, err_c = posterior_errors(xs, mean, cov)
        gap = float((xs.double() @ M.double().T - meas).abs().max())  # max |M x - m|
        results[label] = (err_m, err_c, gap)
        print(f"  {label:<42} {err_m:9.3f} {err_c:9.3f} {gap:10.2e}")
    return dict(results=results, runs=runs, mean=mean, cov=cov, meas=meas)


def toy_experiment(cfg):
    """The default run: exact posteriors of a Gaussian prior for inpainting and 2x2 averaging."""
    n = cfg.TOY_SIZE
    torch.set_num_threads(1)  # 64-pixel images: threads cost more than they save
    mu, S = gaussian_prior(cfg)
    truth = mu + torch.linalg.cholesky(S) @ torch.randn(n * n, dtype=S.dtype)  # one test image
    print(
        f"toy prior: N(0.5, S) over {n}x{n} images, S_ij = {cfg.TOY_STD}^2 exp(-r/{cfg.TOY_LENGTH})"
        f" + {cfg.TOY_NUGGET}^2 delta_ij; errors: mean ||m_hat-m||/sqrt(tr C), "
        f"cov ||C_hat-C||_F/||C||_F"
    )
    mask = named_mask("right", (1, n, n), 0.0, None)
    operators = {
        "inpainting (right half unknown)": (mask_operator(mask), mask),
        "2x2 block averages (super-resolution)": (block_average_operator((1, n, n), 2), None),
    }
    tasks = {}
    for name, (M, pixel_mask) in operators.items():
        tasks[name] = toy_task(name, M, truth, mu, S, cfg, pixel_mask)
    path = os.path.join(cfg.OUT_DIR, "toy_gaussian.png")
    plot_toy(tasks, truth, mask, cfg, path)
    print(f"\nwrote {path}")
    return tasks


# ---- with --ckpt: restore test images with a trained 03 energy ----
def psnr(a, b):
    """Peak signal-to-noise ratio in dB for images in [0, 1] (a clamped first), averaged over
    images: -10 log10 MSE."""
    mse = ((a.clamp(0, 1) - b) ** 2).flatten(1).mean(1)
    return float((-10 * torch.log10(mse.clamp(min=1e-10))).mean())


def restore(model, M, mask, truth, cfg, sigma0):
    """Posterior samples (B, C, H, W) for the images truth (B, C, H, W) measured by M, and the
    number of sampler steps. A pixel mask with MASK_SAMPLER=langevin: masked annealed Langevin,
    then (FINAL_DENOISE) one Tweedie denoise of the unknown pixels; otherwise the projected sampler
    with the blind denoiser D(y) = y - sigma0^2 grad E(y)."""
    if mask is not None and cfg.MASK_SAMPLER == "langevin":
        mask = mask.expand_as(truth)
        known = truth * (1 - mask)  # the sampler only ever reads the known pixels of truth
        temps = langevin.mdsm_schedule(cfg.N_HOT, cfg.N_ANNEAL, cfg.N_COOL, cfg.T_MAX)
        temps = temps.to(truth.device)

        def energy(x, T):  # a trained MDSM net: one E for every temperature
            return model(x)

        x = masked_langevin(energy, known, mask, temps, cfg.STEP_SIZE, sigma0, cfg.KNOWN_NOISE)
        if cfg.FINAL_DENOISE:
            # x <- x - sigma0^2 grad E(x) (Tweedie at sigma0), on the generated pixels only
            x = torch.where(mask > 0, langevin.tweedie_denoise(model, x, sigma0), known)
        return x, len(temps)
    shape = truth.shape[1:]
    m = truth.flatten(1) @ M.T  # (B, m) measurements

    def denoise(y):  # D(y) = y - sigma0^2 grad E(y): blind, for every level MDSM trained on
        return langevin.tweedie_denoise(model, y.view(-1, *shape), sigma0).flatten(1)

    y, steps = projected_sampler(denoise, M, m, cfg)
    return y.view_as(truth), steps


def naive_fills(x, M, mean_image):
    """The trivial answers: the measurements put back, M^T m, plus (I - M^T M) fill, with fill =
    0.5 or the mean training image (what a model with no structure would guess)."""
    flat = x.flatten(1)  # (n, d)
    m = flat @ M.T
    fills = []
    for fill in (torch.full_like(flat, 0.5), mean_image.flatten().expand_as(flat)):
        fills.append((m @ M + fill - (fill @ M.T) @ M).view_as(x))
    return fills


def checkpoint_experiment(cfg):
    """Restore N_IMAGES test images per task; PSNR of the posterior mean and of one sample,
    beside the trivial fills."""
    device = pick_device(cfg.DEVICE)
    model, ckpt = load_energy(cfg, device)
    sigma0 = float(ckpt.get("config", {}).get("SIGMA0", cfg.SIGMA0))
    shape = model_image_shape(model)  # (C, H, W)
    check_checkpoint_knobs(cfg, ckpt, sigma0, shape)
    images, mean_image, dataset = load_test_images(cfg, ckpt, shape)
    n = images.shape[0]
    print(
        f"model: {cfg.CKPT} (step {ckpt.get('step', '?')}, sigma0 {sigma0}); {n} test images of "
        f"{dataset} {shape}, {cfg.N_SAMPLES} samples each, device {device}"
    )
    g = torch.Generator().manual_seed(cfg.SEED)  # the masks and the cs projections
    print(
        f"  {'task':<8} {'sampler':<10} {'measured':>9} {'PSNR mean':>10} {'PSNR 1 smp':>11} "
        f"{'0.5-fill':>9} {'mean-fill':>10} {'max|Mx-m|':>10} {'steps':>6} {'time':>7}"
    )
    x = images.to(device)
    mean_image = mean_image.to(device)
    results = {}
    for task in cfg.TASKS.split(","):
        M, mask = task_operator(task, shape, cfg, g)
        M = M.to(device)
        if mask is not None:
            mask = mask.to(device)
        truth = x.repeat_interleave(cfg.N_SAMPLES, 0)  # (n * N_SAMPLES, C, H, W)
        t0 = time.time()
        parts = []
        for i in range(0, len(truth), cfg.BATCH):
            x_hat, steps = restore(model, M, mask, truth[i : i + cfg.BATCH], cfg, sigma0)
            parts.append(x_hat.detach())
        samples = torch.cat(parts).view(n, cfg.N_SAMPLES, *shape)
        sampler = cfg.MASK_SAMPLER if mask is not None else "projected"
        stop_if_not_finite(
            samples, f"the {sampler} sampler on task {task}", sampler_knob(cfg, sampler)
        )
        half, mean_fill = naive_fills(x, M, mean_image)
        # max |M x - m| over all samples: 0 for pixel masks, float rounding otherwise
        gap = float((samples.flatten(2) @ M.T - (x.flatten(1) @ M.T)[:, None]).abs().max())
        results[task] = r = dict(
            psnr_mean=psnr(samples.mean(1), x),
            psnr_sample=psnr(samples[:, 0], x),
            psnr_half=psnr(half, x),
            psnr_mean_fill=psnr(mean_fill, x),
            gap=gap,
            seconds=time.time() - t0,
        )
        print(
            f"  {task:<8} {sampler:<10} {M.shape[0]:>9} {r['psnr_mean']:>10.2f} "
            f"{r['psnr_sample']:>11.2f} {r['psnr_half']:>9.2f} {r['psnr_mean_fill']:>10.2f} "
            f"{gap:>10.2e} {steps:>6} {r['seconds']:>6.0f}s",
            flush=True,
        )
        columns = [half[:, None], mean_fill[:, None], samples, samples.mean(1, keepdim=True)]
        rows = torch.cat([*columns, x[:, None]], 1)  # (n, N_SAMPLES + 4, C, H, W)
        grid_path = os.path.join(cfg.OUT_DIR, f"{task}.png")
        save_image_grid(rows.flatten(0, 1).cpu(), grid_path, nrow=cfg.N_SAMPLES + 4)
    print(
        f"grids in {cfg.OUT_DIR}/<task>.png; rows: 0.5-fill, mean-fill, "
        f"{cfg.N_SAMPLES} samples, their mean, truth"
    )
    return results


def main(argv=None):
    cfg = parse_config(globals(), argv)
    check_config(cfg)
    torch.manual_seed(cfg.SEED)
    if not cfg.CKPT:
        return toy_experiment(cfg)
    return checkpoint_experiment(cfg)


# ==== plumbing: nothing below this line is about the method ====
def refuse(cfg, knob, allowed):
    """One line naming the knob, its value and what is allowed."""
    value = getattr(cfg, knob)
    raise SystemExit(f"error: --{knob.lower()}={value} is not allowed; allowed: {allowed}")


def stop_if_not_finite(x, what, knob):
    """A sampler that diverged stops the run with one line, instead of printing nan results."""
    if not torch.isfinite(x).all():
        raise SystemExit(f"error: {what} diverged (non-finite pixels); lower {knob}")


def sampler_knob(cfg, sampler):
    """The knob to lower when a sampler diverges."""
    if sampler == "langevin":
        return f"--step_size={cfg.STEP_SIZE}"
    return f"--ks_sigma_start={cfg.KS_SIGMA_START} or --ks_h0={cfg.KS_H0}"


# knobs that only one of the two modes reads: passing one to the other mode is an error
TOY_ONLY = ("TOY_SIZE", "TOY_LENGTH", "TOY_STD", "TOY_NUGGET", "TOY_CHAINS", "TOY_STEP_SIZE")
CKPT_ONLY = (
    *("USE_EMA", "FINAL_DENOISE", "DATASET", "DATA_DIR", "N_IMAGES", "N_SAMPLES", "TASKS"),
    *("RANDOM_KEEP", "CS_KEEP", "MASK_SAMPLER", "BATCH"),
)


def check_config(cfg):
    """Every knob in its range (related knobs together), the toy's memory and a writable --out_dir,
    before any work; one line names the first bad knob."""
    defaults = globals()
    if cfg.CKPT:
        wrong_mode = [k for k in TOY_ONLY if getattr(cfg, k) != defaults[k]]
        if wrong_mode:
            refuse(cfg, wrong_mode[0], "only without --ckpt (the Gaussian toy's knobs)")
    else:
        wrong_mode = [k for k in CKPT_ONLY if getattr(cfg, k) != defaults[k]]
        if wrong_mode:
            refuse(cfg, wrong_mode[0], "only with --ckpt (the default run restores no images)")
    if cfg.SEED < 0:
        refuse(cfg, "SEED", "an integer >= 0")
    if cfg.TOY_SIZE % 2 or not 4 <= cfg.TOY_SIZE <= 32:
        refuse(
            cfg, "TOY_SIZE", "an even integer from 4 to 32 (exact posteriors use d x d matrices)"
        )
    if not 0 < cfg.TOY_LENGTH <= 1e3:
        refuse(cfg, "TOY_LENGTH", "a length in pixels in (0, 1000]")
    if not 0 < cfg.TOY_STD <= 1:
        refuse(cfg, "TOY_STD", "a pixel standard deviation in (0, 1] (pixels are in [0, 1])")
    if not 0 <= cfg.TOY_NUGGET <= 1:
        refuse(cfg, "TOY_NUGGET", "a standard deviation in [0, 1]")
    if cfg.TOY_CHAINS < 2:
        refuse(cfg, "TOY_CHAINS", "an integer >= 2")
    if not 0 < cfg.SIGMA0 <= 1:
        refuse(cfg, "SIGMA0", "a noise level in (0, 1] (pixels are in [0, 1]; MDSM: 0.1)")
    for knob in ("N_HOT", "N_ANNEAL", "N_COOL"):
        if getattr(cfg, knob) < 0:
            refuse(cfg, knob, "an integer >= 0")
    if cfg.N_HOT + cfg.N_ANNEAL + cfg.N_COOL < 1:
        refuse(cfg, "N_COOL", "n_hot + n_anneal + n_cool >= 1")
    if not cfg.CKPT:  # with --ckpt, against the checkpoint's sigma0
        check_step_size(cfg, cfg.SIGMA0, ("STEP_SIZE", "TOY_STEP_SIZE"))
        check_start_noise(cfg, cfg.SIGMA0)
    if cfg.KNOWN_NOISE not in ("sqrt", "quarter"):
        refuse(cfg, "KNOWN_NOISE", "sqrt or quarter")
    if cfg.KS_SIGMA_END <= 0:
        refuse(cfg, "KS_SIGMA_END", "a noise level > 0")
    if not cfg.KS_SIGMA_END < cfg.KS_SIGMA_START <= 10:  # pixels are in [0, 1]
        allowed = f"a noise level above --ks_sigma_end={cfg.KS_SIGMA_END}, at most 10"
        refuse(cfg, "KS_SIGMA_START", allowed)
    if not 0 < cfg.KS_H0 <= 1:
        refuse(cfg, "KS_H0", "0 < ks_h0 <= 1")
    if not 0 < cfg.KS_BETA <= 1:
        refuse(cfg, "KS_BETA", "0 < ks_beta <= 1")
    for knob in ("KS_MAX_STEPS", "N_IMAGES", "N_SAMPLES", "BATCH"):
        if getattr(cfg, knob) < 1:
            refuse(cfg, knob, "an integer >= 1")
    if not all(task in ALL_TASKS for task in cfg.TASKS.split(",")):
        refuse(cfg, "TASKS", "a comma list of " + ", ".join(ALL_TASKS))
    if not 0 < cfg.RANDOM_KEEP < 1:
        refuse(cfg, "RANDOM_KEEP", "0 < random_keep < 1")
    if not 0 < cfg.CS_KEEP <= 1:
        refuse(cfg, "CS_KEEP", "0 < cs_keep <= 1")
    if cfg.MASK_SAMPLER not in ("langevin", "projected"):
        refuse(cfg, "MASK_SAMPLER", "langevin or projected")
    if not cfg.CKPT:
        check_toy_prior(cfg)
        check_memory(cfg, toy_memory(cfg))
    check_writable(cfg.OUT_DIR)


def check_start_noise(cfg, sigma0, top=10.0, why="pixels are in [0, 1]"):
    """The anneal starts at the noise level sigma0 sqrt(T_MAX), cools to sigma0 (T = 1), then 0.
    A start far above the pixel range (10) starts from noise alone."""
    t_top = (top / sigma0) ** 2
    if not 1 <= cfg.T_MAX <= t_top * (1 + 1e-9):  # (1.2 / 0.1)^2 is 143.99999999999997
        allowed = f"a temperature in [1, ({top:g} / sigma0)^2 = {t_top:.4g}]"
        refuse(cfg, "T_MAX", f"{allowed}: {why}")


def check_step_size(cfg, sigma0, knobs):
    """At the MDSM optimum sigma0^2 grad E = x - D(x), which moves as fast as x along directions the
    denoiser D removes, so a Langevin step multiplies them by 1 - s^2 / (2 sigma0^2): the chains
    converge only for step sizes s < 2 sigma0."""
    for knob in knobs:
        if not 0 < getattr(cfg, knob) < 2 * sigma0:
            refuse(cfg, knob, f"a step in (0, {2 * sigma0:g}), below 2 * sigma0 = 2 * {sigma0:g}")


def check_toy_prior(cfg):
    """The toy's covariance must stay invertible in float32, where the samplers run."""
    lam = torch.linalg.eigvalsh(gaussian_prior(cfg)[1])
    if lam[0] < 1e-5 * lam[-1]:
        raise SystemExit(
            f"error: the toy prior's covariance is nearly singular (eigenvalues {lam[0]:.2g} to "
            f"{lam[-1]:.2g}) with --toy_length={cfg.TOY_LENGTH} --toy_nugget={cfg.TOY_NUGGET}; "
            "allowed: a larger --toy_nugget or a shorter --toy_length"
        )


def toy_memory(cfg):
    """Peak bytes of the toy from the knobs alone: the d x d matrices, the chains of every sampler
    (float32, with their temporaries) and the temperature list."""
    d = cfg.TOY_SIZE**2
    steps = cfg.N_HOT + cfg.N_ANNEAL + cfg.N_COOL
    return {
        "the toy's chains (--toy_chains x --toy_size^2)": 4 * cfg.TOY_CHAINS * d * 16,
        "the temperature list (--n_hot + --n_anneal + --n_cool)": 12 * steps,
        "the toy's covariances (--toy_size^4)": 8 * d * d * 12,
    }


def checkpoint_memory(cfg, shape):
    """Peak bytes of a --ckpt run from the knobs and the image shape: the dense measurement
    operator (d x d for a pixel mask), the samples with their grid and the temperature list."""
    d = math.prod(shape)
    steps = cfg.N_HOT + cfg.N_ANNEAL + cfg.N_COOL
    return {
        "a dense measurement operator (pixels^2 of the images)": 4 * d * d * 2,
        "the samples (--n_images x --n_samples)": 4 * cfg.N_IMAGES * (cfg.N_SAMPLES + 5) * d * 3,
        "the temperature list (--n_hot + --n_anneal + --n_cool)": 12 * steps,
    }


def check_memory(cfg, parts):
    """A size that cannot fit gets one line from the estimate, before anything is allocated."""
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): nothing to compare with
        return
    what = max(parts, key=parts.get)
    if parts[what] > have:
        raise SystemExit(
            f"error: this run needs about {parts[what] / 1e9:.3g} GB for {what}, and this machine "
            f"has {have / 1e9:.3g} GB; allowed: smaller values of those knobs"
        )


def check_writable(folder):
    """The out folder must take files before any sampling time is spent."""
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise SystemExit(
            f"error: --out_dir={folder} is not writable ({e.strerror}); pass a folder you can write"
        ) from None


def load_energy(cfg, device):
    """03's EnergyNet from --ckpt, in eval mode, without weight gradients: (model, checkpoint)."""
    model, ckpt = mdsm.load_model(cfg.CKPT, device=device, use_ema=cfg.USE_EMA)
    if cfg.USE_EMA and "ema" not in ckpt:
        raise SystemExit(f"error: --use_ema: {cfg.CKPT} has no EMA weights; drop --use_ema")
    model.requires_grad_(False)  # the samplers need grad_x E only
    return model, ckpt


def model_image_shape(model):
    """(C, H, W) that 03's EnergyNet was built for; its image_size is a side or [height, width]."""
    args = model.model_args
    size = args["image_size"]
    if isinstance(size, int):
        return args["in_channels"], size, size
    return args["in_channels"], int(size[0]), int(size[1])


def load_test_images(cfg, ckpt, want):
    """The first N_IMAGES test images (float in [0, 1]) prepared as the model was trained
    (IMAGE_SIZE of its run), the mean training image, and the dataset's name; the images must have
    the model's shape want = (C, H, W)."""
    conf = ckpt.get("config", {})
    dataset = cfg.DATASET or conf.get("DATASET", "")
    data_dir = cfg.DATA_DIR or conf.get("DATA_DIR", "data")
    if not dataset:
        raise SystemExit(
            "error: the checkpoint names no DATASET; pass --dataset=cifar10 (or mnist, a .npz path)"
        )
    size = int(conf.get("IMAGE_SIZE", 0))
    test = mdsm.load_images(dataset, data_dir, "test", size)
    have = tuple(test.shape[1:])
    if have != want:
        raise SystemExit(
            f"error: --dataset={dataset} gives images of {have[0]} x {have[1]} x {have[2]} "
            f"(channels x height x width) but the model was built for {want[0]} x {want[1]} x "
            f"{want[2]}; pass the --dataset it was trained on"
        )
    images = mdsm.images_to_float(test)[: cfg.N_IMAGES]
    train = mdsm.load_images(dataset, data_dir, "train", size)
    return images, mdsm.images_to_float(train).mean(0), dataset


def check_checkpoint_knobs(cfg, ckpt, sigma0, shape):
    """The knobs that depend on the model, before its images are read: its sigma0, its noise range
    and its image shape (C, H, W)."""
    if cfg.SIGMA0 != globals()["SIGMA0"] and cfg.SIGMA0 != sigma0:
        refuse(cfg, "SIGMA0", f"the checkpoint's own ({sigma0:g}) with --ckpt; drop --sigma0")
    check_step_size(cfg, sigma0, ("STEP_SIZE",))
    # the anneal starts at the noise level sigma0 sqrt(T_MAX): one the model was trained on
    sigma_max = ckpt.get("config", {}).get("SIGMA_MAX")
    if isinstance(sigma_max, (int, float)) and 0 < sigma_max < 10:
        why = f"the model was trained up to noise level sigma_max = {sigma_max:g}"
        check_start_noise(cfg, sigma0, sigma_max, why)
    else:
        check_start_noise(cfg, sigma0)
    if "cs" in cfg.TASKS.split(",") and cs_measurements(cfg, shape) < 1:
        refuse(cfg, "CS_KEEP", f"at least 1 measurement of {math.prod(shape)} pixels")
    check_memory(cfg, checkpoint_memory(cfg, shape))


def plot_toy(tasks, truth, mask, cfg, path):
    """One row per task: observed, truth, exact and sampled means, samples, and std maps."""
    n = cfg.TOY_SIZE
    lang = "masked Langevin (MDSM), sigma0*sqrt(T)"
    ks = "projected coarse-to-fine (K&S)"
    size = (19, 2.1 * len(tasks) + 0.6)
    fig, axes = plt.subplots(len(tasks), 11, figsize=size, layout="constrained")
    for row, (name, t) in enumerate(tasks.items()):
        runs = {k: v.detach().double().reshape(-1, n, n) for k, v in t["runs"].items()}
        if row == 0:  # the observed pixels, unknown ones blank
            observed = np.where(mask[0] > 0, np.nan, truth.view(n, n))
        else:  # the low-resolution image M^T m
            M = block_average_operator((1, n, n), 2).double()
            observed = (M.T @ t["meas"]).view(n, n)
        panels = [
            ("observed (white: unknown)", observed),
            ("truth", truth.view(n, n)),
            ("exact mean", t["mean"].view(n, n)),
            ("Langevin mean", runs[lang].mean(0)),
            ("K&S mean", runs[ks].mean(0)),
            ("Langevin sample", runs[lang][0]),
            ("K&S sample", runs[ks][0]),
            ("unconstrained sample", runs["unconstrained Langevin (ignores m)"][0]),
            ("exact std", t["cov"].diagonal().clamp(min=0).sqrt().view(n, n)),
            ("Langevin std", runs[lang].std(0)),
            ("K&S std", runs[ks].std(0)),
        ]
        handles = {}
        for col, (title, a) in enumerate(panels):
            ax = axes[row, col]
            is_std = "std" in title
            if is_std:
                im = ax.imshow(np.asarray(a), cmap="magma", vmin=0, vmax=1.25 * cfg.TOY_STD)
            else:
                im = ax.imshow(np.asarray(a), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([0, n - 1])
            ax.set_yticks([0, n - 1])
            ax.tick_params(labelsize=7)
            if row == 0:
                ax.set_title(title, fontsize=9)
            handles[is_std] = im  # one image of each kind for the colour bars
        axes[row, 0].set_ylabel(name.split(" (")[0] + "\nrow (pixel)", fontsize=9)
        bar = fig.colorbar(handles[False], ax=axes[row, :8], shrink=0.9, pad=0.01)
        bar.set_label("pixel value", fontsize=8)
        bar = fig.colorbar(handles[True], ax=axes[row, 8:], shrink=0.9, pad=0.01)
        bar.set_label("posterior std", fontsize=8)
    fig.supxlabel("column (pixel)", fontsize=8)
    title = "Posterior of a Gaussian prior: samplers vs the closed form (std maps on the right)"
    fig.suptitle(title, fontsize=10)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


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
