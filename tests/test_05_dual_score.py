"""05: dual score matching. Closed-form checks on Gaussians and the scale mixture, the authors'
network (its layout, normalization and energy), the bits/dim of an exact energy through 05's own
evaluation path, then tiny runs: training, resuming, interrupting, and refusing bad input."""

import math
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch
from conftest import ROOT, load_script, tiny_dual_score_args

m = load_script("05_dual_score.py")
mdsm = load_script("03_mdsm_train.py")
AUTHORS = dict(log_normalizer=False, sqrt_t_output=False, time_features="raw")
LOSSES = m.dual_score_losses  # the real losses, before any test wraps them


def gaussian_energy(mu, s2):
    """Exact U_t(y) = ||y - mu||^2 / (2v) + (d/2) log(2 pi v), v = s2 + t, for N(mu, s2 I)."""

    def U(y, t):
        d = y[0].numel()
        v = (s2 + t).view(-1, *[1] * (y.dim() - 1))
        return ((y - mu) ** 2 / (2 * v)).flatten(1).sum(1) + d / 2 * torch.log(
            2 * math.pi * (s2 + t)
        )

    return U


def close(samples, expected, n_se=4.0):
    """|mean - expected| within n_se standard errors (and the errors are small: N is large)."""
    se = samples.std().item() / math.sqrt(len(samples))
    return abs(samples.mean().item() - expected) < n_se * se, (samples.mean().item(), expected, se)


# ---- the losses and the normalization on closed forms ----
@pytest.mark.parametrize("t_val", [0.05, 1.0, 6.0])
def test_losses_of_true_gaussian_energy_reach_closed_form_minima(t_val):
    g = torch.Generator().manual_seed(1)
    n, s2 = 40000, 0.49
    mu = torch.randn(1, 1, 4, 4, generator=g, dtype=torch.float64)  # d = 16
    x = mu + math.sqrt(s2) * torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.full((n,), t_val, dtype=torch.float64)
    z = torch.randn(x.shape, generator=g, dtype=torch.float64)
    dsm, tsm, *_ = m.dual_score_losses(gaussian_energy(mu, s2), x, t, z)
    v, d = s2 + t_val, 16
    ok, info = close(dsm, s2 / v)  # min L_DSM = s^2 / v
    assert ok, info
    ok, info = close(tsm, (s2**2 + 2 * s2 * t_val) / (2 * d * v**2))  # min L_TSM
    assert ok, info


def test_energy_and_scores_are_the_gradients_in_space_and_time():
    """grad_y U = (y - mu)/v and d_t U = d/(2v) - ||y - mu||^2/(2 v^2) for N(mu, s2 I)."""
    g = torch.Generator().manual_seed(11)
    y = torch.randn(5, 1, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([1e-3, 0.1, 1.0, 4.0, 50.0], dtype=torch.float64)
    U, grad_y, grad_t = m.energy_and_scores(gaussian_energy(0.2, 0.3), y, t)
    v = 0.3 + t
    assert torch.allclose(U, gaussian_energy(0.2, 0.3)(y, t))
    assert torch.allclose(grad_y, (y - 0.2) / v.view(-1, 1, 1, 1))
    r2 = (y - 0.2).pow(2).flatten(1).sum(1)
    assert torch.allclose(grad_t, 9 / (2 * v) - r2 / (2 * v**2))


def test_time_score_identity_on_the_mixture():
    """d_t U(y, t) = E[d/(2t) - ||y - x||^2 / (2 t^2) | y], posterior sampled exactly."""
    g = torch.Generator().manual_seed(2)
    d, t, n = 6, 0.7, 400000
    for radius in (1.2, 3.0, 6.0):  # inner, between, outer
        y = torch.zeros(d, dtype=torch.float64)
        y[0] = radius * math.sqrt(d)
        # posterior: component k with prob w_k(y), then x | y, k ~ N(s_k^2 / v_k y, s_k^2 t / v_k I)
        logw = torch.tensor(
            [
                math.log(p)
                - y.pow(2).sum().item() / (2 * (s2 + t))
                - d / 2 * math.log(2 * math.pi * (s2 + t))
                for p, s2 in zip(m.TOY_WEIGHT, m.TOY_SIGMA2)
            ]
        )
        k = torch.multinomial(torch.softmax(logw, 0), n, replacement=True, generator=g)
        s2k = torch.tensor(m.TOY_SIGMA2, dtype=torch.float64)[k][:, None]
        noise = torch.randn(n, d, generator=g, dtype=torch.float64)
        x = s2k / (s2k + t) * y + (s2k * t / (s2k + t)).sqrt() * noise
        target = d / (2 * t) - (y - x).pow(2).sum(1) / (2 * t**2)
        tt = torch.tensor([t], dtype=torch.float64, requires_grad=True)
        (dU_dt,) = torch.autograd.grad(m.true_toy_energy(y[None], tt).sum(), tt)
        ok, info = close(target, dU_dt.item())
        assert ok, (radius, info)


def test_normalizing_constants_paper_and_data_variance():
    """Exact Gaussian energy off by K: the paper's c = (d/2) log(2 pi e T) - mean U_T
    = -K + (d/2) log(T / v), the data-variance constant = -K (v = s2 + T)."""
    g = torch.Generator().manual_seed(3)
    d, n, s2, T, K = 50, 20000, 2.0, 10.0, 37.5
    y = math.sqrt(s2 + T) * torch.randn(n, d, generator=g, dtype=torch.float64)  # y ~ p_T, mu = 0
    t = torch.full((n,), T, dtype=torch.float64)
    U_T = gaussian_energy(torch.zeros(1, d, dtype=torch.float64), s2)(y, t) + K
    se = math.sqrt(d / 2 / n)  # std of mean U_T: 0.035
    assert abs(m.normalizing_constant(U_T, d, T) - (-K + d / 2 * math.log(T / (s2 + T)))) < 5 * se
    assert abs(m.normalizing_constant(U_T, d, T, s2) + K) < 5 * se


def test_bits_per_dim_of_an_exact_gaussian_energy_both_conventions():
    """Through 05's image_density (c from U at T, log p read at t0): per image, the dequantized
    bits/dim is 8 + (E_u U((k + u)/256, t0) + c) / (d ln 2) in closed form, the single pass
    8 + (U(k/255, t0) + c) / (d ln 2)."""
    g = torch.Generator().manual_seed(4)
    n, mu, s2, t0, T = 3000, 0.2, 0.01, 1e-6, 10.0
    k = torch.randint(0, 256, (n, 1, 4, 4), generator=g, dtype=torch.uint8)  # d = 16
    d, v0, vT = 16, s2 + t0, s2 + T
    res = m.image_density(gaussian_energy(mu, s2), k, t0, T, n_draws=64, generator=g)
    # c: E over u, z of U((k + u)/256 + sqrt(T) z, T); E((k + u)/256 - mu)^2 = ((k + 1/2)/256 - mu)^2 + 1/(12 256^2)
    sq = (((k.double() + 0.5) / 256 - mu) ** 2 + 1 / (12 * 256**2)).flatten(1).sum(1)  # (n,)
    c_exact = (
        d / 2 * math.log(2 * math.pi * math.e * T)
        - ((sq.mean() + d * T) / (2 * vT)).item()
        - d / 2 * math.log(2 * math.pi * vT)
    )
    assert abs(res["c"] - c_exact) < 5 * math.sqrt(d / 2 / n), (res["c"], c_exact)
    deq_exact = 8 + (sq / (2 * v0) + d / 2 * math.log(2 * math.pi * v0) + res["c"]) / (
        d * math.log(2)
    )
    err = res["deq"] - deq_exact  # the Monte Carlo error of 64 draws of u only
    assert err.abs().mean() < 0.02 and abs(err.mean()) < 0.002, (err.abs().mean(), err.mean())
    single = ((k.double() / 255 - mu) ** 2).flatten(1).sum(1) / (2 * v0) + d / 2 * math.log(
        2 * math.pi * v0
    )
    assert torch.allclose(res["single"], 8 + (single + res["c"]) / (d * math.log(2)), atol=1e-4)
    v1 = s2 + 0.01  # the same, read at t = 0.01 (beside 04's AIS)
    smooth = ((k.double() / 255 - mu) ** 2).flatten(1).sum(1) / (2 * v1) + d / 2 * math.log(
        2 * math.pi * v1
    )
    assert torch.allclose(res["t=0.01"], 8 + (smooth + res["c"]) / (d * math.log(2)), atol=1e-4)


def test_dequantize_fills_each_grey_level_bin_uniformly():
    """Training data and c use x = (k + u)/256, u ~ U[0,1): inside [k/256, (k+1)/256), mean (k + 1/2)/256."""
    k = torch.tensor([0, 17, 128, 255], dtype=torch.uint8).repeat(20000, 1)
    x = m.dequantize(k, torch.Generator().manual_seed(9)).double()
    assert torch.all(x >= k / 256) and torch.all(x <= (k.double() + 1) / 256)  # fp32 may round up
    assert torch.allclose(x.mean(0), (k[0].double() + 0.5) / 256, atol=3e-5)  # se 1e-5


def test_without_b_an_energy_zero_at_the_origin_cannot_conserve_mass():
    """Why U has d b(t). Data: dequantized zeros, x = u / 256, second moment m2 = 1/(3 * 256^2)
    per pixel. The exact Gaussian energy with that moment is ||y||^2/(2v) + (d/2) log(2 pi v),
    v = m2 + t. Its y-part is 0 at y = 0 like 0.5 <y, s>, and alone has mean t d_t U / d = -t/(2v)
    on p_t (-0.5 once t >> m2), not 0; adding d b(t) with b = 0.5 log(2 pi v) gives 0 at every t."""
    m2, ts = 1 / (3 * 256**2), [1e-7, 1e-5, 1e-3, 1e-1, 1e1]

    def y_part(y, t):
        return y.pow(2).flatten(1).sum(1) / (2 * (m2 + t))

    def full(y, t):
        return y_part(y, t) + y[0].numel() * 0.5 * torch.log(2 * math.pi * (m2 + t))

    x = torch.zeros(4000, 1, 4, 4, dtype=torch.uint8)
    cfg = types.SimpleNamespace(T_MIN=ts[0], T_MAX=ts[-1])
    rows_y = m.mass_conservation(y_part, x, cfg, "cpu", n_levels=5)
    rows_full = m.mass_conservation(full, x, cfg, "cpu", n_levels=5)
    for (t, vy), (_, vf), t_expected in zip(rows_y, rows_full, ts):
        assert t == pytest.approx(t_expected) and vy == pytest.approx(-t / (2 * (m2 + t)), abs=0.01)
        assert vf == pytest.approx(0.0, abs=0.01), (t, vf)
    assert rows_y[-1][1] < -0.45


def test_mass_conservation_reports_t_times_the_time_score_over_d():
    """The printed table is mean over y of t d_t U / d at log-spaced t in [T_MIN, T_MAX]. With
    U(y, t) = (d/2) log t (+ 0 <y>) the value is exactly 1/2 at every t (d_t U / d alone: 1/(2t))."""

    def energy(y, t):
        return y[0].numel() / 2 * torch.log(t) + 0 * y.flatten(1).sum(1)

    x_uint8 = torch.randint(
        0, 256, (4, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    cfg = types.SimpleNamespace(T_MIN=1e-2, T_MAX=1e2)
    rows = m.mass_conservation(energy, x_uint8, cfg, "cpu", n_levels=5)
    assert [t for t, _ in rows] == pytest.approx([1e-2, 1e-1, 1.0, 1e1, 1e2])
    assert [v for _, v in rows] == pytest.approx([0.5] * 5, rel=1e-5)


# ---- the toy of Figure 1 ----
class ExactCoefficients(torch.nn.Module):
    """[a1, a2, b1, b2](log(t + 1e-2)) of N(0, s2 I) written twice (both components the same)."""

    def __init__(self, s2, d):
        super().__init__()
        self.s2, self.d = s2, d

    def forward(self, log_t):
        v = self.s2 + log_t.exp() - 1e-2
        b = 0.5 * torch.log(2 * math.pi * v) + math.log(2) / self.d
        return torch.cat([1 / (2 * v), 1 / (2 * v), b, b], dim=1)


def test_radial_energy_with_exact_coefficients_is_the_gaussian_and_reaches_the_minima():
    g = torch.Generator().manual_seed(8)
    d, s2, n = 40, 2.0, 20000
    model = m.RadialEnergy(d)
    model.mlp = ExactCoefficients(s2, d)
    for t_val in (0.05, 3.0):
        x = math.sqrt(s2) * torch.randn(n, d, generator=g, dtype=torch.float64)
        t = torch.full((n,), t_val, dtype=torch.float64)
        z = torch.randn(n, d, generator=g, dtype=torch.float64)
        dsm, tsm, U, y, *_ = m.dual_score_losses(model, x, t, z)
        assert torch.allclose(U, gaussian_energy(0.0, s2)(y, t), atol=1e-8)
        v = s2 + t_val
        assert close(dsm, s2 / v)[0] and close(tsm, (s2**2 + 2 * s2 * t_val) / (2 * d * v**2))[0]


def test_toy_trains_through_the_general_loss_and_dual_gets_the_normalization(tmp_path, monkeypatch):
    calls = []
    general = m.dual_score_losses

    def counted(*args, **kwargs):
        calls.append(1)
        return general(*args, **kwargs)

    monkeypatch.setattr(m, "dual_score_losses", counted)
    args = ["--toy_dim=100", "--toy_steps=600", "--toy_samples=5000", "--toy_halve_every=300"]
    summary = m.main(args + ["--toy_batch=128", f"--out_dir={tmp_path}"])
    assert len(calls) == 1200 and (tmp_path / "05_dual_score.png").exists()
    assert summary["dual"]["rms_paper_c"] < 2.0, summary  # dB/dim
    assert summary["single"]["rms_paper_c"] > 3 * summary["dual"]["rms_paper_c"], summary


def test_a_diverging_toy_stops_with_one_line_naming_the_learning_rate(tmp_path, monkeypatch):
    general = m.dual_score_losses

    def diverging(*args, **kwargs):
        dsm, tsm, *rest = general(*args, **kwargs)
        return dsm * float("nan"), tsm, *rest

    monkeypatch.setattr(m, "dual_score_losses", diverging)
    with pytest.raises(
        SystemExit, match=r"^error: the toy's single model diverged .* lower --toy_lr"
    ):
        m.main(
            [
                "--toy_dim=10",
                "--toy_steps=5",
                "--toy_samples=50",
                "--toy_batch=8",
                f"--out_dir={tmp_path}",
            ]
        )


# ---- the image network: the authors' layout, normalization and energy ----
def n_parameters(net):
    return sum(p.numel() for p in net.parameters())


def test_authors_setting_has_their_parameter_count_and_the_additions_add_only_b():
    """The authors' deep UNet at width 64: 8,647,552 parameters for 1 channel, 8,649,856 for 3.
    1/sqrt(t) and the log-t features add no parameter; the b(t) head adds its own MLP."""
    assert n_parameters(m.ScoreUNet(1, 64, **AUTHORS)) == 8_647_552
    assert n_parameters(m.ScoreUNet(3, 64, **AUTHORS)) == 8_649_856
    b_head = 256 * 256 + 256 + 256 + 1
    assert n_parameters(m.ScoreUNet(1, 64)) == 8_647_552 + b_head
    assert n_parameters(m.ScoreUNet(1, 64, log_normalizer=False)) == 8_647_552


def test_every_block_has_three_layers_with_the_resampling_inside():
    """Encoder: [3x3 x3], [2x2 down, 3x3, 3x3] x2; middle [2x2 down, 3x3, 2x2 up]; decoder
    [3x3, 3x3, 2x2 up] x2 and [3x3, 3x3, output 3x3]; each layer conv -> norm -> GELU, no bias,
    except the output: a plain conv."""
    net = m.ScoreUNet(1, 4)
    blocks = [*net.enc, net.mid, *reversed(net.dec)]

    def kind(layer):
        conv = layer.conv
        assert conv.bias is None
        if isinstance(conv, torch.nn.ConvTranspose2d):
            return "up"
        return "down" if conv.stride == (2, 2) else "3x3"

    kinds = [[kind(layer) for layer in block] for block in blocks]
    assert kinds == [
        ["3x3", "3x3", "3x3"],
        ["down", "3x3", "3x3"],
        ["down", "3x3", "3x3"],
        ["down", "3x3", "up"],
        ["3x3", "3x3", "up"],
        ["3x3", "3x3", "up"],
        ["3x3", "3x3", "3x3"],
    ]
    widths = [[layer.conv.out_channels for layer in block] for block in blocks]
    assert widths == [
        [4, 4, 4],
        [8, 8, 8],
        [16, 16, 16],
        [32, 32, 16],
        [16, 16, 8],
        [8, 8, 4],
        [4, 4, 1],
    ]
    assert [block[0].conv.in_channels for block in blocks[4:]] == [32, 16, 8]  # [running, skip]
    outputs = [layer for block in blocks for layer in block if layer.norm is None]
    assert outputs == [net.dec[0][-1]]


def test_authors_energy_is_half_the_inner_product_with_the_last_layer_at_raw_t_features():
    """U(y, t) = 0.5 <y, f(y, t)> with f the last decoder layer's output (no 1/sqrt(t), no b),
    and the time features cos(t w), sin(t w) for 32 frequencies w from 1 to 0.01."""
    torch.manual_seed(3)
    net = m.ScoreUNet(1, 4, **AUTHORS).double()
    raw, features = [], []
    net.dec[0][-1].conv.register_forward_hook(lambda mod, inp, out: raw.append(out))
    net.embed[0].register_forward_hook(lambda mod, inp, out: features.append(inp[0]))
    y = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    t = torch.tensor([1e-6, 0.3, 40.0], dtype=torch.float64)
    U = net(y, t)
    assert torch.allclose(U, 0.5 * (y * raw[0]).sum(dim=(1, 2, 3)), rtol=1e-12)
    w = torch.logspace(0, -2, 32).double()  # the buffer is made in float32, like the weights
    assert torch.allclose(
        features[0], torch.cat([torch.cos(t[:, None] * w), torch.sin(t[:, None] * w)], 1)
    )


def test_default_energy_divides_the_last_layer_by_sqrt_t_and_adds_d_b():
    """U(y, t) = 0.5 <y, f(y, t) / sqrt(t)> + d b(t): a factor 2, a lost b(t) or a lost sqrt(t)
    changes every printed log p."""
    torch.manual_seed(8)
    net = m.ScoreUNet(1, 4).double()
    with torch.no_grad():
        net.log_norm[2].bias.fill_(0.3)  # b(t) starts at 0: give it a value
        net.log_norm[2].weight.normal_(0, 0.01)
    raw = []
    net.dec[0][-1].conv.register_forward_hook(lambda mod, inp, out: raw.append(out))
    y = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    t = torch.tensor([1e-3, 0.5, 20.0], dtype=torch.float64)
    with torch.no_grad():
        U = net(y, t)
        b = net.log_norm(net.time_embedding(t))[:, 0]
    s = raw[0] / t.sqrt().view(-1, 1, 1, 1)
    assert b.std() > 1e-4
    assert torch.allclose(U, 0.5 * (y * s).sum(dim=(1, 2, 3)) + 64 * b, rtol=1e-12)


def test_homogeneous_norm_is_the_authors_formula_with_eps():
    """h_c <- (h_c - mean_c) sqrt(mean_c' v_c' / (v_c + eps) + eps) w_c (1 + g_c(t)), eps = 1e-5,
    g a Linear with a bias at PyTorch's default init."""
    torch.manual_seed(5)
    norm = m.HomogeneousNorm(3, emb_dim=4).double()
    assert norm.eps == 1e-5 and norm.gain.bias is not None and norm.gain.bias.abs().sum() > 0
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
    h = (
        torch.randn(2, 3, 5, 5, dtype=torch.float64)
        * torch.tensor([0.1, 1.0, 7.0]).view(1, 3, 1, 1)
        + 2
    )
    emb = torch.randn(2, 4, dtype=torch.float64)
    c = h - h.mean(dim=(2, 3), keepdim=True)
    v = c.pow(2).mean(dim=(2, 3), keepdim=True)
    expected = c * (v.mean(1, keepdim=True) / (v + 1e-5) + 1e-5).sqrt()
    expected = expected * norm.weight.view(1, 3, 1, 1) * (1 + norm.gain(emb)).view(2, 3, 1, 1)
    assert torch.allclose(norm(h, emb), expected, rtol=1e-12)


def test_homogeneous_norm_keeps_the_scale_except_at_tiny_inputs():
    """Centred, the channels' variances equalized to their mean, so norm(a h) ~ a norm(h); eps
    makes that approximate: close at scale 1, far off at 1e-3 where v ~ eps."""
    torch.manual_seed(5)
    norm = m.HomogeneousNorm(3, emb_dim=4).double()
    torch.nn.init.zeros_(norm.gain.weight)
    torch.nn.init.zeros_(norm.gain.bias)
    h = (
        torch.randn(2, 3, 5, 5, dtype=torch.float64)
        * torch.tensor([0.5, 1.0, 3.0]).view(1, 3, 1, 1)
        + 2
    )
    emb = torch.zeros(2, 4, dtype=torch.float64)
    out = norm(h, emb).detach()
    assert out.mean(dim=(2, 3)).abs().max() < 1e-12  # each channel centred
    target = h.var(dim=(2, 3), unbiased=False).mean(1, keepdim=True).sqrt()  # sqrt(mean variance)
    assert torch.allclose(out.std(dim=(2, 3), unbiased=False), target.expand(2, 3), rtol=1e-4)
    assert torch.allclose(norm(10 * h, emb), 10 * out, rtol=1e-4)
    tiny = norm(1e-3 * h, emb) / 1e-3
    assert (tiny - out).abs().max() > 0.05 * out.abs().max()


def score_growth(lam):
    """||s(lam y, t)|| / ||s(y, t)|| of a seeded width-4 ScoreUNet at t = 1."""
    torch.manual_seed(6)
    net = m.ScoreUNet(1, 4)
    y, t = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(7)), torch.ones(2)
    with torch.no_grad():
        return (net.score(lam * y, t).norm() / net.score(y, t).norm()).item()


def test_network_score_grows_with_the_input_scale():
    """The homogeneous normalization keeps the input's scale and GELU is ~ReLU for large inputs, so
    s(lam y) ~ lam s(y) once every layer's variance is well above eps: U = 0.5 <y, s> then grows
    quadratically, like any density with Gaussian tails. (A fresh network shrinks the variance
    layer by layer, so near scale 1 eps still matters.) A normalization that divided each channel
    by its own RMS would give s(lam y) = s(y) at every scale."""
    assert 9 < score_growth(1e4) / score_growth(1e3) < 11
    assert 9 < score_growth(1e5) / score_growth(1e4) < 11
    assert score_growth(10.0) > 10 and score_growth(0.1) < 0.1


def test_the_model_runs_in_float64_on_non_square_images():
    net = m.ScoreUNet(1, 2).double()
    y = torch.rand(2, 1, 12, 20, dtype=torch.float64)
    U, grad_y, grad_t = m.energy_and_scores(net, y, torch.tensor([1e-4, 3.0], dtype=torch.float64))
    assert (
        U.dtype == grad_y.dtype == torch.float64
        and grad_y.shape == y.shape
        and grad_t.shape == (2,)
    )


# ---- tiny runs on images ----


def test_image_mode_trains_evaluates_resumes_and_refuses_clearly(tmp_path, tiny_npz, capsys):
    out = tmp_path / "out"
    args = tiny_dual_score_args(tiny_npz, out)
    bpd = m.main(args)
    text = capsys.readouterr().out
    assert (
        math.isfinite(bpd)
        and (out / "tiny.pt").exists()
        and (out / "05_dual_score_tiny.png").exists()
    )
    assert "baseline: full-covariance Gaussian" in text and "WARNING: the model is WORSE" in text
    assert m.main(args + ["--eval_only"]) == pytest.approx(bpd, abs=1e-9)  # same model, same draws
    full = mdsm.load_checkpoint(str(out / "tiny.pt"), kind="dual-score")
    slim = {k: full[k] for k in ("kind", "model_args", "model", "step")}  # as shipped: the weights
    mdsm.save_checkpoint(slim, str(tmp_path / "slim" / "tiny.pt"))
    assert m.main(
        tiny_dual_score_args(tiny_npz, tmp_path / "slim") + ["--eval_only"]
    ) == pytest.approx(bpd, abs=1e-9)
    with pytest.raises(SystemExit, match="already exists; pass --resume"):
        m.main(args)  # never overwrites
    m.main(tiny_dual_score_args(tiny_npz, out, steps=5) + ["--resume"])
    assert "resumed at step 3" in capsys.readouterr().out
    assert mdsm.load_checkpoint(str(out / "tiny.pt"), kind="dual-score")["step"] == 5
    with pytest.raises(SystemExit, match="--resume: no checkpoint at"):
        m.main(tiny_dual_score_args(tiny_npz, tmp_path / "empty") + ["--resume"])
    with pytest.raises(SystemExit, match="--eval_only: no checkpoint at"):
        m.main(tiny_dual_score_args(tiny_npz, tmp_path / "empty") + ["--eval_only"])


def test_resume_refuses_fewer_steps_and_a_new_learning_rate(tmp_path, tiny_npz):
    m.main(tiny_dual_score_args(tiny_npz, tmp_path, steps=4))
    for steps in (2, 4):  # at or below the checkpoint's step: nothing to train
        with pytest.raises(
            SystemExit, match=r"^error: .* is at step 4; --resume needs --steps above it"
        ):
            m.main(tiny_dual_score_args(tiny_npz, tmp_path, steps=steps) + ["--resume"])
    with pytest.raises(SystemExit, match="keeps the optimizer and lr schedule .* --lr differ"):
        m.main(tiny_dual_score_args(tiny_npz, tmp_path, steps=6) + ["--resume", "--lr=1e-4"])


def test_a_checkpoint_of_another_design_is_refused_with_one_line(tmp_path, tiny_npz):
    m.main(tiny_dual_score_args(tiny_npz, tmp_path, steps=2) + ["--log_normalizer=false"])
    with pytest.raises(
        SystemExit, match=r"'log_normalizer': False.* but this run builds .*'log_normalizer': True"
    ):
        m.main(tiny_dual_score_args(tiny_npz, tmp_path, steps=2) + ["--eval_only"])
    with pytest.raises(SystemExit, match=r"pass the same --width, --log_normalizer"):
        m.main(
            tiny_dual_score_args(tiny_npz, tmp_path, steps=4)
            + ["--resume", "--log_normalizer=false", "--width=3"]
        )


def test_a_resumed_run_ends_exactly_where_an_uninterrupted_one_does(tmp_path, tiny_npz):
    """The generator of batches, t and noise is saved with the weights and the optimizer."""
    m.main(tiny_dual_score_args(tiny_npz, tmp_path / "straight", steps=4))
    m.main(tiny_dual_score_args(tiny_npz, tmp_path / "split", steps=2))
    m.main(tiny_dual_score_args(tiny_npz, tmp_path / "split", steps=4) + ["--resume"])
    a = mdsm.load_checkpoint(str(tmp_path / "straight" / "tiny.pt"), kind="dual-score")
    b = mdsm.load_checkpoint(str(tmp_path / "split" / "tiny.pt"), kind="dual-score")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_ctrl_c_during_training_saves_the_step_and_the_run_resumes(tmp_path, tiny_npz):
    """A real process: Ctrl-C (SIGINT) saves a checkpoint at the current step, prints one line and
    exits with 130 (128 + the signal's number); --resume continues from there."""
    out = tmp_path / "out"
    args = tiny_dual_score_args(tiny_npz, out, steps=1_000_000) + ["--ckpt_every=1000000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    cmd = [sys.executable, "-u", os.path.join(ROOT, "05_dual_score.py"), *args]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    lines = []
    for line in proc.stdout:  # the handlers are in place once the model line is printed
        lines.append(line)
        if line.startswith("ScoreUNet"):
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(lines) + rest
    last = rest.strip().splitlines()[-1]
    assert last.startswith("interrupted at step ") and "Traceback" not in rest
    step = int(last.split()[3].rstrip(";"))
    assert last == f"interrupted at step {step}; saved {out / 'tiny.pt'}; continue with --resume"
    assert mdsm.load_checkpoint(str(out / "tiny.pt"), kind="dual-score")["step"] == step
    m.main(tiny_dual_score_args(tiny_npz, out, steps=step + 2) + ["--resume"])
    assert mdsm.load_checkpoint(str(out / "tiny.pt"), kind="dual-score")["step"] == step + 2


def test_sigterm_saves_like_ctrl_c_and_exits_143(tmp_path, tiny_npz, monkeypatch, capsys):
    """A scheduler's SIGTERM, delivered to this process during step 2: saved at step 2."""
    shown = m.progress

    def progress_then_sigterm(i, total, t_start, note=""):
        shown(i, total, t_start, note)
        if i == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(m, "progress", progress_then_sigterm)
    with pytest.raises(SystemExit) as e:
        m.main(tiny_dual_score_args(tiny_npz, tmp_path, steps=100))
    assert e.value.code == 143
    assert capsys.readouterr().out.endswith(
        f"interrupted at step 2; saved {tmp_path / 'tiny.pt'}; continue with --resume\n"
    )
    assert mdsm.load_checkpoint(str(tmp_path / "tiny.pt"), kind="dual-score")["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is released


def diverge_at(step, monkeypatch):
    """dual_score_losses returning nan from call `step` on."""
    calls = []

    def diverging(*args, **kwargs):
        calls.append(1)
        dsm, tsm, *rest = LOSSES(*args, **kwargs)
        return (dsm * float("nan") if len(calls) >= step else dsm), tsm, *rest

    monkeypatch.setattr(m, "dual_score_losses", diverging)


def test_divergence_stops_without_saving_and_says_whether_a_checkpoint_is_kept(
    tmp_path, tiny_npz, monkeypatch
):
    diverge_at(2, monkeypatch)
    with pytest.raises(
        SystemExit, match=r"diverged \(nan at step 2\).*no checkpoint was saved.*--lr"
    ) as e:
        m.main(tiny_dual_score_args(tiny_npz, tmp_path / "a", steps=5))
    assert "--resume" not in str(e.value) and not (tmp_path / "a" / "tiny.pt").exists()
    diverge_at(4, monkeypatch)
    args = tiny_dual_score_args(tiny_npz, tmp_path / "b", steps=5) + ["--ckpt_every=2"]
    with pytest.raises(
        SystemExit,
        match=r"diverged \(nan at step 4\).*the checkpoint .*tiny.pt from before is kept",
    ):
        m.main(args)
    assert mdsm.load_checkpoint(str(tmp_path / "b" / "tiny.pt"), kind="dual-score")["step"] == 2


def test_a_non_finite_bits_per_dim_is_never_printed_as_a_result(
    tmp_path, tiny_npz, monkeypatch, capsys
):
    def nan_density(*args, **kwargs):
        nan = torch.full((8,), float("nan"), dtype=torch.float64)
        return {"c": float("nan"), "deq": nan, "single": nan, "t=0.01": nan}

    monkeypatch.setattr(m, "image_density", nan_density)
    with pytest.raises(
        SystemExit, match=r"^error: the model of step 3 gives a test bits/dim of nan.*--lr"
    ):
        m.main(tiny_dual_score_args(tiny_npz, tmp_path))
    assert "test NLL" not in capsys.readouterr().out


def test_strong_generalization_trains_two_models_per_size_and_compares_them(
    tmp_path, tiny_npz, capsys, monkeypatch
):
    """Per N: model A on training images 0 ... N-1, model B on N ... 2N-1, both scored on A's images."""
    args = [
        f"--dataset={tiny_npz}",
        "--steps=2",
        "--batch=4",
        "--width=2",
        "--device=cpu",
        f"--out_dir={tmp_path}",
    ]
    seen, train = [], m.train_images

    def spy(cfg, x_train, x_curve, *rest):
        seen.append((x_train.clone(), x_curve.clone()))
        return train(cfg, x_train, x_curve, *rest)

    monkeypatch.setattr(m, "train_images", spy)
    rms = m.main(args + ["--strong_gen=4,30"])
    x = mdsm.load_images(str(tiny_npz), split="train")
    for (xa, ea), (xb, eb), n in ((seen[0], seen[1], 4), (seen[2], seen[3], 30)):
        assert torch.equal(xa, x[:n]) and torch.equal(xb, x[n : 2 * n])  # disjoint halves
        assert torch.equal(ea, x[:n]) and torch.equal(eb, x[:n])  # both score A's images
    text = capsys.readouterr().out
    assert sorted(rms) == [4, 30] and all(math.isfinite(v) and v > 0 for v in rms.values())
    assert text.count("M parameters, 30 training images") == 2
    assert "N = 4: mean log p of A's 4 training images" in text
    assert all((tmp_path / f"tiny_N{n}{h}.pt").exists() for n in (4, 30) for h in "AB")
    assert (tmp_path / "05_strong_generalization_tiny.png").exists()
    with pytest.raises(SystemExit, match="needs 2 N <= 80 training images"):
        m.main(args + ["--strong_gen=41", f"--out_dir={tmp_path / 'big'}"])


def test_strong_generalization_reports_the_rms_difference_in_db_per_dim(
    tmp_path, tiny_npz, monkeypatch
):
    """Models A and B whose bits/dim differ by exactly 1 on every image: log p differs by
    10 log10(2) = 3.0103 dB/dim (bits/dim = 8 - log2 p / d, dB/dim = 10 log10 p / d)."""
    models = iter(["A", "B"])
    monkeypatch.setattr(m, "train_images", lambda cfg, x, *rest: (next(models), []))

    def density(model, x, *rest):
        return {"deq": torch.full((len(x),), 9.0 if model == "A" else 10.0, dtype=torch.float64)}

    monkeypatch.setattr(m, "image_density", density)
    rms = m.main(
        [f"--dataset={tiny_npz}", "--device=cpu", f"--out_dir={tmp_path}", "--strong_gen=8"]
    )
    assert rms[8] == pytest.approx(10 * math.log10(2), rel=1e-9)


# ---- bad input: one line, before any work ----
@pytest.mark.parametrize(
    "bad, message",
    [
        ("--batch=0", "--batch=0 is out of range"),
        ("--lr=-1", "--lr=-1.0 is out of range"),
        ("--lr=2", "--lr=2.0 is out of range"),
        ("--toy_lr=10", "--toy_lr=10.0 is out of range"),
        ("--steps=0", "--steps=0 is out of range"),
        ("--width=0", "--width=0 is out of range"),
        ("--seed=-1", "--seed=-1 is out of range"),
        ("--t_min=1e4", "--t_max=1000.0 is out of range"),
        ("--t_min=1e-30", "--t_min=1e-30 is out of range"),
        ("--t_max=1e9", "--t_max=1000000000.0 is out of range"),
        ("--toy_t_max=1e-3", "--toy_t_max=0.001 is out of range"),
        ("--tsm_weight=1e5", "--tsm_weight=100000.0 is out of range"),
        ("--n_draws=0", "--n_draws=0 is out of range"),
        ("--image_size=20", "--image_size=20 is out of range"),
        ("--time_features=linear", "--time_features=linear is out of range; allowed: log or raw"),
        ("--strong_gen=10,x", "--strong_gen=10,x is out of range; allowed: sizes > 0"),
        ("--toy_batch=1e9", "this run needs about .* GiB of memory.* lower --toy_batch"),
        ("--toy_dim=1e12", "this run needs about .* GiB of memory.* lower --toy_batch, --toy_dim"),
        ("--toy_samples=1e12", "this run needs about .* GiB of memory"),
    ],
)
def test_bad_knobs_are_refused_at_start_up_with_one_line(tmp_path, bad, message):
    tiny_toy = [
        "--toy_dim=2",
        "--toy_samples=4",
        "--toy_steps=1",
        "--toy_batch=2",
    ]  # if not refused
    with pytest.raises(SystemExit, match=f"^error: {message}"):
        m.main([*tiny_toy, bad, f"--out_dir={tmp_path}"])
    assert not any(tmp_path.iterdir())  # nothing written: refused before any work


def test_impossible_image_sizes_are_refused_from_an_estimate_before_allocation(tmp_path, tiny_npz):
    with pytest.raises(
        SystemExit, match=r"^error: this run needs about .* GiB .* lower --width or --batch"
    ):
        m.main(tiny_dual_score_args(tiny_npz, tmp_path) + ["--width=1000000"])
    with pytest.raises(
        SystemExit, match=r"^error: this run needs about .* GiB .* lower --width or --batch"
    ):
        m.main(tiny_dual_score_args(tiny_npz, tmp_path) + ["--batch=1e9"])
    assert not (tmp_path / "tiny.pt").exists()


def test_a_dataset_with_one_training_image_is_refused_with_one_line(tmp_path):
    x = np.zeros((3, 8, 8), np.uint8)
    np.savez(tmp_path / "one.npz", x_train=x[:1], x_test=x[1:])
    with pytest.raises(
        SystemExit,
        match=r"^error: --dataset=.*one.npz holds 1 training image\(s\); 05 needs at least 2",
    ):
        m.main(
            [f"--dataset={tmp_path / 'one.npz'}", "--device=cpu", f"--out_dir={tmp_path / 'out'}"]
        )


def test_an_image_size_larger_than_the_data_is_refused_not_upsampled(tmp_path, tiny_npz):
    with pytest.raises(
        SystemExit, match=r"^error: .* has images of 8x8; --image_size=16 would upsample"
    ):
        m.main(tiny_dual_score_args(tiny_npz, tmp_path) + ["--image_size=16"])


def test_unwritable_out_dir_is_refused_before_any_work(tmp_path):
    """A folder below a regular file cannot be created, not even by root."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="cannot write to"):
        m.main([f"--out_dir={tmp_path / 'file' / 'sub'}"])
