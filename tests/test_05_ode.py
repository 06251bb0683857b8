"""05, part 3: the probability-flow ODE likelihood against closed forms (Gaussian data with a full
covariance, the scale mixture), Hutchinson's estimator on a known matrix, RK4's convergence, what
the ODE-minus-one-pass gap measures, then 05's own network: the checks, the side-by-side table,
--ode through main(), its knobs, and --ckpt for evaluating a checkpoint in place."""

import functools
import math
import os

import pytest
import torch
from conftest import load_script, tiny_dual_score_args

m = load_script("05_dual_score.py")
mdsm = load_script("03_mdsm_train.py")
T_MIN, T_MAX = 1e-3, 1e3


def gaussian_data(D, seed):
    """mu (D,) and a covariance (D, D) with eigenvalues 0.01 ... 4: hand-overs at several t."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    eigenvalues = torch.logspace(-2, math.log10(4), D, dtype=torch.float64)
    cov = Q @ torch.diag(eigenvalues) @ Q.T
    return torch.randn(D, generator=g, dtype=torch.float64), cov


def gaussian_energy(mu, cov, y, t):
    """Exact U(y, t) = 1/2 r^T V^-1 r + 1/2 log det(2 pi V), r = y - mu, V = cov + t I. (B,)"""
    r = y.flatten(1) - mu
    V = cov + t.view(-1, 1, 1) * torch.eye(len(mu), dtype=cov.dtype)  # (B, D, D)
    solved = torch.linalg.solve(V, r.unsqueeze(-1)).squeeze(-1)
    return 0.5 * (r * solved).sum(1) + 0.5 * torch.logdet(2 * math.pi * V)


def gaussian_gradient(mu, cov, y, t):
    """Exact grad_y U = V^-1 (y - mu), written out (differentiable in y). (B, ...)"""
    V = cov + t.view(-1, 1, 1) * torch.eye(len(mu), dtype=cov.dtype)
    r = (y.flatten(1) - mu).unsqueeze(-1)
    return torch.linalg.solve(V, r).squeeze(-1).view(y.shape)


def gaussian_ode(D=6, steps=64, probes=None, autograd=False, seed=0):
    """ODE log p_{t_min}(x) and the exact -U(x, t_min), for 5 samples and one point far out."""
    mu, cov = gaussian_data(D, seed)
    g = torch.Generator().manual_seed(seed + 1)
    L = torch.linalg.cholesky(cov + T_MIN * torch.eye(D, dtype=torch.float64))
    x = mu + torch.randn(5, D, generator=g, dtype=torch.float64) @ L.T
    x = torch.cat([x, (mu + 3.0)[None]])
    energy = functools.partial(gaussian_energy, mu, cov)
    grad_U = functools.partial(gaussian_gradient, mu, cov)
    if autograd:
        grad_U = functools.partial(m.energy_gradient, energy)
    # the exact energy is normalized: 05's -(U(y, T) + c) with c = 0 is the exact log p_T
    log_p_T = functools.partial(m.normalized_log_p, energy, c=0.0, t0=T_MAX)
    out = m.probability_flow_log_p(grad_U, log_p_T, x, T_MIN, T_MAX, steps, probes)
    exact = -energy(x, torch.full((len(x),), T_MIN, dtype=torch.float64))
    return out, exact


def test_ode_log_likelihood_of_gaussian_data_is_exact():
    """Exact trace, RK4 64 steps: log N(x; mu, Sigma + t_min I) to a relative 3e-5 on
    points from -1.5 to -767 nats; the same through autograd's gradient of U (05's route).
    A flipped sign of the integral is off by 2 x (d/2) log(T / t_min) ~ 80 nats."""
    out, exact = gaussian_ode()
    assert ((out["log_p"] - exact).abs() < 3e-5 * exact.abs()).all(), out["log_p"] - exact
    assert (out["se"] == 0).all()
    out_autograd, _ = gaussian_ode(autograd=True)
    assert torch.allclose(out_autograd["log_p"], out["log_p"], atol=1e-9)


def test_ode_with_hutchinson_probes_is_exact_within_its_standard_error():
    """32 Rademacher probes per image, fixed along the path: every image within 4 of its own
    standard errors of the exact value, and the standard error is neither 0 nor huge."""
    g = torch.Generator().manual_seed(5)
    probes = m.draw_probes((6, 6), 32, "rademacher", g, torch.float64)
    out, exact = gaussian_ode(probes=probes)
    z = (out["log_p"] - exact) / out["se"]
    assert (z.abs() < 4).all(), z
    assert ((out["se"] > 1e-3) & (out["se"] < 2.0)).all(), out["se"]


def mixture_energy(y, t, weights=(0.5, 0.5), variances=(1.0, 16.0)):
    """05's toy, exact: U = -logsumexp_k [log pi_k - ||y||^2 / (2 v_k) - (d/2) log(2 pi v_k)]."""
    r2 = y.flatten(1).pow(2).sum(1)
    d = y[0].numel()
    terms = [
        math.log(w) - r2 / (2 * (s2 + t)) - d / 2 * torch.log(2 * math.pi * (s2 + t))
        for w, s2 in zip(weights, variances)
    ]
    return -torch.logsumexp(torch.stack(terms, dim=1), dim=1)


def test_ode_log_likelihood_of_the_scale_mixture_is_exact():
    """A curved flow: the scale mixture 0.5 N(0, I) + 0.5 N(0, 16 I) in d = 4, whose components
    hand over at different t. RK4 64 steps, exact trace through autograd: within 1e-4 nats."""
    g = torch.Generator().manual_seed(3)
    scales = torch.tensor([0.5, 1, 2, 4.0], dtype=torch.float64).repeat(2)[:, None]
    x = torch.randn(8, 4, generator=g, dtype=torch.float64) * scales
    grad_U = functools.partial(m.energy_gradient, mixture_energy)
    log_p_T = functools.partial(m.normalized_log_p, mixture_energy, c=0.0, t0=T_MAX)
    out = m.probability_flow_log_p(grad_U, log_p_T, x, T_MIN, T_MAX, 64)
    exact = -mixture_energy(x, torch.full((8,), T_MIN, dtype=torch.float64))
    assert (out["log_p"] - exact).abs().max() < 1e-4, out["log_p"] - exact


def test_the_solver_reaches_the_exact_answer_as_steps_grow():
    """Relative error of log p on the Gaussian at 4, 8, ..., 128 RK4 steps: falls at every
    doubling, by 10x or more from 8 steps on (4th order: 16x), to below 1e-6 at 128; Richardson's
    estimate is within a factor 2 of the true error at 16 steps."""
    errors = {}
    for steps in (4, 8, 16, 32, 64, 128):
        out, exact = gaussian_ode(steps=steps)
        errors[steps] = ((out["log_p"] - exact) / exact).abs().max().item()
    ratios = [errors[n] / errors[2 * n] for n in (4, 8, 16, 32, 64)]
    assert ratios[0] > 1 and min(ratios[1:]) > 10, (errors, ratios)
    assert errors[128] < 1e-6, errors
    mu, cov = gaussian_data(6, 0)
    energy = functools.partial(gaussian_energy, mu, cov)
    grad_U = functools.partial(gaussian_gradient, mu, cov)
    log_p_T = functools.partial(m.normalized_log_p, energy, c=0.0, t0=T_MAX)
    x = mu + torch.tensor([[0.0], [1.0], [-2.0]], dtype=torch.float64)
    estimate = m.solver_error(grad_U, log_p_T, x, T_MIN, T_MAX, 16)
    out = m.probability_flow_log_p(grad_U, log_p_T, x, T_MIN, T_MAX, 16)
    true = out["log_p"] + energy(x, torch.full((3,), T_MIN, dtype=torch.float64))
    ratio = estimate / true
    assert ((ratio > 0.5) & (ratio < 2)).all(), (estimate, true)


def known_matrix():
    """A fixed non-symmetric A (5, 5) with trace 12 and off-diagonal mass (probes have variance)."""
    A = torch.randn(5, 5, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    diagonal = torch.tensor([4.0, -1, 3, 5, 1], dtype=torch.float64)
    return A - torch.diag(torch.diag(A)) + torch.diag(diagonal)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_one_hutchinson_step_is_unbiased_on_a_known_matrix(kind):
    """grad_U(y) = A y has Jacobian A: over 40,000 probes the mean of eps^T A eps (twice the ODE's
    div f = 1/2 Lap U) is tr A = 12 within 4 standard errors (0.02 ... 0.04, from the exact
    variance), with the variance theory gives; the exact trace is tr A. A biased estimator (a
    lost factor 1/2 or 2, probes not centred or not of unit variance) misses by a unit or more."""
    A = known_matrix()
    n = 40000
    y = torch.randn(n, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    probes = m.draw_probes(y.shape, 1, kind, torch.Generator().manual_seed(2), torch.float64)
    # Var eps^T A eps, S = (A + A^T)/2: 2 sum_{i != j} S_ij^2 (Rademacher), 2 ||S||_F^2 (Gaussian)
    S = (A + A.T) / 2
    off = S - torch.diag(torch.diag(S))
    var = 2 * off.pow(2).sum().item()
    if kind == "gaussian":
        var = 2 * S.pow(2).sum().item()
    f, div = m.flow_and_divergence(lambda y, t: y @ A.T, y, None, probes)
    forms = 2 * div[:, 0]  # (n,) one probe on each of n copies of the same Jacobian
    assert abs(forms.mean().item() - torch.trace(A).item()) < 4 * math.sqrt(var / n), forms.mean()
    assert abs(forms.var().item() / var - 1) < 0.1, (forms.var(), var)
    assert torch.allclose(f, 0.5 * y @ A.T)
    y3 = y[:3].clone().requires_grad_()
    exact = m.exact_trace(y3 @ A.T, y3)
    assert torch.allclose(exact, torch.trace(A).expand(3))


def test_check_hutchinson_agrees_with_the_exact_trace_on_the_gaussian():
    """tr H = tr (Sigma + t I)^-1 exactly; Hutchinson with 64 probes within 4 SE on every input."""
    mu, cov = gaussian_data(6, 0)
    y = mu + torch.randn(4, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    t = torch.full((4,), 0.1, dtype=torch.float64)
    grad_U = functools.partial(gaussian_gradient, mu, cov)
    res = m.check_hutchinson(grad_U, y, t, 64, generator=torch.Generator().manual_seed(8))
    truth = torch.trace(torch.linalg.inv(cov + 0.1 * torch.eye(6, dtype=torch.float64)))
    assert torch.allclose(res["exact"], truth.expand(4))
    assert (res["z"].abs() < 4).all(), res


def test_gaussian_end_density_is_the_exact_p_T_of_gaussian_data():
    """N(m, (s^2 + T) I) is p_T exactly for data N(m, s^2 I)."""
    s2, T, mean = 0.3, 50.0, 0.7
    y = torch.randn(5, 1, 2, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    energy = functools.partial(mixture_energy, weights=(1.0,), variances=(s2,))
    expected = m.normalized_log_p(energy, 7 * y, 0.0, T)
    got = m.gaussian_log_p_T(7 * y + mean, T, data_mean=mean, data_var=s2)
    assert torch.allclose(got, expected)


def test_the_ode_ignores_a_drifting_level_of_U_that_the_one_pass_takes_in_full():
    """U + b(t), b = 3 log t, c = -b(T) (so it is exact at T): the score is unchanged, so the ODE
    is still the exact log p, while the one pass is off by b(T) - b(t_min) = 3 log(T / t_min).
    ODE - one pass measures how well U's levels across t agree with its score (the time score's
    job), not the constant c, which cancels; level_gap finds it step by step, b(t_k) - b(t_k+1)
    = -3 h in log p, and its steps add up to the whole gap."""
    mu, cov = gaussian_data(6, 0)

    def drifting(y, t):
        return gaussian_energy(mu, cov, y, t) + 3 * torch.log(t)

    x = mu + torch.randn(4, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    c = -3 * math.log(T_MAX)
    grad_U = functools.partial(m.energy_gradient, drifting)
    log_p_T = functools.partial(m.normalized_log_p, drifting, c=c, t0=T_MAX)
    out = m.probability_flow_log_p(grad_U, log_p_T, x, T_MIN, T_MAX, 64, energy=drifting)
    exact = -gaussian_energy(mu, cov, x, torch.full((4,), T_MIN, dtype=torch.float64))
    assert ((out["log_p"] - exact).abs() < 3e-5 * exact.abs()).all()
    one_pass = m.normalized_log_p(drifting, x, c, T_MIN)
    drift = torch.full((4,), 3 * math.log(T_MAX / T_MIN), dtype=torch.float64)
    assert torch.allclose(one_pass - exact, drift)
    steps = m.level_gap(out)  # (4, 64)
    h = math.log(T_MAX / T_MIN) / 64
    assert (steps + 3 * h).abs().max() < 1e-3, steps + 3 * h
    assert torch.allclose(steps.sum(dim=1), out["log_p"] - one_pass)


def test_one_pass_and_ode_agree_for_an_exact_energy_on_8_bit_images():
    """05's route on 2x2 8-bit images with the exact energy of N(0.4, 0.05 I) (c = 0): one pass and
    ODE give the same bits/dim per image (1e-4 at 64 steps, the solver's and float32's error), and
    so does the ODE ending in N(0.4, (0.05 + T) I), which is p_T here; the steps of the gap add
    up to it; the exact flow keeps ||y - m||^2 / (d (s^2 + t)) (y - m grows like sqrt(s^2 + t));
    4 * 64 + 1 forward passes for the ODE and 64 + 1 for U along the path."""
    g = torch.Generator().manual_seed(10)
    k = torch.randint(0, 256, (12, 1, 2, 2), generator=g, dtype=torch.uint8)
    energy = functools.partial(mixture_energy, weights=(1.0,), variances=(0.05,))

    def shifted(y, t):
        return energy(y - 0.4, t)

    args = (shifted, k, 0.0, 1e-4, T_MAX, 64)
    res = m.one_pass_and_ode(*args, 0, "rademacher", g, "cpu", 0.4, 0.05, batch=5)
    assert (res["ode"] - res["one_pass"]).abs().max() < 1e-4, res["ode"] - res["one_pass"]
    assert (res["ode_gaussian"] - res["one_pass"]).abs().max() < 1e-4
    assert torch.allclose(res["gap_by_step"].sum(dim=1), res["ode"] - res["one_pass"], atol=1e-6)
    replay = torch.Generator().manual_seed(10)  # k again, then the u that one_pass_and_ode drew
    torch.randint(0, 256, k.shape, generator=replay)
    u = torch.rand(k.shape, generator=replay, dtype=torch.float64)
    x = ((k.double() + u) / 256).float().double()
    start = (x - 0.4).pow(2).flatten(1).sum(1) / (4 * (0.05 + 1e-4))
    assert torch.allclose(res["shell"], start, rtol=1e-4), (res["shell"], start)
    assert res["passes"]["ode"] == {"forward": 257 + 65, "backward": 256 * (1 + 4)}
    res = m.one_pass_and_ode(*args, 8, "rademacher", g, "cpu")
    assert ((res["ode"] - res["one_pass"]).abs() < 4 * res["se"] + 1e-4).all()


def test_smoke_through_05s_network(capsys):
    """A seeded width-2 ScoreUNet on 8x8 images: the checks (Hutchinson against the exact trace,
    64 passes, at three t; Richardson's error), then both estimators with 05's constant c."""
    torch.manual_seed(0)
    net = m.ScoreUNet(1, 2)
    for p in net.parameters():
        p.requires_grad_(False)  # gradients in y only
    g = torch.Generator().manual_seed(12)
    k = torch.randint(0, 256, (4, 1, 8, 8), generator=g, dtype=torch.uint8)
    y_T = m.dequantize(k, g) + math.sqrt(T_MAX) * torch.randn(k.shape, generator=g)
    c = m.normalizing_constant(m.energies(net, y_T, T_MAX), 64, T_MAX)
    x = m.dequantize(k[:2], g)
    err = m.print_ode_checks(net, x, c, 1e-9, T_MAX, 2, 2, "rademacher", g)
    z = [float(v) for v in capsys.readouterr().out.split("z = ")[1:] for v in v.split()[:2]]
    assert len(z) == 6 and max(abs(v) for v in z) < 5, z
    res = m.one_pass_and_ode(net, k, c, 1e-9, T_MAX, 2, 2, "rademacher", g, "cpu")
    assert all(torch.isfinite(res[key]).all() for key in ("one_pass", "ode", "ode_gaussian", "se"))
    assert math.isfinite(err)
    m.print_one_pass_and_ode(res, 2, 2, "rademacher", err)
    assert "N(m, (s^2 + T) I)" in capsys.readouterr().out


def test_the_table_flags_a_one_pass_below_the_ode_beyond_the_errors(capsys):
    """The NOTE line appears when ODE - one pass exceeds 2 standard errors + the solver error, and
    not when it is within them."""
    n = 50
    one = torch.full((n,), 2.0, dtype=torch.float64)
    wiggle = 0.01 * torch.randn(n, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    res = {
        "one_pass": one,
        "ode": one + 0.1 + wiggle,
        "ode_gaussian": one + 0.1,
        "se": torch.full((n,), 0.01, dtype=torch.float64),
        "shell": torch.ones(n, dtype=torch.float64),
        "gap_by_step": (0.1 + wiggle)[:, None].expand(n, 4) / 4,
        "t_grid": torch.logspace(-3, 3, 5, dtype=torch.float64),
        "passes": {"one_pass": {"forward": 1, "backward": 0}, "ode": m.ode_cost(1, 2, 4)},
        "seconds_per_100": {"one_pass": 1.0, "ode": 100.0},
    }
    m.print_one_pass_and_ode(res, 1, 2, "rademacher", solver_error=0.01)
    assert "NOTE: the one-pass number is BELOW the ODE's by 0.1" in capsys.readouterr().out
    m.print_one_pass_and_ode(res, 1, 2, "rademacher", solver_error=0.2)
    assert "NOTE" not in capsys.readouterr().out


def test_the_table_prints_each_estimators_mean_and_spread_across_images(capsys):
    """Mean and SD across the images per estimator, the gap's mean, SD and the correlation of the
    two estimators, and each estimator's cost."""
    one = torch.tensor([2.0, 2.1, 2.2, 2.3], dtype=torch.float64)
    res = {
        "one_pass": one,
        "ode": 2 * one,
        "ode_gaussian": one + 1,
        "se": torch.zeros(4, dtype=torch.float64),
        "shell": torch.ones(4, dtype=torch.float64),
        "gap_by_step": one[:, None].expand(4, 2) / 2,
        "t_grid": torch.logspace(-3, 3, 3, dtype=torch.float64),
        "passes": {"one_pass": {"forward": 1, "backward": 0}, "ode": m.ode_cost(2, 2, 4, True)},
        "seconds_per_100": {"one_pass": 1.0, "ode": 100.0},
    }
    m.print_one_pass_and_ode(res, 2, 2, "rademacher")
    text = capsys.readouterr().out
    sd = one.std().item()
    assert f"one pass, -(U(x, t_min) + c)               2.1500 {sd:8.4f}" in text
    assert f"05's -(U(y(T), T) + c)                   4.3000 {2 * sd:8.4f}" in text
    assert f"N(m, (s^2 + T) I)                        3.1500 {sd:8.4f}" in text
    assert f"ODE - one pass: mean +2.1500, per-image SD {sd:.4f}" in text
    assert "correlation of the two across images +1.000" in text
    assert "cost, ode     : 12 forward + 24 backward passes per image, 100.0 s per 100" in text


# ---- --ode and --ckpt through main() ----


ODE_ARGS = ["--ode", "--ode_images=4", "--ode_steps=2", "--ode_check=1"]


def test_ode_prints_both_estimators_with_the_headlines_constant(tmp_path, tiny_npz, capsys):
    """--ode after training: the checks, then the table on --ode_images images, scored with the c
    of the headline (never re-estimated), and the headline itself unchanged by --ode."""
    seen = {}
    density = m.image_density
    both = m.one_pass_and_ode

    def spy_density(*args, **kwargs):
        res = density(*args, **kwargs)
        seen["headline"] = res["c"]
        return res

    def spy_both(energy, x_uint8, c, *args, **kwargs):
        seen["ode"] = c
        seen["images"] = len(x_uint8)
        return both(energy, x_uint8, c, *args, **kwargs)

    bpd = m.main(tiny_dual_score_args(tiny_npz, tmp_path / "plain"))
    capsys.readouterr()
    m.image_density = spy_density
    m.one_pass_and_ode = spy_both
    try:
        assert m.main(tiny_dual_score_args(tiny_npz, tmp_path / "ode") + ODE_ARGS) == pytest.approx(
            bpd
        )
    finally:
        m.image_density = density
        m.one_pass_and_ode = both
    text = capsys.readouterr().out
    assert seen["ode"] == seen["headline"] and seen["images"] == 4
    for line in (
        "Hutchinson vs exact trace of Hess U at t = 1e-09: z = ",
        "RK4 error at 2 steps (Richardson): ",
        "log-likelihood of 4 test images, dequantized bits/dim",
        "one pass, -(U(x, t_min) + c)",
        "ODE, RK4 2 steps in log t, Hutchinson, 2 rademacher probes, ending in",
        "05's -(U(y(T), T) + c)",
        "N(m, (s^2 + T) I)",
        "by range of t: ",
        "cost, one_pass: 1 forward + 0 backward passes per image",
        "cost, ode     : 12 forward + 24 backward passes per image",
    ):
        assert line in text, line


def test_a_non_finite_ode_stops_with_one_line_naming_the_steps(tmp_path, tiny_npz, monkeypatch):
    m.main(tiny_dual_score_args(tiny_npz, tmp_path))

    def nan_end(y, *args):
        return torch.full((len(y),), math.nan, dtype=torch.float64)

    monkeypatch.setattr(m, "gaussian_log_p_T", nan_end)
    with pytest.raises(SystemExit, match=r"not finite on 4 of 4 images; raise --ode_steps"):
        m.main(tiny_dual_score_args(tiny_npz, tmp_path) + ["--eval_only"] + ODE_ARGS)


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--ode_steps=3"], "--ode_steps=3 is out of range; allowed: even, >= 2"),
        (["--ode_steps=0"], "--ode_steps=0 is out of range"),
        (["--ode_probes=1"], "--ode_probes=1 is out of range; allowed: 0 (exact trace) or >= 2"),
        (["--ode_probe=normal"], "--ode_probe=normal is out of range"),
        (["--ode_images=0"], "--ode_images=0 is out of range"),
        (["--ode_check=5", "--ode_images=4"], "--ode_check=5 is out of range"),
        (["--ode_check=-1"], "--ode_check=-1 is out of range"),
        (["--ckpt=x.pt"], "--ckpt=x.pt is out of range; allowed: only with --eval_only"),
        (["--ckpt=missing.pt", "--eval_only"], "--ckpt=missing.pt: no such file"),
    ],
)
def test_ode_and_ckpt_knobs_are_checked_before_any_work(tmp_path, bad, message):
    """One line before any data is read: the dataset named here does not exist."""
    args = tiny_dual_score_args(tmp_path / "none.npz", tmp_path / "out") + ["--ode"] + bad
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(")", r"\)")):
        m.main(args)


def test_ode_is_refused_for_the_toy():
    with pytest.raises(SystemExit, match="--ode=True is out of range; allowed: with an image"):
        m.main(["--ode"])


def test_eval_only_reads_a_checkpoint_in_place_and_writes_only_to_out_dir(tmp_path, tiny_npz):
    """--ckpt: a checkpoint under any name is evaluated where it lies, with the same result as from
    OUT_DIR, and the figures go to OUT_DIR, never next to the checkpoint."""
    bpd = m.main(tiny_dual_score_args(tiny_npz, tmp_path / "train"))
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "dual_score_tiny.pt").write_bytes((tmp_path / "train" / "tiny.pt").read_bytes())
    args = tiny_dual_score_args(tiny_npz, tmp_path / "eval") + ["--eval_only"]
    assert m.main(args + [f"--ckpt={shipped / 'dual_score_tiny.pt'}"]) == pytest.approx(bpd)
    assert os.listdir(shipped) == ["dual_score_tiny.pt"]
    assert os.listdir(tmp_path / "eval") == ["05_dual_score_tiny.png"]
