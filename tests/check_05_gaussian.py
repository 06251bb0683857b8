"""Trust checks for 05's image density (not pytest tests: each trains a model; run them by hand).

Data whose exact log-density is known, shaped like the digits:
  --data=gaussian   samples of the full-covariance Gaussian fitted to the dequantized training digits;
  --data=bernoulli  8-bit images whose pixels are independently 0 or 255 with each pixel's frequency
                    of being bright (> 127) in the training digits, dequantized like 05's data: the
                    same sharp 'exactly 0' structure as MNIST, with NLL = mean per-pixel entropy in bits.
05's ScoreUNet is trained on them with 05's own loss, constant c and log p, then its estimate of the test
NLL is printed next to the exact one. A density can only be above the exact NLL on average (up to noise);
an estimate below it would mean a wrong normalization.

    python tests/check_05_gaussian.py --data_dir=data --image_size=16 --steps=3000 --data=gaussian
    python tests/check_05_gaussian.py --data_dir=data --image_size=16 --steps=3000 --data=bernoulli
--authors checks the authors' energy (no d b(t), no 1/sqrt(t), raw-t features) instead of 05's default.
"""

import argparse
import importlib
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the numbered files import each other by name from the repository root


def load(name):
    """A numbered file as a module, e.g. load('05_dual_score.py'); its main() does not run."""
    return importlib.import_module(os.path.splitext(name)[0])


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
    parser.add_argument(
        "--authors", action="store_true", help="the authors' energy, not 05's default"
    )
    args = parser.parse_args()
    dual, mdsm = load("05_dual_score.py"), load("03_mdsm_train.py")
    torch.manual_seed(0)
    digits = mdsm.load_images("mnist", args.data_dir, "train", args.image_size)
    x = dual.dequantize(digits, torch.Generator().manual_seed(3)).double().flatten(1)
    shape, d = digits.shape[1:], x.shape[1]
    if args.data == "gaussian":
        gauss = torch.distributions.MultivariateNormal(x.mean(0), covariance_matrix=torch.cov(x.T))
        train, test = (gauss.sample((n,)).float().view(n, *shape) for n in (60000, args.n_test))
        exact = 8 - gauss.log_prob(test.double().flatten(1)) / (
            d * math.log(2)
        )  # bits/dim, 05's convention
    else:  # density of (k + u)/256 is 256^d P(k): bits/dim = 8 - log2 p / d = -log2 P(k) / d
        bright = (digits.flatten(1) > 127).double().mean(0).clamp(1e-4, 1 - 1e-4)  # (d,)
        pixels = [torch.bernoulli(bright.expand(n, d)) for n in (60000, args.n_test)]
        train, test = (dual.dequantize((255 * k).to(torch.uint8).view(-1, *shape)) for k in pixels)
        exact = -(pixels[1] * bright.log2() + (1 - pixels[1]) * (1 - bright).log2()).sum(1) / d
    print(f"exact NLL of {args.n_test} test samples: {exact.mean():.3f} bits/dim (d = {d})")
    design = (
        dict(log_normalizer=False, sqrt_t_output=False, time_features="raw") if args.authors else {}
    )
    net = dual.ScoreUNet(shape[0], args.width, **design)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=args.lr_halve_every, gamma=0.5)
    gen, t_start = torch.Generator().manual_seed(0), time.time()
    for step in range(1, args.steps + 1):
        batch = train[torch.randint(len(train), (32,), generator=gen)]
        t = dual.log_uniform(32, 1e-9, 1e3, gen)
        dsm, tsm, *_ = dual.dual_score_losses(
            net, batch, t, torch.randn(batch.shape, generator=gen)
        )
        opt.zero_grad()
        (dsm + tsm).mean().backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == args.steps:
            y_T = test + math.sqrt(1e3) * torch.randn(
                test.shape, generator=torch.Generator().manual_seed(1)
            )
            c = dual.normalizing_constant(dual.energies(net, y_T, 1e3), d, 1e3)
            model = 8 - dual.normalized_log_p(net, test, c, 1e-9) / (d * math.log(2))
            print(
                f"step {step} ({(time.time() - t_start) / 60:.1f} min): model {model.mean():.3f} bits/dim, exact "
                f"{exact.mean():.3f}; model - exact {(model - exact).mean():+.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
