"""01_score_matching.py: the conventions (sign of grad E, the Langevin step, the DSM target), the
closed-form mixture, each objective against closed forms and written-out formulas, the numbers in
the printed table, and the start-up checks. Every tolerance here fails when the code has a sign
error, a wrong factor, or uses sigma where sigma^2 belongs."""

import math

import pytest
import torch
from conftest import load_script


@pytest.fixture(scope="module")
def m():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny 2-D networks: one thread is several times faster on a busy CPU
    yield load_script("01_score_matching.py")
    torch.set_num_threads(threads)


MU = torch.tensor([1.0, -2.0])
SIGMA = torch.tensor([[1.0, 0.6], [0.6, 0.8]])  # a correlated 2-D Gaussian, covariance


class Quadratic(torch.nn.Module):
    """E(x) = 0.5 (x - mu)^T P (x - mu), P = L L^T: the energy of a Gaussian with precision P."""

    def __init__(self, mu=None, precision=None):
        super().__init__()
        self.mu = torch.nn.Parameter(torch.zeros(2) if mu is None else mu.clone())
        chol = torch.eye(2) if precision is None else torch.linalg.cholesky(precision)
        self.chol = torch.nn.Parameter(chol.clone())

    def precision(self):
        lower = torch.tril(self.chol)
        return lower @ lower.T

    def forward(self, x):
        d = x - self.mu
        return 0.5 * torch.einsum("bi,ij,bj->b", d, self.precision(), d)


def gaussian(mu, cov):
    return mu[None], cov[None], torch.ones(1)


# ---- conventions ----
def test_grad_energy_is_plus_grad_e_and_langevin_moves_downhill(m):
    A = torch.linalg.inv(SIGMA)
    energy = Quadratic(MU, A)
    x0 = torch.tensor([[4.0, 3.0]])
    grad = m.grad_energy(energy, x0)
    # grad E = +A (x - mu); the score is its negative
    assert torch.allclose(grad, (x0 - MU) @ A, atol=1e-5)
    # the mean of one Langevin step is x - (eta/2) grad E; its spread is sqrt(eta)
    torch.manual_seed(0)
    eta, chains = 0.1, 20000
    x1 = m.langevin(energy, x0.repeat(chains, 1), eta, 1)
    expected = x0 - 0.5 * eta * grad
    assert torch.allclose(x1.mean(0), expected[0], atol=4 * math.sqrt(eta / chains))
    assert torch.allclose(x1.var(0), torch.full((2,), eta), rtol=0.05)
    assert (x1.mean(0) - MU).norm() < (x0[0] - MU).norm()  # moved toward the minimum


def test_one_langevin_step_is_the_written_out_update(m):
    A = torch.linalg.inv(SIGMA)
    x0, eta = torch.tensor([[4.0, 3.0], [-1.0, 0.5], [0.0, 0.0]]), 0.3
    torch.manual_seed(5)
    x1 = m.langevin(Quadratic(MU, A), x0, eta, 1)
    torch.manual_seed(5)
    xi = torch.randn(3, 2)  # the same noise the step drew
    # x <- x - (eta/2) grad E(x) + sqrt(eta) xi, grad E = A (x - mu)
    assert torch.allclose(x1, x0 - 0.5 * eta * (x0 - MU) @ A + math.sqrt(eta) * xi, atol=1e-6)
    torch.manual_seed(5)
    x2 = m.langevin(Quadratic(MU, A), x0, eta, 2)  # two steps: the loop runs n_steps times
    torch.manual_seed(5)
    xi2 = torch.randn(6, 2)[3:]  # the second step's noise follows the first's
    assert torch.allclose(x2, x1 - 0.5 * eta * (x1 - MU) @ A + math.sqrt(eta) * xi2, atol=1e-6)


def test_langevin_samples_the_gaussian_of_a_quadratic_energy(m):
    torch.manual_seed(0)
    energy = Quadratic(MU, torch.linalg.inv(SIGMA))
    x = m.langevin(energy, torch.zeros(4000, 2), 0.02, 400)  # eta * max eigenvalue of A ~ 0.1
    assert torch.allclose(x.mean(0), MU, atol=0.08)
    # a drift without the 1/2, or noise sqrt(2 eta), would give cov SIGMA/2 or 2 SIGMA
    assert torch.allclose(torch.cov(x.T), SIGMA, atol=0.1)


def test_dsm_target_sign_and_power_of_sigma(m):
    x, sigma = torch.zeros(1, 2), 0.5
    x_noisy = torch.tensor([[sigma, 0.0]])  # x~ = x + sigma * eps with eps = (1, 0)
    target = m.dsm_target(x_noisy, x, sigma)
    assert torch.allclose(
        target, torch.tensor([[-1 / sigma, 0.0]])
    )  # -eps / sigma = -2, not -1, -4
    # it is the score of the noise kernel N(x~; x, sigma^2 I)
    x_noisy = torch.tensor([[0.3, -0.7]], requires_grad=True)
    kernel = torch.distributions.MultivariateNormal(x, sigma**2 * torch.eye(2))
    log_kernel = kernel.log_prob(x_noisy).sum()
    (grad,) = torch.autograd.grad(log_kernel, x_noisy)
    assert torch.allclose(m.dsm_target(x_noisy.detach(), x, sigma), grad, atol=1e-5)


# ---- the closed-form toys ----
def test_mixture_log_prob_score_and_noisy_density(m):
    torch.manual_seed(0)
    params = m.make_shape("mixture")
    x = torch.randn(50, 2) * 2
    reference = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(params[2]),
        torch.distributions.MultivariateNormal(params[0], params[1]),
    )
    assert torch.allclose(m.mixture_log_prob(x, *params), reference.log_prob(x), atol=1e-4)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(m.mixture_log_prob(xg, *params).sum(), xg)
    assert torch.allclose(m.mixture_score(x, *params), grad, atol=1e-4)
    # q_sigma(x) = E_eps p(x - sigma eps): Monte Carlo against the closed form with cov + sigma^2 I
    sigma, x0 = 0.3, torch.tensor([[0.2, -0.4]])
    eps = torch.randn(400000, 2)
    mc = m.mixture_log_prob(x0 - sigma * eps, *params).exp().mean().log()
    closed = m.mixture_log_prob(x0, params[0], m.noisy_covs(params[1], sigma), params[2])
    assert abs(mc - closed) < 0.01
    samples = m.sample_mixture(50000, *params)
    assert torch.allclose(samples.mean(0), reference.mean, atol=0.03)


def test_noisy_covs_add_sigma_squared_and_samples_have_the_right_covariance(m):
    covs = torch.stack([SIGMA, 2 * SIGMA])  # (K, 2, 2)
    # cov + sigma^2 I, not cov + sigma I
    assert torch.allclose(m.noisy_covs(covs, 0.5), covs + 0.25 * torch.eye(2), atol=1e-7)
    torch.manual_seed(0)
    x = m.sample_mixture(100000, *gaussian(MU, SIGMA))
    # x = mu + L z with L L^T = cov (not L^T z)
    assert torch.allclose(torch.cov(x.T), SIGMA, atol=0.02)


# ---- the objectives ----
def test_dsm_loss_is_the_written_out_formula(m):
    # one seeded draw, written out: 0.5 sigma^2 ||s(x~) + eps / sigma||^2 with s = -A (x~ - mu)
    A, sigma = torch.linalg.inv(SIGMA), 0.4
    x = torch.tensor([[1.0, 2.0], [-0.5, 0.3], [3.0, -1.0], [0.0, 0.0]])
    torch.manual_seed(7)
    loss = m.dsm_loss(Quadratic(MU, A), x, sigma)
    torch.manual_seed(7)
    eps = torch.randn(4, 2)
    s = -(x + sigma * eps - MU) @ A
    expected = (0.5 * sigma**2 * (s + eps / sigma).pow(2).sum(1)).mean()
    assert torch.allclose(loss, expected, rtol=1e-5)


def test_dsm_loss_has_its_closed_form_expectation(m):
    # E = 0.5 a ||x||^2, so s(x~) = -a x~ and, averaged over eps ~ N(0, I) in D = 2 dimensions,
    # J = 0.5 sigma^2 [a^2 mean ||x||^2 + D (1/sigma - a sigma)^2]: the target's 1/sigma^2 sets it
    a, sigma = 1.5, 0.5
    x = torch.tensor([[1.0, 0.0], [0.0, -2.0]])  # mean ||x||^2 = 2.5
    torch.manual_seed(0)
    estimate = m.dsm_loss(Quadratic(torch.zeros(2), a * torch.eye(2)), x.repeat(50000, 1), sigma)
    expected = 0.5 * sigma**2 * (a**2 * 2.5 + 2 * (1 / sigma - a * sigma) ** 2)  # = 1.0078125
    assert abs(estimate.item() - expected) < 0.02


@pytest.mark.parametrize("variance_reduced", [False, True])
def test_sliced_loss_is_the_written_out_formula(m, variance_reduced):
    # s = -A (x - mu) has Jacobian -A, so each row is -v^T A v + 0.5 ||s||^2 (VR) or 0.5 (v^T s)^2
    A = torch.linalg.inv(SIGMA)
    x = torch.tensor([[1.0, 2.0], [-0.5, 0.3], [3.0, -1.0]])
    torch.manual_seed(3)
    loss = m.sliced_sm_loss(Quadratic(MU, A), x, n_projections=2, variance_reduced=variance_reduced)
    torch.manual_seed(3)
    v = torch.randn(6, 2)  # one projection per (copy, sample): rows are x, x (M = 2 copies)
    s = -(x.repeat(2, 1) - MU) @ A
    second = 0.5 * s.pow(2).sum(1) if variance_reduced else 0.5 * (v * s).sum(1) ** 2
    expected = (-torch.einsum("bi,ij,bj->b", v, A, v) + second).mean()
    assert torch.allclose(loss, expected, rtol=1e-5)


def test_sliced_loss_has_the_exact_loss_as_expectation_on_a_gaussian(m):
    # E_v[-v^T A v] = -tr(A) and E_v[0.5 (v^T s)^2] = 0.5 ||s||^2: both variants average to the
    # exact loss
    A = torch.linalg.inv(SIGMA)
    x = torch.tensor([[1.5, -2.0], [0.5, -1.5]])  # near mu, so 0.5 (v^T s)^2 varies little
    exact = (0.5 * ((x - MU) @ A).pow(2).sum(1).mean() - torch.trace(A)).item()  # Eq. 3, closed
    torch.manual_seed(0)
    for variance_reduced in (False, True):
        estimate = m.sliced_sm_loss(Quadratic(MU, A), x, 40000, variance_reduced).item()
        assert abs(estimate - exact) < 0.05, f"vr={variance_reduced}: {estimate:.3f} vs {exact:.3f}"


def test_exact_sm_loss_matches_its_closed_form_on_a_quadratic(m):
    A = torch.linalg.inv(SIGMA)
    x = torch.randn(64, 2)
    # s = -A (x - mu), tr(grad_x s) = -tr(A): J = mean 0.5 ||A (x - mu)||^2 - tr(A)
    expected = 0.5 * ((x - MU) @ A).pow(2).sum(1).mean() - torch.trace(A)
    assert torch.allclose(m.exact_sm_loss(Quadratic(MU, A), x), expected, atol=1e-5)


@pytest.mark.parametrize("variance_reduced", [False, True])
def test_sliced_loss_equals_exact_loss_in_expectation(m, variance_reduced):
    torch.manual_seed(0)
    net = m.EnergyMLP(32)  # a fixed random network, its weights scaled up so that its Hessian is
    with torch.no_grad():  # far from zero (a default init gives an almost flat energy)
        for p in net.parameters():
            p.mul_(2.0)
    x = torch.randn(64, 2)
    exact = m.exact_sm_loss(net, x).item()
    estimates = [m.sliced_sm_loss(net, x, 100, variance_reduced).item() for _ in range(40)]
    estimates = torch.tensor(estimates)
    se = estimates.std().item() / math.sqrt(len(estimates))
    mean = estimates.mean().item()
    assert abs(mean - exact) < 4 * se, f"sliced {mean:.4f} +- {se:.4f}, exact {exact:.4f}"
    # the test has power: the trace term is many standard errors from zero, so a sign error fails
    trace = exact - 0.5 * m.grad_energy(net, x).pow(2).sum(1).mean().item()  # mean tr(grad_x s)
    assert abs(trace) > 20 * se


def fit(m, model, method, data, steps, lr, batch=512, sigma=0.5):
    torch.manual_seed(1)
    return m.train_energy(
        model, method, data, steps, batch, lr, sigma=sigma, n_projections=1, sliced_vr=True
    )


@pytest.mark.parametrize("method", ["exact", "dsm", "sliced"])
def test_each_objective_recovers_a_gaussian_score(m, method):
    torch.manual_seed(0)
    sigma = 0.5
    params = gaussian(MU, SIGMA)
    data, test = m.sample_mixture(20000, *params), m.sample_mixture(2000, *params)
    model = fit(m, Quadratic(), method, data, 300, 0.05, sigma=sigma)
    # DSM learns the noised density: the same Gaussian with covariance SIGMA + sigma^2 I
    target = gaussian(MU, m.noisy_covs(SIGMA[None], sigma)[0]) if method == "dsm" else params
    err = m.relative_score_error(-m.grad_energy(model, test), m.mixture_score(test, *target))
    assert err < 0.05, f"{method}: relative score error {err:.3f}"


@pytest.mark.parametrize("method", ["exact", "dsm", "sliced"])
def test_each_objective_recovers_a_mixture_score(m, method):
    torch.manual_seed(0)
    sigma = 0.5
    params = m.make_shape("mixture")
    data, test = m.sample_mixture(20000, *params), m.sample_mixture(2000, *params)
    torch.manual_seed(0)
    model = fit(m, m.EnergyMLP(64), method, data, 400, 5e-3, batch=256, sigma=sigma)
    s = -m.grad_energy(model, test)  # s = -grad E
    err_p = m.relative_score_error(s, m.mixture_score(test, *params))
    noisy = (params[0], m.noisy_covs(params[1], sigma), params[2])
    err_q = m.relative_score_error(s, m.mixture_score(test, *noisy))
    message = f"{method}: error vs p {err_p:.3f}, vs q_sigma {err_q:.3f}"
    if method == "dsm":  # DSM matches q_sigma, and is visibly biased against p
        assert err_q < 0.2 and err_p > 2 * err_q, message
    else:
        assert err_p < 0.25 and err_q > 2 * err_p, message


# ---- the numbers in the table ----
def test_relative_score_error_by_hand(m):
    s_true = torch.tensor([[3.0, 4.0], [0.0, 5.0]])  # mean ||s_true||^2 = 25
    s_model = s_true + torch.tensor([[1.0, 0.0], [0.0, -2.0]])  # mean ||difference||^2 = 2.5
    assert m.relative_score_error(s_model, s_true) == pytest.approx(math.sqrt(0.1), rel=1e-6)
    assert m.relative_score_error(torch.zeros(2, 2), s_true) == pytest.approx(1.0)  # s = 0 scores 1
    assert m.relative_score_error(-s_true, s_true) == pytest.approx(2.0)  # a sign error scores 2


def test_energy_misfit_by_hand(m):
    log_p = torch.tensor([-1.0, -2.5, -4.0, -0.3])
    # the constant log Z is free
    assert m.energy_misfit(-log_p + 7.0, log_p) == pytest.approx(0.0, abs=1e-6)
    bump = torch.tensor([1.0, -1.0, 1.0, -1.0])  # sample std sqrt(4/3)
    misfit = m.energy_misfit(-log_p + 0.5 * bump, log_p)
    assert misfit == pytest.approx(0.5 * math.sqrt(4 / 3), rel=1e-5)
    # E = +log p has the wrong sign
    assert m.energy_misfit(log_p, log_p) == pytest.approx((2 * log_p).std().item(), rel=1e-6)


def test_evaluate_is_zero_exactly_where_the_energy_is_right(m):
    torch.manual_seed(0)
    params = m.make_shape("mixture")
    noisy = (params[0], m.noisy_covs(params[1], 0.3), params[2])
    test = m.sample_mixture(500, *params)

    def energy_p(x):  # -log p + 3: right up to its constant
        return -m.mixture_log_prob(x, *params) + 3.0

    def energy_q(x):
        return -m.mixture_log_prob(x, *noisy)

    row = m.evaluate(energy_p, test, params, noisy)
    assert row["err_p"] < 1e-5 and row["misfit_p"] < 1e-5
    s_p, s_q = m.mixture_score(test, *params), m.mixture_score(test, *noisy)
    assert row["err_q"] == pytest.approx(m.relative_score_error(s_p, s_q), rel=1e-4)
    assert row["err_q"] > 0.3
    log_p, log_q = m.mixture_log_prob(test, *params), m.mixture_log_prob(test, *noisy)
    assert row["misfit_q"] == pytest.approx((log_q - log_p).std().item(), rel=1e-4)
    assert row["misfit_q"] > 0.1
    row = m.evaluate(energy_q, test, params, noisy)
    assert row["err_q"] < 1e-5 and row["misfit_q"] < 1e-5
    assert row["err_p"] > 0.3 and row["misfit_p"] > 0.1


# ---- the script ----
SMOKE = ["--steps=30", "--n_train=500", "--n_test=200", "--hidden=16", "--langevin_steps=5"]
SMOKE += ["--n_samples=50", "--log_every=30"]
# one toy, one objective, a few steps: for the checks of the script's behaviour
TINY = ["--shapes=ring", "--methods=dsm", "--steps=3", "--n_train=50", "--n_test=20"]
TINY += ["--hidden=4", "--langevin_steps=2", "--n_samples=5", "--log_every=0"]


def table_rows(out, name):
    """The rows of toy name's printed table, each split at '|'."""
    table = out[out.index(f"\n{name}: ") + 1 :].split("\n\n")[0].splitlines()
    names = ("true E", "exact", "dsm", "sliced")
    return [line.split("|") for line in table if line.split("|")[0].strip() in names]


def test_main_smoke_run_writes_the_figure_and_a_true_energy_row_we_can_recompute(
    m, tmp_path, capsys
):
    results = m.main([f"--out_dir={tmp_path}"] + SMOKE)
    assert (tmp_path / "score_matching.png").stat().st_size > 10000
    out = capsys.readouterr().out
    for word in ("mixture:", "ring:", "exact", "dsm", "sliced", "score err vs p"):
        assert word in out
    assert set(results) == {"mixture", "ring"}
    assert set(results["ring"]["samples"]) == {"exact", "dsm", "sliced"}
    # the 'true E' row, recomputed from the same seeds: main wires p, q_sigma and the samples right
    for name in ("mixture", "ring"):
        torch.manual_seed(0)  # main seeds with SEED, then draws data, test and Langevin starts
        params = m.make_shape(name)
        noisy = (params[0], m.noisy_covs(params[1], 0.3), params[2])
        m.sample_mixture(500, *params)
        test = m.sample_mixture(200, *params)
        start = (torch.rand(50, 2) * 2 - 1) * 4.0
        torch.manual_seed(1)
        samples = m.langevin(m.exact_energy(params), start, 0.01, 5)
        s_p, s_q = m.mixture_score(test, *params), m.mixture_score(test, *noisy)
        log_p, log_q = m.mixture_log_prob(test, *params), m.mixture_log_prob(test, *noisy)
        expected = [
            0.0,
            m.relative_score_error(s_p, s_q),
            0.0,
            (log_q - log_p).std().item(),
            m.mixture_log_prob(samples, *params).mean().item(),
        ]
        rows = table_rows(out, name)
        assert [r[0].strip() for r in rows] == ["true E", "exact", "dsm", "sliced"]
        printed = [float(c) for c in rows[0][1:]]
        assert printed == pytest.approx(expected, abs=1.5e-3), (name, rows[0], expected)
        assert printed[1] > 0.3 and printed[3] > 0.1  # q_sigma differs from p: the test has power
        # a warning under the table names exactly the methods whose errors against p and q_sigma
        # are both above 0.9 (s = 0 scores 1)
        bad = [r[0].strip() for r in rows[1:] if min(float(r[1]), float(r[2])) > 0.9]
        table = out[out.index(f"\n{name}: ") :]
        warned = [li.split(" (")[0] for li in table.splitlines() if li.startswith("warning: ")]
        warned = [li for li in warned if li.startswith(f"warning: {name}: ")]
        if bad:
            assert warned == [f"warning: {name}: {', '.join(bad)} learned no usable score"]
        else:
            assert warned == []


def test_a_diverged_run_is_named_under_its_table(m, tmp_path, capsys, monkeypatch):
    argv = [f"--out_dir={tmp_path}", "--lr=1", "--steps=50", "--n_train=1000", "--n_test=200"]
    argv += ["--shapes=mixture", "--methods=dsm", "--langevin_steps=5", "--n_samples=50"]
    m.main(argv)
    out = capsys.readouterr().out
    assert "warning: mixture: dsm learned no usable score" in out
    assert "try a smaller --lr (now 1.0)" in out
    # the rule: warn when the errors against p AND against q_sigma are both above 0.9
    monkeypatch.setattr(m, "plot", lambda *args: None)
    cases = [(0.95, 0.5, False), (0.5, 0.95, False), (0.95, 0.91, True), (0.85, 0.89, False)]
    for err_p, err_q, warned in cases:
        row = {"err_p": err_p, "err_q": err_q, "misfit_p": 0.0, "misfit_q": 0.0}
        monkeypatch.setattr(m, "evaluate", lambda *args: dict(row))
        m.main([f"--out_dir={tmp_path}"] + TINY)
        out = capsys.readouterr().out
        assert ("warning: ring: dsm learned no usable score" in out) == warned, (err_p, err_q)


def test_the_printed_output_depends_only_on_the_seed(m, tmp_path, capsys, monkeypatch):
    # no speeds or wall times on stdout, so a table can be pinned by its seed
    monkeypatch.setattr(m, "plot", lambda *args: None)
    outputs = []
    for seed in (0, 0, 1):
        m.main([f"--out_dir={tmp_path}", f"--seed={seed}"] + TINY + ["--log_every=1"])
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[2].replace("seed=1", "seed=0")  # the seed does move the numbers
    assert "step 3 | method dsm | loss " in outputs[0]


BAD_KNOBS = [
    "--seed=-1",
    "--seed=1e30",
    "--threads=0",
    "--threads=257",
    "--n_train=0",
    "--n_test=1",
    "--hidden=0",
    "--steps=0",
    "--steps=-5",
    "--batch=0",
    "--n_projections=0",
    "--langevin_steps=0",
    "--n_samples=0",
    "--log_every=-1",
    "--lr=-1",
    "--lr=0",
    "--lr=nan",
    "--lr=inf",
    "--dsm_sigma=0",
    "--dsm_sigma=0.0009",
    "--dsm_sigma=10.5",
    "--langevin_step=0",
    "--box=-4",
    "--box=1000.5",
    "--shapes=moons",
    "--shapes=",
    "--methods=exact,ism",
    "--methods=exact,exact",
    "--device=tpu",
]


def refuse_work(m, monkeypatch):
    """Any drawing or training would raise a TypeError, not the SystemExit a check raises."""
    monkeypatch.setattr(m, "sample_mixture", None)
    monkeypatch.setattr(m, "train_energy", None)
    monkeypatch.setattr(m, "EnergyMLP", None)


@pytest.mark.parametrize("option", BAD_KNOBS)
def test_every_bad_knob_stops_with_one_line_before_any_work(m, option, tmp_path, monkeypatch):
    refuse_work(m, monkeypatch)
    with pytest.raises(SystemExit) as info:
        m.main([option, f"--out_dir={tmp_path / 'out'}"])
    message = str(info.value)
    assert message.startswith(f"error: {option}") and "\n" not in message, message
    # parse_config refuses non-numbers, nan, inf and huge ints; pick_device lists its own choices
    assert "allowed" in message or "not a valid" in message or option == "--device=tpu", message
    assert not (tmp_path / "out").exists()  # refused before the output folder is made


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--stepz=3"], ["unknown option --stepz=3", "--steps", "--dsm_sigma"]),
        (["--steps=many"], ["--steps", "int", "many"]),
        (["--dsm_sigma=-1"], ["--dsm_sigma", ">= 0.001", "<= 10"]),
        (["--threads=300"], ["--threads", "from 1 to 256"]),
        (["--shapes=moons"], ["moons", "mixture", "ring"]),
        (["--methods=exact,ism"], ["ism", "exact", "dsm", "sliced"]),
        (["--methods=dsm,dsm"], ["'dsm' is given twice"]),
    ],
)
def test_bad_options_name_the_choices(m, argv, words):
    with pytest.raises(SystemExit) as info:
        m.main(argv)
    message = str(info.value)
    assert message.startswith("error:") and "\n" not in message
    for w in words:
        assert w in message


@pytest.mark.parametrize(
    "option, named",
    [
        ("--n_train=1e12", "--n_train=1000000000000"),
        ("--n_test=1e12", "--n_test=1000000000000"),
        ("--n_samples=1e12", "--n_samples=1000000000000"),
        ("--batch=1e12", "--batch=1000000000000"),
        ("--n_projections=1e12", "--batch=256 x --n_projections=1000000000000"),
        ("--hidden=1e9", "--hidden=1000000000"),
    ],
)
def test_a_size_that_cannot_fit_in_memory_stops_with_one_line_before_allocating(
    m, option, named, tmp_path, monkeypatch
):
    refuse_work(m, monkeypatch)
    with pytest.raises(SystemExit) as info:
        m.main([option, f"--out_dir={tmp_path / 'out'}"])
    message = str(info.value)
    assert message.startswith(f"error: {named}: the run needs about ") and "\n" not in message
    assert "GiB of memory" in message, message
    smaller = " or ".join(part.split("=")[0] for part in named.split(" x "))
    assert message.endswith(f"allowed: a smaller {smaller}"), message
    assert not (tmp_path / "out").exists()


def test_the_memory_estimate_is_compared_with_the_memory_available(m, tmp_path, monkeypatch):
    assert m.available_memory(torch.device("cpu")) > 2**20  # this machine reports its memory
    refuse_work(m, monkeypatch)
    monkeypatch.setattr(m, "available_memory", lambda device: 2**20)  # 1 MiB left
    with pytest.raises(SystemExit) as info:
        m.main([f"--out_dir={tmp_path / 'out'}"])  # the default run needs tens of MiB
    assert "more than the 0.000977 GiB available on cpu" in str(info.value)
    # where the memory is there, the default run is not refused
    monkeypatch.setattr(m, "available_memory", lambda device: 2**30)
    cfg = m.parse_config(vars(m), [])
    m.check_memory(cfg, ["mixture", "ring"], ["exact", "dsm", "sliced"], torch.device("cpu"))


def test_a_huge_lr_stops_with_one_line_naming_the_lr(m, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        m.main([f"--out_dir={tmp_path}", "--lr=1e6"] + TINY)
    message = str(info.value)
    assert "\n" not in message and message.endswith("try a smaller --lr (now 1000000.0)"), message
    assert "nan" not in capsys.readouterr().out.split("\n", 1)[1]  # no row of nan was printed


def test_a_non_finite_evaluation_stops_naming_the_lr(m, tmp_path, capsys, monkeypatch):
    row = {"err_p": math.nan, "err_q": 0.5, "misfit_p": 0.1, "misfit_q": 0.1}
    monkeypatch.setattr(m, "evaluate", lambda *args: dict(row))
    with pytest.raises(SystemExit) as info:
        m.main([f"--out_dir={tmp_path}"] + TINY)
    message = str(info.value)
    assert message.startswith("error: ring: the energy learned by ") and "\n" not in message
    assert message.endswith("try a smaller --lr (now 0.005)"), message
    assert "nan" not in capsys.readouterr().out.split("\n", 1)[1]


def test_diverged_langevin_chains_stop_naming_the_step_size(m, tmp_path, capsys):
    # a step of 1e15 throws the chains of the true energy past every float32 within two steps
    with pytest.raises(SystemExit) as info:
        m.main([f"--out_dir={tmp_path}", "--langevin_step=1e15"] + TINY)
    message = str(info.value)
    assert message.startswith("error: ring: Langevin chains on the true E energy diverged")
    assert message.endswith(f"try a smaller --langevin_step (now {1e15})") and "\n" not in message
    out = capsys.readouterr().out.split("\n", 1)[1]
    assert "inf" not in out and "nan" not in out  # no row was printed


@pytest.mark.parametrize(
    "under, why",
    [("a_file", "is a file, not a folder"), ("a_file/sub/deeper", "is not a writable folder")],
)
def test_an_out_dir_that_cannot_be_made_stops_with_one_line_and_writes_nothing(
    m, tmp_path, capsys, monkeypatch, under, why
):
    # a folder under a regular file cannot be created by anyone, root included
    (tmp_path / "a_file").write_text("not a folder")
    refuse_work(m, monkeypatch)
    folder = tmp_path / under
    with pytest.raises(SystemExit) as info:
        m.main([f"--out_dir={folder}"] + SMOKE)
    message = str(info.value)
    assert message.startswith(f"error: --out_dir={folder} {why}") and "\n" not in message
    assert message.endswith("allowed: a folder you may create and write to"), message
    assert [p.name for p in tmp_path.rglob("*")] == ["a_file"]  # nothing else was written
    assert (tmp_path / "a_file").read_text() == "not a folder"
    out = capsys.readouterr().out
    assert out.startswith("config: ") and out.count("\n") == 1  # the config line, nothing else


def test_a_nan_loss_stops_training_with_the_cause(m):
    net = m.EnergyMLP(8)
    with torch.no_grad():
        net.net[0].weight[0, 0] = float("nan")
    torch.manual_seed(0)
    with pytest.raises(SystemExit, match=r"error: the exact loss is nan at step 1; try a smaller"):
        m.train_energy(net, "exact", torch.randn(32, 2), steps=5, batch=8, lr=1e-3)
