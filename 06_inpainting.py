"""06 - Inpainting and other linear inverse problems with a learned energy.

A density model earns its keep by solving problems it was not trained for. Given measurements
m = M x of an image x (M: a pixel mask, 2x2 block averages, random projections), we sample the
posterior p(x | M x = m) using only the prior that the energy E(x) of 03 has learned. Two samplers:

1. Masked annealed Langevin (MDSM paper, "Inpainting"; Li, Chen & Sommer, arXiv 1910.07762):
   the MDSM rule x <- x - 0.5 s^2 grad E(x) + sqrt(T) s xi moves only the unknown pixels, while
   the known ones are re-noised to the current noise level before each energy evaluation.
   Why that level: MDSM's optimum is sigma0^2 grad E(y) = y - E[x|y] = -sigma^2 grad log q_sigma(y)
   for y = x + sigma z, so exp(-E/T) ~ q_sigma with T = sigma^2/sigma0^2, i.e.
   E = T * (-log q_sigma) + const. At temperature T the chain samples the data blurred by noise of
   std sigma0*sqrt(T), and the known pixels must carry that same noise (the authors' code uses
   0.1*T^(1/4); compare with --known_noise=quarter).
2. The stochastic coarse-to-fine projected sampler of Kadkhodaie & Simoncelli ("Solving linear
   inverse problems using the prior implicit in a denoiser", NeurIPS 2021, Algorithm 2). It needs
   only a blind denoiser D(y); the MDSM energy gives one for every noise level at once:
   D(y) = y - sigma0^2 grad E(y) (Tweedie/Miyasawa, the line above, with no T in it).

With no arguments the file checks both samplers against EXACT answers: images are 8x8 draws from
a correlated Gaussian N(mu, S), whose noisy densities N(mu, S + sigma^2 I), denoisers and
posteriors p(x | M x = m) are all closed form. It prints how far the samplers' posterior mean and
covariance are from the exact ones, for inpainting and for 2x block averaging, next to an
unconstrained sampler that ignores the measurements (which must fail the same comparison).
With --ckpt it inpaints / super-resolves / compressively senses test images with a trained model.

  python 06_inpainting.py                                # CPU, ~1 min: exact Gaussian checks
  python 06_inpainting.py --ckpt=out/03_mdsm_train/ckpt.pt    # GPU: minutes; CPU: slow (2700 steps)
Outputs: out/06_inpainting/toy_gaussian.png, and with --ckpt one grid per task plus a PSNR table.
"""
import math
import os
import sys
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
TOY_SIZE = 8              # toy images are TOY_SIZE x TOY_SIZE, one channel
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
KS_H0 = 0.01              # initial step h0; h_k = h0 k / (1 + h0 (k - 1)) grows to 1
KS_BETA = 0.01            # noise injection: 1 = none (deterministic ascent), small = much
KS_MAX_STEPS = 3000       # safety cap on iterations
# -- checkpoint mode --
DATASET = ""              # images to restore; empty = the checkpoint's own DATASET
DATA_DIR = ""             # folder of the datasets; empty = the checkpoint's own DATA_DIR
N_IMAGES = 8              # test images per task
N_SAMPLES = 4             # posterior samples per image (their mean is the estimate)
TASKS = "right,centre,random,sr2,sr4,cs"  # comma list of: right, centre, random, sr2, sr4, cs
RANDOM_KEEP = 0.3         # fraction of pixels observed for the 'random' mask
CS_KEEP = 0.25            # measurements / pixels for compressive sensing ('cs')
MASK_SAMPLER = "langevin" # sampler for the pixel masks: langevin (MDSM) | projected (K&S)
BATCH = 64                # images per sampler call (memory knob)

# The shared helpers (device, seed, --key=value overrides, logging, image grids) are at the end of the file.


# ---- measurement operators: M has orthonormal rows, so its pseudo-inverse is M^T ----
def mask_operator(mask):
    """Pixel mask (C, H, W), 1 = unknown, 0 = observed -> M (m, d): the rows of I that read the
    observed pixels."""
    keep = (mask.flatten() == 0).nonzero().squeeze(1)
    return torch.eye(mask.numel())[keep]  # (m, d)


def block_average_operator(shape, factor):
    """Super-resolution: each row averages one factor x factor block of one channel. The rows are
    normalised (entries 1/factor) so that M M^T = I; m = M x is then factor * the block mean."""
    c, h, w = shape
    idx = torch.arange(c * h * w).view(c, h // factor, factor, w // factor, factor)
    rows = idx.permute(0, 1, 3, 2, 4).reshape(-1, factor * factor)  # (m, factor^2) pixel indices
    M = torch.zeros(rows.shape[0], c * h * w)
    M.scatter_(1, rows, 1.0 / factor)
    return M  # (m, d)


def random_orthonormal_operator(d, m, generator):
    """Compressive sensing: m random orthonormal rows (QR of a Gaussian matrix)."""
    q, _ = torch.linalg.qr(torch.randn(d, m, generator=generator))
    return q.T.contiguous()  # (m, d)


def named_mask(kind, shape, keep, generator):
    """right: the right half is unknown; centre: a central square of half the side; random:
    each pixel observed with probability keep (the same pixels in every channel)."""
    c, h, w = shape
    mask = torch.zeros(1, h, w)
    if kind == "right":
        mask[:, :, w // 2:] = 1
    elif kind == "centre":
        mask[:, h // 4:h - h // 4, w // 4:w - w // 4] = 1
    elif kind == "random":
        mask = (torch.rand(1, h, w, generator=generator) > keep).float()
    else:
        raise SystemExit(f"error: unknown mask {kind!r}; use right, centre or random")
    return mask.expand(c, h, w).contiguous()


def orthogonal_completion(M):
    """Q (d, d) orthogonal whose first m rows are M: rotating x into z = Q x turns any M with
    orthonormal rows into a pixel mask on z (the first m coordinates are the measurements)."""
    m, d = M.shape
    q, _ = torch.linalg.qr(torch.cat([M.T, torch.randn(d, d - m, dtype=M.dtype)], 1))
    q = q.T.contiguous()
    q[:m] = M  # QR may flip signs of the first columns; put M back exactly
    return q


# ---- the Gaussian toy: prior N(mu, S) over TOY_SIZE x TOY_SIZE images, all answers exact ----
def gaussian_prior(cfg):
    """Stationary covariance S_ij = v exp(-|p_i - p_j| / l) + nugget^2 delta_ij (exponential
    kernel: smooth enough to look like images, rough enough that a missing pixel is predicted by
    its observed neighbours rather than by tiny derivatives no noisy sampler can read)."""
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


def gaussian_mdsm_energy(mu, S, sigma0):
    """T -> the energy an ideal MDSM model has at temperature T for Gaussian data:
    E_T(x) = T * (-log q_sigma(x)) = (T/2) (x - mu)^T (S + sigma^2 I)^-1 (x - mu) + const,
    sigma = sigma0 sqrt(T); then sigma0^2 grad E_T = sigma^2 (S + sigma^2 I)^-1 (x - mu) = x - D(x).
    (A trained network is one E for all T: in high dimension the levels sit on disjoint shells.)"""
    lam, U = (t.float() for t in torch.linalg.eigh(S))
    mu = mu.float()

    def energy_at(T):
        scale = T / (lam + sigma0**2 * T)  # (d,) eigenvalues of T (S + sigma^2 I)^-1

        def energy(x):  # x (B, ...) with d entries per item -> (B,)
            u = (x.reshape(x.shape[0], -1) - mu) @ U  # coordinates in S's eigenbasis
            return 0.5 * (u * u * scale).sum(1)
        return energy
    return energy_at


def gaussian_blind_denoiser(mu, S):
    """D(y) = E[x | y] when the noise level is unknown: estimate sigma^2 by maximum likelihood
    under y ~ N(mu, S + sigma^2 I) (bisection on log sigma^2), then apply the exact Gaussian
    denoiser mu + S (S + sigma^2 I)^-1 (y - mu). Like a blind CNN, it reads the noise off y."""
    lam, U = (t.float() for t in torch.linalg.eigh(S))
    mu = mu.float()

    def denoise(y):  # (B, d) -> (B, d)
        u2 = ((y - mu) @ U) ** 2  # (B, d) squared coordinates in S's eigenbasis
        lo, hi = torch.full((y.shape[0], 1), -20.0), torch.full((y.shape[0], 1), 5.0)
        for _ in range(40):  # d/ds2 log N = 0.5 sum(u2/(lam+s2)^2 - 1/(lam+s2)), decreasing in s2
            mid = (lo + hi) / 2
            v = lam + mid.exp()
            up = ((u2 / v - 1) / v).sum(1, keepdim=True) > 0
            lo, hi = torch.where(up, mid, lo), torch.where(up, hi, mid)
        shrink = lam / (lam + ((lo + hi) / 2).exp())  # (B, d) per-eigendirection Wiener gain
        return mu + ((y - mu) @ U * shrink) @ U.T
    return denoise


# ---- the two samplers ----
def known_noise_fn(cfg, sigma0):
    if cfg.KNOWN_NOISE == "sqrt":
        return lambda T: sigma0 * torch.as_tensor(T).clamp(min=0) ** 0.5  # sigma0 sqrt(T), as derived
    if cfg.KNOWN_NOISE == "quarter":
        return lambda T: 0.1 * torch.as_tensor(T).clamp(min=0) ** 0.25  # the authors' code
    raise SystemExit(f"error: --known_noise={cfg.KNOWN_NOISE} is not a choice; use sqrt or quarter")


def masked_langevin(energy, x_known, mask, cfg, sigma0, constrained=True):
    """MDSM inpainting with 04's annealed_langevin. energy is either a model (one E for every T,
    as MDSM trains it) or a function T -> E_T (the exact Gaussian energies), in which case we call
    the sampler one temperature at a time. mask: 1 = generate, 0 = known (x_known there)."""
    sampler = sampler_module()
    temps = sampler.mdsm_schedule(cfg.N_HOT, cfg.N_ANNEAL, cfg.N_COOL, cfg.T_MAX)
    # MDSM's init: x = 0.5 + N(0, I) on the unknown pixels
    x = torch.where(mask > 0, 0.5 + torch.randn_like(x_known), x_known)
    kw = dict(mask=mask, x_known=x_known, known_noise_std=known_noise_fn(cfg, sigma0)) if constrained else {}
    if isinstance(energy, torch.nn.Module):
        x, _ = sampler.annealed_langevin(energy, x, temps.to(x.device), cfg.STEP_SIZE, show_progress=True, **kw)
        return x
    for k in range(len(temps)):
        x, _ = sampler.annealed_langevin(energy(float(temps[k])), x, temps[k:k + 1], cfg.STEP_SIZE, **kw)
    return x


def projected_sampler(denoise, M, m, cfg, constrained=True):
    """Kadkhodaie & Simoncelli's stochastic coarse-to-fine ascent, projected onto M x = m.
    denoise: y (B, d) -> D(y) (B, d); M (m, d) orthonormal rows; m (B, m) measurements.
    Returns (B, d) with M x = m exactly (a last projection) and the number of iterations."""
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
    """Relative distances of the samples' mean and covariance from the exact posterior:
    ||mean_hat - mean|| / sqrt(tr cov) (Monte Carlo floor ~ 1/sqrt(N)) and ||C_hat - C||_F / ||C||_F."""
    x = samples.double().reshape(samples.shape[0], -1)  # (N, d)
    c_hat = torch.cov(x.T)
    mean_err = (x.mean(0) - mean).norm() / cov.trace().sqrt()
    return float(mean_err), float((c_hat - cov).norm() / cov.norm())


def toy_task(name, M, truth, mu, S, cfg, mask=None, variants=True):
    """Sample p(x | M x = m) several ways (plus exact draws) and compare with the closed form;
    variants=False skips the two extra Langevin runs (other known-pixel noise, other step)."""
    n, N = cfg.TOY_SIZE, cfg.TOY_CHAINS
    d, m_dim = n * n, M.shape[0]
    meas = M.double() @ truth  # (m,) noise-free measurements
    mean, cov = gaussian_posterior(mu, S, M.double(), meas)
    energy = gaussian_mdsm_energy(mu, S, cfg.SIGMA0)  # T -> E_T, exact
    if mask is not None:  # pixel mask: sample directly on images (N, 1, n, n)
        basis, mask_z = None, mask.expand(N, 1, n, n)
        known = (truth.float() * (1 - mask.flatten())).view(1, 1, n, n).expand(N, 1, n, n)
    else:  # any orthonormal M: rotate z = Q x, the measurements become the first m coordinates
        basis = orthogonal_completion(M)  # (d, d)
        mask_z = torch.cat([torch.zeros(m_dim), torch.ones(d - m_dim)]).expand(N, d)
        known = torch.cat([meas.float(), torch.zeros(d - m_dim)]).expand(N, d)
        energy = (lambda Q, e: lambda T: (lambda z: e(T)(z @ Q)))(basis, energy)

    def langevin(constrained, known_noise, step_size=cfg.STEP_SIZE):
        run_cfg = type(cfg)(**{**vars(cfg), "KNOWN_NOISE": known_noise, "STEP_SIZE": step_size})
        z = masked_langevin(energy, known.clone(), mask_z, run_cfg, cfg.SIGMA0, constrained)
        return z.reshape(N, d) if basis is None else z @ basis

    denoise = gaussian_blind_denoiser(mu, S)
    meas_b = meas.float().expand(N, m_dim)
    L = torch.linalg.cholesky(cov + 1e-10 * torch.eye(d, dtype=cov.dtype))
    runs = {"exact draws (Monte Carlo floor)": mean + torch.randn(N, d, dtype=cov.dtype) @ L.T}
    t0 = time.time()
    runs["masked Langevin (MDSM), sigma0*sqrt(T)"] = langevin(True, "sqrt")
    t_lang = time.time() - t0
    if variants:
        runs["masked Langevin, authors' 0.1*T^(1/4)"] = langevin(True, "quarter")
        runs[f"masked Langevin, step {cfg.TOY_STEP_SIZE} (not {cfg.STEP_SIZE})"] = langevin(True, "sqrt", cfg.TOY_STEP_SIZE)
    t0 = time.time()
    runs["projected coarse-to-fine (K&S)"], steps = projected_sampler(denoise, M, meas_b, cfg)
    t_ks = time.time() - t0
    runs["unconstrained Langevin (ignores m)"] = langevin(False, "sqrt")
    runs["unconstrained coarse-to-fine"] = projected_sampler(denoise, M, meas_b, cfg, False)[0]
    print(f"\n{name}: {m_dim} measurements of {d} pixels, {N} chains "
          f"(Langevin {len(sampler_module().mdsm_schedule(cfg.N_HOT, cfg.N_ANNEAL, cfg.N_COOL))} steps "
          f"{t_lang:.1f} s, K&S {steps} steps {t_ks:.1f} s)")
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
    tasks = {"inpainting (right half unknown)": toy_task("inpainting (right half unknown)",
                                                        mask_operator(mask), truth, mu, S, cfg, mask),
             "2x2 block averages (super-resolution)": toy_task("2x2 block averages (super-resolution)",
                                                            block_average_operator((1, n, n), 2), truth, mu, S, cfg)}
    plot_toy(tasks, truth, mask, cfg)
    return tasks


def plot_toy(tasks, truth, mask, cfg):
    import matplotlib.pyplot as plt

    n = cfg.TOY_SIZE
    img = lambda v: v.detach().double().reshape(n, n).numpy()
    lang, ks, free = "masked Langevin (MDSM), sigma0*sqrt(T)", "projected coarse-to-fine (K&S)", "unconstrained Langevin (ignores m)"
    fig, axes = plt.subplots(len(tasks), 11, figsize=(16.5, 1.9 * len(tasks) + 0.4))
    for row, (name, t) in enumerate(tasks.items()):
        runs = t["runs"]
        if row == 0:
            observed = np.where(img(mask) > 0, np.nan, img(truth))
        else:  # show the low-resolution image M^T m
            M = block_average_operator((1, n, n), 2).double()
            observed = img(M.T @ t["meas"])
        panels = [("observed (white: unknown)", observed), ("truth", img(truth)), ("exact mean", img(t["mean"])),
                  ("Langevin mean", img(runs[lang].double().mean(0))), ("K&S mean", img(runs[ks].double().mean(0))),
                  ("exact std", img(t["cov"].diagonal().clamp(min=0).sqrt())),
                  ("Langevin std", img(runs[lang].double().std(0))), ("K&S std", img(runs[ks].double().std(0))),
                  ("Langevin sample", img(runs[lang][0])), ("K&S sample", img(runs[ks][0])),
                  ("unconstrained", img(runs[free][0]))]
        for col, (title, a) in enumerate(panels):
            ax = axes[row, col]
            is_std = "std" in title
            ax.imshow(a, cmap="magma" if is_std else "gray", vmin=0, vmax=cfg.TOY_STD if is_std else 1)
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=9)
        axes[row, 0].set_ylabel(name.split(" (")[0], fontsize=9)
    fig.suptitle("Posterior of a Gaussian prior: samplers vs the closed form (std maps on 0..%.1f)" % cfg.TOY_STD, fontsize=10)
    fig.tight_layout()
    path = os.path.join(cfg.OUT_DIR, "toy_gaussian.png")
    os.makedirs(cfg.OUT_DIR, exist_ok=True)
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
    if task == "cs":
        return random_orthonormal_operator(c * h * w, int(cfg.CS_KEEP * c * h * w), generator), None
    raise SystemExit(f"error: unknown task {task!r} in --tasks; use right, centre, random, sr2, sr4, cs")


def restore(model, M, mask, truth, cfg, sigma0):
    """Posterior samples (B, C, H, W) for the images truth (B, C, H, W) measured by M."""
    sampler = sampler_module()
    B, shape = truth.shape[0], truth.shape[1:]
    m = truth.flatten(1) @ M.T  # (B, m) measurements
    if mask is not None and cfg.MASK_SAMPLER == "langevin":
        mask_b = mask.expand_as(truth)
        known = truth * (1 - mask_b)  # the sampler only ever reads the known pixels of truth
        x = masked_langevin(model, known, mask_b, cfg, sigma0)
        # MDSM's final one-step denoise (Tweedie at sigma0), applied to the generated pixels only
        steps = cfg.N_HOT + cfg.N_ANNEAL + cfg.N_COOL
        return torch.where(mask_b > 0, sampler.tweedie_denoise(model, x, sigma0), known), steps
    # D(y) = y - sigma0^2 grad E(y): a blind denoiser for every noise level MDSM was trained on
    denoise = lambda y: sampler.tweedie_denoise(model, y.view(-1, *shape), sigma0).flatten(1)
    y, steps = projected_sampler(denoise, M, m, cfg)
    return y.view(B, *shape), steps


def checkpoint_experiment(cfg):
    tasks = [t.strip() for t in cfg.TASKS.split(",") if t.strip()]
    for task in tasks:  # check the options before minutes of sampling, not after
        task_operator(task, (1, 8, 8), cfg, torch.Generator())
    if cfg.MASK_SAMPLER not in ("langevin", "projected"):
        raise SystemExit(f"error: --mask_sampler={cfg.MASK_SAMPLER}; use langevin or projected")
    known_noise_fn(cfg, cfg.SIGMA0)
    mdsm = load_numbered("03_mdsm_train.py")  # 03's data loading, EnergyNet and checkpoints, reused
    device = pick_device(cfg.DEVICE)
    model, ckpt = mdsm.load_model(cfg.CKPT, device=device, use_ema=cfg.USE_EMA)
    model.requires_grad_(False)  # the samplers need grad_x E only
    conf = ckpt.get("config", {})
    sigma0 = float(conf.get("SIGMA0", cfg.SIGMA0))
    dataset, data_dir = cfg.DATASET or conf.get("DATASET", ""), cfg.DATA_DIR or conf.get("DATA_DIR", "data")
    if not dataset:
        raise SystemExit("error: the checkpoint names no DATASET; pass --dataset=cifar10 (or mnist, a .npz path)")
    images = mdsm.images_to_float(mdsm.load_images(dataset, data_dir, "test", int(conf.get("IMAGE_SIZE", 0))))[:cfg.N_IMAGES]
    if images.shape[1] != model.model_args.get("in_channels", images.shape[1]):
        raise SystemExit(f"error: {dataset} has {images.shape[1]} channels but the model expects "
                         f"{model.model_args['in_channels']}; pass the --dataset it was trained on")
    if images.shape[-1] != model.model_args.get("image_size", images.shape[-1]):
        raise SystemExit(f"error: {dataset} images are {images.shape[-1]} pixels wide but the model was built for "
                         f"{model.model_args['image_size']}; pass the --dataset it was trained on")
    n, shape = images.shape[0], tuple(images.shape[1:])
    print(f"model: {cfg.CKPT} (step {ckpt.get('step', '?')}, sigma0 {sigma0}); {n} test images of "
          f"{dataset} {shape}, {cfg.N_SAMPLES} samples each, device {device}")
    g = torch.Generator().manual_seed(cfg.SEED)
    print(f"  {'task':<8} {'sampler':<10} {'measured':>9} {'PSNR mean':>10} {'PSNR 1 smp':>11} "
          f"{'PSNR pinv':>10} {'max|Mx-m|':>10} {'steps':>6} {'time':>7}")
    results = {}
    for task in tasks:
        M, mask = task_operator(task, shape, cfg, g)
        M = M.to(device)
        mask = None if mask is None else mask.to(device)
        truth = images.to(device).repeat_interleave(cfg.N_SAMPLES, 0)  # (n*S, C, H, W)
        t0, parts = time.time(), []
        for i in range(0, len(truth), cfg.BATCH):
            x_hat, steps = restore(model, M, mask, truth[i:i + cfg.BATCH], cfg, sigma0)
            parts.append(x_hat.detach())
        samples = torch.cat(parts).view(n, cfg.N_SAMPLES, *shape)
        x = images.to(device)
        m = x.flatten(1) @ M.T
        # the naive answer: measurements put back (pseudo-inverse M^T m), 0.5 elsewhere
        half = torch.full_like(x.flatten(1), 0.5)
        # M^T m + (I - M^T M) 0.5
        pinv = (m @ M + half - (half @ M.T) @ M).view_as(x)
        gap = float((samples.flatten(2) @ M.T - m[:, None]).abs().max())
        sampler_name = cfg.MASK_SAMPLER if mask is not None else "projected"
        results[task] = dict(psnr_mean=psnr(samples.mean(1), x), psnr_sample=psnr(samples[:, 0], x),
                             psnr_pinv=psnr(pinv, x), gap=gap, seconds=time.time() - t0)
        r = results[task]
        print(f"  {task:<8} {sampler_name:<10} {M.shape[0]:>9} {r['psnr_mean']:>10.2f} {r['psnr_sample']:>11.2f} "
              f"{r['psnr_pinv']:>10.2f} {gap:>10.2e} {steps:>6} {r['seconds']:>6.0f}s", flush=True)
        rows = torch.cat([pinv[:, None], samples, samples.mean(1, keepdim=True), x[:, None]], 1)
        path = os.path.join(cfg.OUT_DIR, f"{task}.png")
        save_image_grid(rows.flatten(0, 1).cpu(), path, nrow=cfg.N_SAMPLES + 3)
    print(f"grids in {cfg.OUT_DIR}/<task>.png; each row: measured (M^T m, gray elsewhere), "
          f"{cfg.N_SAMPLES} samples, their mean, the original")
    return results


def sampler_module():
    return load_numbered("04_langevin_sampling.py")  # 04's annealed Langevin sampler, reused


def main(argv=None):
    cfg = parse_config(globals(), argv)
    set_seed(cfg.SEED)
    if not cfg.CKPT:
        return toy_experiment(cfg)
    return checkpoint_experiment(cfg)


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
