"""05: dual score matching. Closed-form checks on Gaussians / the scale mixture, then tiny runs."""
import math

import numpy as np
import pytest
import torch


def gaussian_energy(mu, s2):
    """Exact U_t(y) = ||y - mu||^2 / (2v) + (d/2) log(2 pi v), v = s2 + t, for N(mu, s2 I)."""
    def U(y, t):
        d = y[0].numel()
        v = (s2 + t).view(-1, *[1] * (y.dim() - 1))
        return ((y - mu) ** 2 / (2 * v)).flatten(1).sum(1) + d / 2 * torch.log(2 * math.pi * (s2 + t))
    return U


def close(samples, expected, n_se=4.0):
    """|mean - expected| within n_se standard errors (and the errors are small: N is large)."""
    se = samples.std().item() / math.sqrt(len(samples))
    return abs(samples.mean().item() - expected) < n_se * se, (samples.mean().item(), expected, se)


@pytest.mark.parametrize("t_val", [0.05, 1.0, 6.0])
def test_losses_of_true_gaussian_energy_reach_closed_form_minima(script, t_val):
    m = script("05_dual_score.py")
    g = torch.Generator().manual_seed(1)
    n, s2 = 40000, 0.49
    mu = torch.randn(1, 1, 4, 4, generator=g, dtype=torch.float64)             # d = 16
    x = mu + math.sqrt(s2) * torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.full((n,), t_val, dtype=torch.float64)
    dsm, tsm, *_ = m.dual_score_losses(gaussian_energy(mu, s2), x, t,
                                       torch.randn(x.shape, generator=g, dtype=torch.float64))
    v, d = s2 + t_val, 16
    ok, info = close(dsm, s2 / v)                                               # min L_DSM = s^2 / v
    assert ok, info
    ok, info = close(tsm, (s2 ** 2 + 2 * s2 * t_val) / (2 * d * v ** 2))        # min L_TSM
    assert ok, info


def test_time_score_identity_on_the_mixture(script):
    """d_t U(y, t) = E[d/(2t) - ||y - x||^2 / (2 t^2) | y], posterior sampled exactly."""
    m = script("05_dual_score.py")
    g = torch.Generator().manual_seed(2)
    d, t, n = 6, 0.7, 400000
    for radius in (1.2, 3.0, 6.0):                                              # inner, between, outer
        y = torch.zeros(d, dtype=torch.float64)
        y[0] = radius * math.sqrt(d)
        # posterior: component k with prob w_k(y), then x | y, k ~ N(s_k^2 / v_k y, s_k^2 t / v_k I)
        logw = torch.tensor([math.log(p) - y.pow(2).sum().item() / (2 * (s2 + t)) - d / 2 * math.log(2 * math.pi * (s2 + t))
                             for p, s2 in zip(m.TOY_WEIGHT, m.TOY_SIGMA2)])
        k = torch.multinomial(torch.softmax(logw, 0), n, replacement=True, generator=g)
        s2k = torch.tensor(m.TOY_SIGMA2, dtype=torch.float64)[k][:, None]
        x = s2k / (s2k + t) * y + (s2k * t / (s2k + t)).sqrt() * torch.randn(n, d, generator=g, dtype=torch.float64)
        target = d / (2 * t) - (y - x).pow(2).sum(1) / (2 * t ** 2)
        r2 = y.pow(2).sum().reshape(1)
        tt = torch.tensor([t], dtype=torch.float64, requires_grad=True)
        (dU_dt,) = torch.autograd.grad(m.true_radial_energy(r2, tt, d).sum(), tt)
        ok, info = close(target, dU_dt.item())
        assert ok, (radius, info)


def test_normalization_recovers_the_log_normalizer(script):
    """An energy off by an unknown constant K is normalized back: c = -K (Gaussian: exact)."""
    m = script("05_dual_score.py")
    g = torch.Generator().manual_seed(3)
    d, n, s2, T, K = 50, 20000, 2.0, 100.0, 37.5
    y = math.sqrt(s2 + T) * torch.randn(n, d, generator=g, dtype=torch.float64)  # y ~ p_T, mu = 0
    U_T = gaussian_energy(torch.zeros(1, d, dtype=torch.float64), s2)(y, torch.full((n,), T, dtype=torch.float64)) + K
    c = m.normalizing_constant(U_T, s2, d, T)
    assert abs(c + K) < 0.3, c                                                  # MC error ~ sqrt(d/2/n) = 0.035


def test_toy_training_dual_gets_the_normalization_and_single_does_not(script, tmp_path):
    m = script("05_dual_score.py")
    summary = m.main(["--toy_dim=100", "--toy_steps=600", "--toy_samples=5000", "--toy_halve_every=300",
                      f"--out_dir={tmp_path}"])
    assert (tmp_path / "05_dual_score.png").exists()
    assert summary["dual"]["rms"] < 1.0, summary                                # dB/dim (seen: 0.57)
    assert summary["single"]["rms"] > 3 * summary["dual"]["rms"], summary       # (seen: 6.2)


def test_image_mode_smoke_on_tiny_npz(script, tmp_path):
    m = script("05_dual_score.py")
    rng = np.random.default_rng(0)
    x = (rng.random((40, 8, 8)) * 255).astype(np.uint8)
    path = tmp_path / "tiny.npz"
    np.savez(path, x_train=x[:32], x_test=x[32:])
    args = [f"--dataset={path}", "--steps=3", "--batch=4", "--width=4", "--n_test=8", "--device=cpu",
            f"--out_dir={tmp_path}"]
    bpd = m.main(args)
    assert math.isfinite(bpd) and (tmp_path / "tiny.pt").exists() and (tmp_path / "05_dual_score_tiny.png").exists()
    assert m.main(args + ["--eval_only"]) == pytest.approx(bpd, abs=0.5)          # reloads the checkpoint
    with pytest.raises(SystemExit, match="already exists; pass --resume"):
        m.main(args)                                                              # never overwrites
    assert m.main(args[:1] + ["--steps=5"] + args[2:] + ["--resume"]) is not None  # continues from step 3
    assert script("03_mdsm_train.py").load_checkpoint(str(tmp_path / "tiny.pt"), kind="dual-score")["step"] == 5
    with pytest.raises(SystemExit, match="error:"):
        m.main(["--dataset=" + str(tmp_path / "missing.npz")])


def test_radial_losses_of_the_exact_radial_gaussian_reach_the_minima(script):
    """The toy's scalar-statistics losses (n_t noise levels x per_t samples) with exact coefficients."""
    m = script("05_dual_score.py")
    rng = np.random.default_rng(4)
    d, s2, n_t, per_t = 40, 2.0, 8, 6000
    model = m.RadialEnergy(d)
    # both components = N(0, s2 I): a_k = 1/(2v), d b_k = (d/2) log(2 pi v) - log(1/2), v = s2 + t
    model.coeffs = lambda t: torch.stack([1 / (2 * (s2 + t))] * 2 + [0.5 * torch.log(2 * math.pi * (s2 + t)) + math.log(2) / d] * 2, 1)
    t = torch.tensor(np.exp(rng.uniform(math.log(0.05), math.log(10), n_t)))
    xx = torch.tensor(s2 * rng.chisquare(d, (n_t, per_t)))
    r2, zy, zz = m.toy_noisy_stats(xx, t[:, None].expand(n_t, per_t), d, rng)
    dsm, tsm = m.radial_dual_losses(model, r2, zy, zz, t, d)
    for i in range(n_t):
        v, ti = s2 + t[i].item(), t[i].item()
        ok, info = close(dsm[i], s2 / v)
        assert ok, info
        ok, info = close(tsm[i], (s2 ** 2 + 2 * s2 * ti) / (2 * d * v ** 2))
        assert ok, info
