"""04 - Annealed Langevin sampling of an MDSM energy, AIS for its log Z, and scores of its samples.

MDSM (Li, Chen & Sommer, arXiv 1910.07762) samples its energy E with Langevin dynamics on
p_T = exp(-E/T), annealing the temperature T = sigma^2 / sigma0^2 from 100 to 0 (Section 4, as the
authors coded it), checks the samples against the data (Appendices C and F) and reports test
bits/dim from an AIS estimate of log Z. NCSN (Song & Ermon, arXiv 1907.05600, Section 3.2.2)
explains why a chain must be annealed: plain Langevin cannot move mass between separated modes.

  1. The MDSM step at temperature T, with step size sigma_s (0.02), i.e. Langevin on p_T with
     step h = sigma_s^2 T / 2:
       x <- x - (sigma_s^2 / 2) grad E(x) + sqrt(T) sigma_s z,   z ~ N(0, I),
     500 steps at T = 100, 2000 with T_k = 100 exp(-k ln(100) / 2000), 200 from T = 1 to 0, then
     one Tweedie denoise x <- x - sigma0^2 grad E(x).
  2. AIS (Neal 2001) for Z = int exp(-E(x)/T) dx walks from N(0, s^2 I) through
       E_b(x) = b E(x)/T + (1 - b) ||x||^2 / (2 s^2),   b = 0 -> 1,
     adding log w += E_b_prev(x) - E_b(x) at the current x before one HMC move at b; then
     log Z ~ log Z_0 + log mean exp(log w), low in expectation. Reverse AIS (Grosse, Ghahramani &
     Adams 2015) runs the same path from data, b = 1 -> 0, and errs high.
  3. Test bits/dim with log p(x) = -E(x)/T - log Z, uniformly dequantized, beside trivial
     baselines fitted to the training pixels.
  4. How good the samples are. A small classifier trained on the labelled data judges them: the
     share it is confident about (top p(y|x) >= 0.9), the total variation between its class
     histogram and the training labels', IS = exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016)
     and the Frechet distance of its features,
       FD = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)),
     each beside real test images (the ceiling) and a Gaussian fitted to the pixels (the
     baseline). IS and FID (Heusel et al. 2017) apply the same formulas to the Inception network.

Run:  python 04_langevin_sampling.py    # CPU, seconds: the two lessons on a 2-D mixture
      python 04_langevin_sampling.py --ckpt=out/03_mdsm_train/ckpt.pt --n_samples=1000 --batch=1000
      python 04_langevin_sampling.py --ckpt=... --n_hot=100 --n_anneal=400 --n_cool=40   # CPU
      python 04_langevin_sampling.py --ckpt=... --ais --ais_chains=100 --ais_stages=1000
      python 04_langevin_sampling.py --ckpt=... --n_samples=1000 --score   # labelled data
      python 04_langevin_sampling.py --ckpt=... --fid   # IS and FID, pip install torch-fidelity
      python 04_langevin_sampling.py --help    # every knob and its meaning

With no arguments, lesson 1 samples a 2-D mixture with weights 0.60/0.30/0.10: plain Langevin keeps
the weights of its starting points, the annealed MDSM chain recovers them; lesson 2 finds the
mixture's log Z = 0 by AIS, though no chain crosses between its modes.
Expected (seed 0): mode weights 0.33/0.30/0.38 (plain) and 0.59/0.31/0.10 (annealed); log Z 0 +- 0.1.
Output: out/04_langevin_sampling/04_langevin_sampling.png; with --ckpt, samples.png, samples.npz,
test_images.png and nearest_*.png in a folder named after the checkpoint; --ais prints log Z and
test bits/dim; --score and --fid cache their judges' results in OUT_DIR.
"""

import gzip
import hashlib
import importlib
import math
import os
import pickle
import sys
import time
import types
from functools import partial

import matplotlib.image
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ---- config: every knob can be overridden with --key=value (see --help) ----
# -- sampling a checkpoint of 03 --
CKPT = ""  # checkpoint of 03_mdsm_train.py; empty = run the two lessons
USE_EMA = False  # sample with the checkpoint's EMA weights (it must have them)
DATASET = ""  # data for the diagnostics and bits/dim; empty = the checkpoint's own DATASET
DATA_DIR = ""  # folder of the datasets; empty = the checkpoint's own DATA_DIR
N_SAMPLES = 64  # images to generate (the paper's FID and IS: 50000)
BATCH = 256  # chains run at once (chunks of N_SAMPLES); as large as memory allows
STEP_SIZE = 0.02  # sigma_s of the MDSM step (paper: 0.02), in (0, 1]
T_MAX = 100.0  # starting temperature, >= 1 (T = sigma^2 / sigma0^2: 100 <-> sigma = 1.0)
INIT_STD = 1.0  # chains start at 0.5 + INIT_STD N(0, I) (authors: 1); 0 = sigma0 sqrt(T_MAX)
N_HOT = 500  # steps at T = T_MAX
N_ANNEAL = 2000  # steps of geometric decay from T_MAX to 1
N_COOL = 200  # steps of linear decay from 1 to 0
DENOISE = True  # final one-step Tweedie denoise x - sigma0^2 grad E(x)
N_REF = 1000  # at most this many train/test images and samples for the energy and distance checks
# -- how good are the samples (with --ckpt) --
SAMPLES = ""  # an earlier run's samples.npz to check and score; empty = draw N_SAMPLES new ones
SCORE = False  # classifier score of the samples, of real test images and of a Gaussian baseline
SCORE_N = 1000  # images per classifier-score line, >= 2 (draws at least this many samples)
CLASSIFIER_EPOCHS = 3  # epochs of the scoring classifier (trained once, cached in OUT_DIR)
FID = False  # IS and FID on torch-fidelity's Inception network (pip install torch-fidelity)
FID_N = 50000  # samples for IS and FID, >= 2 (the paper's 50000; fewer bias FID upwards)
FID_WEIGHTS = ""  # torch-fidelity's Inception weights file; empty = torch hub's checkpoints folder
# -- AIS: log Z and test bits/dim of a checkpoint --
AIS = False  # with --ckpt: estimate log Z and test bits/dim instead of sampling
TEMPERATURE = 1.0  # T of the density exp(-E/T) whose log Z is estimated (paper: 1)
AIS_CHAINS = 100  # AIS chains per direction; the bootstrap error bar is over chains
AIS_STAGES = 1000  # distributions after b = 0 (cost: AIS_STAGES * LEAPFROG gradients per chain)
BETA_SCHEDULE = "sigmoid"  # sigmoid (dense at both ends) | geometric (dense near b = 0) | linear
REF_STD = 1.0  # s of the reference N(0, s^2 I), in (0, 100]; ~ 03's sigma_max
HMC_STEP = 0.01  # first leapfrog step; it then adapts by stage towards 65% acceptance
LEAPFROG = 1  # leapfrog steps per HMC move (1 = Metropolis-adjusted Langevin)
N_TEST = 0  # test images for bits/dim; 0 = the whole test split
GAP_TOL = 0.01  # reverse - forward gap (bits/dim) above which the output says "not converged"
# -- the two lessons (no --ckpt) --
TOY_SAMPLES = 4000  # chains per sampler in the lessons (at least AIS_CHAINS)
TOY_STD = 0.05  # std of each mixture component, in (0, 1] (modes 0.6-0.65 apart)
TOY_SIGMA0 = 0.1  # the MDSM sigma0 assumed by the toy's ideal energy, in (0, 1]
PLAIN_STEPS = 2700  # plain Langevin steps (the same budget as the MDSM chain)
PLAIN_STEP = 1e-4  # plain Langevin step h (stable only well below TOY_STD^2)
# -- the run --
OUT_DIR = "out/04_langevin_sampling"  # figures and samples
DEVICE = "auto"  # auto | cpu | cuda | cuda:N | mps, for --ckpt runs (the lessons run on the cpu)
SEED = 0  # seeds the initial points, the Langevin and the HMC noise

# 03's trained energy: its network (EnergyNet), its checkpoints and the images it was trained on.
mdsm = importlib.import_module("03_mdsm_train")


# ---- the MDSM sampler (06 reuses its parts). E is the energy, the score is -grad E ----
def mdsm_schedule(n_hot=500, n_anneal=2000, n_cool=200, t_max=100.0):
    """Temperatures of the MDSM chain: hot plateau, geometric anneal to 1, linear cool to 0."""
    hot = torch.full((n_hot,), float(t_max), dtype=torch.float64)
    k = torch.arange(n_anneal, dtype=torch.float64)
    # T_k = T_max exp(-k ln(T_max) / n_anneal), k = 0..n_anneal-1 (reaches 1 just after the end)
    anneal = t_max * torch.exp(-k * math.log(t_max) / max(n_anneal, 1))
    cool = torch.linspace(1.0, 0.0, n_cool, dtype=torch.float64)
    return torch.cat([hot, anneal, cool]).float()  # (n_hot + n_anneal + n_cool,)


def energy_and_grad(energy_fn, x, create_graph=False):
    """(E(x) (B,), grad_x E (like x)); detached unless create_graph. Works under no_grad too."""
    with torch.enable_grad():
        if not (create_graph and x.requires_grad):
            x = x.detach().requires_grad_(True)
        energy = energy_fn(x)  # (B,)
        # the sum's gradient is each E's own gradient: E of one image sees only that image
        (grad,) = torch.autograd.grad(energy.sum(), x, create_graph=create_graph)
    if create_graph:
        return energy, grad
    return energy.detach(), grad


def grad_energy(energy_fn, x, create_graph=False):
    """grad_x E(x), like x (the score is its negative)."""
    return energy_and_grad(energy_fn, x, create_graph)[1]


def langevin_step(x, grad, temperature, step_size, noise):
    """One MDSM step: Langevin on exp(-E/T) with step h = step_size^2 T / 2."""
    # x <- x - (sigma_s^2 / 2) grad E(x) + sqrt(T) sigma_s z     (the MDSM sampler, as coded)
    return x - 0.5 * step_size**2 * grad + temperature**0.5 * step_size * noise


def annealed_langevin(energy_fn, x, temperatures, step_size=0.02, show_progress=False):
    """langevin_step at each temperature in turn; returns the samples. No .item() inside, so a
    GPU never waits for the host."""
    temps = torch.as_tensor(temperatures, dtype=x.dtype).to(x.device)  # (steps,)
    t_start = time.time()
    for k in range(len(temps)):
        x = langevin_step(x, grad_energy(energy_fn, x), temps[k], step_size, torch.randn_like(x))
        if show_progress:
            progress(k + 1, len(temps), t_start, "Langevin steps")
    return x


def tweedie_denoise(energy_fn, x, sigma0=0.1):
    """E[x_clean | x] for x ~ q_sigma0: the MDSM fit sigma0^2 grad E(x) = x - E[x_clean | x]."""
    # x <- x - sigma0^2 grad E(x)      (the final one-step denoise of the MDSM sampler)
    return x - sigma0**2 * grad_energy(energy_fn, x)


# ---- AIS (Neal 2001) along E_b = b E/T + (1 - b) ||x||^2 / (2 s^2), and its reverse ----
def beta_schedule(n_stages, kind="sigmoid"):
    """(n_stages + 1,) float64 from b_0 = 0 to b_K = 1."""
    t = torch.linspace(0, 1, n_stages + 1, dtype=torch.float64)
    if kind == "geometric":  # b = 1e-4 ... 1 evenly in log b, after b_0 = 0
        return torch.cat([t[:1], torch.logspace(-4, 0, n_stages, dtype=torch.float64)])
    if kind == "linear":
        return t
    # Grosse et al.'s sigmoid schedule, rescaled to start exactly at 0 and end exactly at 1
    s = torch.sigmoid(8 * (t - 0.5))
    return (s - s[0]) / (s[-1] - s[0])


def path_energy(x, e, g, coef):
    """E_b and grad_x E_b from E(x) = e (B,), grad E(x) = g and coef = (b/T, (1 - b)/s^2)."""
    # E_b(x) = (b/T) E(x) + ((1 - b)/s^2) ||x||^2 / 2
    energy = coef[0] * e + 0.5 * coef[1] * x.flatten(1).pow(2).sum(1)
    # grad E_b(x) = (b/T) grad E(x) + ((1 - b)/s^2) x
    return energy, coef[0] * g + coef[1] * x


def hmc_move(energy_fn, state, coef, step, n_leapfrog):
    """One HMC move that leaves exp(-E_b) invariant: state (x, E(x), grad E(x)) -> (the new
    state, accepted (B,) bool)."""
    p = torch.randn_like(state[0])  # momentum ~ N(0, I)
    u, grad_u = path_energy(*state, coef)
    h_old = u + 0.5 * p.flatten(1).pow(2).sum(1)  # H = E_b(x) + ||p||^2 / 2, (B,)
    new = state
    p = p - 0.5 * step * grad_u  # leapfrog: a half step on p first ...
    for i in range(n_leapfrog):
        x = new[0] + step * p
        new = (x, *energy_and_grad(energy_fn, x))
        u, grad_u = path_energy(*new, coef)
        # ... then full steps on p, and a half step last
        p = p - (0.5 if i == n_leapfrog - 1 else 1.0) * step * grad_u
    h_new = u + 0.5 * p.flatten(1).pow(2).sum(1)
    # Metropolis, per chain: accept with probability min(1, exp(H_old - H_new)); NaN rejects
    accept = torch.rand_like(h_old).log() < h_old - h_new  # (B,)
    kept = []
    for n, o in zip(new, state):
        kept.append(torch.where(accept.view(-1, *[1] * (n.dim() - 1)), n, o))
    return tuple(kept), accept


def ais(
    energy_fn, x, betas, temperature=1.0, ref_std=1.0, step=0.01, n_leapfrog=1, show_progress=False
):
    """x: exact samples of exp(-E_b0). Returns log w (B,) float64 with E[w] = Z_bK / Z_b0, and the
    HMC acceptance per move (K - 1,). Forward AIS: betas 0 -> 1; reverse: the same betas flipped."""
    e, g = energy_and_grad(energy_fn, x)
    log_w = torch.zeros(len(x), dtype=torch.float64, device=x.device)
    acc = []
    t_start = time.time()
    for k in range(1, len(betas)):
        b_prev, b = betas[k - 1].item(), betas[k].item()
        # log w += E_{b_prev}(x) - E_b(x) = (b - b_prev) (||x||^2 / (2 s^2) - E(x)/T), at the current x
        log_w += (b - b_prev) * (
            x.flatten(1).pow(2).sum(1) / (2 * ref_std**2) - e / temperature
        ).double()
        if k < len(betas) - 1:  # the last distribution needs no move
            coef = (b / temperature, (1 - b) / ref_std**2)
            (x, e, g), accepted = hmc_move(energy_fn, (x, e, g), coef, step, n_leapfrog)
            acc.append(accepted.float().mean().item())
            step *= math.exp(acc[-1] - 0.65)  # adapt the step towards 65% acceptance (Neal 2011)
        if show_progress:
            progress(k, len(betas) - 1, t_start, "AIS stages")
    return log_w, torch.tensor(acc)


def log_mean_exp(log_w, n_boot=1000, seed=0):
    """log mean exp(log w), computed stably, and its bootstrap standard error over chains."""

    def lme(v):  # log mean exp along the last axis
        return torch.logsumexp(v, -1) - math.log(v.shape[-1])

    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(log_w), (n_boot, len(log_w)), generator=gen)  # (n_boot, B) resamples
    return lme(log_w.cpu()).item(), lme(log_w.cpu()[idx]).std().item()


def log_z_both_ways(energy_fn, x_data, cfg, show_progress=False):
    """Forward AIS from N(0, s^2 I), reverse AIS from x_data (ideally exact samples of exp(-E/T)):
    {"forward": (log Z, error), "reverse": (log Z, error)}. Prints the HMC acceptance per fifth
    of the stages."""
    d, s = x_data[0].numel(), cfg.REF_STD
    betas = beta_schedule(cfg.AIS_STAGES, cfg.BETA_SCHEDULE)
    x0 = s * torch.randn(cfg.AIS_CHAINS, *x_data.shape[1:], device=x_data.device)  # exact, b = 0
    out = {}
    for name, x, b, sign in (("forward", x0, betas, 1), ("reverse", x_data, betas.flip(0), -1)):
        log_w, acc = ais(
            energy_fn, x, b, cfg.TEMPERATURE, s, cfg.HMC_STEP, cfg.LEAPFROG, show_progress
        )
        est, err = log_mean_exp(log_w, seed=cfg.SEED)
        # log Z = log Z_0 +- log mean w (reverse: E[w] = Z_0 / Z), Z_0 = (2 pi s^2)^(d/2)
        out[name] = (0.5 * d * math.log(2 * math.pi * s**2) + sign * est, err)
        fifths = " ".join(f"{v.mean():.2f}" for v in acc.chunk(5))
        print(f"  {name} AIS: HMC acceptance by fifths of the stages {fifths}")
    return out


# ---- bits/dim of 8-bit images under a density on [0, 1]^D (05 uses these too) ----
def dequantized_bits_per_dim(log_prob, x_uint8, n_draws=4, generator=None):
    """Per-image test NLL in bits/dim, uniformly dequantized: x = (k + u)/256 with u ~ U[0,1)^D, so
    that -log2 P(k) <= E_u[-log p(x)] / ln 2 + D log2 256 (Jensen). log_prob maps (B, C, H, W)
    floats in [0, 1) to log p(x) (B,) in nats. Returns (B,) float64, averaged over n_draws u."""
    d = x_uint8[0].numel()  # real pixels only: pass images without padding
    total = torch.zeros(len(x_uint8), dtype=torch.float64)
    for _ in range(n_draws):
        u = torch.rand(x_uint8.shape, generator=generator, dtype=torch.float64)
        total += log_prob(((x_uint8.double() + u) / 256).float()).double().cpu()
    # bits/dim = -E_u[log p(x)] / (D ln 2) + log2 256
    return -total / n_draws / (d * math.log(2)) + 8.0


def continuous_bits_per_dim(log_prob, x_uint8):
    """The papers' single-pass convention (MDSM's 7.04, dual score's 3.36): log p read at x = k/255,
    no dequantization noise. Not a bound; ill-posed for data with few grey levels."""
    # bits/dim = -log p(k/255) / (D ln 2) + 8
    return (
        -log_prob(x_uint8.float() / 255).double().cpu() / (x_uint8[0].numel() * math.log(2)) + 8.0
    )


def baseline_bits_per_dim(train_uint8, test_uint8, generator=None):
    """Dequantized test bits/dim of the trivial densities a model must beat, each fitted to the
    TRAINING pixels only: uniform on [0,1]^D (8 exactly), a diagonal and a full-covariance Gaussian
    fitted to dequantized training pixels, and independent per-pixel 256-bin histograms (add-one
    smoothed; each bin a uniform density of width 1/256)."""
    d = train_uint8[0].numel()
    k_train, k_test = train_uint8.flatten(1).long(), test_uint8.flatten(1).long()  # (N, D) levels
    x_train = (k_train + torch.rand(k_train.shape, generator=generator, dtype=torch.float64)) / 256
    x_test = (k_test + torch.rand(k_test.shape, generator=generator, dtype=torch.float64)) / 256
    mean = x_train.mean(0)  # (D,)
    diag = torch.distributions.Normal(mean, x_train.std(0)).log_prob(x_test).sum(1)
    cov = torch.cov(x_train.T) + 1e-9 * torch.eye(d, dtype=torch.float64)  # (D, D)
    full = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov).log_prob(x_test)
    # counts[i, k] = 1 + the training images whose pixel i has grey level k, (D, 256)
    flat_bins = (k_train + 256 * torch.arange(d)).flatten()
    counts = torch.bincount(flat_bins, minlength=256 * d).view(d, 256).double() + 1
    # per-pixel density on [0, 1): 256 P_i(k) on the bin of grey level k
    log_density = (counts / counts.sum(1, keepdim=True) * 256).log()
    hist = log_density.gather(1, k_test.T).sum(0)  # (N_test,)

    def to_bits(log_p):
        return -log_p.mean().item() / (d * math.log(2)) + 8.0

    return {
        "uniform": 8.0,
        "diagonal Gaussian": to_bits(diag),
        "full-covariance Gaussian": to_bits(full),
        "per-pixel histogram": to_bits(hist),
    }


# ---- how good are the samples: a classifier score for labelled data, and IS and FID ----
# A judge network maps an image to class probabilities p(y|x) and to features. Its numbers for N
# samples are printed beside those of N real test images (the ceiling) and of N draws of a Gaussian
# fitted to the training pixels (the trivial baseline). IS and FID apply the same two formulas to
# the Inception network of the original IS and FID code (torch-fidelity's copy of its weights).
PAPER_IS_FID = (8.31, 31.7)  # MDSM on CIFAR-10, 50,000 samples (arXiv 1910.07762, Table 1)


class ScoreClassifier(nn.Module):
    """(B, C, H, W) uint8 -> logits (B, K); features() -> (B, 128), the layer before the logits."""

    def __init__(self, in_channels=1, n_classes=10, width=32):
        super().__init__()
        self.model_args = dict(in_channels=in_channels, n_classes=n_classes, width=width)
        self.trunk = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # H/2
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # H/4
            nn.AdaptiveAvgPool2d(4),  # (B, 2 width, 4, 4) for any side >= 4
            nn.Flatten(),
            nn.Linear(2 * width * 16, 128),
            nn.ReLU(),
        )
        self.head = nn.Linear(128, n_classes)

    def features(self, x):
        return self.trunk(x.float() / 255)  # pixels in [0, 1], as 03 trains on them

    def forward(self, x):
        return self.head(self.features(x))


def train_classifier(
    x_train, y_train, n_classes, epochs=3, batch=128, lr=2e-3, seed=0, device="cpu"
):
    """Cross-entropy, Adam, learning rate decayed linearly to 0. x_train: uint8 (N, C, H, W)."""
    torch.manual_seed(seed)  # the initial weights
    model = ScoreClassifier(x_train.shape[1], n_classes).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)  # the batch order
    per_epoch = max(1, len(x_train) // batch)
    steps = epochs * per_epoch
    t_start = time.time()
    for step in range(steps):
        b = step % per_epoch
        if b == 0:  # a new epoch: a new order
            order = torch.randperm(len(x_train), generator=g)
        idx = order[b * batch : (b + 1) * batch]
        logits = model(x_train[idx].to(device))  # (B, K)
        # -log p(y|x), averaged over the batch
        loss = F.cross_entropy(logits, y_train[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.param_groups[0]["lr"] = lr * (1 - step / steps)
        opt.step()
        progress(step + 1, steps, t_start, "classifier steps")
    return model.eval()


def classifier_outputs(model, x, batch=1000):
    """p(y|x) (N, K) and penultimate features (N, 128), float64 on the CPU, for uint8 images x."""
    device = next(model.parameters()).device
    probs = []
    feats = []
    with torch.no_grad():
        for chunk in x.split(batch):
            h = model.features(chunk.to(device))
            probs.append(model.head(h).softmax(1).double().cpu())
            feats.append(h.double().cpu())
    return torch.cat(probs), torch.cat(feats)


def fit_gaussian(x, chunk=4096):
    """Mean (D,) and covariance (D, D) of the rows of x (N, D), accumulated in float64 by chunks."""
    mean = sum(c.double().sum(0) for c in x.split(chunk)) / len(x)
    # cov = sum_i (x_i - mean)(x_i - mean)^T / (N - 1)
    scatter = sum((c.double() - mean).T @ (c.double() - mean) for c in x.split(chunk))
    return mean, scatter / (len(x) - 1)


def frechet_distance(mu1, cov1, mu2, cov2):
    """Frechet (2-Wasserstein) distance between N(mu1, cov1) and N(mu2, cov2), in float64. FD of
    the classifier's features here, FID of Inception features below: one formula."""
    mu1, cov1, mu2, cov2 = (torch.as_tensor(v).double() for v in (mu1, cov1, mu2, cov2))
    w, v = torch.linalg.eigh(cov1)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T  # cov1^(1/2); round-off negatives clamped to 0
    # (cov1 cov2)^(1/2) is not symmetric, but cov1^(1/2) cov2 cov1^(1/2) is (PSD) with the same
    # eigenvalues, so tr((cov1 cov2)^(1/2)) = sum_i sqrt(lambda_i) of that symmetric matrix
    m = root1 @ cov2 @ root1
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    # FD = ||mu1 - mu2||^2 + tr(cov1) + tr(cov2) - 2 tr((cov1 cov2)^(1/2))
    return ((mu1 - mu2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * tr_covmean).item()


def inception_score(probs):
    """exp(E_x KL(p(y|x) || p(y))), p(y) = E_x p(y|x): 1 (no information) to K (sure, balanced)."""
    p = torch.as_tensor(probs).double()  # (N, K)
    p_y = p.mean(0)  # (K,)
    # KL(p(y|x) || p(y)) = sum_y p(y|x) (log p(y|x) - log p(y)), with 0 log 0 = 0
    kl = (torch.xlogy(p, p) - torch.xlogy(p, p_y)).sum(1)  # (N,)
    return kl.mean().exp().item()


def split_inception_score(logits, splits=10):
    """IS as the IS paper reports it: mean and std over `splits` equal parts of the images, taken
    in torch-fidelity's fixed shuffled order (so the numbers equal its calculate_metrics')."""
    order = torch.from_numpy(np.random.RandomState(2020).permutation(len(logits)))
    p = logits[order].double().softmax(1)  # p(y|x), (N, K)
    n = len(p)
    scores = []
    for i in range(splits):
        scores.append(inception_score(p[i * n // splits : (i + 1) * n // splits]))
    scores = torch.tensor(scores, dtype=torch.float64)
    return scores.mean().item(), scores.std(correction=0).item()


def confident_share(probs, threshold=0.9):
    """Share of images whose top class has p(y|x) >= threshold."""
    return (probs.max(1).values >= threshold).double().mean().item()


def class_total_variation(probs, label_hist):
    """TV = 1/2 sum_y |h(y) - h_train(y)|, h = histogram of the predicted classes argmax p(y|x)."""
    h = torch.bincount(probs.argmax(1), minlength=len(label_hist)).double() / len(probs)
    return 0.5 * (h - label_hist).abs().sum().item()


def classifier_score(model, x, label_hist, ref_mean, ref_cov):
    """The four numbers of the score line for uint8 images x (N, C, H, W)."""
    probs, feats = classifier_outputs(model, x)
    mean, cov = fit_gaussian(feats)
    return {
        "confident": confident_share(probs, 0.9),
        "class TV": class_total_variation(probs, label_hist),
        "IS": inception_score(probs),
        "FD": frechet_distance(mean, cov, ref_mean, ref_cov),  # against the test images' features
        "n": len(x),
    }


def score_line(s, label):
    return (
        f"classifier score: confident {s['confident']:.2f} | class TV {s['class TV']:.2f} | "
        f"IS {s['IS']:.2f} | FD {s['FD']:.2f} | n {s['n']} | {label}"
    )


def gaussian_pixel_draws(x_train, n, generator=None):
    """n draws of N(mean, cov) fitted to the training pixels (full covariance), rounded to uint8."""
    mean, cov = fit_gaussian(x_train.flatten(1))  # (D,), (D, D) in grey levels 0..255
    w, v = torch.linalg.eigh(cov)  # not Cholesky: always-black border pixels make cov singular
    root = v * w.clamp(min=0).sqrt()  # cov = root root^T
    z = torch.randn(n, len(mean), generator=generator, dtype=torch.float64)
    x = mean + z @ root.T  # x = mean + root z,  z ~ N(0, I)
    return x.clamp(0, 255).round().to(torch.uint8).view(n, *x_train.shape[1:])


def sample_scores(classifier, samples, train, test, labels, n, seed=0):
    """The score line for the first n samples, n real test images (the ceiling) and n draws of a
    Gaussian fitted to the training pixels (the baseline); returns {label: scores}. Images are
    uint8 (N, C, H, W), labels = (y_train, y_test). FD is measured against one half of the test
    split and the real images come from the other half, so their FD is the sampling noise at n."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(test), generator=g)
    reference, real = test[order[: len(order) // 2]], test[order[len(order) // 2 :]]
    y_train = labels[0]
    k = classifier.head.out_features
    label_hist = torch.bincount(y_train, minlength=k).double() / len(y_train)  # (K,)
    ref_mean, ref_cov = fit_gaussian(classifier_outputs(classifier, reference)[1])
    images = {
        "samples": samples[:n],
        "real test images (ceiling)": real[:n],
        "Gaussian fit to the training pixels (baseline)": gaussian_pixel_draws(train, n, g),
    }
    scores = {}
    for label, x in images.items():
        scores[label] = classifier_score(classifier, x, label_hist, ref_mean, ref_cov)
        print(score_line(scores[label], label), flush=True)
    return scores


def inception_outputs(inception, x, batch=100):
    """torch-fidelity's Inception on uint8 images (N, C, H, W), grey repeated as R, G, B (it
    resizes them to 299x299 itself): FID's features (N, 2048) and IS's logits (N, 1008), float32
    on the CPU."""
    device = next(inception.parameters()).device
    feats = []
    logits = []
    with torch.no_grad():
        for chunk in x.split(batch):
            f, logit = inception(rgb_uint8(chunk).to(device))
            feats.append(f.cpu())
            logits.append(logit.cpu())
    return torch.cat(feats), torch.cat(logits)


def inception_references(inception, train, test, n, seed=0):
    """What the samples' IS and FID are compared with: the Gaussian of the training images'
    Inception features (FID's reference), the IS of n random training images (the ceiling) and
    the FID of the whole test split against the training split (the floor)."""
    feats, logits = inception_outputs(inception, train)
    train_gaussian = fit_gaussian(feats)
    g = torch.Generator().manual_seed(seed)
    real = torch.randperm(len(train), generator=g)[:n]
    test_gaussian = fit_gaussian(inception_outputs(inception, test)[0])
    return {
        "train": train_gaussian,
        "n train": len(train),
        "real IS": split_inception_score(logits[real], min(10, len(real))),
        "n real": len(real),
        "test FID": frechet_distance(*test_gaussian, *train_gaussian),
        "n test": len(test),
    }


def fidelity_scores(inception, samples, refs):
    """IS of the samples and their FID against the training images, printed beside the
    references and the paper's numbers."""
    t_start = time.time()
    n = len(samples)
    feats, logits = inception_outputs(inception, samples)
    is_mean, is_std = split_inception_score(logits, min(10, n))
    # FID = the Frechet distance between Gaussians fitted to the Inception features
    fid = frechet_distance(*fit_gaussian(feats), *refs["train"])
    real_mean, real_std = refs["real IS"]
    print(
        f"IS and FID (torch-fidelity's Inception): IS {is_mean:.2f} +- {is_std:.2f} | FID "
        f"{fid:.2f} | n {n} samples vs {refs['n train']} training images "
        f"[{time.time() - t_start:.0f} s]"
    )
    print(
        f"  real training images: IS {real_mean:.2f} +- {real_std:.2f} (n {refs['n real']}, the "
        f"ceiling) | test split vs training split: FID {refs['test FID']:.2f} (n {refs['n test']}, "
        "the floor)"
    )
    print(f"  paper (MDSM on CIFAR-10, n 50000): IS {PAPER_IS_FID[0]} | FID {PAPER_IS_FID[1]}")
    if n < 50_000:
        print(f"  note: n {n} < 50000: FID is biased upwards at small n; compare only at equal n")
    return {"IS": is_mean, "IS std": is_std, "FID": fid}


# ---- lessons 1 and 2: a 2-D mixture whose noisy densities and log Z are known exactly ----
TOY_MEANS = torch.tensor([[0.2, 0.2], [0.8, 0.25], [0.5, 0.8]])  # (K, 2), inside [0, 1]^2
TOY_WEIGHTS = torch.tensor([0.6, 0.3, 0.1])  # (K,), unequal on purpose


def mixture_energy(x, means, weights, var):
    """-log sum_k w_k N(x; mu_k, var I), a normalized density (log Z = 0 at T = 1): (B, d) -> (B,)."""
    d2 = ((x[:, None, :] - means) ** 2).sum(-1)  # (B, K)
    log_norm = x.shape[1] / 2 * math.log(2 * math.pi * var)
    return -torch.logsumexp(weights.log() - d2 / (2 * var), 1) + log_norm


def toy_energy(x, sigma, std):
    """-log q_sigma: noising N(mu_k, std^2 I) by sigma gives N(mu_k, (std^2 + sigma^2) I)."""
    return mixture_energy(x, TOY_MEANS, TOY_WEIGHTS, std**2 + sigma**2)


def toy_mdsm_energy(x, temperature, sigma0, std):
    """An ideal MDSM model at temperature T fits sigma0^2 grad E(x~) = -sigma^2 grad log q_sigma(x~),
    so E = T (-log q_sigma) + const with T = sigma^2 / sigma0^2. In high dimension the noise levels
    live on disjoint shells and ONE network serves every T; in 2-D they overlap, so the toy gets
    each T's exact energy (q_sigma0's below T = 1)."""
    t = max(float(temperature), 1.0)
    return t * toy_energy(x, sigma0 * math.sqrt(t), std)


def plain_langevin(energy_fn, x, h, n_steps):
    """Langevin on p = exp(-E) itself with one fixed step h, no annealing."""
    for _ in range(n_steps):
        # x <- x - h grad E(x) + sqrt(2h) z
        x = x - h * grad_energy(energy_fn, x) + math.sqrt(2 * h) * torch.randn_like(x)
    return x


def toy_mdsm_chain(x, cfg):
    """The MDSM chain on the toy: langevin_step through mdsm_schedule, each T with its exact energy."""
    for T in mdsm_schedule(cfg.N_HOT, cfg.N_ANNEAL, cfg.N_COOL, cfg.T_MAX).tolist():
        energy = partial(toy_mdsm_energy, temperature=T, sigma0=cfg.TOY_SIGMA0, std=cfg.TOY_STD)
        x = langevin_step(x, grad_energy(energy, x), T, cfg.STEP_SIZE, torch.randn_like(x))
    return x


def mode_stats(x):
    """Mode weights (nearest mode centre), within-mode rms deviation per coordinate, TV error."""
    k = torch.cdist(x, TOY_MEANS).argmin(1)  # (B,)
    weights = torch.bincount(k, minlength=len(TOY_WEIGHTS)).float() / len(x)
    spread = ((x - TOY_MEANS[k]) ** 2).mean().sqrt().item()
    return weights, spread, 0.5 * (weights - TOY_WEIGHTS).abs().sum().item()


def toy_lesson(cfg):
    """Lesson 1: plain Langevin against the annealed MDSM chain, both from MDSM's initialization
    0.5 + N(0, I). Lesson 2: AIS for the mixture's log Z."""
    std, n = cfg.TOY_STD, cfg.TOY_SAMPLES
    x0 = 0.5 + torch.randn(n, 2)  # (n, 2)
    exact = TOY_MEANS[torch.multinomial(TOY_WEIGHTS, n, replacement=True)] + std * torch.randn(n, 2)
    runs = {"exact samples of p": exact}
    p_energy = partial(toy_energy, sigma=0.0, std=std)
    runs["plain Langevin"] = plain_langevin(p_energy, x0, cfg.PLAIN_STEP, cfg.PLAIN_STEPS)
    stop_if_nonfinite(runs["plain Langevin"], "plain Langevin", "a smaller --plain_step")
    x = toy_mdsm_chain(x0, cfg)
    stop_if_nonfinite(x, "the MDSM chain", "a smaller --step_size or --t_max")
    runs["MDSM chain, before the denoise"] = x
    q_sigma0 = partial(toy_energy, sigma=cfg.TOY_SIGMA0, std=std)
    runs["MDSM annealed + final denoise"] = tweedie_denoise(q_sigma0, x, cfg.TOY_SIGMA0)
    print(f"lesson 1: {n} chains per sampler, {len(TOY_WEIGHTS)} modes of std {std} in 2-D")
    print(f"{'sampler':<30} | mode weights      | TV error | within-mode std")
    for name, x in runs.items():
        w, spread, tv = mode_stats(x)
        weights = " ".join(f"{v:.3f}" for v in w.tolist())
        print(f"{name:<30} | {weights} | {tv:8.3f} | {spread:.4f}")
    # Why plain Langevin cannot fix its weights: the energy barrier between modes 1 and 2.
    path = TOY_MEANS[0] + torch.linspace(0, 1, 201)[:, None] * (TOY_MEANS[1] - TOY_MEANS[0])
    barrier = (toy_energy(path, 0.0, std).max() - toy_energy(TOY_MEANS[:1], 0.0, std)).item()
    target = " ".join(f"{v:.3f}" for v in TOY_WEIGHTS.tolist())
    print(
        f"target weights {target}. Barrier between modes 1 and 2: {barrier:.1f} nats, so a crossing "
        f"takes ~e^{barrier:.0f} = {math.exp(barrier):.0e} relaxation times."
    )
    # cooling from T = 1 to 0 samples q_sigma0^(1/T); Tweedie shrinks by std^2 / (std^2 + sigma0^2)
    shrink = std**2 / (std**2 + cfg.TOY_SIGMA0**2)
    print(
        f"MDSM cooling (T 1 -> 0) samples q_sigma0^(1/T), sharper than q_sigma0 (std "
        f"{math.hypot(std, cfg.TOY_SIGMA0):.4f}); Tweedie then shrinks deviations by {shrink:.2f}"
    )
    plot_toy(runs, std, os.path.join(cfg.OUT_DIR, "04_langevin_sampling.png"))
    # Lesson 2: AIS for log Z of p (exactly 0: p is normalized), at T = 1. No HMC chain crosses
    # the barrier either, yet the importance weights correct the fraction of chains per mode.
    # Reverse AIS starts from exact samples of p.
    at_t1 = types.SimpleNamespace(**{**vars(cfg), "TEMPERATURE": 1.0})
    est = log_z_both_ways(p_energy, exact[: cfg.AIS_CHAINS], at_t1)
    stop_if_nonfinite(
        torch.tensor([*est["forward"], *est["reverse"]]), "AIS", "a smaller --hmc_step"
    )
    (f, fe), (r, re_) = est["forward"], est["reverse"]
    print(
        f"AIS for log Z of p (exact: 0), {cfg.AIS_CHAINS} chains x {cfg.AIS_STAGES} stages: "
        f"forward {f:.3f} +- {fe:.3f}, reverse {r:.3f} +- {re_:.3f}"
    )


# ---- a trained model (03's EnergyNet): the MDSM sampler as coded, the paper's diagnostics ----
def log_density(model, x, temperature=1.0, log_z=0.0, batch=500):
    """log p(x) = -E(x)/T - log Z, in chunks without gradients: (N, C, H, W) floats -> (N,) on the
    CPU."""
    device = next(model.parameters()).device
    with torch.no_grad():
        energies = [model(c.to(device)).float().cpu() for c in x.split(batch)]
    return -torch.cat(energies) / temperature - log_z


def generate(model, shape, sigma0, cfg):
    """N_SAMPLES images of shape (C, H, W) in chunks of BATCH: MDSM's initialization 0.5 + N(0, I)
    (INIT_STD = 0: the first temperature's noise level sigma0 sqrt(T_MAX) instead), annealed_langevin through mdsm_schedule, then (if DENOISE) one Tweedie step. Returns
    (N_SAMPLES, C, H, W) floats on the CPU, unclamped; stops if a chain diverged."""
    device = next(model.parameters()).device
    temps = mdsm_schedule(cfg.N_HOT, cfg.N_ANNEAL, cfg.N_COOL, cfg.T_MAX)
    # a model trained up to sigma_max < 1 has never seen the authors' start (noise of std 1)
    init_std = cfg.INIT_STD if cfg.INIT_STD > 0 else sigma0 * math.sqrt(cfg.T_MAX)
    samples = []
    t_start = time.time()
    for start in range(0, cfg.N_SAMPLES, cfg.BATCH):
        x = 0.5 + init_std * torch.randn(
            min(cfg.BATCH, cfg.N_SAMPLES - start), *shape, device=device
        )
        x = annealed_langevin(model, x, temps, cfg.STEP_SIZE, show_progress=True)
        if cfg.DENOISE:
            x = tweedie_denoise(model, x, sigma0)
        samples.append(x.cpu())  # the one host sync per chunk
        hint = "a smaller --step_size or --t_max (below 100 with --init_std=0)"
        stop_if_nonfinite(samples[-1], "the Langevin chains", hint)
        rate = (start + len(x)) / (time.time() - t_start)  # the paper's FID and IS take 50,000
        log_line(start + len(x), {"samples/s": rate, "h per 50k": 50_000 / rate / 3600})
    return torch.cat(samples)


def nearest_distances(queries, train, k):
    """Appendix C: the k nearest training images of each query, by rms pixel distance.
    uint8 (Q, C, H, W), (M, C, H, W) -> distances (Q, k), nearest first, and indices (Q, k)."""
    flat = train.flatten(1).float() / 255  # (M, D)
    best = []
    for chunk in queries.split(256):  # (256, M) distances at a time
        d = torch.cdist(chunk.flatten(1).float() / 255, flat) / math.sqrt(flat.shape[1])
        best.append(d.topk(k, largest=False))
    return torch.cat([b.values for b in best]), torch.cat([b.indices for b in best])


def sample_checkpoint(cfg, model, ckpt, train, test, out, samples=None, labels=None):
    """Samples (or the given ones), then the paper's checks: do they sit at the energies of real
    images (Appendix F), and how far are they from their nearest training image (Appendix C)?
    Then, if asked, how good they are: the classifier score and IS/FID."""
    shape = tuple(train.shape[1:])
    sigma0 = checkpoint_sigma0(ckpt)
    n_steps = cfg.N_HOT + cfg.N_ANNEAL + cfg.N_COOL
    how = (
        f"schedule {n_steps} steps (hot {cfg.N_HOT} at T={cfg.T_MAX:g}, anneal {cfg.N_ANNEAL}, cool "
        f"{cfg.N_COOL}), step size {cfg.STEP_SIZE}, {cfg.N_SAMPLES} samples in chunks of {cfg.BATCH}"
    )
    if samples is not None:  # --samples: an earlier run's samples, checked and scored again
        how = f"{len(samples)} samples read from {cfg.SAMPLES}"
    print(
        f"model: EnergyNet({ckpt['model_args']}) from {cfg.CKPT} (step {ckpt.get('step')}), sigma0 "
        f"{sigma0}; {how}"
    )
    if samples is None:
        samples = save_samples(generate(model, shape, sigma0, cfg), out)
    x_uint8 = samples  # (N, C, H, W) uint8
    g = torch.Generator().manual_seed(cfg.SEED)
    images = {
        "train": train[torch.randperm(len(train), generator=g)[: cfg.N_REF]],
        "samples": x_uint8[: cfg.N_REF],
        "test": test[torch.randperm(len(test), generator=g)[: cfg.N_REF]],
    }
    save_image_grid(images["test"][:64].float() / 255, os.path.join(out, "test_images.png"))
    for name, v in images.items():  # Appendix F: do samples sit at the energies of real images?
        e = -log_density(model, v.float() / 255)
        print(
            f"energy of {name:<8}: mean {e.mean():.4g}  std {e.std():.4g}  (n={len(e)}, 8-bit images)"
        )
    median = {}
    for name in ("samples", "test"):  # Appendix C: samples are not copies of training images
        d, idx = nearest_distances(images[name], train, 5)
        save_nearest_figure(images[name], train, idx, os.path.join(out, f"nearest_{name}.png"))
        median[name] = d[:, 0].median().item()
    print(
        f"nearest training image, median rms pixel distance: samples {median['samples']:.4f}, test "
        f"{median['test']:.4f}; saved test_images.png (real test images), nearest_samples.png "
        f"(Appendix C), nearest_test.png"
    )
    device = next(model.parameters()).device
    if cfg.SCORE:
        classifier = load_or_train_classifier(cfg, ckpt, train, test, labels, device)
        sample_scores(classifier, x_uint8, train, test, labels, cfg.SCORE_N, cfg.SEED)
    if cfg.FID:
        inception = inception_network(cfg.FID_WEIGHTS, device)
        refs = cached_inception_references(cfg, inception, train, test)
        fidelity_scores(inception, x_uint8[: cfg.FID_N], refs)


def likelihood(cfg, model, ckpt, train, test):
    """log Z of exp(-E/T) by forward and reverse AIS, then test bits/dim beside trivial baselines."""
    sigma0, T = checkpoint_sigma0(ckpt), cfg.TEMPERATURE
    g = torch.Generator().manual_seed(cfg.SEED)
    d = test[0].numel()
    # Reverse AIS starts from held-out images noised like the density the model learned: exp(-E/T)
    # fits q_sigma with sigma = sigma0 sqrt(T). Exact samples only if the model is exactly right.
    x_data = test[torch.randperm(len(test), generator=g)[: cfg.AIS_CHAINS]].float() / 255
    x_data = x_data + sigma0 * math.sqrt(T) * torch.randn(x_data.shape, generator=g)
    print(
        f"AIS: log Z of exp(-E/{T:g}) in d = {d}, {cfg.AIS_CHAINS} chains x {cfg.AIS_STAGES} stages "
        f"({cfg.BETA_SCHEDULE}), {cfg.LEAPFROG} leapfrog step(s) from {cfg.HMC_STEP}, reference "
        f"N(0, {cfg.REF_STD:g}^2 I)"
    )
    t0 = time.time()
    est = log_z_both_ways(
        model, x_data.to(next(model.parameters()).device), cfg, show_progress=True
    )
    (f, fe), (r, re_) = est["forward"], est["reverse"]
    stop_if_nonfinite(torch.tensor([f, fe, r, re_]), "AIS", "a smaller --hmc_step or --ref_std")
    bits = 1 / (d * math.log(2))  # nats -> bits/dim
    print(
        f"log Z: forward {f:.2f} +- {fe:.2f} (low in expectation), reverse {r:.2f} +- {re_:.2f} "
        f"(high), gap {r - f:.2f} nats = {(r - f) * bits:.4f} bits/dim [{time.time() - t0:.0f} s]"
    )
    if abs(r - f) * bits > cfg.GAP_TOL:  # a negative gap (forward above reverse) is no better
        print(
            f"not converged: |gap| exceeds --gap_tol={cfg.GAP_TOL} bits/dim; use more stages, "
            "chains or leapfrog steps"
        )
    # log p(x) = -E(x)/T - log Z: log Z is one constant, so it shifts bits/dim by log Z / (D ln 2)
    log_p = partial(log_density, model, temperature=T)
    deq = dequantized_bits_per_dim(log_p, test, 4, g).mean().item()
    cont = continuous_bits_per_dim(log_p, test).mean().item()
    stop_if_nonfinite(torch.tensor([deq, cont]), "bits/dim", "a larger --temperature")
    base = baseline_bits_per_dim(train, test, g)
    print(
        f"test bits/dim ({len(test)} images of {tuple(test.shape[1:])}), with forward | reverse AIS log Z:"
    )
    print(f"  dequantized (headline)           {deq + f * bits:7.3f} | {deq + r * bits:7.3f}")
    print(f"  continuous, x = k/255 (papers')  {cont + f * bits:7.3f} | {cont + r * bits:7.3f}")
    for name, v in base.items():
        print(f"  baseline: {name:<23} {v:7.3f}")
    if deq + f * bits > base["diagonal Gaussian"]:
        print("warning: the model is worse than a diagonal Gaussian fitted to the training pixels")


def main(argv=None):
    cfg = parse_config(globals(), argv)
    check_config(cfg)
    device = pick_device(cfg.DEVICE)
    torch.manual_seed(cfg.SEED)
    out = output_folder(cfg)  # e.g. out/04_langevin_sampling/03_mdsm_train_ckpt
    check_writable(out)
    if cfg.FID:  # torch-fidelity and its Inception weights are there, before any sampling
        cfg.FID_WEIGHTS = check_fidelity_available(cfg.FID_WEIGHTS)
    if not cfg.CKPT:
        check_toy_fits(cfg)
        torch.set_num_threads(1)  # (n, 2) tensors: thread hand-offs would cost more than they save
        return toy_lesson(cfg)
    model, ckpt = load_energy_model(cfg, device)
    train, test = reference_images(cfg, ckpt, model_shape(ckpt))  # checked before any sampling
    if cfg.AIS:
        test = test[: cfg.N_TEST or len(test)]
    samples = read_samples(cfg.SAMPLES, train.shape[1:]) if cfg.SAMPLES else None
    labels = score_labels(cfg, ckpt, train, test) if cfg.SCORE else None
    needed = max(cfg.SCORE_N * cfg.SCORE, cfg.FID_N * cfg.FID)
    if samples is None and needed > cfg.N_SAMPLES:  # draw as many samples as the scores judge
        print(f"note: --n_samples={cfg.N_SAMPLES} raised to {needed} for --score_n / --fid_n")
        cfg.N_SAMPLES = needed
    check_fits(cfg, model, train, test)
    try:
        if cfg.AIS:
            return likelihood(cfg, model, ckpt, train, test)
        return sample_checkpoint(cfg, model, ckpt, train, test, out, samples, labels)
    except torch.cuda.OutOfMemoryError:
        knob = "--ais_chains" if cfg.AIS else "--batch"
        raise SystemExit(f"error: out of GPU memory; use a smaller {knob}") from None


# ==== plumbing: nothing below this line is about the method ====
def check_config(cfg):
    """Every knob in range, and related knobs together, before any work: one line names the knob."""
    rules = {"N_SAMPLES": (cfg.N_SAMPLES >= 1, ">= 1"), "BATCH": (cfg.BATCH >= 1, ">= 1")}
    rules["STEP_SIZE"] = (0 < cfg.STEP_SIZE <= 1, "(0, 1]")
    rules["T_MAX"] = (cfg.T_MAX >= 1, ">= 1 (T = 1 is the data's own temperature)")
    rules["INIT_STD"] = (0 <= cfg.INIT_STD <= 100, "in [0, 100] (0 = sigma0 sqrt(T_MAX))")
    for knob in ("N_HOT", "N_ANNEAL", "N_COOL", "N_TEST", "PLAIN_STEPS", "SEED"):
        rules[knob] = (getattr(cfg, knob) >= 0, ">= 0")
    for knob in ("N_REF", "LEAPFROG", "TOY_SAMPLES"):
        rules[knob] = (getattr(cfg, knob) >= 1, ">= 1")
    for knob in ("AIS_CHAINS", "AIS_STAGES"):
        rules[knob] = (getattr(cfg, knob) >= 2, ">= 2")
    for knob in ("TEMPERATURE", "HMC_STEP", "GAP_TOL", "PLAIN_STEP"):
        rules[knob] = (getattr(cfg, knob) > 0, "> 0")
    for knob in ("TOY_STD", "TOY_SIGMA0"):
        rules[knob] = (0 < getattr(cfg, knob) <= 1, "(0, 1]")
    rules["REF_STD"] = (0 < cfg.REF_STD <= 100, "(0, 100]")
    for knob in ("SCORE_N", "FID_N"):
        rules[knob] = (getattr(cfg, knob) >= 2, ">= 2 (a covariance needs two images)")
    rules["CLASSIFIER_EPOCHS"] = (cfg.CLASSIFIER_EPOCHS >= 1, ">= 1")
    schedules = ("sigmoid", "geometric", "linear")
    rules["BETA_SCHEDULE"] = (cfg.BETA_SCHEDULE in schedules, "sigmoid, geometric or linear")
    for knob, (ok, allowed) in rules.items():
        if not ok:
            raise SystemExit(
                f"error: --{knob.lower()}={getattr(cfg, knob)} is out of range; allowed: {allowed}"
            )
    if cfg.N_HOT + cfg.N_ANNEAL + cfg.N_COOL < 1:
        raise SystemExit(
            "error: --n_hot + --n_anneal + --n_cool = 0 Langevin steps; allowed: at least 1"
        )
    for flag, on in (("--score", cfg.SCORE), ("--fid", cfg.FID), ("--samples", cfg.SAMPLES != "")):
        if on and not cfg.CKPT:
            raise SystemExit(f"error: {flag} judges a model's samples; pass --ckpt=... (from 03)")
        if on and cfg.AIS:
            raise SystemExit(f"error: {flag} judges samples, and --ais draws none; run them apart")
    if not cfg.CKPT and cfg.AIS_CHAINS > cfg.TOY_SAMPLES:
        raise SystemExit(
            f"error: --ais_chains={cfg.AIS_CHAINS} is more than --toy_samples={cfg.TOY_SAMPLES}: "
            "reverse AIS starts from the lesson's exact samples; allowed: at most --toy_samples"
        )


def output_folder(cfg):
    """OUT_DIR for the lessons; OUT_DIR/<checkpoint folder>_<checkpoint name> with --ckpt."""
    if not cfg.CKPT:
        return cfg.OUT_DIR
    parent, stem = os.path.split(os.path.splitext(os.path.abspath(cfg.CKPT))[0])
    return os.path.join(cfg.OUT_DIR, f"{os.path.basename(parent)}_{stem}")


def check_writable(path):
    """Fail before any work, not at the first save."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write_test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise SystemExit(
            f"error: --out_dir: cannot write to {path} ({e.strerror}); choose another --out_dir"
        ) from None


def stop_if_nonfinite(x, what, fix):
    """A diverged sampler or estimator stops here: never a nan printed or saved as a result."""
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise SystemExit(
            f"error: {what} diverged ({bad} of {x.numel()} values are nan or inf); try {fix}"
        )


def load_energy_model(cfg, device):
    """03's EnergyNet and its checkpoint (03's loader names a missing, foreign or wrong-kind file)."""
    model, ckpt = mdsm.load_model(cfg.CKPT, device=device, use_ema=cfg.USE_EMA)
    model.requires_grad_(False)  # gradients with respect to x only
    if cfg.USE_EMA and "ema" not in ckpt:
        raise SystemExit(
            f"error: --use_ema: {cfg.CKPT} has no EMA weights (03 saves them with --ema_decay > 0)"
        )
    return model, ckpt


def checkpoint_sigma0(ckpt):
    return float(ckpt["config"].get("SIGMA0", mdsm.SIGMA0))


def model_shape(ckpt):
    """(C, H, W) of the images the model was built for; 03 writes image_size as H or [H, W]."""
    args = ckpt["model_args"]
    size = args.get("image_size", 32)
    h, w = (size, size) if isinstance(size, int) else size
    return (args["in_channels"], h, w)


def reference_images(cfg, ckpt, shape):
    """The model's data set (or --dataset) at the model's size, both splits as uint8 (N, C, H, W),
    checked against the model's channels and size before any sampling."""
    config = ckpt["config"]
    dataset, data_dir = data_source(cfg, ckpt)
    size = int(config.get("IMAGE_SIZE", 0))
    splits = [mdsm.load_images(dataset, data_dir, split, size) for split in ("train", "test")]
    for split, x in zip(("train", "test"), splits):
        if tuple(x.shape[1:]) != tuple(shape):
            raise SystemExit(
                f"error: --dataset={dataset} {split} images are {fmt_shape(x.shape[1:])}, but the model "
                f"in {cfg.CKPT} was trained on {fmt_shape(shape)} images; pass the data set it was "
                f"trained on (its config: {config.get('DATASET')}, --image_size={size})"
            )
    if cfg.N_TEST > len(splits[1]):
        raise SystemExit(
            f"error: --n_test={cfg.N_TEST}, but {dataset} has {len(splits[1])} test images"
        )
    return splits


def fmt_shape(shape):  # (1, 16, 24) -> '1-channel 16x24'
    return f"{shape[0]}-channel {shape[1]}x{shape[2]}"


def data_source(cfg, ckpt):
    """(dataset, data_dir): the knobs, or else the checkpoint's own."""
    config = ckpt["config"]
    return cfg.DATASET or config.get("DATASET", ""), cfg.DATA_DIR or config.get("DATA_DIR", "data")


LABEL_MD5 = {  # the official IDX label files, checked when downloaded (beside 03's IDX_FILES)
    "mnist": {
        "train": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}


def read_idx_labels(data_dir, name, split):
    """The IDX label file (magic 2049) beside 03's image file: int64 (N,), fetched like 03's."""
    part = "train" if split == "train" else "t10k"
    path = os.path.join(data_dir, name, f"{part}-labels-idx1-ubyte.gz")
    if not os.path.exists(
        path
    ):  # 03's fetch: every mirror, then an MD5 check; one line if it fails
        mirrors = mdsm.IDX_FILES[name][0]
        mdsm.fetch([m + os.path.basename(path) for m in mirrors], path, LABEL_MD5[name][part])
    try:
        raw = gzip.open(path).read()
        magic, n = np.frombuffer(raw[:8], ">u4")  # header: magic 2049, count; then a byte per label
        if magic != 2049 or len(raw) != 8 + n:
            raise ValueError
    except (OSError, ValueError, EOFError):
        raise SystemExit(
            f"error: {path} is not an IDX label file (corrupt or incomplete). Delete it, run again"
        ) from None
    return np.frombuffer(raw, np.uint8, offset=8).astype(np.int64)


def read_cifar10_labels(data_dir, split):
    """b'labels' of CIFAR-10's python batches in 03's order (data_batch_1..5 | test_batch): (N,)."""
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    labels = []
    for name in names:
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                labels.append(np.asarray(pickle.load(f, encoding="bytes")[b"labels"], np.int64))
        except (OSError, KeyError, pickle.UnpicklingError, EOFError) as e:
            raise SystemExit(
                f"error: {path} holds no CIFAR-10 labels ({type(e).__name__}); delete {folder} "
                f"and run again to re-extract cifar-10-python.tar.gz"
            ) from None
    return np.concatenate(labels)


def read_array_labels(path, split):
    """y_train / y_test of a user's .npz (beside 03's x_train / x_test): integer classes (N,)."""
    key = "y_train" if split == "train" else "y_test"
    try:
        data = np.load(path)
        found = list(data.files) if hasattr(data, "files") else ["one unnamed array"]
        y = data[key] if key in found else None
    except Exception as e:  # missing, not a NumPy file, truncated: say which
        raise SystemExit(f"error: --dataset={path} is not readable ({type(e).__name__})") from None
    if y is None:
        raise SystemExit(
            f"error: {path} has no {key} array (found: {', '.join(found)}); the classifier score "
            f"needs labels: np.savez(path, x_train=x, y_train=y, x_test=x2, y_test=y2)"
        )
    if y.dtype.kind not in "iu" or y.size != len(y) or y.min() < 0:
        raise SystemExit(
            f"error: {path}: {key} is {y.dtype} {y.shape}; expected classes 0..K-1, one per image"
        )
    return y.reshape(-1).astype(np.int64)


def load_labels(dataset, data_dir, split):
    """Labels of the split that 03's load_images(dataset, data_dir, split) returns: int64 (N,)."""
    if dataset == "cifar10":
        return torch.from_numpy(read_cifar10_labels(data_dir, split))
    if dataset in mdsm.IDX_FILES:
        return torch.from_numpy(read_idx_labels(data_dir, dataset, split))
    return torch.from_numpy(read_array_labels(dataset, split))


def score_labels(cfg, ckpt, train, test):
    """(y_train, y_test) for --score, read and matched to the images before any sampling."""
    dataset, data_dir = data_source(cfg, ckpt)
    labels = (load_labels(dataset, data_dir, "train"), load_labels(dataset, data_dir, "test"))
    for split, x, y in zip(("train", "test"), (train, test), labels):
        if len(x) != len(y):
            raise SystemExit(
                f"error: --dataset={dataset}: {len(x)} {split} images but {len(y)} labels"
            )
    if len(test) < 4:  # FD needs two halves of at least two images
        raise SystemExit(f"error: --score: {dataset} has {len(test)} test images; at least 4")
    return labels


def data_fingerprint(*arrays):
    """The first 12 hex digits of the SHA-256 of the arrays' bytes: names that change with data."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(torch.as_tensor(a).numpy()).tobytes())
    return h.hexdigest()[:12]


def load_cache(path, key, what):
    """The dict saved at path if its key matches, else None (saying why when a file was there)."""
    if not os.path.exists(path):
        return None
    cached = torch.load(path, map_location="cpu", weights_only=True)
    if cached.get("key") == key:
        return cached
    stale = {k: v for k, v in cached.get("key", {}).items() if key.get(k) != v}
    print(f"{what}: {path} is stale (made for {stale}); computing it again")
    return None


def save_cache(obj, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: never half a file


def load_or_train_classifier(cfg, ckpt, train, test, labels, device):
    """The judge from OUT_DIR/classifier_<dataset>_<H>x<W>.pt if it was made from these images,
    labels and settings, else trained and saved there. Prints its test accuracy either way."""
    dataset = data_source(cfg, ckpt)[0]
    key = {
        "dataset": os.path.basename(dataset),
        "image_size": "x".join(map(str, train.shape[2:])),
        "channels": train.shape[1],
        "n_train": len(train),
        "data_sha256": data_fingerprint(train, labels[0], test, labels[1]),
        "epochs": cfg.CLASSIFIER_EPOCHS,
        "seed": cfg.SEED,
        "classifier": "ScoreClassifier(width=32)",
    }
    slug = os.path.splitext(key["dataset"])[0]
    path = os.path.join(cfg.OUT_DIR, f"classifier_{slug}_{key['image_size']}.pt")
    cached = load_cache(path, key, "classifier")
    if cached is None:
        t_start = time.time()
        n_classes = int(max(labels[0].max(), labels[1].max())) + 1
        model = train_classifier(
            train, labels[0], n_classes, cfg.CLASSIFIER_EPOCHS, seed=cfg.SEED, device=device
        )
        seconds = time.time() - t_start
        state = {k: v.cpu() for k, v in model.state_dict().items()}
        save_cache({"key": key, "model_args": model.model_args, "model": state}, path)
        how = f"trained {cfg.CLASSIFIER_EPOCHS} epochs on {len(train)} images in {seconds:.0f} s"
        how = f"{how}, saved {path}"
    else:
        model = ScoreClassifier(**cached["model_args"]).to(device)
        model.load_state_dict(cached["model"])
        how = f"loaded {path}"
    model.eval()
    accuracy = (classifier_outputs(model, test)[0].argmax(1) == labels[1]).double().mean().item()
    print(f"classifier: {how}; test accuracy {accuracy:.4f} ({len(test)} test images)", flush=True)
    return model


def check_fidelity_available(weights_path=""):
    """Before any sampling: torch-fidelity imports and its Inception weights file is on disk
    (downloaded once where there is a network). Returns the weights' path, or stops with one line
    that names the fix."""
    try:
        import torch_fidelity.feature_extractor_inceptionv3 as inception  # an optional install
    except Exception as e:  # not installed (ImportError), or a torchvision built for another torch
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise SystemExit(
            f"error: --fid needs torch-fidelity, which does not import here ({reason}); "
            f"pip install torch-fidelity (with a torchvision built for torch {torch.__version__})"
        ) from None
    url = inception.URL_INCEPTION_V3
    name = os.path.basename(url)  # weights-inception-2015-12-05-6726825d.pth
    path = weights_path or os.path.join(torch.hub.get_dir(), "checkpoints", name)
    # torch hub's rule: the file name ends in the first 8 hex digits of its SHA-256
    hash_prefix = name.rsplit("-", 1)[1].split(".")[0]
    if not os.path.exists(path):
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            torch.hub.download_url_to_file(url, path, hash_prefix=hash_prefix, progress=False)
        except (OSError, RuntimeError) as e:  # offline (URLError), or a corrupt download
            raise SystemExit(
                f"error: --fid needs torch-fidelity's Inception weights at {path} and could not "
                f"download them ({type(e).__name__}); copy {url} to that path, "
                f"or pass --fid_weights=FILE"
            ) from None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    digest = digest.hexdigest()
    if not digest.startswith(hash_prefix):
        raise SystemExit(
            f"error: {path} is not {name} (SHA-256 {digest[:8]}..., expected {hash_prefix}...); "
            f"delete it and copy {url} there"
        )
    return path


def inception_network(weights_path, device):
    """torch-fidelity's Inception v3 ('inception-v3-compat': the 2015-12-05 TensorFlow weights of
    the IS and FID papers, TensorFlow 1.x's bilinear resize to 299x299), returning the 2048 pool
    features (FID's layer) and the logits (IS's layer)."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception  # checked before sampling

    net = inception.FeatureExtractorInceptionV3(
        "inception-v3-compat",
        ["2048", "logits_unbiased"],
        feature_extractor_weights_path=weights_path,
    )
    return net.to(device).eval().requires_grad_(False)


def rgb_uint8(x):
    """torch-fidelity's input: uint8 (N, 3, H, W); grey images repeated over R, G and B."""
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def cached_inception_references(cfg, inception, train, test):
    """inception_references, from OUT_DIR/inception_<data hash>_n<N>.pt when it was made from
    these images with these settings: the training split is embedded once."""
    n = min(cfg.FID_N, len(train))
    key = {"data_sha256": data_fingerprint(train, test), "n": n, "seed": cfg.SEED}
    path = os.path.join(cfg.OUT_DIR, f"inception_{key['data_sha256']}_n{n}.pt")
    cached = load_cache(path, key, "inception references")
    if cached is not None:
        print(f"inception references: loaded {path}")
        return cached["refs"]
    t_start = time.time()
    refs = inception_references(inception, train, test, n, cfg.SEED)
    save_cache({"key": key, "refs": refs}, path)
    print(
        f"inception references: {len(train)} + {len(test)} images in "
        f"{time.time() - t_start:.0f} s, saved {path}"
    )
    return refs


def read_samples(path, shape):
    """An earlier run's samples.npz (samples: uint8 (N, H, W, C)) as uint8 (N, C, H, W), checked
    against the model's (C, H, W) before any work."""
    try:
        x = np.load(path)["samples"]
    except Exception as e:  # missing, not a NumPy file, no 'samples' array: say which
        raise SystemExit(
            f"error: --samples={path} is not a samples.npz written by 04 ({type(e).__name__})"
        ) from None
    if x.dtype != np.uint8 or x.ndim != 4 or len(x) < 2:
        raise SystemExit(
            f"error: --samples={path} holds {x.dtype} {x.shape}; expected uint8 (N, H, W, C), N >= 2"
        )
    x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    if tuple(x.shape[1:]) != tuple(shape):
        raise SystemExit(
            f"error: --samples={path} holds {fmt_shape(x.shape[1:])} images, but the model makes "
            f"{fmt_shape(shape)} images; pass the samples of this --ckpt"
        )
    return x


def chain_bytes(model, shape):
    """Memory one chain needs in a Langevin step or an HMC move, measured on one image: the
    tensors autograd keeps for grad_x E (not the weights), and the chain's own x, noise, gradient
    and momentum. A lower estimate: the backward pass adds some."""
    weights = {p.data_ptr() for p in model.parameters()}
    saved = []

    def pack(t):
        if t.data_ptr() not in weights:
            saved.append(t.numel() * t.element_size())
        return t

    x = torch.zeros(1, *shape, device=next(model.parameters()).device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        grad_energy(model, x)
    return sum(saved) + 8 * x.numel() * 4


def check_memory(need, knob, device):
    """One line, before anything is allocated, when an estimate exceeds the memory there is."""
    if device.type == "cuda":
        have = torch.cuda.mem_get_info(device)[0]  # free bytes on this GPU
    elif hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # the machine's RAM
    else:
        return  # no portable way to ask: the allocator will say
    if need > have:
        raise SystemExit(
            f"error: {knob} needs at least {need / 2**30:.3g} GiB ({device.type}), more than the "
            f"{have / 2**30:.3g} GiB there; use a smaller {knob}"
        )


def check_toy_fits(cfg):
    # about 1 KiB per chain at the lessons' peak, the figure's scatter plots included
    check_memory(1024 * cfg.TOY_SAMPLES, "--toy_samples", torch.device("cpu"))


def check_fits(cfg, model, train, test):
    """The chains on the device, and what the host keeps, against the memory there is."""
    device = next(model.parameters()).device
    per_chain = chain_bytes(model, train.shape[1:])
    if cfg.AIS:
        if cfg.AIS_CHAINS > len(test):
            raise SystemExit(
                f"error: --ais_chains={cfg.AIS_CHAINS}, but there are {len(test)} test images "
                f"(--n_test={cfg.N_TEST}): reverse AIS starts one chain from each; allowed: at most "
                f"{len(test)}"
            )
        check_memory(cfg.AIS_CHAINS * per_chain, "--ais_chains", device)
        # the baselines hold the training pixels as grey levels, dequantized floats, bin indices
        check_memory(32 * train.numel(), "--dataset (its training split)", torch.device("cpu"))
        return
    check_memory(min(cfg.BATCH, cfg.N_SAMPLES) * per_chain, "--batch", device)
    # the samples as floats and as 8 bits, the training images as floats for the nearest images
    d = train[0].numel()
    check_memory(cfg.N_SAMPLES * d * 9 + len(train) * d * 4, "--n_samples", torch.device("cpu"))


def save_samples(x, out):
    """samples.png (the first 64) and samples.npz (all, 8-bit, (N, H, W, C)); returns the uint8."""
    x_uint8 = (x.clamp(0, 1) * 255).round().to(torch.uint8)  # the sampler never clamps; 8 bits do
    save_image_grid(x[:64], os.path.join(out, "samples.png"))
    np.savez_compressed(
        os.path.join(out, "samples.npz"), samples=x_uint8.permute(0, 2, 3, 1).numpy()
    )
    print(
        f"pixels before clamping in [{x.min():.3f}, {x.max():.3f}], mean {x.mean():.3f}; saved "
        f"{out}/samples.png, samples.npz"
    )
    return x_uint8


def save_nearest_figure(queries, train, idx, path):
    """Rows of a query (up to 8) and its nearest training images."""
    rows = [torch.cat([queries[j : j + 1], train[idx[j]]]) for j in range(min(8, len(queries)))]
    save_image_grid(torch.cat(rows).float() / 255, path, nrow=idx.shape[1] + 1)


def plot_toy(runs, std, path):
    import matplotlib.pyplot as plt  # the file-only Agg backend where there is no display

    fig, axes = plt.subplots(1, len(runs), figsize=(3.6 * len(runs), 3.9))
    axis = torch.linspace(-0.1, 1.1, 200)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1)  # (200, 200, 2)
    log_p = -toy_energy(grid.reshape(-1, 2), 0.0, std).reshape(200, 200)  # the target, (200, 200)
    levels = (log_p.max() - torch.tensor([6.0, 4.0, 2.0])).tolist()  # rings round every mode
    for ax, (name, x) in zip(axes, runs.items()):
        w, spread, _ = mode_stats(x)
        weights = " / ".join(f"{v:.2f}" for v in w.tolist())
        ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.3)
        ax.contour(
            grid[..., 0],
            grid[..., 1],
            log_p,
            levels=levels,
            colors="0.3",
            linewidths=0.6,
            linestyles="solid",
        )
        ax.set_title(f"{name}\nmode weights {weights}, std {spread:.3f}", fontsize=9)
        ax.set(xlim=(-0.1, 1.1), ylim=(-0.1, 1.1), aspect="equal", xlabel="x1", ylabel="x2")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    print(f"figure: {path} (grey: contours of the target log p)")


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
