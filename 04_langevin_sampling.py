"""04 - Annealed Langevin sampling, and annealed importance sampling (AIS) of log Z for an MDSM energy.

MDSM (Li, Chen, Sommer, arXiv 1910.07762): the sampler of Section 4 as coded, Appendices C and F, the AIS
likelihood of its results table. NCSN (Song, Ermon, arXiv 1907.05600) Section 3.2.2. AIS: R. Neal (2001);
reverse AIS: Grosse, Ghahramani, Adams, "Sandwiching the marginal likelihood" (2015).
Langevin on p = exp(-E/T) with step h = sigma_s^2 T / 2 is the MDSM rule (sigma_s = 0.02):
    x <- x - (sigma_s^2 / 2) grad E(x) + sqrt(T) sigma_s z,          z ~ N(0, I).
AIS for Z = int exp(-E(x)/T) dx walks from N(0, s^2 I) through E_b(x) = b E(x)/T + (1 - b) ||x||^2/(2 s^2),
b = 0 -> 1, adding log w += E_b_prev(x) - E_b(x) at the current x before one HMC move at b. Then
log Z ~ log Z_0 + log mean exp(log w), low in expectation; reverse AIS from data (b = 1 -> 0) errs high.
  python 04_langevin_sampling.py          # no arguments, CPU, about a minute: the two lessons below
  python 04_langevin_sampling.py --ckpt=out/03_mdsm_train/ckpt.pt --n_samples=1000 --batch=1000  # GPU
  python 04_langevin_sampling.py --ckpt=... --n_hot=100 --n_anneal=400 --n_cool=40   # shorter chain (CPU)
  python 04_langevin_sampling.py --ckpt=... --ais --ais_chains=100 --ais_stages=1000  # log Z, bits/dim
No arguments: lesson 1, a 2-D mixture with weights 0.60/0.30/0.10 (seed 0): plain Langevin keeps the weights
of its starting points (0.33/0.30/0.38), MDSM's annealed temperatures recover them (0.59/0.31/0.10); lesson 2,
AIS finds its log Z = 0 (+-0.1) though no chain crosses between modes. --ckpt writes samples, nearest_*.png and
test_images.png; --ais prints both log Z, their gap, and test bits/dim (log p = -E/T - log Z) beside baselines.
"""
import math
import os
import sys
import time
from functools import partial

import numpy as np
import torch

# ---- config: every knob can be overridden with --key=value (see --help) ----
CKPT = ""                    # checkpoint of 03_mdsm_train.py; empty = run the two lessons
USE_EMA = False              # use the EMA weights, if the checkpoint has them
DATASET = ""                 # data for diagnostics and bits/dim; empty = the checkpoint's own DATASET
DATA_DIR = ""                # empty = the checkpoint's own DATA_DIR
N_SAMPLES = 64               # images to generate (paper's FID/IS: 50000)
BATCH = 256                  # chains run at once (chunks of N_SAMPLES); as large as memory allows
STEP_SIZE = 0.02             # sigma_s of the MDSM step (paper: 0.02)
T_MAX = 100.0                # starting temperature (T = sigma^2/sigma0^2: 100 <-> sigma = 1.0)
N_HOT = 500                  # steps at T = T_MAX
N_ANNEAL = 2000              # steps of geometric decay from T_MAX to 1
N_COOL = 200                 # steps of linear decay from 1 to 0
DENOISE = True               # final one-step Tweedie denoise x - sigma0^2 grad E(x)
N_REF = 1000                 # train/test images and samples for the energy (App. F) and distance (App. C) checks
AIS = False                  # with --ckpt: estimate log Z and test bits/dim instead of sampling
TEMPERATURE = 1.0            # T of the density exp(-E/T) whose log Z is estimated (paper: 1)
AIS_CHAINS = 100             # AIS chains per direction; the bootstrap error bar is over chains
AIS_STAGES = 1000            # distributions after b = 0 (cost: AIS_STAGES * LEAPFROG gradients per chain)
BETA_SCHEDULE = "sigmoid"    # sigmoid (dense at both ends) | geometric (dense near b = 0) | linear
REF_STD = 1.0                # s of the reference N(0, s^2 I); ~ 03's sigma_max, so E was trained where it starts
HMC_STEP = 0.01              # first leapfrog step; it then adapts by stage towards 65% acceptance
LEAPFROG = 1                 # leapfrog steps per HMC move (1 = Metropolis-adjusted Langevin)
N_TEST = 0                   # test images for bits/dim; 0 = the whole test split
GAP_TOL = 0.01               # reverse - forward gap (bits/dim) above which the output says "not converged"
TOY_SAMPLES = 4000           # chains per sampler in the toy lesson
TOY_STD = 0.05               # std of each mixture component (modes 0.6-0.65 apart: well separated)
TOY_SIGMA0 = 0.1             # the MDSM sigma0 assumed by the toy's ideal energy
PLAIN_STEPS = 2700           # plain Langevin steps (same budget as the MDSM chain)
PLAIN_STEP = 1e-4            # plain Langevin step h (must be << TOY_STD^2 for stability)
OUT_DIR = "out/04_langevin_sampling"  # figures and samples
DEVICE = "auto"              # auto | cpu | cuda | mps (the lessons always run on the CPU)
SEED = 0                     # seeds initial points, Langevin and HMC noise

# The helpers every file repeats (device, seed, --key=value overrides, logging, image grids) are at the end.

# ---- The sampler (06_inpainting.py reuses its parts). Conventions: E is the energy, the score is -grad E.
def mdsm_schedule(n_hot=500, n_anneal=2000, n_cool=200, t_max=100.0):
    """Temperatures of the MDSM chain: hot plateau, geometric anneal to 1, linear cool to 0."""
    hot = torch.full((n_hot,), float(t_max), dtype=torch.float64)
    k = torch.arange(n_anneal, dtype=torch.float64)
    # T_k = T_max * exp(-k ln(T_max) / n_anneal), k = 0..n_anneal-1 (reaches 1 just after the end)
    anneal = t_max * torch.exp(-k * math.log(t_max) / max(n_anneal, 1))
    cool = torch.linspace(1.0, 0.0, n_cool, dtype=torch.float64)
    return torch.cat([hot, anneal, cool]).float()  # (n_hot + n_anneal + n_cool,)

def energy_and_grad(energy_fn, x, create_graph=False):
    """(E(x) (B,), grad_x E (like x)); detached unless create_graph. Works inside torch.no_grad() too."""
    with torch.enable_grad():
        x = x if create_graph and x.requires_grad else x.detach().requires_grad_(True)
        energy = energy_fn(x)  # (B,)
        (grad,) = torch.autograd.grad(energy.sum(), x, create_graph=create_graph)  # each E sees only its x
    return (energy, grad) if create_graph else (energy.detach(), grad)

def grad_energy(energy_fn, x, create_graph=False):
    """grad_x E(x), like x (the score is its negative)."""
    return energy_and_grad(energy_fn, x, create_graph)[1]

def langevin_step(x, grad, temperature, step_size, noise):
    """One MDSM step: Langevin on exp(-E/T) with step h = step_size^2 T / 2."""
    # x <- x - (sigma_s^2 / 2) grad E(x) + sqrt(T) sigma_s xi     (MDSM sampler, as coded)
    return x - 0.5 * step_size ** 2 * grad + temperature ** 0.5 * step_size * noise

def annealed_langevin(energy_fn, x, temperatures, step_size=0.02, show_progress=False):
    """langevin_step at each temperature in turn; returns the samples (no .item() inside: a GPU never waits)."""
    temps, t_start = torch.as_tensor(temperatures, dtype=x.dtype).to(x.device), time.time()  # (steps,)
    for k in range(len(temps)):
        x = langevin_step(x, grad_energy(energy_fn, x), temps[k], step_size, torch.randn_like(x))
        if show_progress:
            progress(k + 1, len(temps), t_start, "Langevin steps")
    return x

def tweedie_denoise(energy_fn, x, sigma0=0.1):
    """E[x_clean | x] for x ~ q_sigma0: the MDSM fit sigma0^2 grad E(x) = x - E[x | x]."""
    # x <- x - sigma0^2 grad E(x)      (final one-step denoise of the MDSM sampler)
    return x - sigma0 ** 2 * grad_energy(energy_fn, x)

# ---- AIS (Neal 2001) along E_b = b E/T + (1 - b) ||x||^2/(2 s^2), one HMC move per b, and its reverse.
def beta_schedule(n_stages, kind="sigmoid"):
    """(n_stages + 1,) float64 from b_0 = 0 to b_K = 1."""
    t = torch.linspace(0, 1, n_stages + 1, dtype=torch.float64)
    if kind == "geometric":  # b = 1e-4 ... 1 evenly in log b, after b_0 = 0
        return torch.cat([t[:1], torch.logspace(-4, 0, n_stages, dtype=torch.float64)])
    s = torch.sigmoid(8 * (t - 0.5))  # Grosse et al.'s sigmoid schedule, rescaled to end exactly at 0 and 1
    return (s - s[0]) / (s[-1] - s[0]) if kind == "sigmoid" else t

def path_energy(x, e, g, coef):
    """E_b and grad E_b from E(x) = e, grad E(x) = g and coef = (b/T, (1 - b)/s^2)."""
    return coef[0] * e + 0.5 * coef[1] * x.flatten(1).pow(2).sum(1), coef[0] * g + coef[1] * x

def hmc_move(energy_fn, state, coef, step, n_leapfrog):
    """One HMC move leaving exp(-E_b) invariant: state (x, E(x), grad E(x)) -> (new state, accepted (B,))."""
    p = torch.randn_like(state[0])  # momentum ~ N(0, I)
    u, grad_u = path_energy(*state, coef)
    h_old = u + 0.5 * p.flatten(1).pow(2).sum(1)  # H = E_b(x) + ||p||^2 / 2
    new, p = state, p - 0.5 * step * grad_u  # leapfrog: a half step on p first ...
    for i in range(n_leapfrog):
        x = new[0] + step * p
        new = (x, *energy_and_grad(energy_fn, x))
        u, grad_u = path_energy(*new, coef)
        p = p - (0.5 if i == n_leapfrog - 1 else 1.0) * step * grad_u  # ... full steps, a half step last
    h_new = u + 0.5 * p.flatten(1).pow(2).sum(1)
    # Metropolis, per chain: accept with probability min(1, exp(H_old - H_new)); NaN counts as a reject
    accept = torch.rand_like(h_old).log() < h_old - h_new  # (B,)
    return tuple(torch.where(accept.view(-1, *[1] * (n.dim() - 1)), n, o) for n, o in zip(new, state)), accept

def ais(energy_fn, x, betas, temperature=1.0, ref_std=1.0, step=0.01, n_leapfrog=1, show_progress=False):
    """x: exact samples of exp(-E_b0). Returns log w (B,) float64 with E[w] = Z_bK / Z_b0 and the HMC
    acceptance per move (K - 1,). Forward AIS: betas 0 -> 1; reverse AIS: the same betas flipped."""
    e, g = energy_and_grad(energy_fn, x)
    log_w, acc, t_start = torch.zeros(len(x), dtype=torch.float64, device=x.device), [], time.time()
    for k in range(1, len(betas)):
        b_prev, b = betas[k - 1].item(), betas[k].item()
        # log w += E_{b_prev}(x) - E_b(x) = (b - b_prev) (||x||^2/(2 s^2) - E(x)/T), at the current x
        log_w += (b - b_prev) * (x.flatten(1).pow(2).sum(1) / (2 * ref_std ** 2) - e / temperature).double()
        if k < len(betas) - 1:  # the last distribution needs no move
            (x, e, g), accepted = hmc_move(energy_fn, (x, e, g), (b / temperature, (1 - b) / ref_std ** 2), step, n_leapfrog)
            acc.append(accepted.float().mean().item())
            step *= math.exp(acc[-1] - 0.65)  # adapt the step towards 65% acceptance (Neal 2011)
        if show_progress:
            progress(k, len(betas) - 1, t_start, "AIS stages")
    return log_w, torch.tensor(acc)

def log_mean_exp(log_w, n_boot=1000, seed=0):
    """log mean exp(log w), stably, and its bootstrap standard error over chains."""
    lme = lambda v: torch.logsumexp(v, -1) - math.log(v.shape[-1])  # noqa: E731
    idx = torch.randint(len(log_w), (n_boot, len(log_w)), generator=torch.Generator().manual_seed(seed))
    return lme(log_w.cpu()).item(), lme(log_w.cpu()[idx]).std().item()

def log_z_both_ways(energy_fn, x_data, cfg, show_progress=False):
    """Forward AIS from N(0, s^2 I), reverse AIS from x_data (ideally exact samples of exp(-E/T)):
    {"forward": (log Z, error), "reverse": (log Z, error)}. Prints the HMC acceptance per fifth of the stages."""
    d, betas, s, out = x_data[0].numel(), beta_schedule(cfg.AIS_STAGES, cfg.BETA_SCHEDULE), cfg.REF_STD, {}
    x0 = s * torch.randn(cfg.AIS_CHAINS, *x_data.shape[1:], device=x_data.device)  # exact reference samples
    for name, x, b, sign in (("forward", x0, betas, 1), ("reverse", x_data, betas.flip(0), -1)):
        log_w, acc = ais(energy_fn, x, b, cfg.TEMPERATURE, s, cfg.HMC_STEP, cfg.LEAPFROG, show_progress)
        est, err = log_mean_exp(log_w, seed=cfg.SEED)
        # log Z = log Z_0 +- log mean w (reverse: E[w] = Z_0 / Z), with Z_0 = (2 pi s^2)^(d/2) of the reference
        out[name] = (0.5 * d * math.log(2 * math.pi * s ** 2) + sign * est, err)
        print(f"  {name} AIS: HMC acceptance by fifths of the stages " + " ".join(f"{v.mean():.2f}" for v in acc.chunk(5)))
    return out

# ---- The lessons: a 2-D mixture whose noisy densities and log Z are known exactly.
TOY_MEANS = torch.tensor([[0.2, 0.2], [0.8, 0.25], [0.5, 0.8]])  # (K, 2), inside [0, 1]^2 like pixels
TOY_WEIGHTS = torch.tensor([0.6, 0.3, 0.1])                      # (K,), unequal on purpose

def mixture_energy(x, means, weights, var):
    """-log sum_k w_k N(x; mu_k, var I): a normalized density, so log Z = 0 at T = 1. (B, d) -> (B,)"""
    d2 = ((x[:, None, :] - means) ** 2).sum(-1)  # (B, K)
    return -torch.logsumexp(weights.log() - d2 / (2 * var), 1) + x.shape[1] / 2 * math.log(2 * math.pi * var)

def toy_energy(x, sigma, std):
    """-log q_sigma: noising N(mu_k, std^2 I) by sigma gives N(mu_k, (std^2 + sigma^2) I)."""
    return mixture_energy(x, TOY_MEANS, TOY_WEIGHTS, std ** 2 + sigma ** 2)

def toy_mdsm_energy(x, temperature, sigma0, std):
    """An ideal MDSM model at temperature T: it fits sigma0^2 grad E(x~) = -sigma^2 grad log q_sigma(x~), so
    E = T (-log q_sigma) + const, T = sigma^2/sigma0^2. In high dimension the levels live on disjoint shells and
    ONE network serves every T; in 2-D they overlap, so the toy gets each T's exact energy (q_sigma0's below 1)."""
    t = max(float(temperature), 1.0)
    return t * toy_energy(x, sigma0 * math.sqrt(t), std)

def mode_stats(x, std):
    """Mode weights (nearest mode centre), within-mode rms deviation per coordinate, TV error."""
    k = torch.cdist(x, TOY_MEANS).argmin(1)  # (B,)
    weights = torch.bincount(k, minlength=len(TOY_WEIGHTS)).float() / len(x)
    return weights, ((x - TOY_MEANS[k]) ** 2).mean().sqrt().item(), 0.5 * (weights - TOY_WEIGHTS).abs().sum().item()

def toy_lesson(cfg):
    """Lesson 1: plain Langevin against the annealed MDSM chain, all from the MDSM init 0.5 + N(0, I)."""
    std, n, x = cfg.TOY_STD, cfg.TOY_SAMPLES, 0.5 + torch.randn(cfg.TOY_SAMPLES, 2)
    runs = {"exact samples of p": TOY_MEANS[torch.multinomial(TOY_WEIGHTS, n, replacement=True)] + std * torch.randn(n, 2)}
    runs["plain Langevin"], h = x, cfg.PLAIN_STEP
    for _ in range(cfg.PLAIN_STEPS):  # Langevin on p itself: x <- x + h grad log p + sqrt(2h) z
        y = runs["plain Langevin"]
        runs["plain Langevin"] = y - h * grad_energy(partial(toy_energy, sigma=0.0, std=std), y) + math.sqrt(2 * h) * torch.randn_like(y)
    for T in mdsm_schedule(cfg.N_HOT, cfg.N_ANNEAL, cfg.N_COOL, cfg.T_MAX).tolist():
        energy = partial(toy_mdsm_energy, temperature=T, sigma0=cfg.TOY_SIGMA0, std=std)
        x = langevin_step(x, grad_energy(energy, x), T, cfg.STEP_SIZE, torch.randn_like(x))
    runs["MDSM chain, before the denoise"] = x
    runs["MDSM annealed + final denoise"] = tweedie_denoise(partial(toy_energy, sigma=cfg.TOY_SIGMA0, std=std), x, cfg.TOY_SIGMA0)
    print(f"lesson 1: {n} chains per sampler, {len(TOY_WEIGHTS)} modes of std {std} in 2-D\n"
          f"{'sampler':<30} | mode weights      | TV error | within-mode std")
    for name, x in runs.items():
        w, spread, tv = mode_stats(x, std)
        print(f"{name:<30} | {' '.join(f'{v:.3f}' for v in w.tolist())} | {tv:8.3f} | {spread:.4f}")
    # Why plain Langevin cannot fix its weights: the energy barrier on the way from mode 1 to mode 2.
    path = TOY_MEANS[0] + torch.linspace(0, 1, 201)[:, None] * (TOY_MEANS[1] - TOY_MEANS[0])  # (201, 2)
    barrier = (toy_energy(path, 0.0, std).max() - toy_energy(TOY_MEANS[:1], 0.0, std)).item()
    print(f"target weights {' '.join(f'{v:.3f}' for v in TOY_WEIGHTS.tolist())}. Barrier between modes 1 and 2: "
          f"{barrier:.1f} nats, so a crossing takes ~e^{barrier:.0f} = {math.exp(barrier):.0e} relaxation times.\n"
          f"MDSM cooling (T 1 -> 0) samples q_sigma0^(1/T), sharper than q_sigma0 (std {math.hypot(std, cfg.TOY_SIGMA0):.4f}); "
          f"Tweedie then shrinks deviations by {std ** 2 / (std ** 2 + cfg.TOY_SIGMA0 ** 2):.2f}")
    plot_toy(runs, std, os.path.join(cfg.OUT_DIR, "04_langevin_sampling.png"))
    # Lesson 2: AIS for log Z of p, exactly 0 (p is normalized). No HMC chain crosses the barrier either,
    # yet the importance weights correct the fraction of chains per mode; reverse AIS starts from exact samples.
    est = log_z_both_ways(partial(toy_energy, sigma=0.0, std=std), runs["exact samples of p"][:cfg.AIS_CHAINS], cfg)
    print(f"AIS for log Z of p (exact: 0), {cfg.AIS_CHAINS} chains x {cfg.AIS_STAGES} stages: forward {est['forward'][0]:.3f} "
          f"+- {est['forward'][1]:.3f}, reverse {est['reverse'][0]:.3f} +- {est['reverse'][1]:.3f}")

def plot_toy(runs, std, path):
    import matplotlib.pyplot as plt  # falls back to the file-only Agg backend where there is no display

    fig, axes = plt.subplots(1, len(runs), figsize=(3.6 * len(runs), 3.9))
    grid = torch.stack(torch.meshgrid(torch.linspace(-0.1, 1.1, 200), torch.linspace(-0.1, 1.1, 200), indexing="xy"), -1)
    density = torch.exp(-toy_energy(grid.reshape(-1, 2), 0.0, std)).reshape(200, 200)  # the target p on a grid
    for ax, (name, x) in zip(axes, runs.items()):
        w, spread, _ = mode_stats(x, std)
        ax.contour(grid[..., 0], grid[..., 1], density, levels=4, colors="0.6", linewidths=0.6)
        ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.3)
        ax.set_title(f"{name}\nmode weights {' / '.join(f'{v:.2f}' for v in w.tolist())}, std {spread:.3f}", fontsize=9)
        ax.set(xlim=(-0.1, 1.1), ylim=(-0.1, 1.1), aspect="equal", xlabel="x1", ylabel="x2")
    fig.tight_layout(), fig.savefig(path, dpi=80), plt.close(fig)
    print(f"figure: {path} (grey: contours of the target p)")

# ---- A trained model (03's EnergyNet): the MDSM sampler as coded, the paper's diagnostics, AIS.
def log_density(model, x, temperature=1.0, log_z=0.0, batch=500):
    """log p(x) = -E(x)/T - log Z, in chunks without gradients: (N, C, H, W) floats -> (N,) on the CPU."""
    device = next(model.parameters()).device
    with torch.no_grad():
        return torch.cat([-model(c.to(device)).float().cpu() / temperature for c in x.split(batch)]) - log_z

def generate(model, shape, sigma0, cfg):
    """N_SAMPLES images in chunks of BATCH: init 0.5 + N(0, I) as coded, annealed_langevin through the MDSM
    schedule, then (if DENOISE) one Tweedie step. Returns (N, C, H, W) floats on the CPU, unclamped."""
    temps, device = mdsm_schedule(cfg.N_HOT, cfg.N_ANNEAL, cfg.N_COOL, cfg.T_MAX), next(model.parameters()).device
    samples, t_start = [], time.time()
    for start in range(0, cfg.N_SAMPLES, cfg.BATCH):
        x = 0.5 + torch.randn(min(cfg.BATCH, cfg.N_SAMPLES - start), *shape, device=device)
        x = annealed_langevin(model, x, temps, cfg.STEP_SIZE, show_progress=True)
        x = tweedie_denoise(model, x, sigma0) if cfg.DENOISE else x
        samples.append(x.cpu())  # the one host sync per chunk
        rate = (start + len(x)) / (time.time() - t_start)  # the paper's FID and IS take 50,000 samples
        log_line(start + len(x), {"samples/s": rate, "h per 50k": 50_000 / rate / 3600, "nonfinite": int((~x.isfinite()).sum())})
    return torch.cat(samples)

def reference_images(cfg, mdsm, ckpt, split):
    """The model's data set (or --dataset) at the model's image size: uint8 (N, C, H, W)."""
    config = ckpt["config"]
    return mdsm.load_images(cfg.DATASET or config.get("DATASET", ""), cfg.DATA_DIR or config.get("DATA_DIR", "data"),
                            split, int(config.get("IMAGE_SIZE", 0)))

def nearest_figure(samples, train, k, path):
    """Appendix C: each sample beside its k nearest training images; returns the median nearest distance."""
    flat = train.flatten(1).float() / 255  # (M, D)
    d = torch.cat([torch.cdist(c.flatten(1).float() / 255, flat) for c in samples.split(256)]) / math.sqrt(flat.shape[1])
    d, idx = d.topk(k, largest=False)  # (Q, k) rms pixel distances, nearest first
    save_image_grid(torch.cat([torch.cat([samples[j:j + 1], train[idx[j]]]) for j in range(min(8, len(d)))]).float() / 255, path, nrow=k + 1)
    return d[:, 0].median().item()

def sample_checkpoint(cfg, mdsm, model, ckpt, out):
    args, sigma0 = ckpt["model_args"], float(ckpt["config"].get("SIGMA0", mdsm.SIGMA0))
    shape = (args["in_channels"], args.get("image_size", 32), args.get("image_size", 32))
    print(f"model: EnergyNet({args}) from {cfg.CKPT} (step {ckpt.get('step')}), sigma0 {sigma0}; schedule "
          f"{cfg.N_HOT + cfg.N_ANNEAL + cfg.N_COOL} steps (hot {cfg.N_HOT} at T={cfg.T_MAX:g}, anneal {cfg.N_ANNEAL}, "
          f"cool {cfg.N_COOL}), step size {cfg.STEP_SIZE}, {cfg.N_SAMPLES} samples in chunks of {cfg.BATCH}")
    try:
        x = generate(model, shape, sigma0, cfg)
    except torch.cuda.OutOfMemoryError:
        raise SystemExit(f"error: out of GPU memory with --batch={cfg.BATCH}; use a smaller --batch") from None
    x_uint8 = (x.clamp(0, 1) * 255).round().to(torch.uint8)  # the sampler never clamps; 8-bit files do
    save_image_grid(x[:64], os.path.join(out, "samples.png"))
    np.savez_compressed(os.path.join(out, "samples.npz"), samples=x_uint8.permute(0, 2, 3, 1).numpy())  # (N, H, W, C)
    print(f"pixels before clamping in [{x.min():.3f}, {x.max():.3f}], mean {x.mean():.3f}; saved {out}/samples.png, samples.npz")
    train, test = (reference_images(cfg, mdsm, ckpt, split) for split in ("train", "test"))
    g = torch.Generator().manual_seed(cfg.SEED)
    images = {"train": train[torch.randperm(len(train), generator=g)[:cfg.N_REF]], "samples": x_uint8[:cfg.N_REF],
              "test": test[torch.randperm(len(test), generator=g)[:cfg.N_REF]]}
    save_image_grid(images["test"][:64].float() / 255, os.path.join(out, "test_images.png"))
    for k, v in images.items():  # Appendix F: do the samples sit at the energies of real images?
        e = -log_density(model, v.float() / 255)
        print(f"energy of {k:<8}: mean {e.mean():.4g}  std {e.std():.4g}  (n={len(e)}, 8-bit images)")
    d = {k: nearest_figure(images[k], train, 5, os.path.join(out, f"nearest_{k}.png")) for k in ("samples", "test")}
    print(f"nearest training image, median rms pixel distance: samples {d['samples']:.4f}, test {d['test']:.4f}; saved "
          f"test_images.png (real test images), nearest_samples.png (Appendix C), nearest_test.png")

def likelihood(cfg, mdsm, model, ckpt, out):
    """log Z of exp(-E/T) by forward and reverse AIS, then test bits/dim beside trivial baselines."""
    sigma0, T, g = float(ckpt["config"].get("SIGMA0", mdsm.SIGMA0)), cfg.TEMPERATURE, torch.Generator().manual_seed(cfg.SEED)
    train, test = (reference_images(cfg, mdsm, ckpt, split) for split in ("train", "test"))
    test, d = test[:cfg.N_TEST or len(test)], test[0].numel()
    # Reverse AIS starts from held-out images noised like the density the model learned: exp(-E/T) fits
    # q_sigma with sigma = sigma0 sqrt(T). These are exact samples only if the model is exactly right.
    x_data = test[torch.randperm(len(test), generator=g)[:cfg.AIS_CHAINS]].float() / 255
    x_data = x_data + sigma0 * math.sqrt(T) * torch.randn(x_data.shape, generator=g)
    print(f"AIS: log Z of exp(-E/{T:g}) in d = {d}, {cfg.AIS_CHAINS} chains x {cfg.AIS_STAGES} stages ({cfg.BETA_SCHEDULE}), "
          f"{cfg.LEAPFROG} leapfrog step(s) from {cfg.HMC_STEP}, reference N(0, {cfg.REF_STD:g}^2 I)")
    t0 = time.time()
    est = log_z_both_ways(model, x_data.to(next(model.parameters()).device), cfg, show_progress=True)
    (f, fe), (r, re_), bits = est["forward"], est["reverse"], 1 / (d * math.log(2))  # nats -> bits/dim
    print(f"log Z: forward {f:.2f} +- {fe:.2f} (low in expectation), reverse {r:.2f} +- {re_:.2f} (high), "
          f"gap {r - f:.2f} nats = {(r - f) * bits:.4f} bits/dim [{time.time() - t0:.0f} s]")
    if abs(r - f) * bits > cfg.GAP_TOL:  # a negative gap (forward above reverse) is no better
        print(f"not converged: |gap| exceeds --gap_tol={cfg.GAP_TOL} bits/dim; use more stages, chains or leapfrog steps")
    # log p(x) = -E(x)/T - log Z: log Z is one constant, so it shifts bits/dim by log Z / (D ln 2)
    deq = dequantized_bits_per_dim(partial(log_density, model, temperature=T), test, 4, g).mean().item()
    cont = continuous_bits_per_dim(partial(log_density, model, temperature=T), test).mean().item()
    base = baseline_bits_per_dim(train, test, g)
    print(f"test bits/dim ({len(test)} images of {tuple(test.shape[1:])}), with forward | reverse AIS log Z:\n"
          f"  dequantized (headline)           {deq + f * bits:7.3f} | {deq + r * bits:7.3f}\n"
          f"  continuous, x = k/255 (papers')  {cont + f * bits:7.3f} | {cont + r * bits:7.3f}\n"
          + "\n".join(f"  baseline: {k:<23} {v:7.3f}" for k, v in base.items()))
    if deq + f * bits > base["diagonal Gaussian"]:
        print("warning: the model is worse than a diagonal Gaussian fitted to the training pixels")

# ---- Density conventions shared with 05 (05 loads these): bits/dim of 8-bit images under a density on [0,1]^D
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

def validate(cfg):
    """Every knob checked before any work: one line naming the knob and the allowed values."""
    rules = [(lambda v: v > 0, "> 0", "step_size t_max temperature ref_std hmc_step gap_tol toy_std toy_sigma0 plain_step"),
             (lambda v: v >= 0, ">= 0", "n_hot n_anneal n_cool n_test plain_steps"), (lambda v: v >= 2, ">= 2", "ais_chains ais_stages"),
             (lambda v: v >= 1, ">= 1", "n_samples batch n_ref leapfrog toy_samples"),
             (lambda v: v in ("sigmoid", "geometric", "linear"), "sigmoid, geometric or linear", "beta_schedule")]
    for ok, allowed, name, v in ((ok, a, n, getattr(cfg, n.upper())) for ok, a, names in rules for n in names.split()):
        if not ok(v):
            raise SystemExit(f"error: --{name}={v} is out of range; allowed: {allowed}")
    if cfg.N_HOT + cfg.N_ANNEAL + cfg.N_COOL < 1:
        raise SystemExit("error: --n_hot + --n_anneal + --n_cool = 0 Langevin steps; allowed: at least 1")

def check_writable(path):
    """Fail before any work, not at the first save."""
    try:
        os.makedirs(path, exist_ok=True)
        open(os.path.join(path, ".write_test"), "w").close(), os.remove(os.path.join(path, ".write_test"))
    except OSError as e:
        raise SystemExit(f"error: --out_dir: cannot write to {path} ({e.strerror}); choose another --out_dir") from None

def main(argv=None):
    cfg = parse_config(globals(), argv)
    validate(cfg)
    set_seed(cfg.SEED)
    parent, stem = os.path.split(os.path.splitext(os.path.abspath(cfg.CKPT))[0])
    out = os.path.join(cfg.OUT_DIR, f"{os.path.basename(parent)}_{stem}") if cfg.CKPT else cfg.OUT_DIR
    check_writable(out)  # e.g. out/04_langevin_sampling/03_mdsm_train_ckpt
    if not cfg.CKPT:
        torch.set_num_threads(1)  # (n, 2) and (n, 64) tensors: thread hand-offs would cost more than they save
        return toy_lesson(type(cfg)(**{**vars(cfg), "TEMPERATURE": 1.0}))  # the lessons work at T = 1
    mdsm = load_numbered("03_mdsm_train.py")  # reuse 03's EnergyNet, checkpoints and data loaders
    model, ckpt = mdsm.load_model(cfg.CKPT, device=pick_device(cfg.DEVICE), use_ema=cfg.USE_EMA)
    model.requires_grad_(False)  # gradients w.r.t. x only
    (likelihood if cfg.AIS else sample_checkpoint)(cfg, mdsm, model, ckpt, out)


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
