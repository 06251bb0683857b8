"""04: the Langevin step rule, the schedule and the final denoise against closed forms; annealing
against plain Langevin on an exact Gaussian mixture; AIS and its HMC move against energies with a
known log Z; the bits/dim conventions and baselines; the checks that run before any work; and tiny
end-to-end runs with checkpoints written by 03's own code."""

import math
import types
from functools import partial

import numpy as np
import pytest
import torch

FILE = "04_langevin_sampling.py"


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: on a busy machine a second thread only adds hand-off waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gaussian_energy(mean, precision):
    """E(x) = 0.5 (x - m)^T P (x - m): exp(-E/T) is N(m, T P^-1)."""
    return partial(lambda x: 0.5 * (((x - mean) @ precision) * (x - mean)).sum(1))


class GaussianEnergyNet(torch.nn.Module):
    """A stand-in for 03's EnergyNet with a closed-form energy ||x - m||^2 / (2 v) on images."""

    def __init__(self, mean=0.3, var=0.04):
        super().__init__()
        self.mean, self.var = torch.nn.Parameter(torch.tensor(mean)), var

    def forward(self, x):
        return ((x - self.mean) ** 2).flatten(1).sum(1) / (2 * self.var)


def sampler_cfg(**kw):
    base = dict(
        N_SAMPLES=3,
        BATCH=2,
        N_HOT=1,
        N_ANNEAL=0,
        N_COOL=0,
        T_MAX=4.0,
        STEP_SIZE=0.02,
        DENOISE=True,
        INIT_STD=1.0,
    )
    return types.SimpleNamespace(**{**base, **kw})


# ---- the MDSM sampler ----
def test_single_step_matches_the_spec(script):
    m = script(FILE)
    mean, precision = torch.tensor([0.3, -0.2]), torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    energy = gaussian_energy(mean, precision)
    x = torch.tensor([[1.0, 2.0], [-0.5, 0.25]])
    e, g = m.energy_and_grad(energy, x)
    assert torch.allclose(g, (x - mean) @ precision) and torch.allclose(e, energy(x))
    assert torch.allclose(m.grad_energy(energy, x), g)
    xg = x.clone().requires_grad_(True)  # create_graph: the gradient itself can be differentiated
    assert m.grad_energy(energy, xg, create_graph=True).sum().requires_grad
    T, s, xi = 9.0, 0.02, torch.tensor([[0.5, -1.0], [2.0, 0.1]])
    # x <- x - (sigma_s^2 / 2) grad E + sqrt(T) sigma_s xi, grad E = P (x - m) written out by hand
    expected = x - 0.5 * s**2 * (x - mean) @ precision + math.sqrt(T) * s * xi
    assert torch.allclose(m.langevin_step(x, g, T, s, xi), expected, atol=1e-7)
    torch.manual_seed(1)
    out = m.annealed_langevin(energy, x, torch.tensor([T]), step_size=s)
    torch.manual_seed(1)
    xi = torch.randn_like(x)  # the one random draw of the step
    assert torch.allclose(
        out, x - 0.5 * s**2 * (x - mean) @ precision + math.sqrt(T) * s * xi, atol=1e-7
    )
    assert torch.allclose(m.tweedie_denoise(energy, x, 0.1), x - 0.01 * (x - mean) @ precision)


def test_langevin_on_a_gaussian_reaches_its_mean_and_covariance(script):
    m = script(FILE)
    torch.manual_seed(0)
    mean, cov = torch.tensor([0.5, -1.0]), torch.tensor([[0.25, 0.1], [0.1, 0.5]])
    precision = torch.linalg.inv(cov)
    T, s = 4.0, 0.1  # exp(-E/T) = N(m, T cov); Langevin step h = s^2 T / 2 = 0.02
    temps = torch.full((1500,), T)
    x = m.annealed_langevin(
        gaussian_energy(mean, precision), torch.zeros(4000, 2), temps, step_size=s
    )
    # The discrete chain x' = x - a P (x - m) + b z (a = s^2/2, b = sqrt(T) s) has, per eigenvalue lam
    # of P, stationary variance b^2 / (a lam (2 - a lam)) = T / lam / (1 - s^2 lam / 4) -> T / lam.
    lam, v = torch.linalg.eigh(precision)
    target = (v * (T / lam / (1 - s**2 * lam / 4))) @ v.T  # 1.2% above T * cov here
    assert torch.allclose(x.mean(0), mean, atol=0.08)
    assert torch.allclose(torch.cov(x.T), target, atol=0.07 * target.diagonal().max()), (
        torch.cov(x.T),
        target,
    )


def test_schedule_segment_by_segment(script):
    m = script(FILE)
    t = m.mdsm_schedule()
    assert t.shape == (2700,) and t.dtype == torch.float32
    assert torch.all(t[:500] == 100)  # hot plateau
    anneal = t[500:2500].double()
    assert anneal[0] == 100 and torch.all(anneal[1:] < anneal[:-1])
    k = torch.arange(2000, dtype=torch.float64)
    assert torch.allclose(anneal, 100 * torch.exp(-k * math.log(100) / 2000), rtol=1e-6)
    assert abs(anneal[-1].item() - 100 ** (1 / 2000)) < 1e-5  # one step short of T = 1
    assert torch.allclose(t[2500:], torch.linspace(1, 0, 200)) and t[2500] == 1 and t[-1] == 0
    t = m.mdsm_schedule(3, 4, 3, 16.0)  # a short one, by hand: 16 16 16 | 16 8 4 2 | 1 0.5 0
    assert torch.allclose(t, torch.tensor([16, 16, 16, 16, 8, 4, 2, 1, 0.5, 0.0]))


def test_sampler_log_projects_the_time_of_50000_samples(script, capsys):
    m = script(FILE)
    m.generate(GaussianEnergyNet(mean=0.3, var=0.04), (1, 2, 2), 0.1, sampler_cfg())
    lines = [line for line in capsys.readouterr().out.splitlines() if "samples/s" in line]
    assert [line.split(" |")[0] for line in lines] == ["step 2", "step 3"]  # one line per chunk
    for line in lines:
        parts = [part.strip() for part in line.split("|")[1:]]  # 'key value', or 'value unit/s'
        fields = dict(
            p.split(" ", 1)[::-1] if p.endswith("/s") else p.rsplit(" ", 1) for p in parts
        )
        assert float(fields["h per 50k"]) == pytest.approx(
            50_000 / float(fields["samples/s"]) / 3600, rel=1e-3
        )


def test_final_denoise_switch_of_the_checkpoint_sampler(script):
    """generate() with a closed-form energy: one Langevin step at T = 4, then Tweedie at sigma0."""
    m = script(FILE)
    net, sigma0, s = GaussianEnergyNet(mean=0.3, var=0.04), 0.15, 0.02

    def grad(x):  # grad E of the stand-in
        return (x - 0.3) / 0.04

    torch.manual_seed(0)
    expected = []
    for b in (2, 1):  # two chunks: init 0.5 + N(0, I), then the step's noise
        x = 0.5 + torch.randn(b, 1, 2, 2)
        x = x - 0.5 * s**2 * grad(x) + 2.0 * s * torch.randn_like(x)
        expected.append(x)
    expected = torch.cat(expected)
    for denoise in (True, False):
        torch.manual_seed(0)
        out = m.generate(net, (1, 2, 2), sigma0, sampler_cfg(STEP_SIZE=s, DENOISE=denoise))
        # Tweedie: x - sigma0^2 grad E(x) = x - (0.15^2 / 0.04) (x - 0.3), a 56% shrink to the mean
        want = expected - sigma0**2 * grad(expected) if denoise else expected
        assert torch.allclose(out, want, atol=1e-6), denoise


def test_init_std_zero_starts_the_chains_at_the_first_temperatures_noise_level(script):
    """INIT_STD = 0: x0 = 0.5 + sigma0 sqrt(T_MAX) z; the default 1 is the authors' 0.5 + z."""
    m = script(FILE)
    net, sigma0, s = GaussianEnergyNet(mean=0.3, var=0.04), 0.15, 0.02
    for init_std, std in ((1.0, 1.0), (0.0, 0.15 * 2.0), (0.25, 0.25)):  # T_MAX = 4
        torch.manual_seed(0)
        x = 0.5 + std * torch.randn(3, 1, 2, 2)
        # one step at T = 4, its noise drawn after the init
        want = x - 0.5 * s**2 * (x - 0.3) / 0.04 + 2.0 * s * torch.randn_like(x)
        cfg = sampler_cfg(STEP_SIZE=s, DENOISE=False, BATCH=3, INIT_STD=init_std)
        torch.manual_seed(0)
        out = m.generate(net, (1, 2, 2), sigma0, cfg)
        assert torch.allclose(out, want, atol=1e-6), init_std


def test_diverging_chains_stop_with_one_line_instead_of_returning_nan(script):
    """Step 1 on a Gaussian of variance 0.04 multiplies x - m by 1 - 12.5 per step: it overflows."""
    m = script(FILE)
    torch.manual_seed(0)
    with pytest.raises(SystemExit, match=r"^error: the Langevin chains diverged .*--step_size"):
        m.generate(GaussianEnergyNet(), (1, 2, 2), 0.1, sampler_cfg(STEP_SIZE=1.0, N_HOT=100))


# ---- lessons 1 and 2: the 2-D mixture ----
def test_noisy_mixture_energy_is_the_convolved_density(script):
    """exp(-E_sigma) must equal p * N(0, sigma^2 I), computed here by quadrature on a grid."""
    m = script(FILE)
    std, h = 0.05, 0.004
    axis = torch.arange(-0.4, 1.4, h, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)  # (G, 2)
    p = torch.exp(-m.toy_energy(grid.float(), 0.0, std)).double()  # clean density on the grid
    assert abs(p.sum().item() * h * h - 1) < 1e-3
    y = torch.tensor([[0.2, 0.2], [0.5, 0.5], [0.8, 0.7], [0.1, 0.9]], dtype=torch.float64)
    for sigma in (0.1, 0.3):
        kernel = torch.exp(-(torch.cdist(y, grid) ** 2) / (2 * sigma**2)) / (2 * math.pi * sigma**2)
        q = (kernel * p).sum(1) * h * h  # (4,)
        assert torch.allclose(
            torch.exp(-m.toy_energy(y.float(), sigma, std)).double(), q, rtol=2e-3
        ), sigma


def test_annealing_recovers_mode_weights_that_plain_langevin_misses(script, tmp_path, capsys):
    m = script(FILE)
    torch.manual_seed(0)
    cfg = types.SimpleNamespace(
        TOY_STD=0.05, TOY_SAMPLES=1000, TOY_SIGMA0=0.1, PLAIN_STEPS=400, PLAIN_STEP=1e-4, N_HOT=500,
        N_ANNEAL=2000, N_COOL=200, T_MAX=100.0, STEP_SIZE=0.02, OUT_DIR=str(tmp_path),
        **vars(ais_cfg(AIS_CHAINS=100, AIS_STAGES=300, REF_STD=1.0, LEAPFROG=1)),
    )  # fmt: skip
    m.toy_lesson(cfg)
    text = capsys.readouterr().out
    rows = {
        line.split("|")[0].strip(): line.split("|")
        for line in text.splitlines()
        if line.count("|") == 3 and "TV error" not in line
    }
    tv = {name: float(row[2]) for name, row in rows.items()}
    assert tv["MDSM annealed + final denoise"] < 0.05, tv  # sampling error alone: ~0.01-0.02
    assert tv["plain Langevin"] > 0.15, tv  # keeps the basin fractions of its starting points
    assert abs(float(rows["plain Langevin"][3]) - 0.05) < 0.005  # ... with the right spread
    # Tweedie after the chain shrinks within-mode deviations by std^2/(std^2 + sigma0^2) = 0.2
    ratio = float(rows["MDSM annealed + final denoise"][3]) / float(
        rows["MDSM chain, before the denoise"][3]
    )
    assert abs(ratio - 0.2) < 0.02, ratio
    assert (tmp_path / "04_langevin_sampling.png").stat().st_size > 0
    # lesson 2: AIS for log Z of the normalized mixture p (exactly 0), though no chain crosses
    ais_line = next(line for line in text.splitlines() if line.startswith("AIS for log Z of p"))
    forward = float(ais_line.split("forward ")[1].split()[0])
    reverse = float(ais_line.split("reverse ")[1].split()[0])
    assert abs(forward) < 0.3 and abs(reverse) < 0.3, ais_line


def test_a_diverging_plain_langevin_chain_stops_with_one_line(script, tmp_path, capsys):
    """h = 1 on modes of variance 0.05^2 multiplies deviations by 1 - 400 per step."""
    m = script(FILE)
    argv = [
        "--plain_step=1",
        "--plain_steps=50",
        "--toy_samples=100",
        "--ais_chains=10",
        f"--out_dir={tmp_path}",
    ]
    with pytest.raises(SystemExit, match=r"^error: plain Langevin diverged .*--plain_step"):
        m.main(argv)
    assert "lesson 1" not in capsys.readouterr().out  # no table of nan rows
    assert not (tmp_path / "04_langevin_sampling.png").exists()


# ---- AIS: exact log Z of closed-form energies in d = 64 ----
def ais_cfg(**kw):
    base = dict(
        AIS_CHAINS=64, AIS_STAGES=200, BETA_SCHEDULE="sigmoid", REF_STD=0.3, TEMPERATURE=1.0,
        HMC_STEP=0.05, LEAPFROG=2, SEED=0,
    )  # fmt: skip
    return types.SimpleNamespace(**{**base, **kw})


def test_ais_gets_exact_log_z_of_gaussians_and_a_mixture(script):
    """Tolerances that a wrong beta (weights taken after the move), a wrong energy (no reference
    term, s for s^2, no 1/T), a missing or reversed Metropolis test, or a leapfrog without its half
    step all break. d = 64, 64 chains x 200 stages, reference N(0, 0.3^2 I)."""
    m = script(FILE)
    d, g = 64, torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]  # a random rotation
    cov = (
        q * torch.logspace(2 * math.log10(0.05), 2 * math.log10(0.3), d, dtype=torch.float64)
    ) @ q.T
    means, weights = (
        torch.stack([torch.full((d,), -0.2), torch.full((d,), 0.2)]),
        torch.tensor([0.7, 0.3]),
    )
    # the correlated case runs at T = 2: exp(-E/T) = N(0, T cov),
    # log Z = (d/2) log(2 pi T) + (1/2) log det cov
    T = 2.0
    torch.manual_seed(0)
    cases = {
        "isotropic": (
            gaussian_energy(0.0, 100 * torch.eye(d)),
            1.0,
            0.5 * d * math.log(2 * math.pi * 0.01),
            0.1 * torch.randn(64, d),
        ),
        "correlated": (
            gaussian_energy(0.0, torch.linalg.inv(cov).float()),
            T,
            0.5 * d * math.log(2 * math.pi * T) + 0.5 * torch.logdet(cov).item(),
            math.sqrt(T) * torch.randn(64, d) @ torch.linalg.cholesky(cov).float().T,
        ),
        "mixture": (  # normalized: log Z = 0
            partial(m.mixture_energy, means=means, weights=weights, var=0.01),
            1.0,
            0.0,
            means[torch.multinomial(weights, 64, replacement=True)] + 0.1 * torch.randn(64, d),
        ),
    }
    for name, (energy, temperature, exact, samples) in cases.items():
        torch.manual_seed(1)
        est = m.log_z_both_ways(energy, samples, ais_cfg(TEMPERATURE=temperature))
        (f, fe), (r, re_) = est["forward"], est["reverse"]
        assert abs(f - exact) < 1.5 and abs(r - exact) < 1.5, (name, f - exact, r - exact)
        assert f < r and 0 < fe < 1.5 and 0 < re_ < 1.5, (name, f, r, fe, re_)


def test_forward_ais_is_low_and_reverse_high_in_expectation(script):
    """Jensen: E[log mean w] <= log E[w], so forward AIS underestimates log Z and reverse AIS
    overestimates it; averaged over 8 seeds with few stages (a large bias), on N(0.5, 0.1^2 I)
    from N(0, I)."""
    m = script(FILE)
    d, forward, reverse = 64, [], []
    exact = 0.5 * d * math.log(2 * math.pi * 0.01)
    energy = gaussian_energy(0.5, 100 * torch.eye(d))
    for seed in range(8):
        torch.manual_seed(seed)
        cfg = ais_cfg(AIS_CHAINS=8, AIS_STAGES=100, REF_STD=1.0, SEED=seed)
        est = m.log_z_both_ways(energy, 0.5 + 0.1 * torch.randn(8, d), cfg)
        forward.append(est["forward"][0])
        reverse.append(est["reverse"][0])
    assert np.mean(forward) < exact - 1 and np.mean(reverse) > exact + 1, (
        np.mean(forward) - exact,
        np.mean(reverse) - exact,
    )


def test_ais_pieces_by_hand(script):
    m = script(FILE)
    est, err = m.log_mean_exp(torch.tensor([0.0, math.log(3.0)], dtype=torch.float64))
    assert est == pytest.approx(math.log(2.0)) and err > 0  # log((1 + 3)/2)
    assert m.log_mean_exp(torch.full((5,), -7.0, dtype=torch.float64)) == pytest.approx((-7.0, 0.0))
    for kind in ("sigmoid", "geometric", "linear"):
        b = m.beta_schedule(10, kind)
        assert b.shape == (11,) and b[0] == 0 and b[-1] == 1 and torch.all(b[1:] > b[:-1]), kind
    # one weight increment by hand: from b = 0 to b = 1 with no move, log w = E_0(x) - E(x)/T
    x, temperature, s = torch.tensor([[1.0, 2.0]]), 2.0, 0.5
    energy = gaussian_energy(torch.zeros(2), torch.eye(2))
    log_w, acc = m.ais(energy, x, torch.tensor([0.0, 1.0], dtype=torch.float64), temperature, s)
    assert log_w.item() == pytest.approx(5 / (2 * 0.25) - 2.5 / 2) and len(acc) == 0
    # E_b and its gradient: (b/T) E(x) + ((1 - b)/s^2) ||x||^2 / 2
    u, grad_u = m.path_energy(x, torch.tensor([3.0]), torch.tensor([[0.5, -1.0]]), (0.25, 4.0))
    assert u.item() == pytest.approx(0.25 * 3.0 + 0.5 * 4.0 * 5.0)
    assert torch.allclose(grad_u, 0.25 * torch.tensor([[0.5, -1.0]]) + 4.0 * x)


def test_hmc_move_leaves_a_gaussian_invariant_through_its_metropolis_test(script):
    """Exact samples of N(0, v I) in d = 16, moved 20 times with 3 leapfrog steps of 1.2 std: the
    leapfrog alone drifts the variance to about 1.57 v, the Metropolis test keeps it at v and
    rejects about 45% of the proposals. Each returned E(x), grad E(x) belongs to the returned x."""
    m = script(FILE)
    torch.manual_seed(0)
    d, v = 16, 0.04

    def energy(y):  # exp(-E) = N(0, v I)
        return (y**2).sum(1) / (2 * v)

    x = math.sqrt(v) * torch.randn(4000, d)
    state = (x, *m.energy_and_grad(energy, x))
    acceptance = []
    for _ in range(20):
        state, accepted = m.hmc_move(energy, state, (1.0, 0.0), 1.2 * math.sqrt(v), 3)
        acceptance.append(accepted.float().mean().item())
    x, e, g = state
    assert 0.4 < np.mean(acceptance) < 0.7, acceptance  # a real test: neither all nor none
    assert abs(x.var().item() / v - 1) < 0.05, x.var().item() / v
    assert abs(x.mean().item()) < 0.01
    assert torch.allclose(e, energy(x)) and torch.allclose(g, x / v)
    # a proposal with a NaN energy is rejected: the chain stays where it was
    nan_far = lambda y: torch.where(y.abs().amax(1) > 1, torch.nan, 0.0) + energy(y)  # noqa: E731
    start = (x[:100], e[:100], g[:100])
    (x1, e1, g1), accepted = m.hmc_move(nan_far, start, (1.0, 0.0), 100.0, 1)
    assert not accepted.any() and torch.equal(x1, start[0]) and torch.equal(e1, start[1])


# ---- bits/dim conventions and the trivial baselines ----
def test_bits_per_dim_conventions_on_closed_forms(script):
    m = script(FILE)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (5, 1, 4, 4), generator=g, dtype=torch.uint8)
    eight = torch.full((5,), 8.0, dtype=torch.float64)

    def zero(y):  # the uniform density on [0,1]^D
        return torch.zeros(len(y))

    assert torch.allclose(m.dequantized_bits_per_dim(zero, x, 2, g), eight)
    assert torch.allclose(m.continuous_bits_per_dim(zero, x), eight)
    # a discrete law P(k) per pixel, as the density 256 P(floor(256 x)): bits/dim = -mean log2 P(k)
    probs = torch.rand(256, generator=g, dtype=torch.float64) + 0.1
    probs /= probs.sum()

    def hist(y):
        return (256 * probs[(y * 256).floor().long().clamp(0, 255)]).log().flatten(1).sum(1)

    expected = -probs[x.long()].log2().flatten(1).mean(1)
    assert torch.allclose(m.dequantized_bits_per_dim(hist, x, 3, g), expected, atol=1e-4)

    # continuous: log p at k/255 with a density 2 on [0, 1/2), 0 elsewhere (1 bit below uniform)
    def half(y):
        return torch.where(y < 0.5, math.log(2.0), -math.inf).flatten(1).sum(1)

    zeros = torch.zeros(2, 1, 2, 2, dtype=torch.uint8)
    assert torch.allclose(
        m.continuous_bits_per_dim(half, zeros), torch.full((2,), 7.0, dtype=torch.float64)
    )


def test_baselines_match_their_closed_forms(script):
    m = script(FILE)
    g = torch.Generator().manual_seed(1)
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])  # grey levels 0..3 only
    train = torch.multinomial(probs, 40000 * 4, replacement=True, generator=g).view(40000, 1, 2, 2)
    test = torch.multinomial(probs, 20000 * 4, replacement=True, generator=g).view(20000, 1, 2, 2)
    b = m.baseline_bits_per_dim(train.to(torch.uint8), test.to(torch.uint8), g)
    assert b["uniform"] == 8.0
    assert abs(b["per-pixel histogram"] - 1.75) < 0.01  # the entropy of probs in bits
    # uniform grey levels: a Gaussian of variance 1/12 on x ~ U[0,1): 8 + 0.5 log2(2 pi e / 12)
    train = torch.randint(0, 256, (40000, 1, 1, 3), generator=g, dtype=torch.uint8)
    test = torch.randint(0, 256, (20000, 1, 1, 3), generator=g, dtype=torch.uint8)
    b = m.baseline_bits_per_dim(train, test, g)
    exact = 8 + 0.5 * math.log2(2 * math.pi * math.e / 12)
    assert (
        abs(b["diagonal Gaussian"] - exact) < 0.01
        and abs(b["full-covariance Gaussian"] - exact) < 0.01
    )
    # perfectly correlated pixels: the full covariance sees it, the diagonal cannot
    k = torch.randint(0, 256, (20000, 1, 1, 1), generator=g, dtype=torch.uint8).expand(
        20000, 1, 1, 3
    )
    b = m.baseline_bits_per_dim(k[:10000], k[10000:], g)
    assert b["full-covariance Gaussian"] < b["diagonal Gaussian"] - 1.0


def test_baselines_are_fitted_to_the_training_pixels_only(script):
    """Training pixels dark (grey levels 0-127), test pixels light (128-255). Fitted to the training
    pixels, x ~ U[0, 1/2): mean 1/4, variance 1/48; the test pixels x ~ U[1/2, 1) have
    E[(x - 1/4)^2] = 1/48 + 1/4, so each Gaussian pays 0.5 ln(2 pi / 48) + 6.5 nats per pixel. Every
    test level is unseen in training, so the add-one histogram gives it 1 / (N + 256): log2(N + 256)
    bits. A baseline that looked at the test pixels would score about 8 bits lower."""
    m = script(FILE)
    g = torch.Generator().manual_seed(2)
    n = 40000
    train = torch.randint(0, 128, (n, 1, 1, 3), generator=g, dtype=torch.uint8)
    test = torch.randint(128, 256, (20000, 1, 1, 3), generator=g, dtype=torch.uint8)
    b = m.baseline_bits_per_dim(train, test, g)
    gaussian = 8 + (0.5 * math.log(2 * math.pi / 48) + 6.5) / math.log(2)  # 15.91
    assert abs(b["diagonal Gaussian"] - gaussian) < 0.05, b
    assert abs(b["full-covariance Gaussian"] - gaussian) < 0.05, b
    assert b["per-pixel histogram"] == pytest.approx(math.log2(n + 256), abs=1e-9), b


# ---- a checkpoint of 03: data and knobs checked before any work, then tiny end-to-end runs ----
def write_tiny_run(mdsm, tmp_path, height=16, width=16, name="tiny"):
    """A tiny EnergyNet saved by 03's own checkpoint code, and a tiny .npz data set of its size."""
    rng = np.random.default_rng(0)
    data = str(tmp_path / f"{name}.npz")
    np.savez(
        data,
        x_train=rng.integers(0, 256, (40, height, width), dtype=np.uint8),
        x_test=rng.integers(0, 256, (12, height, width), dtype=np.uint8),
    )
    torch.manual_seed(0)
    size = height if height == width else [height, width]  # 03 writes [H, W] for non-square images
    model = mdsm.EnergyNet(in_channels=1, width=4, blocks_per_stage=1, image_size=size)
    ckpt = str(tmp_path / f"{name}.pt")
    mdsm.save_checkpoint(
        mdsm.make_checkpoint(model, {"SIGMA0": 0.1, "DATASET": data, "DATA_DIR": "data"}), ckpt
    )
    args = [
        f"--ckpt={ckpt}", "--n_samples=6", "--batch=4", "--n_hot=3", "--n_anneal=5", "--n_cool=2",
        "--n_ref=10", "--device=cpu", f"--out_dir={tmp_path / 'out'}",
    ]  # fmt: skip
    return args, tmp_path / "out" / f"{tmp_path.name}_{name}"


@pytest.fixture
def tiny_run(script, tmp_path):
    m = script(FILE)
    args, out = write_tiny_run(script("03_mdsm_train.py"), tmp_path)
    return m, args, out


def test_smoke_run_with_a_tiny_checkpoint(tiny_run, capsys):
    m, args, out = tiny_run
    m.main(args)
    for name in ("samples.png", "nearest_samples.png", "nearest_test.png", "test_images.png"):
        assert (out / name).stat().st_size > 0, name
    samples = np.load(out / "samples.npz")["samples"]
    assert samples.shape == (6, 16, 16, 1) and samples.dtype == np.uint8
    text = capsys.readouterr().out
    assert "10 steps" in text and "energy of test" in text and "nearest training image" in text


def test_ais_smoke_run_with_a_tiny_checkpoint(tiny_run, capsys):
    m, args, out = tiny_run
    m.main(args + ["--ais", "--ais_chains=3", "--ais_stages=4", "--n_test=5"])
    text = capsys.readouterr().out
    assert "log Z: forward" in text and "not converged" in text and "HMC acceptance" in text
    assert "dequantized (headline)" in text and "continuous, x = k/255" in text
    assert "baseline: diagonal Gaussian" in text


def test_a_non_square_checkpoint_samples_and_estimates_log_z(script, tmp_path, capsys):
    """03 trains on 16x24 images (model_args image_size [16, 24]); 04 samples that shape."""
    m = script(FILE)
    args, out = write_tiny_run(script("03_mdsm_train.py"), tmp_path, 16, 24, name="wide")
    m.main(args)
    assert np.load(out / "samples.npz")["samples"].shape == (6, 16, 24, 1)
    m.main(args + ["--ais", "--ais_chains=3", "--ais_stages=4", "--n_test=5"])
    text = capsys.readouterr().out
    assert "nearest training image" in text and "test bits/dim (5 images of (1, 16, 24))" in text


def mismatched_data(tmp_path, kind):
    rng = np.random.default_rng(1)
    path = tmp_path / f"{kind}.npz"
    if kind == "text":
        path.write_text("pixel values, one per line\n")
    elif kind == "no_x_test":
        np.savez(path, x_train=rng.integers(0, 256, (40, 16, 16), dtype=np.uint8))
    elif kind == "colour":
        images = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
        np.savez(path, x_train=images, x_test=images[:12])
    elif kind == "8x8":
        images = rng.integers(0, 256, (40, 8, 8), dtype=np.uint8)
        np.savez(path, x_train=images, x_test=images[:12])
    return path


@pytest.mark.parametrize(
    "kind, words",
    [
        ("text", "not a NumPy file"),
        ("no_x_test", "no x_test"),
        ("colour", "3-channel 16x16.*1-channel 16x16"),
        ("8x8", "1-channel 8x8.*1-channel 16x16"),
    ],
)
@pytest.mark.parametrize("ais", [False, True])
def test_dataset_is_checked_against_the_model_before_any_sampling(
    tiny_run, tmp_path, capsys, kind, words, ais
):
    m, args, out = tiny_run
    argv = (
        args + [f"--dataset={mismatched_data(tmp_path, kind)}"] + ["--ais", "--ais_chains=3"] * ais
    )
    with pytest.raises(SystemExit, match=f"^error: .*{words}"):
        m.main(argv)
    assert not (out / "samples.png").exists()
    assert "samples/s" not in capsys.readouterr().out and "AIS:" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--n_test=13"], "--n_test=13, but .* has 12 test images"),
        (["--ais", "--ais_chains=6", "--n_test=5"], "--ais_chains=6, but there are 5 test images"),
        (["--n_samples=1e15"], "--n_samples needs at least .* GiB"),
        (["--batch=1e12", "--n_samples=1e12"], "--batch needs at least .* GiB"),
        (["--use_ema"], "--use_ema: .* has no EMA weights"),
    ],
)
def test_knobs_that_depend_on_the_checkpoint_or_data_are_checked_before_work(
    tiny_run, capsys, extra, words
):
    m, args, out = tiny_run
    with pytest.raises(SystemExit, match=f"^error: {words}"):
        m.main(args + extra)
    assert not (out / "samples.png").exists() and "samples/s" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "bad",
    [
        "--temperature=0", "--ais_chains=1", "--ais_stages=1", "--toy_samples=0", "--batch=0",
        "--n_samples=-1", "--hmc_step=-0.1", "--leapfrog=0", "--beta_schedule=cosine", "--n_ref=0",
        "--t_max=0.5", "--step_size=0", "--step_size=2", "--ref_std=1000", "--toy_std=0",
        "--toy_sigma0=2", "--plain_step=0", "--seed=-1", "--gap_tol=0", "--ais_chains=5000",
    ],
)  # fmt: skip
def test_bad_knobs_are_one_line_errors(script, bad, tmp_path):
    m = script(FILE)
    with pytest.raises(SystemExit, match=f"^error: {bad.split('=')[0]}=.*allowed"):
        m.main([bad, f"--out_dir={tmp_path}"])


def test_related_knobs_and_sizes_are_checked_before_the_lessons(script, tmp_path):
    m = script(FILE)
    with pytest.raises(SystemExit, match="^error: --n_hot \\+ --n_anneal \\+ --n_cool = 0"):
        m.main(["--n_hot=0", "--n_anneal=0", "--n_cool=0", f"--out_dir={tmp_path}"])
    with pytest.raises(SystemExit, match="^error: --toy_samples needs at least .* GiB"):
        m.main(["--toy_samples=1e15", f"--out_dir={tmp_path}"])
    assert not (tmp_path / "04_langevin_sampling.png").exists()


def test_unwritable_out_dir_fails_before_any_work(script, tmp_path):
    """A folder below a regular file cannot be created, whoever runs the test (root included)."""
    m = script(FILE)
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(SystemExit, match="error: --out_dir: cannot write to"):
        m.main([f"--out_dir={tmp_path / 'a_file' / 'sub'}"])


def test_missing_foreign_or_wrong_kind_checkpoint_is_a_clear_error(script, tmp_path):
    m = script(FILE)
    with pytest.raises(SystemExit, match="error: no checkpoint at"):
        m.main([f"--ckpt={tmp_path / 'nope.pt'}", f"--out_dir={tmp_path}"])
    torch.save({"kind": "dual-score", "model": {}}, tmp_path / "other.pt")
    for extra in ([], ["--ais"]):
        with pytest.raises(SystemExit) as info:
            m.main([f"--ckpt={tmp_path / 'other.pt'}", f"--out_dir={tmp_path}"] + extra)
        message = str(info.value).replace(str(tmp_path), "<tmp>")
        # names what the file is and which script writes what 04 needs; no other script would do
        assert (
            message.startswith("error:")
            and "'dual-score'" in message
            and "03_mdsm_train.py" in message
        )
        assert "05" not in message, message
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(SystemExit, match="error: .*not a readable checkpoint"):
        m.main([f"--ckpt={tmp_path / 'junk.pt'}", f"--out_dir={tmp_path}"])
