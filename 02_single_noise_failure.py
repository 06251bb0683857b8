"""02 - Why one noise level is not enough in high dimension (MDSM, arXiv 1910.07762, Appendix B).

DSM at one noise level sigma supervises grad E only where x~ = x + sigma*eps falls, and in d
dimensions that is a thin shell around the data (a chi law; the width does not shrink with d):
    E||x~ - x|| = sigma sqrt(2) Gamma((d+1)/2) / Gamma(d/2) ~ sigma sqrt(d),   std ~ sigma / sqrt(2).
On the data and far out, where sampling chains start, nothing constrains E. MDSM (paper eq. 10, with
the 1/sigma^2 weight of the authors' code) trains ONE unconditional energy on all shells at once,
sigma ~ U[0.05, 1.2] laid out across the batch:
    loss = mean over x, sigma, eps of ||x - x~ + sigma0^2 grad E(x~)||^2 / (sigma^2 sigma0^4).
Its optimum (derived) is sigma0^2 grad E(x~) = x~ - E[x|x~] on the shell of sigma: exp(-E) is the
sigma-smoothed data at temperature T = sigma^2/sigma0^2, so sampling anneals T from 100 to 0,
    x <- x - (sigma_s^2/2) grad E(x) + sqrt(T) sigma_s xi,   then Tweedie: x <- x - sigma0^2 grad E(x).

Part 1 measures the shell. Part 2: 3 Gaussian modes (weights 0.6/0.3/0.1) on a 2-D plane rotated into
R^d (smoothed density, exact optimum g* of each loss, exact "oracle" chains: closed form). One energy,
sigma0^2 E = c(dist) dist(x, P)^2/2 + MLP(coordinates in P, dist), learned plane P and learned pull c
(see Energy), is trained by single-noise DSM (sigma = sigma0 = 0.1) and by MDSM; we measure the error
||grad E - g*|| / ||g*|| at 0.3x-10x the single shell radius and sample from N(0, I) (single: Langevin
at T = 1; MDSM: annealed). Run: python 02_single_noise_failure.py  (90 s on one CPU core)
Expected (seed 0, d = 256): radii match sqrt(d) and 1/sqrt(2). Single-noise DSM: gradient error 0.03
on its shell, 1.0 at 0.3x and 10x; 38 % of its chains reach the data, all in one mode (TV 0.40). MDSM:
0.04 / 0.02 / 0.005, 93 % on the data, mode TV 0.07 (exact field: 100 %, 0.01). At d = 16 MDSM's plane sticks.
"""
import math
import os
import sys
import time

import numpy as np
import torch

# ---- config: every knob can be overridden with --key=value (see --help) ----
SEED = 0                    # random seed for data, initialization and sampling
DEVICE = "cpu"              # auto | cpu | cuda | mps (small MLPs: the CPU is fine)
THREADS = 1                 # CPU threads; tiny matrices run fastest on 1 (0 = torch default)
DIMS = "2,128,256"          # comma-separated ambient dimensions of the toy (d = 16 traps MDSM's plane: README)
CONC_DIMS = "2,16,128,1024,3072"  # dimensions of the concentration table (3072 = CIFAR-10)
CONC_SAMPLES = 4000         # Monte Carlo draws per dimension for the concentration table
SIGMA0 = 0.1                # small noise level: the single-noise sigma and MDSM's sigma0
SIGMA_MIN = 0.05            # MDSM: smallest sigma of the uniform range (CIFAR-10: 0.05)
SIGMA_MAX = 1.2             # MDSM: largest sigma (CIFAR-10: 1.2)
MODE_STD = 0.05             # std of each mixture mode inside the data plane
MODE_RADIUS = 0.6           # modes sit on a circle of this radius in the plane
ENERGY = "subspace"         # subspace: c(dist) dist(x, learned plane)^2/2 + MLP of in-plane coordinates; mlp: MLP of x
LATENT = 2                  # subspace: dimension K of the learned plane (the toy's data plane is 2-D)
HIDDEN = 64                 # width of the energy's hidden layer (mlp: raised to d if smaller)
STEPS = 3000                # Adam steps per model (same for both models)
BATCH = 256                 # training batch (one sigma per slot for MDSM)
LR = 1e-2                   # Adam learning rate, cosine-decayed to 1% of it (mlp: 3e-3)
LOG_EVERY = 200             # print a log line every this many steps
N_PROBE = 256               # probe points per distance for the gradient-error table
N_CHAINS = 256              # Langevin chains per sampler
INIT_STD = 1.0              # chains start at N(0, INIT_STD^2 I) around the data centre
STEP_SIZE = 0.02            # Langevin sigma_s (MDSM: 0.02); update -0.5 sigma_s^2 grad E + sqrt(T) sigma_s xi
T_MAX = 100.0               # starting temperature (MDSM: 100, i.e. sigma = 1)
WARM_STEPS = 50             # steps at T_MAX (MDSM: 500)
ANNEAL_STEPS = 400          # geometric decay T_MAX -> 1 (MDSM: 2000)
COOL_STEPS = 200            # linear decay 1 -> 0 (MDSM: 200)
OUT_DIR = "out/02_single_noise_failure"  # figure and table go here

# The helpers every file repeats (device, seed, --key=value overrides, logging, image grids) are at the end.


# ---------------------------------------------------------------- part 1: concentration of measure
def shell_radius(d, sigma):
    """Exact mean and std of ||sigma*eps||, eps ~ N(0, I_d) (a chi distribution), and the
    high-d approximations sigma*sqrt(d) and sigma/sqrt(2)."""
    # E||eps|| = sqrt(2) Gamma((d+1)/2) / Gamma(d/2);  Var = d - (E||eps||)^2
    mean = math.sqrt(2) * math.exp(math.lgamma((d + 1) / 2) - math.lgamma(d / 2))
    return sigma * mean, sigma * math.sqrt(max(d - mean**2, 0.0)), sigma * math.sqrt(d), sigma / math.sqrt(2)


def concentration_table(cfg, gen):
    rows = []
    print("\npart 1: ||x~ - x|| for x~ = x + sigma*eps (sigma = 1; everything scales with sigma)")
    print(f"{'d':>6} {'MC mean':>9} {'sqrt(d)':>9} {'MC std':>8} {'1/sqrt2':>8} {'exact std':>9} {'rel. width':>10}")
    for d in [int(text) for text in cfg.CONC_DIMS.split(",")]:
        r = torch.randn(cfg.CONC_SAMPLES, d, generator=gen).norm(dim=1)  # (N,)
        mean, std, approx_mean, approx_std = shell_radius(d, 1.0)
        rows.append((d, r))
        print(f"{d:>6} {r.mean():9.3f} {approx_mean:9.3f} {r.std():8.3f} {approx_std:8.3f} {std:9.3f} {r.std() / r.mean():10.3f}")
    radii = ", ".join(f"sigma={s}: {shell_radius(3072, s)[2]:.3g}" for s in (0.05, 0.1, 1.0, 1.2))
    print(f"CIFAR-10 (d=3072) shell radii sigma*sqrt(d): {radii}")
    return rows


# ---------------------------------------------------------------- part 2: the toy and its exact scores
class PlaneMixture:
    """3 Gaussian modes (std MODE_STD, weights 0.6/0.3/0.1) on a 2-D plane, rotated into R^d."""

    def __init__(self, d, cfg, gen):
        angles = torch.tensor([90.0, 210.0, 330.0]) * math.pi / 180
        self.centers = cfg.MODE_RADIUS * torch.stack([angles.cos(), angles.sin()], 1)  # (K, 2)
        self.weights = torch.tensor([0.6, 0.3, 0.1])
        self.s, self.d = cfg.MODE_STD, d
        self.Q = torch.linalg.qr(torch.randn(d, 2, generator=gen))[0]  # (d, 2) orthonormal basis of the plane

    def sample(self, n, gen):
        k = torch.multinomial(self.weights, n, replacement=True, generator=gen)
        u = self.centers[k] + self.s * torch.randn(n, 2, generator=gen)  # (n, 2) in-plane coordinates
        return u @ self.Q.T  # (n, d)

    def split(self, x):
        """In-plane coordinates u (n, 2) and squared distance to the plane |v|^2 (n,)."""
        u = x @ self.Q
        return u, (x.pow(2).sum(1) - u.pow(2).sum(1)).clamp_min(0)

    def log_q(self, x, sigma):
        """log q_sigma(x~): the mixture smoothed by N(0, sigma^2 I) (exact), for each sigma (L,)."""
        u, v2 = self.split(x)
        var = self.s**2 + sigma**2  # (L,) in-plane variance of each mode after smoothing
        du2 = (u[:, None, :] - self.centers[None]).pow(2).sum(-1)  # (n, K)
        logits = self.weights.log() - du2[:, None, :] / (2 * var[None, :, None])  # (n, L, K)
        plane = torch.logsumexp(logits, -1) - torch.log(2 * math.pi * var)  # (n, L)
        across = -v2[:, None] / (2 * sigma**2) - (self.d - 2) / 2 * torch.log(2 * math.pi * sigma**2)
        return plane + across  # (n, L)

    def plane_score(self, u, sigma):
        """In-plane part of grad log q_sigma at in-plane points u (n, 2), for each sigma (L,): (n, L, 2)."""
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
        """Exact pointwise minimizer g* of the 1/sigma^2-weighted MDSM loss over the levels `sigmas`:
        sigma0^2 g* = sum_j w_j (-s_j^2 grad log q_{s_j}), w_j proportional to q_{s_j}(x~) / s_j^2.
        Across the plane -s^2 grad log q_s = v for every level, so only the plane part mixes."""
        u = x @ self.Q
        w = torch.softmax(self.log_q(x, sigmas) - 2 * sigmas.log(), 1)  # (n, L) level posterior x weight
        plane = (w[..., None] * sigmas[None, :, None] ** 2 * self.plane_score(u, sigmas)).sum(1)  # (n, 2)
        return (x - u @ self.Q.T - plane @ self.Q.T) / sigma0**2  # (n, d)


# ---------------------------------------------------------------- model and loss
class Energy(torch.nn.Module):
    """sigma0^2 E(x) = c(rho) dist(x, P)^2 / 2 + f(A^T x, log rho) - f(0, log rho)  (energy="subspace"),
    or f(x, ||x||/sqrt(d)) (energy="mlp"). P: a learned K-dim subspace, basis A (d, K); rho = dist(x, P)/sqrt(d)
    (~ sigma on the shell of sigma); c(rho) > 0: learned over log-spaced distance bins in [0.05, 5], 0.1 at the
    start, so each distance learns only from the noisy points that land there (exact optimum: c = 1 at every
    distance, as x~ - E[x|x~] = v across a data plane). f: one SiLU layer with MDSM's quadratic-neuron head."""

    def __init__(self, d, hidden, sigma0, kind="subspace", latent=2, bins=16):
        super().__init__()
        self.kind, n_in = kind, min(latent, d) if kind == "subspace" else d
        if kind == "subspace":
            self.basis = torch.nn.Parameter(torch.randn(d, n_in) / math.sqrt(d))  # spans P after QR
            self.register_buffer("centers", torch.linspace(math.log(0.05), math.log(5.0), bins))  # log rho
            self.logit_c = torch.nn.Parameter(torch.full((bins,), math.log(math.expm1(0.1))))  # c = 0.1
        width = hidden if kind == "subspace" else max(hidden, d)  # mlp: grad E lies in the span of W's rows
        self.trunk = torch.nn.Sequential(torch.nn.Linear(n_in + 1, width), torch.nn.SiLU())
        self.pair, self.square = torch.nn.Linear(width, 2), torch.nn.Linear(width, 1)
        self.scale = 1 / sigma0**2  # the net models sigma0^2 E, whose gradient has norm ~ sigma sqrt(d)

    def forward(self, x):  # (n, d) -> (n,)
        if self.kind == "mlp":
            return self.scale * self.head(torch.cat([x, x.norm(dim=1, keepdim=True) / math.sqrt(x.shape[1])], 1))
        z = x @ torch.linalg.qr(self.basis)[0]  # (n, K) coordinates in P
        dist2 = (x.pow(2).sum(1) - z.pow(2).sum(1)).clamp_min(1e-12)  # (n,) dist(x, P)^2
        log_rho = (dist2 / x.shape[1]).sqrt().log().clamp(self.centers[0], self.centers[-1])[:, None]  # (n, 1)
        bins = torch.softmax(-0.5 * ((log_rho - self.centers) / (self.centers[1] - self.centers[0])) ** 2, 1)  # bumps
        f = self.head(torch.cat([z, log_rho], 1)) - self.head(torch.cat([torch.zeros_like(z), log_rho], 1))
        return self.scale * (0.5 * torch.nn.functional.softplus(bins @ self.logit_c) * dist2 + f)  # c(rho) = softplus

    def head(self, inputs):  # (n, n_in + 1) -> (n,): one SiLU layer, MDSM's quadratic neuron
        h = self.trunk(inputs)  # (n, H)
        a = self.pair(h)  # (n, 2)
        return a[:, 0] * a[:, 1] + self.square(h * h)[:, 0]


def grad_energy(net, x, create_graph=False):
    x = x if x.requires_grad else x.detach().requires_grad_(True)
    return torch.autograd.grad(net(x).sum(), x, create_graph=create_graph)[0]  # (n, d)


def mdsm_loss(net, x, sigma, sigma0):
    """Per sample ||x - x~ + sigma0^2 grad E(x~)||^2 / (sigma^2 sigma0^4), batch mean (MDSM eq. 10
    with the authors' 1/sigma^2 weight). Single-noise DSM is the special case sigma = sigma0."""
    x_noisy = x + sigma[:, None] * torch.randn_like(x)  # (B, d)
    g = grad_energy(net, x_noisy, create_graph=True)
    return ((x - x_noisy + sigma0**2 * g).pow(2).sum(1) / (sigma**2 * sigma0**4)).mean()


def train(toy, multiscale, cfg, gen, tag):
    net = Energy(toy.d, cfg.HIDDEN, cfg.SIGMA0, cfg.ENERGY, cfg.LATENT)  # the same network for both models
    opt = torch.optim.Adam(net.parameters(), lr=cfg.LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.STEPS, eta_min=cfg.LR / 100)
    # MDSM: one sigma per batch slot, linspace(SIGMA_MIN, SIGMA_MAX, B); single: every slot sigma0
    sigma = (torch.linspace(cfg.SIGMA_MIN, cfg.SIGMA_MAX, cfg.BATCH) if multiscale
             else torch.full((cfg.BATCH,), cfg.SIGMA0))
    t0 = time.time()
    for step in range(1, cfg.STEPS + 1):
        loss = mdsm_loss(net, toy.sample(cfg.BATCH, gen), sigma, cfg.SIGMA0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        progress(step, cfg.STEPS, t0, tag)
        if step % cfg.LOG_EVERY == 0 or step == cfg.STEPS:
            # sigma0^4 * loss / d is ~1 for a useless model, and near 0 for a perfect denoiser
            log_line(step, {"model": tag, "d": toy.d, "loss/d": cfg.SIGMA0**4 * loss.item() / toy.d,
                            "it/s": step / (time.time() - t0)})
    return net


# ---------------------------------------------------------------- evaluation: gradient error vs distance
PROBE_RATIOS = (0.3, 0.6, 1.0, 2.0, 5.0, 10.0)  # probe noise sigma_t / SIGMA0 (1 = the single shell)


def gradient_errors(toy, nets, cfg, gen):
    """||g - g*|| / ||g*|| at x + sigma_t*eps, sigma_t = ratio * SIGMA0, and for the in-plane part alone
    ("<model> plane"): the 2-D pull that picks a mode is 5-15x smaller than the off-plane v / sigma0^2,
    so a small total error can hide a useless in-plane field."""
    levels = torch.linspace(cfg.SIGMA_MIN, cfg.SIGMA_MAX, cfg.BATCH)
    errors = {key: [] for name in nets for key in (name, name + " plane")}
    for ratio in PROBE_RATIOS:
        x = toy.sample(cfg.N_PROBE, gen)
        x_noisy = x + ratio * cfg.SIGMA0 * torch.randn(x.shape, generator=gen)
        targets = {"single": -toy.score(x_noisy, torch.tensor(cfg.SIGMA0)),  # exact grad of -log q_sigma0
                   "multi": toy.mdsm_target(x_noisy, levels, cfg.SIGMA0)}  # exact optimum of the MDSM loss
        for name, net in nets.items():
            g = grad_energy(net, x_noisy)  # (n, d)
            errors[name].append(((g - targets[name]).norm(dim=1) / targets[name].norm(dim=1)).mean().item())
            g_u, t_u = g @ toy.Q, targets[name] @ toy.Q  # (n, 2) in-plane coordinates
            errors[name + " plane"].append(((g_u - t_u).norm(dim=1) / t_u.norm(dim=1)).mean().item())
    return errors


# ---------------------------------------------------------------- sampling
def temperatures(cfg):
    """MDSM's schedule, shortened: T_MAX flat, geometric T_MAX -> 1, then linear 1 -> 0."""
    anneal = [cfg.T_MAX * math.exp(-k * math.log(cfg.T_MAX) / cfg.ANNEAL_STEPS) for k in range(cfg.ANNEAL_STEPS)]
    return [cfg.T_MAX] * cfg.WARM_STEPS + anneal + [1 - k / cfg.COOL_STEPS for k in range(cfg.COOL_STEPS)]


def langevin(grad_fn, x, temps, step_size, gen):
    """x <- x - 0.5 sigma_s^2 grad E(x) + sqrt(T) sigma_s xi: Langevin on exp(-E/T)."""
    for T in temps:
        x = x - 0.5 * step_size**2 * grad_fn(x) + math.sqrt(max(T, 0)) * step_size * torch.randn(x.shape, generator=gen)
    return x.detach()


def tweedie_step(grad_fn, x, sigma0):
    """Final denoise: E[x | x~] = x~ + sigma0^2 grad log q_sigma0(x~) = x~ - sigma0^2 grad E(x~) (Tweedie)."""
    return (x - sigma0**2 * grad_fn(x)).detach()


def sample_quality(toy, x):
    """Mode-weight error (total variation), median distance to the data plane, and the fraction
    of samples "on the data": within 4 MODE_STD of a mode centre and of the plane (exact: 1.00)."""
    x = torch.nan_to_num(x, nan=1e3).clamp(-1e3, 1e3)  # a diverged chain counts as far away
    u, v2 = toy.split(x)
    dist, k = torch.cdist(u, toy.centers).min(1)
    freq = torch.bincount(k, minlength=3).float() / len(x)
    on_data = (dist < 4 * toy.s) & (v2.sqrt() < 4 * toy.s)
    return {"tv": 0.5 * (freq - toy.weights).abs().sum().item(), "plane": v2.sqrt().median().item(),
            "on_data": on_data.float().mean().item(), "freq": freq.tolist()}


def run_samplers(toy, nets, cfg, gen):
    temps = temperatures(cfg)
    x0 = cfg.INIT_STD * torch.randn(cfg.N_CHAINS, toy.d, generator=gen)  # broad noise around the data
    s0 = torch.tensor(cfg.SIGMA0)
    levels = torch.linspace(cfg.SIGMA_MIN, cfg.SIGMA_MAX, cfg.BATCH)
    fields = {  # grad E of each sampler; oracles use the exact optimum of each objective
        "single": lambda x: grad_energy(nets["single"], x), "single oracle": lambda x: -toy.score(x, s0),
        "multi": lambda x: grad_energy(nets["multi"], x), "multi oracle": lambda x: toy.mdsm_target(x, levels, cfg.SIGMA0)}
    out = {}
    for name, grad_fn in fields.items():
        # plain Langevin at T = 1 for the single-noise energy, MDSM's annealing for the multiscale one
        x = langevin(grad_fn, x0.clone(), [1.0] * len(temps) if "single" in name else temps, cfg.STEP_SIZE, gen)
        x = tweedie_step(grad_fn, x, cfg.SIGMA0)
        out[name] = (sample_quality(toy, x), x)
    return out


# ---------------------------------------------------------------- figure and main
def save_figure(conc, results, cfg, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(2, 3, figsize=(15, 8.5))
    for d, r in conc:  # (a) radii concentrate: histogram of ||eps|| / sqrt(d)
        ax[0, 0].hist((r / math.sqrt(d)).numpy(), bins=60, range=(0, 2), histtype="step", density=True, label=f"d={d}")
    ax[0, 0].set(title="(a) ||x~ - x|| / (sigma sqrt d): a thin shell in high d", xlabel="radius / (sigma sqrt d)", ylabel="density")
    ax[0, 0].legend(fontsize=8)
    dims = [d for d, _ in results]
    for j, (name, title) in enumerate([("single", "(b) single-noise DSM: grad error (dashed: in-plane)"),
                                          ("multi", "(c) MDSM: grad error (dashed: in-plane)")]):
        a = ax[0, j + 1]
        for d, res in results:  # solid: whole gradient; dashed: its in-plane part (the pull towards a mode)
            line, = a.plot(PROBE_RATIOS, res["errors"][name], "o-", label=f"d={d}")
            a.plot(PROBE_RATIOS, res["errors"][name + " plane"], "x--", color=line.get_color(), alpha=0.6)
        a.axvline(1.0, color="k", ls=":", label="single-noise shell")
        if name == "multi":
            a.axvspan(cfg.SIGMA_MIN / cfg.SIGMA0, cfg.SIGMA_MAX / cfg.SIGMA0, color="g", alpha=0.08, label="MDSM sigma range")
        a.set(xscale="log", yscale="log", title=title, xlabel="probe sigma_t / sigma0 (distance / single shell radius)",
              ylabel="||g - g*|| / ||g*||", ylim=(1e-3, 1e2))
        a.legend(fontsize=8)
    for name, style in [("single", "o-"), ("single oracle", "o:"), ("multi", "s-"), ("multi oracle", "s:")]:
        ax[1, 0].plot(dims, [res["samples"][name][0]["tv"] for _, res in results], style, label=name)
        ax[1, 1].plot(dims, [res["samples"][name][0]["on_data"] for _, res in results], style, label=name)
    ax[1, 0].set(xscale="log", title="(d) mode-weight error of samples (0 = exact)", xlabel="d", ylabel="total variation", ylim=(0, 1))
    ax[1, 1].set(xscale="log", title="(e) fraction of samples on the data (1 = exact)", xlabel="d", ylabel="fraction", ylim=(-0.02, 1.02))
    for a in ax[1, :2]:
        a.legend(fontsize=8)
        a.set_xticks(dims, [str(d) for d in dims], minor=False)
        a.set_xticks([], minor=True)
    d, res = results[-1]  # (f) in-plane view of the samples at the largest d
    toy, colors = res["toy"], {"single": "tab:blue", "multi": "tab:green"}  # the colours of (d) and (e)
    u = {name: torch.nan_to_num(res["samples"][name][1] @ toy.Q, nan=1e3).clamp(-1e3, 1e3) for name in colors}
    reach = torch.cat([v.abs().max(1).values for v in u.values()])  # (2n,) how far out each sample lies
    lim = min(max(1.0, 1.1 * reach.max().item()), 3.0)  # all in view up to 5x the mode radius, the rest counted
    outside = int((reach > lim).sum())
    for name, color in colors.items():
        ax[1, 2].scatter(u[name][:, 0], u[name][:, 1], s=4, alpha=0.5, color=color, label=f"{name} (learned)")
    for k, c in enumerate(toy.centers):  # the 'on the data' region of each mode
        ax[1, 2].add_patch(plt.Circle(c.tolist(), 4 * toy.s, fill=False, color="k", lw=0.8,
                                      label="on-data region (4 mode std)" if k == 0 else None))
    ax[1, 2].scatter(*toy.centers.T, marker="x", color="k", s=60, label="modes (weights 0.6/0.3/0.1)")
    title = f"(f) samples in the data plane, d={d}" + (f" ({outside} off-frame)" if outside else "")
    ax[1, 2].set(title=title, xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal",
                 xlabel="in-plane coordinate u1", ylabel="in-plane coordinate u2")
    ax[1, 2].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


# smallest allowed value of each integer knob; the float knobs below must be > 0
INT_MINIMUM = {"SEED": 0, "THREADS": 0, "CONC_SAMPLES": 2, "LATENT": 1, "HIDDEN": 1, "STEPS": 1, "BATCH": 2,
               "LOG_EVERY": 1, "N_PROBE": 1, "N_CHAINS": 1, "WARM_STEPS": 0, "ANNEAL_STEPS": 0, "COOL_STEPS": 0}
POSITIVE = ("SIGMA0", "SIGMA_MIN", "SIGMA_MAX", "MODE_STD", "MODE_RADIUS", "LR", "INIT_STD", "STEP_SIZE")


def check_config(cfg):
    """Every knob in its range, else one line naming the knob and what is allowed."""
    def refuse(knob, allowed):
        raise SystemExit(f"error: --{knob.lower()}={getattr(cfg, knob)} is not allowed; allowed: {allowed}")
    for knob, low in INT_MINIMUM.items():
        if getattr(cfg, knob) < low:
            refuse(knob, f"an integer >= {low}")
    for knob in POSITIVE:
        if not 0 < getattr(cfg, knob) < math.inf:
            refuse(knob, "a finite number > 0")
    if cfg.SIGMA_MAX <= cfg.SIGMA_MIN:
        refuse("SIGMA_MAX", f"a number > --sigma_min={cfg.SIGMA_MIN}")
    if not 1 <= cfg.T_MAX < math.inf:
        refuse("T_MAX", "a finite temperature >= 1 (the anneal runs from t_max down to 1)")
    if cfg.ENERGY not in ("subspace", "mlp"):
        refuse("ENERGY", "subspace or mlp")
    for knob, low in (("DIMS", 2), ("CONC_DIMS", 1)):  # the data plane is 2-D, so the toy needs d >= 2
        if not all(text.strip().isdigit() and int(text) >= low for text in getattr(cfg, knob).split(",")):
            refuse(knob, f"comma-separated integers >= {low}, e.g. 2,16,128")


def check_writable(folder):
    """Fail before any work, not at the first save, when the figure cannot be written."""
    try:
        os.makedirs(folder, exist_ok=True)
        open(os.path.join(folder, ".write_test"), "w").close()
        os.remove(os.path.join(folder, ".write_test"))
    except OSError as err:
        raise SystemExit(f"error: --out_dir={folder} is not writable ({err.strerror}); allowed: a writable folder")


def main(argv=None):
    cfg = parse_config(globals(), argv)
    check_config(cfg)
    dims = [int(text) for text in cfg.DIMS.split(",")]
    check_writable(cfg.OUT_DIR)
    pick_device(cfg.DEVICE)  # the toy runs on the CPU; this only validates the knob
    torch.set_num_threads(cfg.THREADS or torch.get_num_threads())  # 0 = keep torch's default
    set_seed(cfg.SEED)
    gen = torch.Generator().manual_seed(cfg.SEED)
    t0 = time.time()
    conc = concentration_table(cfg, gen)
    results = []
    for d in dims:
        print(f"\npart 2, d = {d}: train single-noise DSM (sigma = {cfg.SIGMA0}) and MDSM "
              f"(sigma in [{cfg.SIGMA_MIN}, {cfg.SIGMA_MAX}]), {cfg.STEPS} steps each", flush=True)
        toy = PlaneMixture(d, cfg, gen)
        nets = {"single": train(toy, False, cfg, gen, "single"), "multi": train(toy, True, cfg, gen, "multi")}
        results.append((d, {"toy": toy, "errors": gradient_errors(toy, nets, cfg, gen),
                            "samples": run_samplers(toy, nets, cfg, gen)}))
    for title, part in (("gradient error ||g - g*|| / ||g*|| at x + sigma_t*eps (ratio = sigma_t / sigma0; 1 = single shell)", ""),
                        ("the same error for the in-plane part of g only (the 2-D pull towards the modes)", " plane")):
        print(f"\n{title}\n{'d':>5} {'model':>7} " + " ".join(f"{r:>7g}" for r in PROBE_RATIOS))
        for d, res in results:
            for name in ("single", "multi"):
                print(f"{d:>5} {name:>7} " + " ".join(f"{e:7.3f}" for e in res["errors"][name + part]))
    print(f"\nsamples from N(0, {cfg.INIT_STD}^2 I) after {len(temperatures(cfg))} Langevin steps + denoise "
          f"(exact samples: tv ~0.02, plane 0, on data 1.00, weights 0.60/0.30/0.10)")
    print(f"{'d':>5} {'sampler':>14} {'tv':>6} {'plane':>9} {'on data':>8}  mode weights")
    for d, res in results:
        for name, (q, _) in res["samples"].items():
            print(f"{d:>5} {name:>14} {q['tv']:6.3f} {q['plane']:9.3g} {q['on_data']:8.2f}  "
                  + "/".join(f"{f:.2f}" for f in q["freq"]))
    e, q = results[-1][1]["errors"], {name: v[0] for name, v in results[-1][1]["samples"].items()}
    print(f"\nreading (d = {results[-1][0]}): 10x outside the single shell the in-plane gradient error is "
          f"{e['single plane'][-1]:.2f} (single) vs {e['multi plane'][-1]:.2f} (MDSM); on the data: MDSM "
          f"{q['multi']['on_data']:.2f} (oracle {q['multi oracle']['on_data']:.2f}), mode-weight TV: single "
          f"{q['single']['tv']:.2f} (oracle {q['single oracle']['tv']:.2f}), MDSM {q['multi']['tv']:.2f}")
    path = os.path.join(cfg.OUT_DIR, "02_single_noise_failure.png")
    save_figure(conc, results, cfg, path)
    print(f"\nwrote {path} | total {time.time() - t0:.0f} s")
    return results


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
