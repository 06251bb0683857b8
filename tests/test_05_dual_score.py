"""05: dual score matching. Closed-form checks on Gaussians / the scale mixture, the network's response
to input scaling, the bits/dim of an exact energy through 05's own evaluation path, then tiny runs."""
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
        tt = torch.tensor([t], dtype=torch.float64, requires_grad=True)
        (dU_dt,) = torch.autograd.grad(m.true_toy_energy(y[None], tt).sum(), tt)
        ok, info = close(target, dU_dt.item())
        assert ok, (radius, info)


def test_normalizing_constants_paper_and_data_variance(script):
    """Exact Gaussian energy off by K: the paper's c = (d/2) log(2 pi e T) - mean U_T = -K + (d/2) log(T / v),
    the data-variance constant = -K (v = s2 + T)."""
    m = script("05_dual_score.py")
    g = torch.Generator().manual_seed(3)
    d, n, s2, T, K = 50, 20000, 2.0, 10.0, 37.5
    y = math.sqrt(s2 + T) * torch.randn(n, d, generator=g, dtype=torch.float64)  # y ~ p_T, mu = 0
    U_T = gaussian_energy(torch.zeros(1, d, dtype=torch.float64), s2)(y, torch.full((n,), T, dtype=torch.float64)) + K
    se = math.sqrt(d / 2 / n)                                                   # std of mean U_T: 0.035
    assert abs(m.normalizing_constant(U_T, d, T) - (-K + d / 2 * math.log(T / (s2 + T)))) < 5 * se
    assert abs(m.normalizing_constant(U_T, d, T, s2) + K) < 5 * se


def test_bits_per_dim_of_an_exact_gaussian_energy_both_conventions(script):
    """Through 05's image_density (c from U at T, log p read at t0): per image, the dequantized bits/dim is
    8 + (E_u U((k + u)/256, t0) + c) / (d ln 2) in closed form, the single pass 8 + (U(k/255, t0) + c) / (d ln 2)."""
    m = script("05_dual_score.py")
    g = torch.Generator().manual_seed(4)
    n, mu, s2, t0, T = 3000, 0.2, 0.01, 1e-6, 10.0
    k = torch.randint(0, 256, (n, 1, 4, 4), generator=g, dtype=torch.uint8)     # d = 16
    d, v0, vT = 16, s2 + t0, s2 + T
    res = m.image_density(gaussian_energy(mu, s2), k, t0, T, n_draws=64, generator=g)
    # c: E over u, z of U((k + u)/256 + sqrt(T) z, T), E((k + u)/256 - mu)^2 = ((k + 1/2)/256 - mu)^2 + 1/(12 256^2)
    sq = (((k.double() + 0.5) / 256 - mu) ** 2 + 1 / (12 * 256 ** 2)).flatten(1).sum(1)  # (n,)
    c_exact = d / 2 * math.log(2 * math.pi * math.e * T) - ((sq.mean() + d * T) / (2 * vT)).item() - d / 2 * math.log(2 * math.pi * vT)
    assert abs(res["c"] - c_exact) < 5 * math.sqrt(d / 2 / n), (res["c"], c_exact)
    deq_exact = 8 + (sq / (2 * v0) + d / 2 * math.log(2 * math.pi * v0) + res["c"]) / (d * math.log(2))
    err = res["deq"] - deq_exact                                                # MC error of 64 draws of u only
    assert err.abs().mean() < 0.02 and abs(err.mean()) < 0.002, (err.abs().mean(), err.mean())  # seen 0.002, 3e-5
    single = ((k.double() / 255 - mu) ** 2).flatten(1).sum(1) / (2 * v0) + d / 2 * math.log(2 * math.pi * v0)
    assert torch.allclose(res["single"], 8 + (single + res["c"]) / (d * math.log(2)), atol=1e-4)
    v1 = s2 + 0.01                                                              # the same, read at t = 0.01 (beside 04's AIS)
    smooth = ((k.double() / 255 - mu) ** 2).flatten(1).sum(1) / (2 * v1) + d / 2 * math.log(2 * math.pi * v1)
    assert torch.allclose(res["t=0.01"], 8 + (smooth + res["c"]) / (d * math.log(2)), atol=1e-4)


def test_homogeneous_norm_centres_equalizes_and_keeps_the_scale(script):
    m = script("05_dual_score.py")
    torch.manual_seed(5)
    norm = m.HomogeneousNorm(3, emb_dim=4)
    h = torch.randn(2, 3, 5, 5) * torch.tensor([0.1, 1.0, 7.0]).view(1, 3, 1, 1) + 2.0
    out = norm(h, torch.zeros(2, 4)).detach()
    assert out.mean(dim=(2, 3)).abs().max() < 1e-5                              # each channel centred
    target = h.var(dim=(2, 3), unbiased=False).mean(1, keepdim=True).sqrt()      # sqrt(mean channel variance)
    assert torch.allclose(out.std(dim=(2, 3), unbiased=False), target.expand(2, 3), rtol=1e-4)
    assert torch.allclose(norm(10 * h, torch.zeros(2, 4)), 10 * out, rtol=1e-4, atol=1e-4)  # scale kept


def score_growth(m, lam):
    """||s(lam y, t)|| / ||s(y, t)|| of a seeded width-4 ScoreUNet at t = 1."""
    torch.manual_seed(6)
    net = m.ScoreUNet(1, 4)
    y, t = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(7)), torch.ones(2)
    with torch.no_grad():
        return (net.score(lam * y, t).norm() / net.score(y, t).norm()).item()


def test_network_score_grows_with_the_input_scale(script):
    """The homogeneous normalization keeps the input's scale, and GELU is ~ReLU for large inputs, so
    s(lam y) ~ lam s(y): U = 0.5 <y, s> grows quadratically, like any density with Gaussian tails."""
    m = script("05_dual_score.py")
    assert 5 < score_growth(m, 10.0) < 30 and 7 < score_growth(m, 1000.0) / score_growth(m, 100.0) < 20  # seen 17, 14
    assert score_growth(m, 0.1) < 0.5                                           # s(0.1 y) != s(y) (seen 0.09)


def test_the_old_rms_normalization_made_the_score_scale_invariant(script, monkeypatch):
    """The check above fails on the old design (divide each channel by its RMS): s(lam y) = s(y) exactly."""
    m = script("05_dual_score.py")

    def rms_norm(self, h, emb):
        rms = h.pow(2).mean(dim=(2, 3), keepdim=True).add(1e-12).sqrt()
        return h / rms * (self.weight * (1 + self.gain(emb)))[:, :, None, None]
    monkeypatch.setattr(m.HomogeneousNorm, "forward", rms_norm)
    assert score_growth(m, 10.0) == pytest.approx(1.0, abs=1e-4)
    assert score_growth(m, 0.1) == pytest.approx(1.0, abs=1e-4)


class ExactCoefficients(torch.nn.Module):
    """[a1, a2, b1, b2](log(t + 1e-2)) of N(0, s2 I) written twice (both components the same Gaussian)."""
    def __init__(self, s2, d):
        super().__init__()
        self.s2, self.d = s2, d

    def forward(self, log_t):
        v = self.s2 + log_t.exp() - 1e-2
        return torch.cat([1 / (2 * v)] * 2 + [0.5 * torch.log(2 * math.pi * v) + math.log(2) / self.d] * 2, dim=1)


def test_radial_energy_with_exact_coefficients_is_the_gaussian_and_reaches_the_minima(script):
    m = script("05_dual_score.py")
    g = torch.Generator().manual_seed(8)
    d, s2, n = 40, 2.0, 20000
    model = m.RadialEnergy(d)
    model.mlp = ExactCoefficients(s2, d)
    for t_val in (0.05, 3.0):
        x = math.sqrt(s2) * torch.randn(n, d, generator=g, dtype=torch.float64)
        t = torch.full((n,), t_val, dtype=torch.float64)
        dsm, tsm, U, y, *_ = m.dual_score_losses(model, x, t, torch.randn(n, d, generator=g, dtype=torch.float64))
        assert torch.allclose(U, gaussian_energy(0.0, s2)(y, t), atol=1e-8)
        v = s2 + t_val
        assert close(dsm, s2 / v)[0] and close(tsm, (s2 ** 2 + 2 * s2 * t_val) / (2 * d * v ** 2))[0]


def test_toy_trains_through_the_general_loss_and_dual_gets_the_normalization(script, tmp_path, monkeypatch):
    m = script("05_dual_score.py")
    calls = []
    general = m.dual_score_losses
    monkeypatch.setattr(m, "dual_score_losses", lambda *a, **k: calls.append(1) or general(*a, **k))
    summary = m.main(["--toy_dim=100", "--toy_steps=600", "--toy_samples=5000", "--toy_halve_every=300",
                      "--toy_batch=128", f"--out_dir={tmp_path}"])
    assert len(calls) == 1200 and (tmp_path / "05_dual_score.png").exists()
    assert summary["dual"]["rms_paper_c"] < 2.0, summary                        # dB/dim (seen: 1.28)
    assert summary["single"]["rms_paper_c"] > 3 * summary["dual"]["rms_paper_c"], summary  # (seen: 5.6)


@pytest.fixture
def tiny_npz(tmp_path):
    rng = np.random.default_rng(0)
    x = (rng.random((96, 8, 8)) * 255).astype(np.uint8)
    path = tmp_path / "tiny.npz"
    np.savez(path, x_train=x[:80], x_test=x[80:])
    return path


def test_image_mode_trains_evaluates_resumes_and_refuses_clearly(script, tmp_path, tiny_npz, capsys):
    m = script("05_dual_score.py")
    out = tmp_path / "out"
    args = [f"--dataset={tiny_npz}", "--steps=3", "--batch=4", "--width=2", "--n_test=8", "--n_draws=1",
            "--device=cpu", f"--out_dir={out}"]
    bpd = m.main(args)
    text = capsys.readouterr().out
    assert math.isfinite(bpd) and (out / "tiny.pt").exists() and (out / "05_dual_score_tiny.png").exists()
    assert "baseline: full-covariance Gaussian" in text and "WARNING: the model is WORSE" in text
    assert m.main(args + ["--eval_only"]) == pytest.approx(bpd, abs=1e-9)          # same checkpoint, same draws
    with pytest.raises(SystemExit, match="already exists; pass --resume"):
        m.main(args)                                                              # never overwrites
    m.main(args[:1] + ["--steps=5"] + args[2:] + ["--resume"])
    assert "resumed at step 3" in capsys.readouterr().out
    assert script("03_mdsm_train.py").load_checkpoint(str(out / "tiny.pt"), kind="dual-score")["step"] == 5
    with pytest.raises(SystemExit, match=r"holds a ScoreUNet.*pass the same --width"):
        m.main(args[:4] + ["--width=3"] + args[5:] + ["--steps=6", "--resume"])
    with pytest.raises(SystemExit, match="--resume: no checkpoint at"):
        m.main(args[:-1] + [f"--out_dir={tmp_path / 'empty'}", "--resume"])
    with pytest.raises(SystemExit, match="--eval_only: no checkpoint at"):
        m.main(args[:-1] + [f"--out_dir={tmp_path / 'empty'}", "--eval_only"])


@pytest.mark.parametrize("bad, message", [("--batch=0", "--batch=0 is out of range"), ("--lr=-1", "--lr=-1.0"),
                                          ("--steps=0", "--steps=0"), ("--width=0", "--width=0"),
                                          ("--t_min=1e4", "--t_max=1000.0"), ("--n_draws=0", "--n_draws=0"),
                                          ("--strong_gen=10,x", "--strong_gen=10,x is out of range; allowed: sizes > 0")])
def test_bad_knobs_are_refused_at_start_up_with_one_line(script, tmp_path, bad, message):
    m = script("05_dual_score.py")
    with pytest.raises(SystemExit, match=f"^error: {message}" if message.startswith("--") else message):
        m.main([bad, f"--out_dir={tmp_path}", "--toy_dim=2", "--toy_samples=4", "--toy_steps=1", "--toy_batch=2"])


def test_unwritable_out_dir_is_refused_before_any_work(script, tmp_path):
    m = script("05_dual_score.py")
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="cannot write to"):
        m.main([f"--out_dir={tmp_path / 'file' / 'sub'}"])


def test_dequantize_fills_each_grey_level_bin_uniformly(script):
    """Training data and c use x = (k + u)/256, u ~ U[0,1): inside [k/256, (k+1)/256), mean (k + 1/2)/256."""
    m = script("05_dual_score.py")
    k = torch.tensor([0, 17, 128, 255], dtype=torch.uint8).repeat(20000, 1)
    x = m.dequantize(k, torch.Generator().manual_seed(9)).double()
    assert torch.all(x >= k / 256) and torch.all(x <= (k.double() + 1) / 256)  # fp32 may round up to the edge
    assert torch.allclose(x.mean(0), (k[0].double() + 0.5) / 256, atol=3e-5)          # se 1e-5


def test_resume_refuses_a_new_learning_rate_instead_of_ignoring_it(script, tmp_path, tiny_npz):
    m = script("05_dual_score.py")
    args = [f"--dataset={tiny_npz}", "--steps=2", "--batch=4", "--width=2", "--n_test=8", "--n_draws=1", f"--out_dir={tmp_path}"]
    m.main(args)
    with pytest.raises(SystemExit, match="keeps the optimizer and lr schedule .* --lr differ"):
        m.main(args[:1] + ["--steps=4"] + args[2:] + ["--resume", "--lr=1e-4"])


def test_image_energy_is_half_the_inner_product_of_y_and_the_score_plus_d_b(script):
    """U(y, t) = 0.5 <y, s(y, t)> + d b(t) per image, written out from the network's own score and its
    log-normalizer head: a factor 2 (U = <y, s>) or a lost b(t) changes every printed log p."""
    m = script("05_dual_score.py")
    torch.manual_seed(8)
    net = m.ScoreUNet(1, 4)
    with torch.no_grad():
        net.out.weight.mul_(100.0)  # a fresh net's score is ~1e-5 of y: scale it up so that U is O(1)
        net.log_norm[2].bias.fill_(0.3)  # b(t) starts at 0: give it a value
        net.log_norm[2].weight.normal_(0, 0.01)
    y = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    t = torch.tensor([1e-3, 0.5, 20.0])
    with torch.no_grad():
        U, s, b = net(y, t), net.score(y, t), net.log_norm(net.time_embedding(t))[:, 0]
    expected = 0.5 * (y * s).sum(dim=(1, 2, 3)) + 64 * b
    assert U.shape == (3,) and (0.5 * (y * s).sum(dim=(1, 2, 3))).abs().min() > 1e-3 and b.std() > 1e-4
    assert torch.allclose(U, expected, rtol=1e-4, atol=0), (U, expected)


def test_score_is_the_last_layer_divided_by_sqrt_t(script):
    """s = out(h) / sqrt(t): the score of p_t is ~ z / sqrt(t), and the network only has to find z."""
    m = script("05_dual_score.py")
    torch.manual_seed(3)
    net, raw = m.ScoreUNet(1, 4), []
    net.out.register_forward_hook(lambda mod, inp, out: raw.append(out))
    y, t = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(4)), torch.tensor([1e-6, 4.0])
    with torch.no_grad():
        s = net.score(y, t)
    assert torch.allclose(s, raw[0] / t.sqrt().view(-1, 1, 1, 1), rtol=1e-6)


def test_without_b_an_energy_zero_at_the_origin_cannot_conserve_mass(script):
    """Why U has d b(t). Data: dequantized zeros, x = u / 256, second moment m2 = 1/(3 * 256^2) per pixel.
    The exact Gaussian energy with that moment is ||y||^2/(2v) + (d/2) log(2 pi v), v = m2 + t. Its y-part is 0
    at y = 0 like 0.5 <y, s>, and alone has mean t d_t U / d = -t/(2v) on p_t (-0.5 once t >> m2), not 0;
    adding d b(t) with b = 0.5 log(2 pi v) (the head's job) gives 0 at every t."""
    import types
    m = script("05_dual_score.py")
    m2, ts = 1 / (3 * 256 ** 2), [1e-7, 1e-5, 1e-3, 1e-1, 1e1]
    y_part = lambda y, t: y.pow(2).flatten(1).sum(1) / (2 * (m2 + t))  # noqa: E731
    full = lambda y, t: y_part(y, t) + y[0].numel() * 0.5 * torch.log(2 * math.pi * (m2 + t))  # noqa: E731
    x = torch.zeros(4000, 1, 4, 4, dtype=torch.uint8)
    cfg = types.SimpleNamespace(T_MIN=ts[0], T_MAX=ts[-1])
    rows_y, rows_full = (m.mass_conservation(f, x, cfg, "cpu", n_levels=5) for f in (y_part, full))
    for (t, vy), (_, vf) in zip(rows_y, rows_full):
        assert t == pytest.approx(ts.pop(0)) and vy == pytest.approx(-t / (2 * (m2 + t)), abs=0.01), (t, vy)
        assert vf == pytest.approx(0.0, abs=0.01), (t, vf)
    assert rows_y[-1][1] < -0.45


def test_mass_conservation_reports_t_times_the_time_score_over_d(script):
    """The printed table is mean over y of t d_t U / d at log-spaced t in [T_MIN, T_MAX]. With
    U(y, t) = (d/2) log t (+ 0 <y>) the value is exactly 1/2 at every t (d_t U / d alone would be 1/(2t))."""
    import types
    m = script("05_dual_score.py")
    energy = lambda y, t: y[0].numel() / 2 * torch.log(t) + 0 * y.flatten(1).sum(1)  # noqa: E731
    x_uint8 = torch.randint(0, 256, (4, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    rows = m.mass_conservation(energy, x_uint8, types.SimpleNamespace(T_MIN=1e-2, T_MAX=1e2), "cpu", n_levels=5)
    assert [t for t, _ in rows] == pytest.approx([1e-2, 1e-1, 1.0, 1e1, 1e2])
    assert [v for _, v in rows] == pytest.approx([0.5] * 5, rel=1e-5)


def test_strong_generalization_trains_two_models_per_size_and_compares_them(script, tmp_path, tiny_npz, capsys, monkeypatch):
    """Per N: model A on training images 0 ... N-1, model B on N ... 2N-1, both scored on A's images."""
    m = script("05_dual_score.py")
    args = [f"--dataset={tiny_npz}", "--steps=2", "--batch=4", "--width=2", "--device=cpu", f"--out_dir={tmp_path}"]
    seen, train = [], m.train_images
    def spy(cfg, x_train, x_curve, *rest):
        seen.append((x_train.clone(), x_curve.clone()))
        return train(cfg, x_train, x_curve, *rest)
    monkeypatch.setattr(m, "train_images", spy)
    rms = m.main(args + ["--strong_gen=4,30"])
    x = script("03_mdsm_train.py").load_images(str(tiny_npz), split="train")
    for (xa, ea), (xb, eb), n in ((seen[0], seen[1], 4), (seen[2], seen[3], 30)):  # A, B: disjoint halves; A's images scored
        assert torch.equal(xa, x[:n]) and torch.equal(xb, x[n:2 * n]) and torch.equal(ea, x[:n]) and torch.equal(eb, x[:n])
    text = capsys.readouterr().out
    assert sorted(rms) == [4, 30] and all(math.isfinite(v) and v > 0 for v in rms.values())
    assert text.count("M parameters, 30 training images") == 2 and "N = 4: mean log p of A's 4 training images" in text
    assert all((tmp_path / f"tiny_N{n}{h}.pt").exists() for n in (4, 30) for h in "AB")
    assert (tmp_path / "05_strong_generalization_tiny.png").exists()
    with pytest.raises(SystemExit, match="needs 2 N <= 80 training images"):
        m.main(args + ["--strong_gen=41", f"--out_dir={tmp_path / 'big'}"])


def test_strong_generalization_reports_the_rms_difference_in_db_per_dim(script, tmp_path, tiny_npz, monkeypatch):
    """Models A and B whose bits/dim differ by exactly 1 on every image: log p differs by 10 log10(2) = 3.0103
    dB/dim (bits/dim = 8 - log2 p / d, dB/dim = 10 log10 p / d), so the RMS difference is 3.0103."""
    m = script("05_dual_score.py")
    models = iter(["A", "B"])
    monkeypatch.setattr(m, "train_images", lambda cfg, x, *rest: (next(models), []))
    monkeypatch.setattr(m, "image_density", lambda model, x, *rest: {"deq": torch.full((len(x),), 9.0 if model == "A" else 10.0,
                                                                                          dtype=torch.float64)})
    rms = m.main([f"--dataset={tiny_npz}", "--device=cpu", f"--out_dir={tmp_path}", "--strong_gen=8"])
    assert rms[8] == pytest.approx(10 * math.log10(2), rel=1e-9)


def test_a_checkpoint_of_the_older_design_is_refused_with_one_line(script, tmp_path, tiny_npz):
    """Checkpoints written before b(t) and the 1/sqrt(t) output have no 'design' tag: one line, not a traceback."""
    m, mdsm = script("05_dual_score.py"), script("03_mdsm_train.py")
    args = [f"--dataset={tiny_npz}", "--steps=2", "--batch=4", "--width=2", "--n_test=8", "--n_draws=1", f"--out_dir={tmp_path}"]
    m.main(args)
    ck = mdsm.load_checkpoint(str(tmp_path / "tiny.pt"), kind="dual-score")
    del ck["model_args"]["design"]
    mdsm.save_checkpoint(ck, str(tmp_path / "tiny.pt"))
    with pytest.raises(SystemExit, match=r"holds a ScoreUNet\{'in_channels': 1, 'width': 2, 'emb_dim': 256\} but this run builds"):
        m.main(args + ["--eval_only"])
