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

Run:  python 01_score_matching.py                  # CPU: the error table and the figure
      python 01_score_matching.py --methods=dsm --dsm_sigma=0.1 --steps=4000   # less DSM bias
      python 01_score_matching.py --help           # every knob and its meaning
Expected (seed 0): score error vs p 0.08-0.17 for exact and sliced SM; DSM 0.07-0.12 vs q_sigma.
Output: out/01_score_matching/score_matching.png (energy contours, score fields, Langevin samples).
"""

import io
import math
import os
import sys
import tempfile
import time
import types

import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import PIL.Image
import torch
import torch.nn as nn

# ---- config: every knob can be overridden with --key=value (see --help) ----
SEED = 0  # random seed for data, initialization, noise and sampling
DEVICE = "cpu"  # auto | cpu | cuda | mps (the 2-D toys are fastest on the CPU)
THREADS = 1  # CPU threads for torch, 1-256; 1 is fastest for these tiny networks
SHAPES = "mixture,ring"  # comma-separated toys: mixture (3 unequal Gaussians) | ring (6 Gaussians)
METHODS = "exact,dsm,sliced"  # comma-separated objectives: exact | dsm | sliced
N_TRAIN = 20000  # training samples drawn once per toy
N_TEST = 2000  # held-out samples for the error table (at least 2)
HIDDEN = 64  # width of the three hidden layers of the energy MLP
STEPS = 1000  # Adam steps per (toy, objective)
BATCH = 256  # samples per step
LR = 5e-3  # Adam learning rate, cosine-decayed to 0 over STEPS
DSM_SIGMA = 0.3  # DSM noise standard deviation, 0.001-10 (the bias grows with it)
N_PROJECTIONS = 1  # random projections v per sample in sliced SM
SLICED_VR = True  # sliced SM: use 0.5||s||^2 (SSM-VR) instead of 0.5(v^T s)^2
LANGEVIN_STEP = 0.01  # Langevin step size eta (see the step rule in the docstring)
LANGEVIN_STEPS = 500  # Langevin steps from a uniform start in the plot box
N_SAMPLES = 1000  # Langevin chains per model
BOX = 4.0  # plots and Langevin starts cover [-BOX, BOX]^2; at most 1000
LOG_EVERY = 500  # print a log line every this many training steps (0: never)
OUT_DIR = "out/01_score_matching"  # where the figure is written


# ---- data: toys whose log-density and score are known in closed form ----
def make_shape(name):
    """Return (means (K, 2), covs (K, 2, 2), weights (K,)) of a 2-D Gaussian mixture."""
    if name == "mixture":  # unequal weights, correlated and elongated components
        means = [[-1.5, -1.0], [1.5, -1.0], [0.0, 1.6]]
        covs = [
            [[0.40, 0.25], [0.25, 0.40]],
            [[0.30, -0.15], [-0.15, 0.50]],
            [[0.60, 0.0], [0.0, 0.15]],
        ]
        weights = [0.5, 0.3, 0.2]
    elif name == "ring":  # six equal round Gaussians on a circle of radius 2
        angles = [2 * math.pi * k / 6 for k in range(6)]
        means = [[2.0 * math.cos(a), 2.0 * math.sin(a)] for a in angles]
        covs = [[[0.16, 0.0], [0.0, 0.16]]] * 6
        weights = [1 / 6] * 6
    else:
        raise SystemExit(
            f"error: unknown shape {name!r}; use --shapes=mixture,ring (or one of them)"
        )
    return torch.tensor(means), torch.tensor(covs), torch.tensor(weights)


def sample_mixture(n, means, covs, weights):
    """n samples (n, 2): pick a component k ~ weights, then x = mu_k + L_k z, L_k L_k^T = cov_k."""
    k = torch.multinomial(weights, n, replacement=True)  # (n,)
    z = torch.randn(n, means.shape[1], 1, device=means.device)  # (n, 2, 1)
    return means[k] + (torch.linalg.cholesky(covs)[k] @ z).squeeze(-1)


def component_terms(x, means, covs, weights):
    """x - mu_k (B, K, D), cov_k^-1 (K, D, D) and log w_k + log N(x; mu_k, cov_k) (B, K)."""
    diff = x[:, None, :] - means[None]  # (B, K, D)
    prec = torch.linalg.inv(covs)  # (K, D, D)
    # squared Mahalanobis distances (x - mu_k)^T cov_k^-1 (x - mu_k), (B, K)
    maha = torch.einsum("bki,kij,bkj->bk", diff, prec, diff)
    # log N(x; mu_k, cov_k) = -0.5 (D log 2 pi + log det cov_k + maha)
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


def exact_energy(params):
    """E(x) = -log p(x) of the mixture params = (means, covs, weights): the control row."""

    def energy(x):
        return -mixture_log_prob(x, *params)

    return energy


def noisy_covs(covs, sigma):
    """q_sigma = p convolved with N(0, sigma^2 I) is again a mixture, with cov_k + sigma^2 I."""
    return covs + sigma**2 * torch.eye(covs.shape[-1], device=covs.device)


# ---- model: a scalar energy E(x); the score is its negative gradient ----
class EnergyMLP(nn.Module):
    """E(x) = MLP(x), (B, 2) -> (B,). SiLU is smooth, so the Hessian needed by exact SM exists
    (with ReLU the trace of the Hessian would be zero almost everywhere)."""

    def __init__(self, hidden=64, dim=2):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, x):
        return self.net(x).squeeze(-1)


def grad_energy(energy_fn, x, create_graph=False):
    """grad_x E(x), (B, D); the score is its negative. An x that already requires grad is used
    as is (the losses differentiate again with respect to it); create_graph=True keeps the graph
    for a loss."""
    with torch.enable_grad():
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        # E_b depends on x_b only, so the gradient of sum_b E_b gives every row at once
        (grad,) = torch.autograd.grad(energy_fn(x).sum(), x, create_graph=create_graph)
    return grad


# ---- losses: three objectives that need only samples of p ----
def exact_sm_loss(energy_fn, x):
    """Hyvarinen (2005) Eq. 3 with s = -grad E: mean over x of 0.5||s||^2 + tr(grad_x s)."""
    x = x.detach().requires_grad_(True)
    s = -grad_energy(energy_fn, x, create_graph=True)  # s = -grad E, (B, D)
    # tr(grad_x s) = sum_i ds_i/dx_i; samples are independent, so d(sum_b s_bi)/dx_b gives row b
    trace = torch.zeros_like(s[:, 0])  # (B,)
    for i in range(x.shape[1]):
        trace = trace + torch.autograd.grad(s[:, i].sum(), x, create_graph=True)[0][:, i]
    # Eq. 3: J = E[ 0.5 ||s||^2 + tr(grad_x s) ]  (equals 0.5 E||s - s_p||^2 up to a constant)
    return (0.5 * (s**2).sum(1) + trace).mean()


def dsm_target(x_noisy, x, sigma):
    """Score of the noise kernel: grad_x~ log N(x~; x, sigma^2 I) = -(x~ - x) / sigma^2."""
    return -(x_noisy - x) / sigma**2  # = -eps / sigma


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
    x = x.detach().repeat(n_projections, 1).requires_grad_(True)  # (M*B, D), a row per (v, x)
    s = -grad_energy(energy_fn, x, create_graph=True)  # s = -grad E, (M*B, D)
    v = torch.randn_like(x)  # E[v v^T] = I, so E_v[v^T A v] = tr(A)
    v_s = (v * s).sum(1)  # (M*B,) v^T s
    # v^T (grad_x s) v: the gradient of v^T s with respect to x, projected on v again
    v_jac_v = (torch.autograd.grad(v_s.sum(), x, create_graph=True)[0] * v).sum(1)
    if variance_reduced:
        second = 0.5 * (s**2).sum(1)  # E_v[0.5 (v^T s)^2] = 0.5 ||s||^2
    else:
        second = 0.5 * v_s**2
    # SSM: J = E_x E_v[ v^T (grad_x s) v + 0.5 (v^T s)^2 ]; unbiased for exact SM as E[v v^T] = I
    return (v_jac_v + second).mean()


# ---- training: a plain Adam loop, the same for every objective ----
def objective(method, model, x, sigma, n_projections, sliced_vr):
    """The loss of one batch x (B, D) under 'exact' | 'dsm' | 'sliced'."""
    if method == "exact":
        return exact_sm_loss(model, x)
    if method == "dsm":
        return dsm_loss(model, x, sigma)
    if method == "sliced":
        return sliced_sm_loss(model, x, n_projections, sliced_vr)
    raise SystemExit(f"error: unknown method {method!r}; use exact, dsm or sliced")


def train_energy(
    model, method, data, steps, batch, lr, sigma=0.3, n_projections=1, sliced_vr=True, log_every=0
):
    """Fit model (an energy) to samples data (N, D) with method 'exact' | 'dsm' | 'sliced'."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    t_start = time.time()
    for step in range(1, steps + 1):
        x = data[torch.randint(len(data), (batch,), device=data.device)]  # (B, D)
        loss = objective(method, model, x, sigma, n_projections, sliced_vr)
        check_loss(loss, method, step, lr)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        progress(step, steps, t_start, method)
        if log_every and (step % log_every == 0 or step == steps):
            log_line(step, {"method": method, "loss": loss.item()})
    return model


# ---- sampling and evaluation ----
def langevin(energy_fn, x, step, n_steps):
    """Unadjusted Langevin: samples exp(-E) as the step eta -> 0."""
    for _ in range(n_steps):
        # x <- x - (eta / 2) grad_x E(x) + sqrt(eta) xi,  xi ~ N(0, I)
        x = x - 0.5 * step * grad_energy(energy_fn, x) + math.sqrt(step) * torch.randn_like(x)
    return x.detach()


def relative_score_error(s_model, s_true):
    """sqrt(mean ||s_model - s_true||^2 / mean ||s_true||^2): 0 is perfect, 1 is as bad as s = 0."""
    squared_error = (s_model - s_true).pow(2).sum(1).mean()
    return (squared_error / s_true.pow(2).sum(1).mean()).sqrt().item()


def energy_misfit(energy, log_p):
    """std of E + log p over points: 0 when E = -log p + const (the constant is log Z)."""
    return (energy + log_p).std().item()


def evaluate(energy_fn, test, params, noisy):
    """The table's numbers for one energy on held-out x ~ p: score error and energy misfit
    against p (params) and against q_sigma (noisy), each a (means, covs, weights) mixture."""
    s = -grad_energy(energy_fn, test)  # s = -grad E, (N_TEST, 2)
    with torch.no_grad():
        energy = energy_fn(test)  # (N_TEST,)
    return {
        "err_p": relative_score_error(s, mixture_score(test, *params)),
        "err_q": relative_score_error(s, mixture_score(test, *noisy)),
        "misfit_p": energy_misfit(energy, mixture_log_prob(test, *params)),
        "misfit_q": energy_misfit(energy, mixture_log_prob(test, *noisy)),
    }


# ---- the experiment: every objective on one toy, against its closed form ----
def run_toy(name, methods, cfg, device):
    """Train one energy per method on toy `name`, fill its table row, and keep what the figure
    draws. The 'true E' row runs the same evaluation and sampler on the exact energy."""
    torch.manual_seed(cfg.SEED)
    params = [t.to(device) for t in make_shape(name)]  # means, covs, weights
    noisy = (params[0], noisy_covs(params[1], cfg.DSM_SIGMA), params[2])  # q_sigma, same weights
    data = sample_mixture(cfg.N_TRAIN, *params)  # (N_TRAIN, 2)
    test = sample_mixture(cfg.N_TEST, *params)  # (N_TEST, 2), never trained on
    # Langevin starts, uniform in the plot box, (N_SAMPLES, 2)
    start = (torch.rand(cfg.N_SAMPLES, 2, device=device) * 2 - 1) * cfg.BOX
    result = {
        "params": [t.cpu() for t in params],
        "data": data[: cfg.N_SAMPLES].cpu().clone(),
        "models": {},
        "samples": {},
    }
    rows = {}
    seconds = {}
    for method in ["true E"] + methods:
        t0 = time.time()
        if method == "true E":  # control: the exact energy E = -log p, nothing learned
            model = exact_energy(params)
        else:
            torch.manual_seed(cfg.SEED)  # every objective starts from the same initial network
            model = EnergyMLP(cfg.HIDDEN).to(device)
            train_energy(
                model,
                method,
                data,
                cfg.STEPS,
                cfg.BATCH,
                cfg.LR,
                sigma=cfg.DSM_SIGMA,
                n_projections=cfg.N_PROJECTIONS,
                sliced_vr=cfg.SLICED_VR,
                log_every=cfg.LOG_EVERY,
            )
        rows[method] = evaluate(model, test, params, noisy)
        check_evaluation(rows[method], name, method, cfg)
        torch.manual_seed(cfg.SEED + 1)  # the same Langevin noise for every model
        samples = langevin(model, start, cfg.LANGEVIN_STEP, cfg.LANGEVIN_STEPS)  # (N_SAMPLES, 2)
        rows[method]["logp_langevin"] = mixture_log_prob(samples, *params).mean().item()
        check_langevin(rows[method]["logp_langevin"], name, method, cfg)
        seconds[method] = time.time() - t0
        if method != "true E":
            result["models"][method] = model.cpu()
            result["samples"][method] = samples.cpu()
    print_table(name, rows, mixture_log_prob(test, *params), cfg.DSM_SIGMA)
    warn_if_failed(name, rows, methods, cfg)
    print_seconds(name, seconds)
    return result


def print_table(name, rows, logp, sigma):
    """One line per energy: the numbers of evaluate() and the mean true log p of its Langevin
    samples."""
    print(
        f"\n{name}: {len(logp)} held-out samples x ~ p; q_sigma = p * N(0, {sigma}^2 I); "
        f"std(log p) = {logp.std().item():.2f}, mean log p(data) = {logp.mean().item():.3f}"
    )
    print(
        f"{'method':<8} | {'score err vs p':>14} | {'vs q_sigma':>10} | {'std(E+log p)':>12} | "
        f"{'std(E+log q)':>12} | {'log p(Langevin)':>15}"
    )
    for method, row in rows.items():
        print(
            f"{method:<8} | {row['err_p']:>14.3f} | {row['err_q']:>10.3f} | "
            f"{row['misfit_p']:>12.3f} | {row['misfit_q']:>12.3f} | "
            f"{row['logp_langevin']:>15.3f}",
            flush=True,
        )


def print_legend(cfg):
    """What the columns of the tables mean."""
    print(
        "\nscore err = sqrt(mean ||s_theta - s_true||^2 / mean ||s_true||^2) (0 perfect, 1 no "
        "better than s = 0);\nstd(E + log p) in nats is 0 when E = -log p + const; log p(Langevin) "
        f"is the mean true log-density of\n{cfg.N_SAMPLES} chains after {cfg.LANGEVIN_STEPS} steps "
        f"of size {cfg.LANGEVIN_STEP} (compare mean log p(data)); the 'true E' row runs\nthe same "
        "Langevin on the exact energy, so it shows what the sampler itself gets right."
    )


def warn_if_failed(name, rows, methods, cfg):
    """A network that diverged or died still prints a row: say under the table what it means.
    s = 0 scores 1, so an error above 0.9 against both p and q_sigma is no usable score."""
    failed = [m for m in methods if min(rows[m]["err_p"], rows[m]["err_q"]) > 0.9]
    if failed:
        print(
            f"warning: {name}: {', '.join(failed)} learned no usable score (error > 0.9 against "
            f"p and q_sigma); try a smaller --lr (now {cfg.LR}) or more --steps (now {cfg.STEPS})"
        )


def main(argv=None):
    cfg = parse_config(globals(), argv)
    shapes, methods = check_config(cfg)
    device = pick_device(cfg.DEVICE)
    check_memory(cfg, shapes, methods, device)
    check_writable(cfg.OUT_DIR)
    torch.set_num_threads(cfg.THREADS)  # more threads only add synchronization cost on 2-D toys
    t_start = time.time()
    results = {}
    for name in shapes:
        results[name] = run_toy(name, methods, cfg, device)
    print_legend(cfg)
    path = os.path.join(cfg.OUT_DIR, "score_matching.png")
    plot(results, shapes, methods, path, cfg.BOX)
    print(f"\nwrote {path}")
    print(f"{time.time() - t_start:.0f}s in all", file=sys.stderr)
    return results


# ==== plumbing: nothing below this line is about the method ====
def check_config(cfg):
    """Stop with one line naming the knob and its allowed range; return the toy and method
    lists. parse_config has refused nan, inf and integers of 2**62 or more; the sizes are
    checked against the memory by check_memory, and a too large --lr or --langevin_step by the
    checks of the results."""
    integers = {  # knob: (lowest, highest) allowed
        "SEED": (0, None),
        "THREADS": (1, 256),
        "N_TRAIN": (1, None),
        "N_TEST": (2, None),  # a standard deviation needs two points
        "HIDDEN": (1, None),
        "STEPS": (1, None),
        "BATCH": (1, None),
        "N_PROJECTIONS": (1, None),
        "LANGEVIN_STEPS": (1, None),
        "N_SAMPLES": (1, None),
        "LOG_EVERY": (0, None),
    }
    for knob, (low, high) in integers.items():
        value = getattr(cfg, knob)
        if value < low or high is not None and value > high:
            allowed = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
            raise SystemExit(f"error: --{knob.lower()}={value} is out of range; allowed: {allowed}")
    numbers = {  # knob: (lowest, highest) allowed; None: above 0, or no upper end
        "LR": (None, None),
        "DSM_SIGMA": (1e-3, 10.0),  # below, float32 rounds x~ - x; above, q_sigma is one blur
        "LANGEVIN_STEP": (None, None),
        "BOX": (None, 1000.0),
    }
    for knob, (low, high) in numbers.items():
        value = getattr(cfg, knob)
        too_low = value < low if low is not None else value <= 0
        if too_low or high is not None and value > high:
            allowed = "a number > 0" if low is None else f"a number >= {low}"
            if high is not None:
                allowed += f" and <= {high}"
            raise SystemExit(f"error: --{knob.lower()}={value} is out of range; allowed: {allowed}")
    choices = {"SHAPES": ("mixture", "ring"), "METHODS": ("exact", "dsm", "sliced")}
    lists = []
    for knob, allowed in choices.items():
        names = [s.strip() for s in getattr(cfg, knob).split(",") if s.strip()]
        for s in names or [""]:
            if s not in allowed or names.count(s) > 1:
                if not s:
                    why = "no name given"
                elif s in allowed:
                    why = f"{s!r} is given twice"
                else:
                    why = f"{s!r} is unknown"
                raise SystemExit(
                    f"error: --{knob.lower()}={getattr(cfg, knob)}: {why}; "
                    f"allowed: one or more of {', '.join(allowed)} (comma-separated)"
                )
        lists.append(names)
    return lists


def check_loss(loss, method, step, lr):
    """A diverged network only gets worse: stop with the cause at the first non-finite loss."""
    if not torch.isfinite(loss):
        raise SystemExit(
            f"error: the {method} loss is {loss.item()} at step {step}; "
            f"try a smaller --lr (now {lr})"
        )


def check_evaluation(row, name, method, cfg):
    """A learned energy whose scores or energies are not finite on held-out data has diverged."""
    if not all(math.isfinite(value) for value in row.values()):
        raise SystemExit(
            f"error: {name}: the energy learned by {method} is not finite on held-out data; "
            f"try a smaller --lr (now {cfg.LR})"
        )


def check_langevin(logp, name, method, cfg):
    """Chains that left every float (inf or nan) give no log p: name the step size instead."""
    if not math.isfinite(logp):
        raise SystemExit(
            f"error: {name}: Langevin chains on the {method} energy diverged (mean log p = {logp} "
            f"after {cfg.LANGEVIN_STEPS} steps); try a smaller --langevin_step "
            f"(now {cfg.LANGEVIN_STEP})"
        )


def print_seconds(name, seconds):
    """Wall time per table row, on stderr: the printed table depends on the seed alone."""
    times = ", ".join(f"{method} {t:.1f}s" for method, t in seconds.items())
    print(f"{name}: seconds per row (train, evaluate, sample): {times}", file=sys.stderr)


def check_memory(cfg, shapes, methods, device):
    """Estimate the run's memory before allocating any, and stop with one line naming the knob
    behind the largest part when it does not fit. The bytes per item are measured on the CPU in
    float32 and rounded up (the graph of exact SM's second derivative is the largest)."""
    h = cfg.HIDDEN
    per_point = 512 + 32 * h  # score and energy of the MLP and of the mixture at one point
    plotted = 256 * (1 + len(methods)) * len(shapes)  # a sample scattered in each of its panels
    per_row = {"exact": 700 * h, "dsm": 150 * h, "sliced": 350 * h * cfg.N_PROJECTIONS}
    step_knob = f"--batch={cfg.BATCH}"  # one training step, with its graph
    if max(methods, key=per_row.get) == "sliced" and cfg.N_PROJECTIONS > 1:
        step_knob += f" x --n_projections={cfg.N_PROJECTIONS}"
    needs = {
        f"--n_train={cfg.N_TRAIN}": 64 * cfg.N_TRAIN,  # drawing the training set
        f"--n_test={cfg.N_TEST}": per_point * cfg.N_TEST,
        f"--n_samples={cfg.N_SAMPLES}": (per_point + plotted) * cfg.N_SAMPLES,
        step_knob: max(per_row[m] for m in methods) * cfg.BATCH,
        # weights, gradients and Adam's two moments, and the 120 x 120 grid of the figure
        f"--hidden={h}": 128 * h * h + 120 * 120 * per_point,
    }
    total = sum(needs.values())
    available = available_memory(device)
    if total > available:
        knob = max(needs, key=needs.get)
        smaller = " or ".join(part.split("=")[0] for part in knob.split(" x "))
        raise SystemExit(
            f"error: {knob}: the run needs about {total / 2**30:.3g} GiB of memory (estimated "
            f"before allocating), more than the {available / 2**30:.3g} GiB available on "
            f"{device}; allowed: a smaller {smaller}"
        )


def available_memory(device):
    """Bytes free now on device: the GPU's own memory, else the memory the system can give."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:  # Linux: MemAvailable counts reclaimable caches
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:  # macOS and other Unix systems: the physical memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return math.inf  # no way to ask (Windows without extra packages): the allocator decides


def check_writable(folder):
    """Create folder and write a scratch file in it, so that an unusable --out_dir stops the run
    before the training time is spent."""
    allowed = "allowed: a folder you may create and write to"
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise SystemExit(f"error: --out_dir={folder} is a file, not a folder; {allowed}")
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        why = error.strerror or error
        raise SystemExit(f"error: --out_dir={folder} is not a writable folder ({why}); {allowed}")


def plot(results, shapes, methods, path, box):
    """Row pair per toy: energy contours + score field (true, then each method), then data and
    Langevin samples from each learned energy. One colour bar per energy row (same levels)."""
    n = torch.linspace(-box, box, 120)
    grid = torch.stack(torch.meshgrid(n, n, indexing="xy"), -1).reshape(-1, 2)  # (120*120, 2)
    q = torch.linspace(-box + 0.4, box - 0.4, 17)
    qgrid = torch.stack(torch.meshgrid(q, q, indexing="xy"), -1).reshape(-1, 2)  # quiver points
    levels = np.arange(0.0, 12.5, 1.0)  # energy contours 1 nat apart, shifted so the minimum is 0
    cols = 1 + len(methods)  # a narrow last column holds the colour bars
    fig, axes = plt.subplots(
        2 * len(shapes),
        cols + 1,
        figsize=(3.2 * cols + 0.9, 6.6 * len(shapes)),
        squeeze=False,
        gridspec_kw={"width_ratios": [1] * cols + [0.07]},
    )
    for r, name in enumerate(shapes):
        res = results[name]
        fields = [("true E = -log p", exact_energy(res["params"]), res["data"], "data")]
        for m in methods:
            fields.append((m, res["models"][m], res["samples"][m], f"Langevin, {m}"))
        true_logp = mixture_log_prob(grid, *res["params"]).reshape(120, 120)
        for c, (title, energy_fn, points, points_title) in enumerate(fields):
            with torch.no_grad():
                e = energy_fn(grid).reshape(120, 120)
            s = -grad_energy(energy_fn, qgrid)  # s = -grad E, (17*17, 2)
            s = s / (1 + s.norm(dim=1, keepdim=True))  # compress long arrows far from the data
            ax = axes[2 * r, c]
            energy = (e - e.min()).clamp(max=12)
            filled = ax.contourf(n, n, energy, levels=levels, cmap="viridis")
            ax.quiver(
                qgrid[:, 0], qgrid[:, 1], s[:, 0], s[:, 1], color="white", scale=20, width=0.004
            )
            if c > 0:
                title = "learned E, " + title
            ax.set_title(f"{name}: {title}", fontsize=9)
            ax = axes[2 * r + 1, c]
            ax.contour(n, n, true_logp, levels=8, colors="0.75", linewidths=0.6)
            ax.scatter(points[:, 0], points[:, 1], s=2, color="k" if c == 0 else "C3")
            ax.set_title(f"{name}: {points_title}", fontsize=9)
        bar = fig.colorbar(filled, cax=axes[2 * r, cols], ticks=levels[::2])
        bar.set_label("E - min E (nats; 12 = 12 or more)", fontsize=8)
        bar.ax.tick_params(labelsize=7)
        axes[2 * r + 1, cols].axis("off")
    for ax in axes[:, :cols].flat:
        ax.set_xlim(-box, box)
        ax.set_ylim(-box, box)
        ax.set_aspect("equal")
        ax.set_xlabel("$x_1$", fontsize=8, labelpad=1)
        ax.set_ylabel("$x_2$", fontsize=8, labelpad=0)
        ax.tick_params(labelsize=7)
    fig.suptitle(
        "colors: E - min E in bands of 1 nat; white arrows: score s = -grad E (long arrows "
        "shortened); gray lines: true log p",
        fontsize=9,
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=72)
    plt.close(fig)
    # a 256-color PNG looks the same and is a third of the size (small enough to keep in the repository)
    PIL.Image.open(buffer).convert("RGB").quantize(256).save(path, optimize=True)


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
