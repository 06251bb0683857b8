"""Trust checks for 05's image density (not pytest tests: each trains a model; run them by hand).

Data whose exact log-density is known, shaped like the digits:
  --data=gaussian   samples of the full-covariance Gaussian fitted to the dequantized training
                    digits;
  --data=bernoulli  8-bit images whose pixels are independently 0 or 255 with each pixel's frequency
                    of being bright (> 127) in the training digits, dequantized like 05's data: the
                    same sharp 'exactly 0' structure as MNIST, with NLL = mean per-pixel entropy in
                    bits.
05's ScoreUNet is trained on them with 05's own loss, constant c and log p, then its estimate of the
test NLL is printed next to the exact one. A density can only be above the exact NLL on average (up
to noise); an estimate below it would mean a wrong normalization. At the end, the first --ode_images
test samples are scored three ways, side by side: 05's one pass -(U(x, t_min) + c), 05's
probability-flow ODE (ending in -(U(y(T), T) + c) and in N(m, (s^2 + T) I)), and the exact density.

    python tests/check_05_gaussian.py --data_dir=data --image_size=16 --steps=3000 --data=gaussian
    python tests/check_05_gaussian.py --data_dir=data --image_size=16 --steps=3000 --data=bernoulli
--authors checks the authors' energy (no d b(t), no 1/sqrt(t), raw-t features) instead of 05's default.
"""

import argparse
import functools
import importlib
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the numbered files import each other by name from the repository root
T_MIN = 1e-9  # 05's defaults: log p is read off at T_MIN, the model normalized at T
T = 1e3


def load(name):
    """A numbered file as a module, e.g. load('05_dual_score.py'); its main() does not run."""
    return importlib.import_module(os.path.splitext(name)[0])


def bits_per_dim(log_p, d):
    """05's convention: 8 - log p / (d ln 2)."""
    return 8 - log_p / (d * math.log(2))


def one_pass_bits(dual, net, test, d):
    """c from the test samples + N(0, T I) (one fixed draw), then -(U(x, t_min) + c) in bits/dim."""
    noise = torch.randn(test.shape, generator=torch.Generator().manual_seed(1))
    y_T = test + math.sqrt(T) * noise
    c = dual.normalizing_constant(dual.energies(net, y_T, T), d, T)
    return c, bits_per_dim(dual.normalized_log_p(net, test, c, T_MIN), d)


def ode_bits(dual, net, x, c, steps, n_probes, data_mean, data_var):
    """05's probability-flow ODE on the samples x: bits/dim ending in -(U(y(T), T) + c) and in
    N(m, (s^2 + T) I), the probes' standard error in bits/dim, Richardson's RK4 error on the first
    two samples, and the seconds spent."""
    d = x[0].numel()
    grad_U = functools.partial(dual.energy_gradient, net)
    log_p_T = functools.partial(dual.normalized_log_p, net, c=c, t0=T)
    gen = torch.Generator().manual_seed(2)
    start = time.time()
    rows = {"ode": [], "ode_gaussian": [], "se": []}
    for xb in x.split(50):
        probes = dual.draw_probes(xb.shape, n_probes, "rademacher", gen)
        out = dual.probability_flow_log_p(grad_U, log_p_T, xb, T_MIN, T, steps, probes)
        end = dual.gaussian_log_p_T(out["y_T"], T, data_mean, data_var)
        rows["ode"].append(bits_per_dim(out["log_p"], d))
        rows["ode_gaussian"].append(bits_per_dim(out["log_p"] - out["log_p_T"] + end, d))
        rows["se"].append(out["se"] / (d * math.log(2)))
    seconds = time.time() - start
    res = {k: torch.cat(v) for k, v in rows.items()}
    probes = dual.draw_probes(x[:2].shape, n_probes, "rademacher", gen)
    err = dual.solver_error(grad_U, log_p_T, x[:2], T_MIN, T, steps, probes)
    res["solver_error"] = err.abs().max().item() / (d * math.log(2))
    res["seconds"] = seconds
    return res


def print_side_by_side(one_pass, res, exact, steps, n_probes):
    """Mean and SD across the samples of each estimate, its mean difference from the exact bits/dim
    with the standard error over the samples (paired), and its correlation with the exact one."""
    n = len(exact)
    se_probes = res["se"].pow(2).sum().sqrt().item() / n
    print(f"{n} test samples, bits/dim (8 - log p / (d ln 2)), 05's estimators and the exact one:")
    print(f"  {'':<48} {'mean':>8} {'SD':>8}  {'- exact (SE)':>17}  corr. with exact")
    rows = (
        ("one pass, -(U(x, t_min) + c)", one_pass),
        (f"ODE ({steps} RK4 steps) ending in -(U(y(T), T) + c)", res["ode"]),
        ("ODE ending in N(m, (s^2 + T) I)", res["ode_gaussian"]),
        ("exact", exact),
    )
    for label, v in rows:
        gap = v - exact
        se = gap.std().item() / math.sqrt(n)
        corr = torch.corrcoef(torch.stack([v.double(), exact.double()]))[0, 1].item()
        print(
            f"  {label:<48} {v.mean().item():8.4f} {v.std().item():8.4f}"
            f"  {gap.mean().item():+8.4f} ({se:.4f})  {corr:+.3f}"
        )
    print(
        f"  ODE errors: probes ({n_probes} Rademacher) {se_probes:.4f} (SE of the mean), RK4"
        f" (Richardson, 2 samples) {res['solver_error']:.1e}; ODE time {res['seconds']:.0f} s"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--image_size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lr_halve_every", type=int, default=1500, help="as in 05's MNIST command")
    parser.add_argument("--n_test", type=int, default=300)
    parser.add_argument("--data", choices=["gaussian", "bernoulli"], default="gaussian")
    parser.add_argument("--ode_images", type=int, default=100, help="0: no ODE")
    parser.add_argument("--ode_steps", type=int, default=32, help="RK4 steps in log t, even")
    parser.add_argument("--ode_probes", type=int, default=2, help="Hutchinson probes, >= 2")
    parser.add_argument(
        "--authors", action="store_true", help="the authors' energy, not 05's default"
    )
    args = parser.parse_args()
    if args.steps < 1:
        raise SystemExit("error: --steps must be >= 1")
    if args.ode_images and (args.ode_steps < 2 or args.ode_steps % 2 or args.ode_probes < 2):
        raise SystemExit("error: --ode_steps must be even and >= 2, --ode_probes >= 2")
    dual, mdsm = load("05_dual_score.py"), load("03_mdsm_train.py")
    torch.manual_seed(0)
    digits = mdsm.load_images("mnist", args.data_dir, "train", args.image_size)
    x = dual.dequantize(digits, torch.Generator().manual_seed(3)).double().flatten(1)
    shape, d = digits.shape[1:], x.shape[1]
    if args.data == "gaussian":
        gauss = torch.distributions.MultivariateNormal(x.mean(0), covariance_matrix=torch.cov(x.T))
        train, test = (gauss.sample((n,)).float().view(n, *shape) for n in (60000, args.n_test))
        exact = bits_per_dim(gauss.log_prob(test.double().flatten(1)), d)
    else:  # density of (k + u)/256 is 256^d P(k): bits/dim = 8 - log2 p / d = -log2 P(k) / d
        bright = (digits.flatten(1) > 127).double().mean(0).clamp(1e-4, 1 - 1e-4)  # (d,)
        pixels = [torch.bernoulli(bright.expand(n, d)) for n in (60000, args.n_test)]
        train, test = (dual.dequantize((255 * k).to(torch.uint8).view(-1, *shape)) for k in pixels)
        exact = -(pixels[1] * bright.log2() + (1 - pixels[1]) * (1 - bright).log2()).sum(1) / d
    print(f"exact NLL of {args.n_test} test samples: {exact.mean():.3f} bits/dim (d = {d})")
    design = {}
    if args.authors:
        design = dict(log_normalizer=False, sqrt_t_output=False, time_features="raw")
    net = dual.ScoreUNet(shape[0], args.width, **design)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=args.lr_halve_every, gamma=0.5)
    gen = torch.Generator().manual_seed(0)
    t_start = time.time()
    for step in range(1, args.steps + 1):
        batch = train[torch.randint(len(train), (32,), generator=gen)]
        t = dual.log_uniform(32, T_MIN, T, gen)
        z = torch.randn(batch.shape, generator=gen)
        dsm, tsm, *_ = dual.dual_score_losses(net, batch, t, z)
        opt.zero_grad()
        (dsm + tsm).mean().backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == args.steps:
            c, model = one_pass_bits(dual, net, test, d)
            print(
                f"step {step} ({(time.time() - t_start) / 60:.1f} min): model"
                f" {model.mean():.3f} bits/dim, exact {exact.mean():.3f}; model - exact"
                f" {(model - exact).mean():+.3f}",
                flush=True,
            )
    if args.ode_images == 0:
        return
    for p in net.parameters():
        p.requires_grad_(False)  # gradients in y only
    n = min(args.ode_images, args.n_test)
    k = train.double()  # the end Gaussian's m and s^2: the training samples' pixel mean, variance
    m, s2 = k.mean().item(), k.var().item()
    res = ode_bits(dual, net, test[:n], c, args.ode_steps, args.ode_probes, m, s2)
    print_side_by_side(model[:n], res, exact[:n], args.ode_steps, args.ode_probes)


if __name__ == "__main__":
    main()
