"""01 - Score matching: learn an energy E(x) from samples alone, on 2-D toys with a known score.

A density p(x) = exp(-E(x)) / Z is hard to fit by maximum likelihood because Z is an integral
over all x. The score s(x) = grad_x log p(x) = -grad_x E(x) does not contain Z, so we fit the
score instead. This file trains the same small MLP energy with three objectives that need only
samples of p, and checks each against the closed-form score of two toys (a Gaussian mixture with
unequal weights and correlated components, and a ring of six Gaussians):

  1. Exact score matching, Hyvarinen (2005), JMLR 6:695, Theorem 1 (Eq. 3):
       J(theta) = E_p[ 0.5 ||s_theta(x)||^2 + tr(grad_x s_theta(x)) ]
     The trace is computed exactly: one extra backward pass per dimension (2 here).
  2. Denoising score matching, Vincent (2011), Neural Computation 23(7), the J_DSM objective:
       J(theta) = E_p E_eps[ 0.5 ||s_theta(x~) - (-(x~ - x) / sigma^2)||^2 ],  x~ = x + sigma*eps
     No derivative of s is needed, but the optimum is the score of the NOISED density
     q_sigma = p convolved with N(0, sigma^2 I), not the score of p.
  3. Sliced score matching, Song, Garg, Shi, Ermon (2019), UAI, SSM and its variance-reduced SSM-VR:
       J(theta) = E_p E_v[ v^T (grad_x s_theta) v + 0.5 (v^T s_theta)^2 ],  v ~ N(0, I)
     One Jacobian-vector product per projection instead of D backward passes for the trace.

Conventions (the same in every file of this repository):
  E(x)  the energy; p_theta(x) is proportional to exp(-E(x)); low energy = high probability.
  s(x)  = -grad_x E(x), the score; grad_energy(E, x) below returns +grad_x E, so s = -grad_energy.
  x~    = x + sigma * eps, eps ~ N(0, I): sigma is a standard deviation (variance sigma^2).
  Langevin step of size eta:  x <- x - (eta / 2) grad_x E(x) + sqrt(eta) * xi,  xi ~ N(0, I)
        (files 04-06 write the same rule with eta = sigma_s^2 and temperature T = 1).

Run:  python 01_score_matching.py                        # CPU, about a minute: the table and the figure
      python 01_score_matching.py --methods=dsm --dsm_sigma=0.1 --steps=4000   # less DSM bias
      python 01_score_matching.py --help                 # every knob and its meaning
Expected (seed 0): relative score error against p of about 0.1-0.17 for exact and sliced SM; DSM
at sigma = 0.3 errs by 0.35-0.41 against p but only 0.07-0.12 against q_sigma, the density it learns.
Output: out/01_score_matching/score_matching.png (energy contours, score fields, Langevin samples).
"""
import io
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn

# ---- config: every knob can be overridden with --key=value (see --help) ----
SEED = 0                         # random seed for data, initialization, noise and sampling
DEVICE = "cpu"                   # auto | cpu | cuda | mps (the 2-D toys are fastest on the CPU)
THREADS = 1                      # CPU threads for torch; 1 is fastest for these tiny networks
SHAPES = "mixture,ring"          # comma-separated toys: mixture (3 unequal Gaussians) | ring (6 Gaussians)
METHODS = "exact,dsm,sliced"     # comma-separated objectives: exact | dsm | sliced
N_TRAIN = 20000                  # training samples drawn once per toy
N_TEST = 2000                    # held-out samples for the error table (at least 2)
HIDDEN = 64                      # width of the three hidden layers of the energy MLP
STEPS = 1000                     # Adam steps per (toy, objective); 2-8 s each on one CPU core
BATCH = 256                      # samples per step
LR = 5e-3                        # Adam learning rate, cosine-decayed to 0 over STEPS
DSM_SIGMA = 0.3                  # DSM noise standard deviation (0.1-0.5; the bias grows with it)
N_PROJECTIONS = 1                # random projections v per sample in sliced SM
SLICED_VR = True                 # sliced SM: use 0.5||s||^2 (SSM-VR) instead of 0.5(v^T s)^2
LANGEVIN_STEP = 0.01             # Langevin step size eta (see the step rule in the docstring)
LANGEVIN_STEPS = 500             # Langevin steps from a uniform start in the plot box
N_SAMPLES = 1000                 # Langevin chains per model
BOX = 4.0                        # plots and Langevin starts cover [-BOX, BOX]^2
LOG_EVERY = 500                  # print a log line every this many training steps (0: never)
OUT_DIR = "out/01_score_matching"  # where the figure is written

# The helpers every file repeats (device, seed, --key=value overrides, logging, image grids) are at the end.


# ---- data: toys whose log-density and score are known in closed form ----
def make_shape(name):
    """Return (means (K, 2), covs (K, 2, 2), weights (K,)) of a 2-D Gaussian mixture."""
    if name == "mixture":  # unequal weights, correlated and elongated components
        means = [[-1.5, -1.0], [1.5, -1.0], [0.0, 1.6]]
        covs = [[[0.40, 0.25], [0.25, 0.40]], [[0.30, -0.15], [-0.15, 0.50]], [[0.60, 0.0], [0.0, 0.15]]]
        weights = [0.5, 0.3, 0.2]
    elif name == "ring":  # six equal round Gaussians on a circle of radius 2
        angles = [2 * math.pi * k / 6 for k in range(6)]
        means = [[2.0 * math.cos(a), 2.0 * math.sin(a)] for a in angles]
        covs = [[[0.16, 0.0], [0.0, 0.16]]] * 6
        weights = [1 / 6] * 6
    else:
        raise SystemExit(f"error: unknown shape {name!r}; use --shapes=mixture,ring (or one of them)")
    return torch.tensor(means), torch.tensor(covs), torch.tensor(weights)


def sample_mixture(n, means, covs, weights):
    """n samples (n, 2): pick a component k ~ weights, then x = mu_k + L_k z with L_k L_k^T = cov_k."""
    k = torch.multinomial(weights, n, replacement=True)  # (n,)
    z = torch.randn(n, means.shape[1], 1, device=means.device)  # (n, 2, 1)
    return means[k] + (torch.linalg.cholesky(covs)[k] @ z).squeeze(-1)


def component_terms(x, means, covs, weights):
    """x - mu_k (B, K, D), cov_k^-1 (K, D, D) and log w_k + log N(x; mu_k, cov_k) (B, K)."""
    diff = x[:, None, :] - means[None]  # (B, K, D)
    prec = torch.linalg.inv(covs)  # (K, D, D)
    maha = torch.einsum("bki,kij,bkj->bk", diff, prec, diff)  # (B, K) squared Mahalanobis distances
    log_norm = -0.5 * (x.shape[1] * math.log(2 * math.pi) + torch.logdet(covs))  # (K,)
    return diff, prec, weights.log() + log_norm - 0.5 * maha


def mixture_log_prob(x, means, covs, weights):
    """log p(x) = logsumexp_k [log w_k + log N(x; mu_k, cov_k)], x (B, D) -> (B,)."""
    return torch.logsumexp(component_terms(x, means, covs, weights)[2], dim=1)


def mixture_score(x, means, covs, weights):
    """grad_x log p(x) = sum_k r_k(x) * (-cov_k^-1 (x - mu_k)), r_k = posterior of component k."""
    diff, prec, log_terms = component_terms(x, means, covs, weights)
    r = torch.softmax(log_terms, dim=1)  # (B, K) responsibilities
    return -torch.einsum("bk,kij,bkj->bi", r, prec, diff)  # (B, D)


def noisy_covs(covs, sigma):
    """q_sigma = p convolved with N(0, sigma^2 I) is again a mixture, with cov_k + sigma^2 I."""
    return covs + sigma**2 * torch.eye(covs.shape[-1], device=covs.device)


# ---- model: a scalar energy E(x); the score is its negative gradient ----
class EnergyMLP(nn.Module):
    """E(x) = MLP(x), (B, 2) -> (B,). SiLU is smooth, so the Hessian needed by exact SM exists
    (with ReLU the trace of the Hessian would be zero almost everywhere)."""

    def __init__(self, hidden=64, dim=2):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)


def grad_energy(energy_fn, x, create_graph=False):
    """grad_x E(x), (B, D); the score is its negative. x that already requires grad is used as is
    (the losses differentiate again with respect to it); create_graph=True keeps the graph for a loss."""
    with torch.enable_grad():
        x = x if x.requires_grad else x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(energy_fn(x).sum(), x, create_graph=create_graph)  # E_b depends on x_b only
    return grad


# ---- losses: three objectives that need only samples of p ----
def exact_sm_loss(energy_fn, x):
    """Hyvarinen (2005) Eq. 3 with s = -grad E: mean over x of 0.5||s||^2 + tr(grad_x s)."""
    x = x.detach().requires_grad_(True)
    s = -grad_energy(energy_fn, x, create_graph=True)  # s = -grad E, (B, D)
    # tr(grad_x s) = sum_i ds_i/dx_i; samples are independent, so d(sum_b s_bi)/dx_b gives row b.
    trace = torch.zeros_like(s[:, 0])  # (B,)
    for i in range(x.shape[1]):
        trace = trace + torch.autograd.grad(s[:, i].sum(), x, create_graph=True)[0][:, i]
    # Eq. 3: J = E[ 0.5 ||s||^2 + tr(grad_x s) ]  (equals 0.5 E||s - s_p||^2 up to a constant)
    return (0.5 * (s**2).sum(1) + trace).mean()


def dsm_target(x_noisy, x, sigma):
    """Score of the noise kernel, grad_x~ log N(x~; x, sigma^2 I) = -(x~ - x) / sigma^2 = -eps / sigma."""
    return -(x_noisy - x) / sigma**2


def dsm_loss(energy_fn, x, sigma):
    """Vincent (2011) J_DSM at one noise level, weighted by lambda(sigma) = sigma^2."""
    x_noisy = x + sigma * torch.randn_like(x)  # x~ = x + sigma * eps, (B, D)
    s = -grad_energy(energy_fn, x_noisy, create_graph=True)  # s = -grad E at x~, (B, D)
    # J_DSM = E[ 0.5 ||s(x~) + (x~ - x)/sigma^2||^2 ]; the weight sigma^2 (lambda(sigma) = sigma^2)
    # makes the loss O(1) for any sigma and does not move its minimum.
    return (0.5 * sigma**2 * ((s - dsm_target(x_noisy, x, sigma)) ** 2).sum(1)).mean()


def sliced_sm_loss(energy_fn, x, n_projections=1, variance_reduced=True):
    """Song et al. (2019) SSM: mean of v^T (grad_x s) v + 0.5 (v^T s)^2 over x and v ~ N(0, I).
    variance_reduced=True is SSM-VR: 0.5 (v^T s)^2 -> its expectation over v, 0.5 ||s||^2."""
    x = x.detach().repeat(n_projections, 1).requires_grad_(True)  # (M*B, D), one row per (v, x)
    s = -grad_energy(energy_fn, x, create_graph=True)  # s = -grad E, (M*B, D)
    v = torch.randn_like(x)  # E[v v^T] = I, so E_v[v^T A v] = tr(A)
    v_s = (v * s).sum(1)  # (M*B,) v^T s
    v_jac_v = (torch.autograd.grad(v_s.sum(), x, create_graph=True)[0] * v).sum(1)  # v^T (grad_x s) v
    second = 0.5 * (s**2).sum(1) if variance_reduced else 0.5 * v_s**2
    # SSM: J = E_x E_v[ v^T (grad_x s) v + 0.5 (v^T s)^2 ]; unbiased for exact SM since E_v[v v^T] = I
    return (v_jac_v + second).mean()


# ---- training: a plain Adam loop, the same for every objective ----
def train_energy(model, method, data, steps, batch, lr, sigma=0.3, n_projections=1, sliced_vr=True,
                 log_every=0):
    """Fit model (an energy) to samples data (N, D) with method 'exact' | 'dsm' | 'sliced'."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    t_start = time.time()
    for step in range(1, steps + 1):
        x = data[torch.randint(len(data), (batch,), device=data.device)]  # (B, D)
        if method == "exact":
            loss = exact_sm_loss(model, x)
        elif method == "dsm":
            loss = dsm_loss(model, x, sigma)
        elif method == "sliced":
            loss = sliced_sm_loss(model, x, n_projections, sliced_vr)
        else:
            raise SystemExit(f"error: unknown method {method!r}; use exact, dsm or sliced")
        if not torch.isfinite(loss):  # a diverged network only gets worse: stop with the cause
            raise SystemExit(f"error: the {method} loss is {loss.item()} at step {step}; try a smaller --lr (now {lr})")
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        progress(step, steps, t_start, method)
        if log_every and (step % log_every == 0 or step == steps):
            log_line(step, {"method": method, "loss": loss.item(), "it/s": step / (time.time() - t_start)})
    return model


# ---- sampling and evaluation ----
def langevin(energy_fn, x, step, n_steps):
    """Unadjusted Langevin: x <- x - (eta/2) grad E(x) + sqrt(eta) xi; samples exp(-E) as eta -> 0."""
    for _ in range(n_steps):
        x = x - 0.5 * step * grad_energy(energy_fn, x) + math.sqrt(step) * torch.randn_like(x)
    return x.detach()


def relative_score_error(s_model, s_true):
    """sqrt(mean ||s_model - s_true||^2 / mean ||s_true||^2): 0 is perfect, 1 is as bad as s = 0."""
    return ((s_model - s_true).pow(2).sum(1).mean() / s_true.pow(2).sum(1).mean()).sqrt().item()


def energy_misfit(energy, log_p):
    """std of E + log p over points: 0 when E = -log p + const (the constant is log Z)."""
    return (energy + log_p).std().item()


def evaluate(energy_fn, test, params, noisy):
    """The table's numbers for one energy on held-out x ~ p: score error and energy misfit against
    p (params) and against q_sigma (noisy), each a (means, covs, weights) mixture."""
    s = -grad_energy(energy_fn, test)  # s = -grad E, (N_TEST, 2)
    with torch.no_grad():
        energy = energy_fn(test)  # (N_TEST,)
    return {"err_p": relative_score_error(s, mixture_score(test, *params)),
            "err_q": relative_score_error(s, mixture_score(test, *noisy)),
            "misfit_p": energy_misfit(energy, mixture_log_prob(test, *params)),
            "misfit_q": energy_misfit(energy, mixture_log_prob(test, *noisy))}


def plot(results, shapes, methods, path, box):
    """Row pair per toy: energy contours + score field (true, then each method), then data and
    Langevin samples from each learned energy. One colour bar per energy row (same levels)."""
    import matplotlib.pyplot as plt
    import PIL.Image  # installed with matplotlib

    n = torch.linspace(-box, box, 120)
    grid = torch.stack(torch.meshgrid(n, n, indexing="xy"), -1).reshape(-1, 2)  # (120*120, 2)
    q = torch.linspace(-box + 0.4, box - 0.4, 17)
    qgrid = torch.stack(torch.meshgrid(q, q, indexing="xy"), -1).reshape(-1, 2)  # quiver points
    levels = np.arange(0.0, 12.5, 1.0)  # energy contours 1 nat apart, shifted so the minimum is 0
    cols = 1 + len(methods)  # a narrow last column holds the colour bars
    fig, axes = plt.subplots(2 * len(shapes), cols + 1, figsize=(3.2 * cols + 0.9, 6.6 * len(shapes)), squeeze=False,
                             gridspec_kw={"width_ratios": [1] * cols + [0.07]})
    for r, name in enumerate(shapes):
        res = results[name]
        fields = [("true E = -log p", lambda x: -mixture_log_prob(x, *res["params"]), res["data"], "data")]
        fields += [(m, res["models"][m], res["samples"][m], f"Langevin, {m}") for m in methods]
        true_logp = mixture_log_prob(grid, *res["params"]).reshape(120, 120)
        for c, (title, energy_fn, points, points_title) in enumerate(fields):
            with torch.no_grad():
                e = energy_fn(grid).reshape(120, 120)
            s = -grad_energy(energy_fn, qgrid)  # s = -grad E, (17*17, 2)
            s = s / (1 + s.norm(dim=1, keepdim=True))  # compress long arrows far from the data
            ax = axes[2 * r, c]
            filled = ax.contourf(n, n, (e - e.min()).clamp(max=12), levels=levels, cmap="viridis")
            ax.quiver(qgrid[:, 0], qgrid[:, 1], s[:, 0], s[:, 1], color="white", scale=20, width=0.004)
            ax.set_title(f"{name}: {title if c == 0 else 'learned E, ' + title}", fontsize=9)
            ax = axes[2 * r + 1, c]
            ax.contour(n, n, true_logp, levels=8, colors="0.75", linewidths=0.6)
            ax.scatter(points[:, 0], points[:, 1], s=2, color="k" if c == 0 else "C3")
            ax.set_title(f"{name}: {points_title}", fontsize=9)
        bar = fig.colorbar(filled, cax=axes[2 * r, cols], ticks=levels[::2])
        bar.set_label("E - min E (nats; 12 = 12 or more)", fontsize=8)
        bar.ax.tick_params(labelsize=7)
        axes[2 * r + 1, cols].axis("off")
    for ax in axes[:, :cols].flat:
        ax.set_xlim(-box, box), ax.set_ylim(-box, box), ax.set_aspect("equal")
        ax.set_xlabel("$x_1$", fontsize=8, labelpad=1), ax.set_ylabel("$x_2$", fontsize=8, labelpad=0)
        ax.tick_params(labelsize=7)
    fig.suptitle("colors: E - min E in bands of 1 nat; white arrows: score s = -grad E (long arrows shortened); "
                 "gray lines: true log p", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=72)
    plt.close(fig)
    # a 256-color PNG looks the same and is a third of the size (small enough for the README)
    PIL.Image.open(buffer).convert("RGB").quantize(256).save(path, optimize=True)


# ---- start-up checks: bad input stops with one line before any work ----
def check_config(cfg):
    """Stop with one line naming the knob and its allowed range; return the toy and method lists."""
    at_least = {"SEED": 0, "THREADS": 1, "N_TRAIN": 1, "N_TEST": 2, "HIDDEN": 1, "STEPS": 1, "BATCH": 1,
                "N_PROJECTIONS": 1, "LANGEVIN_STEPS": 1, "N_SAMPLES": 1, "LOG_EVERY": 0}
    for knob, low in at_least.items():
        if not low <= getattr(cfg, knob) < 2**62:
            raise SystemExit(f"error: --{knob.lower()}={getattr(cfg, knob)} is out of range; allowed: an integer >= {low}")
    for knob in ("LR", "DSM_SIGMA", "LANGEVIN_STEP", "BOX"):
        if not 0 < getattr(cfg, knob) < math.inf:  # also refuses nan
            raise SystemExit(f"error: --{knob.lower()}={getattr(cfg, knob)} is out of range; allowed: a finite number > 0")
    choices = {"SHAPES": ("mixture", "ring"), "METHODS": ("exact", "dsm", "sliced")}
    lists = []
    for knob, allowed in choices.items():
        names = [s.strip() for s in getattr(cfg, knob).split(",") if s.strip()]
        for s in names or [""]:
            if s not in allowed or names.count(s) > 1:
                why = f"{s!r} is given twice" if s in allowed else f"{s!r} is unknown" if s else "no name given"
                raise SystemExit(f"error: --{knob.lower()}={getattr(cfg, knob)}: {why}; "
                                 f"allowed: one or more of {', '.join(allowed)} (comma-separated)")
        lists.append(names)
    return lists


def check_writable(folder):
    """Create folder and write a scratch file in it, so that an unusable --out_dir stops the run
    before the training time is spent."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise SystemExit(f"error: --out_dir={folder} is a file, not a folder; allowed: a folder you may create and write to")
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise SystemExit(f"error: --out_dir={folder} is not a writable folder ({error.strerror or error}); "
                         "allowed: a folder you may create and write to")


def print_table(name, rows, logp, sigma):
    """One line per energy: the numbers of evaluate() and the mean true log p of its Langevin samples."""
    print(f"\n{name}: {len(logp)} held-out samples x ~ p; q_sigma = p * N(0, {sigma}^2 I); "
          f"std(log p) = {logp.std().item():.2f}, mean log p(data) = {logp.mean().item():.3f}")
    print(f"{'method':<8} | {'score err vs p':>14} | {'vs q_sigma':>10} | {'std(E+log p)':>12} | "
          f"{'std(E+log q)':>12} | {'log p(Langevin)':>15} | {'time':>6}")
    for method, row in rows.items():
        print(f"{method:<8} | {row['err_p']:>14.3f} | {row['err_q']:>10.3f} | {row['misfit_p']:>12.3f} | "
              f"{row['misfit_q']:>12.3f} | {row['logp_langevin']:>15.3f} | {row['time']:>5.1f}s", flush=True)


def main(argv=None):
    cfg = parse_config(globals(), argv)
    shapes, methods = check_config(cfg)
    device = pick_device(cfg.DEVICE)
    check_writable(cfg.OUT_DIR)
    torch.set_num_threads(cfg.THREADS)  # more threads only add synchronization cost on 2-D toys
    results, t_start = {}, time.time()
    for name in shapes:
        set_seed(cfg.SEED)
        params = [t.to(device) for t in make_shape(name)]  # means, covs, weights
        noisy = (params[0], noisy_covs(params[1], cfg.DSM_SIGMA), params[2])  # q_sigma, same weights
        data = sample_mixture(cfg.N_TRAIN, *params)  # (N_TRAIN, 2)
        test = sample_mixture(cfg.N_TEST, *params)  # (N_TEST, 2), never trained on
        start = (torch.rand(cfg.N_SAMPLES, 2, device=device) * 2 - 1) * cfg.BOX  # Langevin starts, uniform
        res = results[name] = {"params": [t.cpu() for t in params], "data": data[:cfg.N_SAMPLES].cpu(),
                               "models": {}, "samples": {}}
        rows = {}
        for method in ["true E"] + methods:
            t0 = time.time()
            if method == "true E":  # control: Langevin on the exact energy E = -log p, nothing learned
                model = lambda x: -mixture_log_prob(x, *params)  # noqa: E731
            else:
                set_seed(cfg.SEED)  # every objective starts from the same initial network
                model = EnergyMLP(cfg.HIDDEN).to(device)
                train_energy(model, method, data, cfg.STEPS, cfg.BATCH, cfg.LR, cfg.DSM_SIGMA,
                             cfg.N_PROJECTIONS, cfg.SLICED_VR, cfg.LOG_EVERY)
            rows[method] = evaluate(model, test, params, noisy)
            set_seed(cfg.SEED + 1)  # the same Langevin noise for every model
            samples = langevin(model, start, cfg.LANGEVIN_STEP, cfg.LANGEVIN_STEPS)  # (N_SAMPLES, 2)
            rows[method]["logp_langevin"] = mixture_log_prob(samples, *params).mean().item()
            rows[method]["time"] = time.time() - t0
            if method != "true E":
                res["models"][method], res["samples"][method] = model.cpu(), samples.cpu()
        print_table(name, rows, mixture_log_prob(test, *params), cfg.DSM_SIGMA)
        failed = [m for m in methods if min(rows[m]["err_p"], rows[m]["err_q"]) > 0.9]  # s = 0 would score 1
        if failed:  # a diverged or dead network still prints a table: say what it means
            print(f"warning: {name}: {', '.join(failed)} learned no usable score (error > 0.9 against p and q_sigma); "
                  f"try a smaller --lr (now {cfg.LR}) or more --steps (now {cfg.STEPS})")
    print("\nscore err = sqrt(mean ||s_theta - s_true||^2 / mean ||s_true||^2) (0 perfect, 1 no better than s = 0);\n"
          "std(E + log p) in nats is 0 when E = -log p + const; log p(Langevin) is the mean true log-density of\n"
          f"{cfg.N_SAMPLES} chains after {cfg.LANGEVIN_STEPS} steps of size {cfg.LANGEVIN_STEP} (compare mean log p(data));"
          " the 'true E' row runs\nthe same Langevin on the exact energy, so it shows what the sampler itself gets right.")
    path = os.path.join(cfg.OUT_DIR, "score_matching.png")
    plot(results, shapes, methods, path, cfg.BOX)
    print(f"\nwrote {path} ({time.time() - t_start:.0f}s in all)")
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
