"""02 - Why one noise level is not enough in high dimension (MDSM, arXiv 1910.07762, Appendix B).

DSM at one noise level sigma supervises grad E only where x~ = x + sigma*eps falls, and in d
dimensions that is a thin shell around the data (a chi law; its width does not shrink with d):
    E||x~ - x|| = sigma sqrt(2) Gamma((d+1)/2) / Gamma(d/2) ~ sigma sqrt(d),  std ~ sigma/sqrt(2).
On the data and far out, where sampling chains start, nothing constrains E. MDSM (paper eq. 10, with
the 1/sigma^2 weight of the authors' code) trains ONE unconditional energy on all shells at once,
sigma ~ U[0.05, 1.2] laid out across the batch:
    loss = mean over x, sigma, eps of ||x - x~ + sigma0^2 grad E(x~)||^2 / (sigma^2 sigma0^4).
Its optimum (derived) is sigma0^2 grad E(x~) = x~ - E[x|x~] on the shell of sigma: exp(-E) is the
sigma-smoothed data at temperature T = sigma^2/sigma0^2, so sampling anneals T from 100 to 0,
    x <- x - (sigma_s^2/2) grad E(x) + sqrt(T) sigma_s xi,  then (Tweedie) x <- x - sigma0^2 grad E.

Part 1 measures the shell. Part 2: 3 Gaussian modes (weights 0.6/0.3/0.1) on a 2-D plane rotated
into R^d, where the smoothed density, the exact optimum g* of each loss and exact "oracle" chains
are closed forms. One energy (see Energy: a learned plane P, a learned pull c towards it, an MLP
inside it) is trained by single-noise DSM (sigma = sigma0 = 0.1) and by MDSM; we measure the error
||grad E - g*|| / ||g*|| at 0.3x-10x the single shell radius and sample from N(0, I) (single:
Langevin at T = 1; MDSM: annealed), counting the samples that land on the data.

Run: python 02_single_noise_failure.py                        (the full lesson, CPU)
     python 02_single_noise_failure.py --dims=2,64 --steps=500  (a quick, under-trained look)
Expected at d = 256: on the data single-noise DSM 38 % (150 of 256 chains diverge), MDSM 93 %.
"""

import math
import os
import re
import sys
import time
import types

import matplotlib.image
import torch

# ---- config: every knob can be overridden with --key=value (see --help) ----
SEED = 0  # random seed for data, initialization and sampling
DEVICE = "cpu"  # cpu only: the toy's matrices are tiny, a GPU would not be faster
THREADS = 1  # CPU threads; tiny matrices run fastest on 1 (0 = torch's default)
DIMS = "2,128,256"  # comma-separated ambient dimensions d >= 2 of the toy
CONC_DIMS = "2,16,128,1024,3072"  # dimensions of the concentration table (3072 = CIFAR-10)
CONC_SAMPLES = 4000  # Monte Carlo draws per dimension for the concentration table
SIGMA0 = 0.1  # small noise level: the single-noise sigma and MDSM's sigma0
SIGMA_MIN = 0.05  # MDSM: smallest sigma of the uniform range (CIFAR-10: 0.05)
SIGMA_MAX = 1.2  # MDSM: largest sigma (CIFAR-10: 1.2)
MODE_STD = 0.05  # std of each mixture mode inside the data plane
MODE_RADIUS = 0.6  # modes sit on a circle of this radius in the plane
ENERGY = "subspace"  # subspace: pull to a learned plane + MLP inside it; mlp: an MLP of x
LATENT = 2  # subspace: dimension K of the learned plane (the toy's data plane is 2-D)
HIDDEN = 64  # width of the energy's hidden layer (mlp: raised to d if smaller)
STEPS = 3000  # Adam steps per model (same for both models)
BATCH = 256  # training batch (one sigma per slot for MDSM)
LR = 1e-2  # Adam learning rate, cosine-decayed to 1% of it (mlp: 3e-3)
LOG_EVERY = 200  # print a log line every this many steps
N_PROBE = 256  # probe points per distance for the gradient-error table
N_CHAINS = 256  # Langevin chains per sampler
INIT_STD = 1.0  # chains start at N(0, INIT_STD^2 I) around the data centre
STEP_SIZE = 0.02  # Langevin sigma_s, below 2*sigma0 (MDSM: 0.02)
T_MAX = 100.0  # starting temperature, sigma = sqrt(T_MAX) sigma0 (MDSM: 100, sigma = 1)
WARM_STEPS = 50  # steps at T_MAX (MDSM: 500)
ANNEAL_STEPS = 400  # geometric decay T_MAX -> 1 (MDSM: 2000)
COOL_STEPS = 200  # linear decay 1 -> 0 (MDSM: 200)
OUT_DIR = "out/02_single_noise_failure"  # the figure goes here

# The helpers every file repeats (device, --key=value overrides, log line) are at the end.


# ---------------------------------------------------------------- part 1: concentration of measure
def shell_radius(d, sigma):
    """Exact mean and std of ||sigma*eps||, eps ~ N(0, I_d) (a chi distribution), and the
    high-d approximations sigma*sqrt(d) and sigma/sqrt(2)."""
    # E||eps|| = sqrt(2) Gamma((d+1)/2) / Gamma(d/2)
    mean = math.sqrt(2) * math.exp(math.lgamma((d + 1) / 2) - math.lgamma(d / 2))
    # Var||eps|| = E||eps||^2 - (E||eps||)^2 = d - mean^2
    std = math.sqrt(max(d - mean**2, 0.0))
    return sigma * mean, sigma * std, sigma * math.sqrt(d), sigma / math.sqrt(2)


# ---------------------------------------------------------- part 2: the toy and its exact scores
class PlaneMixture:
    """3 Gaussian modes (std MODE_STD, weights 0.6/0.3/0.1) on a 2-D plane, rotated into R^d."""

    def __init__(self, d, cfg, gen):
        angles = torch.tensor([90.0, 210.0, 330.0]) * math.pi / 180
        # mode centres on a circle in the plane
        self.centers = cfg.MODE_RADIUS * torch.stack([angles.cos(), angles.sin()], 1)  # (K, 2)
        self.weights = torch.tensor([0.6, 0.3, 0.1])
        self.s = cfg.MODE_STD
        self.d = d
        # orthonormal basis of the data plane
        self.Q = torch.linalg.qr(torch.randn(d, 2, generator=gen))[0]  # (d, 2)

    def sample(self, n, gen):
        k = torch.multinomial(self.weights, n, replacement=True, generator=gen)
        u = self.centers[k] + self.s * torch.randn(n, 2, generator=gen)  # (n, 2) in the plane
        return u @ self.Q.T  # (n, d)

    def split(self, x):
        """In-plane coordinates u (n, 2) and squared distance to the plane |v|^2 (n,)."""
        u = x @ self.Q
        # |v|^2 = |x|^2 - |u|^2 (Pythagoras; Q is orthonormal)
        return u, (x.pow(2).sum(1) - u.pow(2).sum(1)).clamp_min(0)

    def log_q(self, x, sigma):
        """log q_sigma(x~): the mixture smoothed by N(0, sigma^2 I) (exact), for each sigma (L,)."""
        u, v2 = self.split(x)
        var = self.s**2 + sigma**2  # (L,) in-plane variance of each mode after smoothing
        du2 = (u[:, None, :] - self.centers[None]).pow(2).sum(-1)  # (n, K)
        # in the plane: log sum_k w_k N(u; c_k, (s^2 + sigma^2) I_2)
        logits = self.weights.log() - du2[:, None, :] / (2 * var[None, :, None])  # (n, L, K)
        plane = torch.logsumexp(logits, -1) - torch.log(2 * math.pi * var)  # (n, L)
        # across it: log N(v; 0, sigma^2 I_{d-2})
        across = -v2[:, None] / (2 * sigma**2)
        across = across - (self.d - 2) / 2 * torch.log(2 * math.pi * sigma**2)
        return plane + across  # (n, L)

    def plane_score(self, u, sigma):
        """In-plane part of grad log q_sigma at in-plane points u (n, 2), for each sigma (L,):
        sum_k r_k (c_k - u) / (s^2 + sigma^2), r_k the posterior of mode k. Shape (n, L, 2)."""
        var = (self.s**2 + sigma**2)[None, :, None]  # (1, L, 1)
        diff = self.centers[None, None] - u[:, None, None]  # (n, 1, K, 2)
        resp = torch.softmax(self.weights.log() - diff.pow(2).sum(-1) / (2 * var), -1)  # (n, L, K)
        return (resp[..., None] * diff).sum(2) / var  # (n, L, 2)

    def score(self, x, sigma):
        """grad log q_sigma(x~) for one sigma: mixture score in the plane, -v/sigma^2 across it."""
        u = x @ self.Q
        v = x - u @ self.Q.T  # (n, d) the part orthogonal to the plane
        return self.plane_score(u, sigma.reshape(1))[:, 0] @ self.Q.T - v / sigma**2

    def mdsm_target(self, x, sigmas, sigma0):
        """Exact pointwise minimizer g* of the 1/sigma^2-weighted MDSM loss over the levels
        `sigmas`: sigma0^2 g* = sum_j w_j (-s_j^2 grad log q_{s_j}), w_j proportional to
        q_{s_j}(x~) / s_j^2. Across the plane -s^2 grad log q_s = v for every level, so only the
        plane part mixes."""
        u = x @ self.Q
        # level posterior times the loss weight 1/s_j^2
        w = torch.softmax(self.log_q(x, sigmas) - 2 * sigmas.log(), 1)  # (n, L)
        weighted = w[..., None] * sigmas[None, :, None] ** 2 * self.plane_score(u, sigmas)
        plane = weighted.sum(1)  # (n, 2)
        return (x - u @ self.Q.T - plane @ self.Q.T) / sigma0**2  # (n, d)


# ---------------------------------------------------------------- model and loss
class Energy(torch.nn.Module):
    """sigma0^2 E(x) = c(rho) dist(x, P)^2 / 2 + f(A^T x, log rho) - f(0, log rho)
    (energy="subspace"), or f(x, ||x||/sqrt(d)) (energy="mlp").

    P is a learned K-dim subspace with basis A (d, K); rho = dist(x, P)/sqrt(d) (~ sigma on the
    shell of sigma). c(rho) > 0 is learned over log-spaced distance bins in [0.05, 5], 0.1 at the
    start, so each distance learns only from the noisy points that land there (exact optimum:
    c = 1 at every distance, as x~ - E[x|x~] = v across a data plane). Subtracting f(0, log rho)
    leaves the pull towards the plane to c alone. f: one SiLU layer with MDSM's quadratic head."""

    def __init__(self, d, hidden, sigma0, kind="subspace", latent=2, bins=16):
        super().__init__()
        self.kind = kind
        n_in = min(latent, d) if kind == "subspace" else d
        if kind == "subspace":
            self.basis = torch.nn.Parameter(torch.randn(d, n_in) / math.sqrt(d))  # QR -> P
            log_rho = torch.linspace(math.log(0.05), math.log(5.0), bins)
            self.register_buffer("centers", log_rho)  # bin centres in log rho
            # softplus(logit_c) = c = 0.1 in every bin at the start
            self.logit_c = torch.nn.Parameter(torch.full((bins,), math.log(math.expm1(0.1))))
        # mlp: grad E lies in the span of the first layer's rows, so it needs width >= d
        width = hidden if kind == "subspace" else max(hidden, d)
        self.trunk = torch.nn.Sequential(torch.nn.Linear(n_in + 1, width), torch.nn.SiLU())
        self.pair = torch.nn.Linear(width, 2)
        self.square = torch.nn.Linear(width, 1)
        # the net models sigma0^2 E, so grad E has the norm of (x~ - x) / sigma0^2 ~ sigma sqrt(d)
        self.scale = 1 / sigma0**2

    def forward(self, x):  # (n, d) -> (n,)
        if self.kind == "mlp":
            radius = x.norm(dim=1, keepdim=True) / math.sqrt(x.shape[1])  # (n, 1)
            return self.scale * self.head(torch.cat([x, radius], 1))
        z = x @ torch.linalg.qr(self.basis)[0]  # (n, K) coordinates in P
        dist2 = (x.pow(2).sum(1) - z.pow(2).sum(1)).clamp_min(1e-12)  # (n,) dist(x, P)^2
        # log rho = log(dist / sqrt(d)), held inside the bins' range
        log_rho = (dist2 / x.shape[1]).sqrt().log()
        log_rho = log_rho.clamp(self.centers[0], self.centers[-1])[:, None]  # (n, 1)
        # c(rho) = softplus(sum_b bump_b(log rho) logit_c[b]), Gaussian bumps one bin wide
        bin_width = self.centers[1] - self.centers[0]
        bumps = torch.softmax(-0.5 * ((log_rho - self.centers) / bin_width) ** 2, 1)  # (n, bins)
        c = torch.nn.functional.softplus(bumps @ self.logit_c)  # (n,)
        # f(z, log rho) - f(0, log rho): no energy of the distance alone
        f = self.head(torch.cat([z, log_rho], 1))
        f = f - self.head(torch.cat([torch.zeros_like(z), log_rho], 1))
        return self.scale * (0.5 * c * dist2 + f)

    def head(self, inputs):  # (n, n_in + 1) -> (n,)
        h = self.trunk(inputs)  # (n, H)
        a = self.pair(h)  # (n, 2)
        # MDSM's quadratic neuron: (w1.h + b1)(w2.h + b2) + w3.(h*h) + b3
        return a[:, 0] * a[:, 1] + self.square(h * h)[:, 0]


def grad_energy(net, x, create_graph=False):
    if not x.requires_grad:
        x = x.detach().requires_grad_(True)
    return torch.autograd.grad(net(x).sum(), x, create_graph=create_graph)[0]  # (n, d)


def mdsm_loss(net, x, sigma, sigma0):
    """Per sample ||x - x~ + sigma0^2 grad E(x~)||^2 / (sigma^2 sigma0^4), batch mean (MDSM eq. 10
    with the authors' 1/sigma^2 weight). Single-noise DSM is the special case sigma = sigma0."""
    x_noisy = x + sigma[:, None] * torch.randn_like(x)  # (B, d) x~ = x + sigma*eps
    g = grad_energy(net, x_noisy, create_graph=True)
    # eq. 10: ||x - x~ + sigma0^2 grad E(x~)||^2 / (sigma^2 sigma0^4)
    return ((x - x_noisy + sigma0**2 * g).pow(2).sum(1) / (sigma**2 * sigma0**4)).mean()


# ---------------------------------------------------------------- sampling
def temperatures(cfg):
    """MDSM's schedule, shortened: T_MAX flat, geometric T_MAX -> 1, then linear 1 -> 0."""
    warm = [cfg.T_MAX] * cfg.WARM_STEPS
    # T_k = T_MAX exp(-k ln(T_MAX) / ANNEAL_STEPS)
    anneal = [
        cfg.T_MAX * math.exp(-k * math.log(cfg.T_MAX) / cfg.ANNEAL_STEPS)
        for k in range(cfg.ANNEAL_STEPS)
    ]
    cool = [1 - k / cfg.COOL_STEPS for k in range(cfg.COOL_STEPS)]
    return warm + anneal + cool


def langevin(grad_fn, x, temps, step_size, gen):
    """Langevin on exp(-E/T), one step per temperature in `temps`."""
    for T in temps:
        # x <- x - 0.5 sigma_s^2 grad E(x) + sqrt(T) sigma_s xi
        drift = 0.5 * step_size**2 * grad_fn(x)
        noise = math.sqrt(max(T, 0)) * step_size * torch.randn(x.shape, generator=gen)
        x = x - drift + noise
    return x.detach()


def tweedie_step(grad_fn, x, sigma0):
    """Final denoise (Tweedie): E[x | x~] = x~ + sigma0^2 grad log q_sigma0(x~)
    = x~ - sigma0^2 grad E(x~)."""
    return (x - sigma0**2 * grad_fn(x)).detach()


def sample_quality(toy, x, far=1e3):
    """Mode-weight error (total variation), median distance to the data plane, the fraction of
    samples "on the data": within 4 MODE_STD of a mode centre in the plane AND within 4 MODE_STD
    of the plane (distances, not squared distances; exact samples: 1.00 up to 4-sigma tails), and
    the number of diverged chains: non-finite or beyond `far` (1000x the data's scale), counted
    as off the data and in no mode."""
    diverged = ~(x.abs() <= far).all(1)  # (n,) true for nan and inf too
    x = torch.nan_to_num(x, nan=far).clamp(-far, far)
    u, v2 = toy.split(x)
    dist, k = torch.cdist(u, toy.centers).min(1)  # (n,) in-plane distance to the nearest mode
    freq = torch.bincount(k[~diverged], minlength=3).float() / len(x)  # a diverged chain: no mode
    on_data = (dist < 4 * toy.s) & (v2.sqrt() < 4 * toy.s)
    return {
        # total variation over {mode 1, mode 2, mode 3, diverged}, the last with target weight 0
        "tv": 0.5 * ((freq - toy.weights).abs().sum() + diverged.float().mean()).item(),
        "plane": v2.sqrt().median().item(),
        "on_data": on_data.float().mean().item(),
        "freq": freq.tolist(),
        "diverged": int(diverged.sum()),
    }


# ---------------------------------------------------------------- the experiment
def concentration_table(cfg, gen):
    rows = []
    print("\npart 1: ||x~ - x|| for x~ = x + sigma*eps (sigma = 1; everything scales with sigma)")
    header = f"{'d':>6} {'MC mean':>9} {'sqrt(d)':>9} {'MC std':>8} {'1/sqrt2':>8}"
    print(header + f" {'exact std':>9} {'rel. width':>10}")
    for d in dimensions(cfg.CONC_DIMS):
        r = torch.randn(cfg.CONC_SAMPLES, d, generator=gen).norm(dim=1)  # (N,)
        mean, std, approx_mean, approx_std = shell_radius(d, 1.0)
        rows.append((d, r))
        line = f"{d:>6} {r.mean():9.3f} {approx_mean:9.3f} {r.std():8.3f} {approx_std:8.3f}"
        print(line + f" {std:9.3f} {r.std() / r.mean():10.3f}")
    radii = ", ".join(f"sigma={s}: {shell_radius(3072, s)[2]:.3g}" for s in (0.05, 0.1, 1.0, 1.2))
    print(f"CIFAR-10 (d=3072) shell radii sigma*sqrt(d): {radii}")
    return rows


def train(toy, multiscale, cfg, gen, tag):
    net = Energy(toy.d, cfg.HIDDEN, cfg.SIGMA0, cfg.ENERGY, cfg.LATENT)  # the same for both models
    opt = torch.optim.Adam(net.parameters(), lr=cfg.LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.STEPS, eta_min=cfg.LR / 100)
    if multiscale:  # MDSM: one sigma per batch slot, linspace(SIGMA_MIN, SIGMA_MAX, B)
        sigma = torch.linspace(cfg.SIGMA_MIN, cfg.SIGMA_MAX, cfg.BATCH)
    else:  # single-noise DSM: every slot sigma0
        sigma = torch.full((cfg.BATCH,), cfg.SIGMA0)
    t0 = time.time()
    for step in range(1, cfg.STEPS + 1):
        x = toy.sample(cfg.BATCH, gen)  # (B, d)
        loss = mdsm_loss(net, x, sigma, cfg.SIGMA0)  # draws the noise
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if not math.isfinite(loss.item()):
            stop_diverged(f"{tag} training at d = {toy.d}, step {step}", "--lr", cfg.LR)
        progress(step, cfg.STEPS, t0, tag)
        if step % cfg.LOG_EVERY == 0 or step == cfg.STEPS:
            # sigma0^4 * loss / d is ~1 for a useless model, and near 0 for a perfect denoiser
            scaled = cfg.SIGMA0**4 * loss.item() / toy.d
            log_line(step, {"model": tag, "d": toy.d, "loss/d": scaled})
    return net


# probe noise sigma_t / SIGMA0: the distance from the data in units of the single shell radius
PROBE_RATIOS = (0.3, 0.6, 1.0, 2.0, 5.0, 10.0)


def gradient_errors(toy, nets, cfg, gen):
    """||g - g*|| / ||g*|| at x + sigma_t*eps, sigma_t = ratio * SIGMA0, and for the in-plane part
    alone ("<model> plane"): the 2-D pull that picks a mode is 5-15x smaller than the off-plane
    v / sigma0^2, so a small total error can hide a useless in-plane field."""
    levels = torch.linspace(cfg.SIGMA_MIN, cfg.SIGMA_MAX, cfg.BATCH)
    errors = {key: [] for name in nets for key in (name, name + " plane")}
    for ratio in PROBE_RATIOS:
        x = toy.sample(cfg.N_PROBE, gen)
        x_noisy = x + ratio * cfg.SIGMA0 * torch.randn(x.shape, generator=gen)
        targets = {
            "single": -toy.score(x_noisy, torch.tensor(cfg.SIGMA0)),  # exact grad of -log q_sigma0
            "multi": toy.mdsm_target(x_noisy, levels, cfg.SIGMA0),  # exact optimum of MDSM's loss
        }
        for name, net in nets.items():
            g = grad_energy(net, x_noisy)  # (n, d)
            error = (g - targets[name]).norm(dim=1) / targets[name].norm(dim=1)
            errors[name].append(error.mean().item())
            g_u = g @ toy.Q  # (n, 2) in-plane coordinates
            t_u = targets[name] @ toy.Q
            error_u = (g_u - t_u).norm(dim=1) / t_u.norm(dim=1)
            errors[name + " plane"].append(error_u.mean().item())
    for name, values in errors.items():
        if not all(math.isfinite(e) for e in values):
            what = f"the gradient of the trained {name.split()[0]} energy at d = {toy.d}"
            stop_diverged(what, "--lr", cfg.LR)
    return errors


def run_samplers(toy, nets, cfg, gen):
    temps = temperatures(cfg)
    # the chains start from broad noise around the data
    x0 = cfg.INIT_STD * torch.randn(cfg.N_CHAINS, toy.d, generator=gen)  # (n, d)
    s0 = torch.tensor(cfg.SIGMA0)
    levels = torch.linspace(cfg.SIGMA_MIN, cfg.SIGMA_MAX, cfg.BATCH)
    fields = {  # grad E of each sampler; the oracles use the exact optimum of each objective
        "single": lambda x: grad_energy(nets["single"], x),
        "single oracle": lambda x: -toy.score(x, s0),
        "multi": lambda x: grad_energy(nets["multi"], x),
        "multi oracle": lambda x: toy.mdsm_target(x, levels, cfg.SIGMA0),
    }
    out = {}
    for name, grad_fn in fields.items():
        # plain Langevin at T = 1 for the single-noise energy, MDSM's annealing for the other
        schedule = [1.0] * len(temps) if "single" in name else temps
        x = langevin(grad_fn, x0.clone(), schedule, cfg.STEP_SIZE, gen)
        x = tweedie_step(grad_fn, x, cfg.SIGMA0)
        quality = sample_quality(toy, x)
        # a learned energy whose chains diverge is a result; the exact fields' chains never do
        if name.endswith("oracle") and quality["diverged"]:
            what = f"{quality['diverged']} chains of the {name} sampler at d = {toy.d}"
            stop_diverged(what, "--step_size", cfg.STEP_SIZE)
        out[name] = (quality, x)
    return out


def print_results(results, cfg):
    whole = "gradient error ||g - g*|| / ||g*|| at x + sigma_t*eps "
    whole += "(ratio = sigma_t / sigma0; 1 = single shell)"
    in_plane = "the same error for the in-plane part of g only (the 2-D pull towards the modes)"
    for title, part in ((whole, ""), (in_plane, " plane")):
        print(f"\n{title}\n{'d':>5} {'model':>7} " + " ".join(f"{r:>7g}" for r in PROBE_RATIOS))
        for d, res in results:
            for name in ("single", "multi"):
                errors = res["errors"][name + part]
                print(f"{d:>5} {name:>7} " + " ".join(f"{e:7.3f}" for e in errors))
    print(
        f"\nsamples from N(0, {cfg.INIT_STD}^2 I) after {len(temperatures(cfg))} Langevin steps + "
        f"denoise (exact samples: tv ~0.02, plane 0, on data 1.00, weights 0.60/0.30/0.10)"
    )
    print(
        f"{'d':>5} {'sampler':>14} {'tv':>6} {'plane':>9} {'on data':>8} {'diverged':>8}"
        "  mode weights"
    )
    for d, res in results:
        for name, (q, _) in res["samples"].items():
            weights = "/".join(f"{f:.2f}" for f in q["freq"])
            row = f"{d:>5} {name:>14} {q['tv']:6.3f} {q['plane']:9.3g} {q['on_data']:8.2f}"
            print(row + f" {q['diverged']:>8}  {weights}")
    d, res = results[-1]
    e = res["errors"]
    q = {name: v[0] for name, v in res["samples"].items()}
    print(
        f"\nreading (d = {d}): 10x outside the single shell the in-plane gradient error is "
        f"{e['single plane'][-1]:.2f} (single) vs {e['multi plane'][-1]:.2f} (MDSM); on the data: "
        f"single {q['single']['on_data']:.2f} ({q['single']['diverged']} chains diverged), "
        f"MDSM {q['multi']['on_data']:.2f} (oracle {q['multi oracle']['on_data']:.2f}), "
        f"mode-weight TV: single {q['single']['tv']:.2f} (oracle {q['single oracle']['tv']:.2f}), "
        f"MDSM {q['multi']['tv']:.2f}"
    )


def main(argv=None):
    cfg = parse_config(globals(), argv)
    check_config(cfg)  # every knob in range, the memory it needs, a writable --out_dir
    torch.set_num_threads(cfg.THREADS or torch.get_num_threads())  # 0 = keep torch's default
    torch.manual_seed(cfg.SEED)  # the networks' initialization and the training noise
    gen = torch.Generator().manual_seed(cfg.SEED)  # the data, the probes and the chains
    conc = concentration_table(cfg, gen)
    results = []
    for d in dimensions(cfg.DIMS):
        print(
            f"\npart 2, d = {d}: train single-noise DSM (sigma = {cfg.SIGMA0}) and MDSM "
            f"(sigma in [{cfg.SIGMA_MIN}, {cfg.SIGMA_MAX}]), {cfg.STEPS} steps each",
            flush=True,
        )
        toy = PlaneMixture(d, cfg, gen)
        nets = {
            "single": train(toy, False, cfg, gen, "single"),
            "multi": train(toy, True, cfg, gen, "multi"),
        }
        errors = gradient_errors(toy, nets, cfg, gen)
        samples = run_samplers(toy, nets, cfg, gen)
        results.append((d, {"toy": toy, "errors": errors, "samples": samples}))
    print_results(results, cfg)
    path = os.path.join(cfg.OUT_DIR, "02_single_noise_failure.png")
    save_figure(conc, results, cfg, path)
    print(f"\nwrote {path}")
    return results


# ==== plumbing: nothing below this line is about the method ====
def dimensions(text):  # "2,128,256" -> [2, 128, 256]
    return [int(part) for part in text.split(",")]


def stop_diverged(what, knob, value):
    """One line instead of a nan result: what diverged, and the knob to lower."""
    raise SystemExit(f"error: {what} diverged; lower {knob}={value}")


# smallest allowed value of each integer knob (the largest come from the memory estimate)
INT_MINIMUM = {
    "SEED": 0,
    "THREADS": 0,
    "CONC_SAMPLES": 2,
    "LATENT": 1,
    "HIDDEN": 1,
    "STEPS": 1,
    "BATCH": 2,
    "LOG_EVERY": 1,
    "N_PROBE": 1,
    "N_CHAINS": 1,
    "WARM_STEPS": 0,
    "ANNEAL_STEPS": 0,
    "COOL_STEPS": 0,
}
# lengths and noise levels: the toy's data lie at scale 1, and float32 squares and divides by them
SCALES = ("SIGMA0", "SIGMA_MIN", "SIGMA_MAX", "MODE_STD", "MODE_RADIUS", "INIT_STD")
SCALE_RANGE = (1e-3, 1e3)


def check_config(cfg):
    """Every knob in its range (related knobs together), the memory the run needs and a writable
    --out_dir, else one line naming the knob and what is allowed: all before any work."""

    def refuse(knob, allowed):
        raise SystemExit(
            f"error: --{knob.lower()}={getattr(cfg, knob)} is not allowed; allowed: {allowed}"
        )

    if cfg.DEVICE != "cpu":
        refuse("DEVICE", "cpu (the toy's matrices are tiny; nothing here runs on a GPU)")
    for knob, low in (("DIMS", 2), ("CONC_DIMS", 1)):  # the data plane is 2-D: the toy needs d >= 2
        parts = getattr(cfg, knob).split(",")
        if not all(re.fullmatch(r"[0-9]+", p.strip()) and int(p) >= low for p in parts):
            refuse(knob, f"comma-separated integers >= {low}, e.g. 2,16,128")
    for knob, low in INT_MINIMUM.items():
        if getattr(cfg, knob) < low:
            refuse(knob, f"an integer >= {low}")
    if cfg.THREADS > (os.cpu_count() or 1):
        refuse("THREADS", f"an integer in [0, {os.cpu_count() or 1}] (the cores of this machine)")
    if cfg.LATENT > min(dimensions(cfg.DIMS)):
        refuse("LATENT", f"an integer in [1, {min(dimensions(cfg.DIMS))}] (the smallest --dims)")
    if cfg.ENERGY not in ("subspace", "mlp"):
        refuse("ENERGY", "subspace or mlp")
    for knob in SCALES:
        if not SCALE_RANGE[0] <= getattr(cfg, knob) <= SCALE_RANGE[1]:
            refuse(knob, f"a number in [{SCALE_RANGE[0]:g}, {SCALE_RANGE[1]:g}] (data at scale 1)")
    if cfg.SIGMA_MAX <= cfg.SIGMA_MIN:
        refuse("SIGMA_MAX", f"a number > --sigma_min={cfg.SIGMA_MIN}")
    if not 0 < cfg.LR <= 1:
        refuse("LR", "a number in (0, 1]")
    # across the data plane sigma0^2 grad E = v exactly, so a Langevin step multiplies v by
    # 1 - sigma_s^2 / (2 sigma0^2): the exact chains converge only for sigma_s < 2 sigma0
    if not 0 < cfg.STEP_SIZE < 2 * cfg.SIGMA0:
        refuse("STEP_SIZE", f"a number in (0, {2 * cfg.SIGMA0:g}), i.e. below 2 * --sigma0")
    # the anneal starts on the shell sigma = sqrt(T_MAX) sigma0, which MDSM must have trained on
    t_top = (cfg.SIGMA_MAX / cfg.SIGMA0) ** 2
    if not 1 <= cfg.T_MAX <= t_top * (1 + 1e-9):  # (1.2 / 0.2)^2 = 36 up to rounding
        refuse(
            "T_MAX", f"a number in [1, (sigma_max / sigma0)^2 = {t_top:.4g}] (or raise --sigma_max)"
        )
    check_memory(cfg)
    check_writable(cfg.OUT_DIR)


def memory_estimate(cfg):
    """Peak bytes of the largest tensors (float32) from the knobs alone, with the knobs that set
    them: the Monte Carlo table, the network with Adam's state, and one batch of rows (training,
    probes or chains) with their activations and the exact target's (rows, levels, 3 modes, 2)."""
    d = max(dimensions(cfg.DIMS))
    n_in = min(cfg.LATENT, d) if cfg.ENERGY == "subspace" else d
    width = cfg.HIDDEN if cfg.ENERGY == "subspace" else max(cfg.HIDDEN, d)
    params = d * n_in + width * (n_in + 4)
    per_row = 10 * (d + width) + 8 * 3 * cfg.BATCH  # activations, double backward, exact target
    rows = {"--batch": cfg.BATCH, "--n_probe": cfg.N_PROBE, "--n_chains": cfg.N_CHAINS}
    biggest = max(rows, key=rows.get)
    steps = cfg.WARM_STEPS + cfg.ANNEAL_STEPS + cfg.COOL_STEPS
    table = 4 * cfg.CONC_SAMPLES * max(dimensions(cfg.CONC_DIMS))
    network = 4 * (8 * params + rows[biggest] * per_row)
    parts = {
        "the concentration table (--conc_samples x --conc_dims)": table,
        f"the network and {biggest} rows (--hidden, --dims, {biggest})": network,
        "the temperature list (--warm_steps + --anneal_steps + --cool_steps)": 32 * steps,
    }
    what = max(parts, key=parts.get)
    return parts[what], what


def check_memory(cfg):
    """A size that cannot fit gets one line from the estimate, before anything is allocated."""
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): nothing to compare with
        return
    need, what = memory_estimate(cfg)
    if need > have:
        raise SystemExit(
            f"error: this run needs about {need / 1e9:.3g} GB for {what}, and this machine has "
            f"{have / 1e9:.3g} GB; allowed: smaller values of those knobs"
        )


def check_writable(folder):
    """Fail before any work, not at the first save, when the figure cannot be written."""
    try:
        os.makedirs(folder, exist_ok=True)
        open(os.path.join(folder, ".write_test"), "w").close()
        os.remove(os.path.join(folder, ".write_test"))
    except OSError as err:
        raise SystemExit(
            f"error: --out_dir={folder} is not writable ({err.strerror}); "
            "allowed: a writable folder"
        )


def save_figure(conc, results, cfg, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 3, figsize=(15, 8.5))
    # (a) radii concentrate: histogram of ||eps|| / sqrt(d)
    for d, r in conc:
        hist = (r / math.sqrt(d)).numpy()
        ax[0, 0].hist(hist, bins=60, range=(0, 2), histtype="step", density=True, label=f"d={d}")
    ax[0, 0].set(
        title="(a) ||x~ - x|| / (sigma sqrt d): a thin shell in high d",
        xlabel="radius / (sigma sqrt d)",
        ylabel="density",
    )
    ax[0, 0].legend(fontsize=8)
    # (b), (c) gradient error against distance; solid: the whole gradient, dashed: in-plane part
    dims = [d for d, _ in results]
    panels = [
        ("single", "(b) single-noise DSM: grad error (dashed: in-plane)"),
        ("multi", "(c) MDSM: grad error (dashed: in-plane)"),
    ]
    for j, (name, title) in enumerate(panels):
        a = ax[0, j + 1]
        for d, res in results:
            (line,) = a.plot(PROBE_RATIOS, res["errors"][name], "o-", label=f"d={d}")
            plane = res["errors"][name + " plane"]
            a.plot(PROBE_RATIOS, plane, "x--", color=line.get_color(), alpha=0.6)
        a.axvline(1.0, color="k", ls=":", label="single-noise shell")
        if name == "multi":
            low, high = cfg.SIGMA_MIN / cfg.SIGMA0, cfg.SIGMA_MAX / cfg.SIGMA0
            a.axvspan(low, high, color="g", alpha=0.08, label="MDSM sigma range")
        a.set(
            xscale="log",
            yscale="log",
            title=title,
            xlabel="probe sigma_t / sigma0 (distance / single shell radius)",
            ylabel="||g - g*|| / ||g*||",
            ylim=(1e-3, 1e2),
        )
        a.legend(fontsize=8)
    # (d), (e) sample quality against d
    for name, style in [
        ("single", "o-"),
        ("single oracle", "o:"),
        ("multi", "s-"),
        ("multi oracle", "s:"),
    ]:
        tv = [res["samples"][name][0]["tv"] for _, res in results]
        on_data = [res["samples"][name][0]["on_data"] for _, res in results]
        ax[1, 0].plot(dims, tv, style, label=name)
        ax[1, 1].plot(dims, on_data, style, label=name)
    ax[1, 0].set(
        xscale="log",
        title="(d) mode-weight error of samples (0 = exact)",
        xlabel="d",
        ylabel="total variation",
        ylim=(0, 1),
    )
    ax[1, 1].set(
        xscale="log",
        title="(e) fraction of samples on the data (1 = exact)",
        xlabel="d",
        ylabel="fraction",
        ylim=(-0.02, 1.02),
    )
    for a in ax[1, :2]:
        a.legend(fontsize=8)
        a.set_xticks(dims, [str(d) for d in dims], minor=False)
        a.set_xticks([], minor=True)
    # (f) in-plane view of the samples at the largest d, in the colours of (d) and (e)
    d, res = results[-1]
    toy = res["toy"]
    colors = {"single": "tab:blue", "multi": "tab:green"}
    u = {}
    for name in colors:
        u[name] = torch.nan_to_num(res["samples"][name][1] @ toy.Q, nan=1e3).clamp(-1e3, 1e3)
    reach = torch.cat([v.abs().max(1).values for v in u.values()])  # (2n,) how far out each lies
    lim = min(max(1.0, 1.1 * reach.max().item()), 3.0)  # all in view up to 5x the mode radius
    outside = int((reach > lim).sum())
    for name, color in colors.items():
        label = f"{name} (learned)"
        ax[1, 2].scatter(u[name][:, 0], u[name][:, 1], s=4, alpha=0.5, color=color, label=label)
    for k, c in enumerate(toy.centers):  # the 'on the data' region of each mode
        label = "on-data region (4 mode std)" if k == 0 else None
        circle = plt.Circle(c.tolist(), 4 * toy.s, fill=False, color="k", lw=0.8, label=label)
        ax[1, 2].add_patch(circle)
    ax[1, 2].scatter(
        *toy.centers.T, marker="x", color="k", s=60, label="modes (weights 0.6/0.3/0.1)"
    )
    title = f"(f) samples in the data plane, d={d}"
    if outside:
        title += f" ({outside} off-frame)"
    ax[1, 2].set(
        title=title,
        xlim=(-lim, lim),
        ylim=(-lim, lim),
        aspect="equal",
        xlabel="in-plane coordinate u1",
        ylabel="in-plane coordinate u2",
    )
    ax[1, 2].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
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
