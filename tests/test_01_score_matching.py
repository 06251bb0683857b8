"""01_score_matching.py: the conventions (sign of the score, the Langevin step, the DSM target),
the closed-form mixture, and each objective against analytic scores. Every tolerance here was
checked to fail when the code has a sign error or uses sigma where sigma^2 belongs."""
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
def test_score_is_minus_grad_energy_and_langevin_moves_downhill(m):
    A = torch.linalg.inv(SIGMA)
    energy = Quadratic(MU, A)
    x0 = torch.tensor([[4.0, 3.0]])
    s = m.score(energy, x0)
    assert torch.allclose(s, -(x0 - MU) @ A, atol=1e-5)  # s = -grad E = -A (x - mu)
    # the mean of one Langevin step is x - (eta/2) grad E = x + (eta/2) s; its spread is sqrt(eta)
    torch.manual_seed(0)
    eta, chains = 0.1, 20000
    x1 = m.langevin(energy, x0.repeat(chains, 1), eta, 1)
    expected = x0 + 0.5 * eta * s
    assert torch.allclose(x1.mean(0), expected[0], atol=4 * math.sqrt(eta / chains))
    assert torch.allclose(x1.var(0), torch.full((2,), eta), rtol=0.05)
    assert (x1.mean(0) - MU).norm() < (x0[0] - MU).norm()  # moved toward the minimum


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
    assert torch.allclose(target, torch.tensor([[-1 / sigma, 0.0]]))  # -eps / sigma = -2, not -1 or -4
    # it is the score of the noise kernel N(x~; x, sigma^2 I)
    x_noisy = torch.tensor([[0.3, -0.7]], requires_grad=True)
    log_kernel = torch.distributions.MultivariateNormal(x, sigma**2 * torch.eye(2)).log_prob(x_noisy).sum()
    (grad,) = torch.autograd.grad(log_kernel, x_noisy)
    assert torch.allclose(m.dsm_target(x_noisy.detach(), x, sigma), grad, atol=1e-5)


# ---- the closed-form toys ----
def test_mixture_log_prob_score_and_noisy_density(m):
    torch.manual_seed(0)
    params = m.make_shape("mixture")
    x = torch.randn(50, 2) * 2
    reference = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(params[2]), torch.distributions.MultivariateNormal(params[0], params[1]))
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


# ---- the objectives ----
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
    estimates = torch.tensor([m.sliced_sm_loss(net, x, 100, variance_reduced).item() for _ in range(40)])
    se = estimates.std().item() / math.sqrt(len(estimates))
    assert abs(estimates.mean().item() - exact) < 4 * se, f"sliced {estimates.mean():.4f} +- {se:.4f}, exact {exact:.4f}"
    # the test has power: the trace term is many standard errors from zero, so a sign error fails
    trace = exact - 0.5 * m.score(net, x).pow(2).sum(1).mean().item()  # mean tr(grad_x s)
    assert abs(trace) > 20 * se


def fit(m, model, method, data, steps, lr, batch=512, sigma=0.5):
    torch.manual_seed(1)
    return m.train_energy(model, method, data, steps, batch, lr, sigma=sigma, n_projections=1, sliced_vr=True)


@pytest.mark.parametrize("method", ["exact", "dsm", "sliced"])
def test_each_objective_recovers_a_gaussian_score(m, method):
    torch.manual_seed(0)
    sigma = 0.5
    params = gaussian(MU, SIGMA)
    data, test = m.sample_mixture(20000, *params), m.sample_mixture(2000, *params)
    model = fit(m, Quadratic(), method, data, 300, 0.05, sigma=sigma)
    # DSM learns the noised density: the same Gaussian with covariance SIGMA + sigma^2 I
    target = gaussian(MU, m.noisy_covs(SIGMA[None], sigma)[0]) if method == "dsm" else params
    err = m.relative_score_error(m.score(model, test), m.mixture_score(test, *target))
    assert err < 0.05, f"{method}: relative score error {err:.3f}"


@pytest.mark.parametrize("method", ["exact", "dsm", "sliced"])
def test_each_objective_recovers_a_mixture_score(m, method):
    torch.manual_seed(0)
    sigma = 0.5
    params = m.make_shape("mixture")
    data, test = m.sample_mixture(20000, *params), m.sample_mixture(2000, *params)
    torch.manual_seed(0)
    model = fit(m, m.EnergyMLP(64), method, data, 400, 5e-3, batch=256, sigma=sigma)
    s = m.score(model, test)
    err_p = m.relative_score_error(s, m.mixture_score(test, *params))
    err_q = m.relative_score_error(s, m.mixture_score(test, params[0], m.noisy_covs(params[1], sigma), params[2]))
    if method == "dsm":  # DSM matches q_sigma, and is visibly biased against p
        assert err_q < 0.2 and err_p > 2 * err_q, f"dsm: error vs q_sigma {err_q:.3f}, vs p {err_p:.3f}"
    else:
        assert err_p < 0.25 and err_q > 2 * err_p, f"{method}: error vs p {err_p:.3f}, vs q_sigma {err_q:.3f}"


# ---- the script ----
def test_main_smoke_run_writes_the_figure(m, tmp_path, capsys):
    results = m.main([f"--out_dir={tmp_path}", "--steps=30", "--n_train=500", "--n_test=200", "--hidden=16",
                      "--langevin_steps=5", "--n_samples=50", "--log_every=30"])
    assert (tmp_path / "score_matching.png").stat().st_size > 10000
    out = capsys.readouterr().out
    for word in ("mixture:", "ring:", "exact", "dsm", "sliced", "score err vs p"):
        assert word in out
    assert set(results) == {"mixture", "ring"} and set(results["ring"]["samples"]) == {"exact", "dsm", "sliced"}


@pytest.mark.parametrize("argv, words", [
    (["--stepz=3"], ["unrecognized arguments: --stepz=3", "--steps", "--dsm_sigma"]),
    (["--steps=many"], ["--steps", "int", "many"]),
    (["--dsm_sigma=-1"], ["--dsm_sigma", "positive"]),
    (["--shapes=moons"], ["moons", "mixture", "ring"]),
    (["--methods=exact,ism"], ["ism", "exact", "dsm", "sliced"]),
])
def test_bad_options_stop_with_one_line(m, argv, words):
    with pytest.raises(SystemExit) as info:
        m.main(argv)
    message = str(info.value)
    assert message.startswith("error:") and "\n" not in message
    for w in words:
        assert w in message
