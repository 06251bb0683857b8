"""02: concentration formulas against Monte Carlo, the toy's closed-form scores against autograd,
the Appendix B effect itself (single-noise DSM is accurate only near its shell, MDSM everywhere),
the sample-quality measure, and one-line refusals of knobs, sizes and diverging runs."""

import math
import re

import pytest
import torch

FILE = "02_single_noise_failure.py"


@pytest.mark.parametrize("d", [3, 50, 1000])
def test_shell_radius_matches_monte_carlo(script, d):
    m = script(FILE)
    sigma = 0.7
    eps = torch.randn(8000, d, generator=torch.Generator().manual_seed(d), dtype=torch.float64)
    r = sigma * eps.norm(dim=1)
    mean, std, approx_mean, approx_std = m.shell_radius(d, sigma)
    assert abs(r.mean().item() - mean) < 0.01 * mean
    assert abs(r.std().item() - std) < 0.03 * std
    if d >= 50:  # the high-d approximations sigma*sqrt(d) and sigma/sqrt(2)
        assert abs(approx_mean - mean) < 0.01 * mean and abs(approx_std - std) < 0.02 * std
    assert abs(m.shell_radius(3072, 1.2)[2] - 66.5) < 0.05  # the CIFAR-10 radius quoted in the spec


def make_toy(m, d, argv=()):
    cfg = m.parse_config(vars(m), list(argv))
    gen = torch.Generator().manual_seed(0)
    return m.PlaneMixture(d, cfg, gen), cfg, gen


def test_toy_score_is_the_gradient_of_its_log_density(script):
    m = script(FILE)
    toy, cfg, gen = make_toy(m, 20)
    x = toy.sample(64, gen) + 0.3 * torch.randn(64, 20, generator=gen)
    for sigma in (0.05, 0.3, 1.0):
        s = torch.tensor(sigma)
        xr = x.clone().requires_grad_(True)
        auto = torch.autograd.grad(toy.log_q(xr, s.reshape(1)).sum(), xr)[0]
        assert torch.allclose(toy.score(x, s), auto, rtol=1e-4, atol=1e-3)
    # log_q integrates to one: check it in d = 2 on a grid
    toy2, _, _ = make_toy(m, 2)
    g = torch.linspace(-3, 3, 301)
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    mass = toy2.log_q(grid, torch.tensor([0.2])).exp().sum() * (g[1] - g[0]) ** 2
    assert abs(mass.item() - 1) < 1e-3


def test_mdsm_target_is_the_weighted_tweedie_mixture(script):
    m = script(FILE)
    toy, cfg, gen = make_toy(m, 256)
    levels = torch.linspace(cfg.SIGMA_MIN, cfg.SIGMA_MAX, 16)
    x = toy.sample(32, gen) + 0.5 * torch.randn(32, 256, generator=gen)
    # brute force: sigma0^2 g* = sum_j w_j (-s_j^2 score_j), w_j ~ q_{s_j}(x) / s_j^2
    w = torch.softmax(toy.log_q(x, levels) - 2 * levels.log(), 1)
    brute = sum(w[:, j : j + 1] * -(s**2) * toy.score(x, s) for j, s in enumerate(levels))
    brute = brute / cfg.SIGMA0**2
    assert torch.allclose(toy.mdsm_target(x, levels, cfg.SIGMA0), brute, rtol=1e-4, atol=1e-3)
    # in high d the posterior picks the probe's own level: temperature T = sigma^2 / sigma0^2
    exact = -(0.5**2) / cfg.SIGMA0**2 * toy.score(x, torch.tensor(0.5))
    target = toy.mdsm_target(x, torch.linspace(0.05, 1.2, 128), cfg.SIGMA0)
    rel = (target - exact).norm(dim=1) / exact.norm(dim=1)
    assert rel.mean() < 0.05


def test_single_noise_is_accurate_only_on_its_shell(script):
    """Train both models briefly at d = 64. The single-noise gradient error 10x outside its shell
    (where chains start) is several times its on-shell error, and its in-plane part (the pull
    towards a mode) is far worse there than MDSM's; MDSM's error is small out there."""
    m = script(FILE)
    torch.manual_seed(0)
    argv = ["--steps=1200", "--batch=128", "--log_every=10000", "--n_probe=128"]
    toy, cfg, gen = make_toy(m, 64, argv)
    nets = {
        "single": m.train(toy, False, cfg, gen, "single"),
        "multi": m.train(toy, True, cfg, gen, "multi"),
    }
    err = m.gradient_errors(toy, nets, cfg, gen)
    on, far = m.PROBE_RATIOS.index(1.0), m.PROBE_RATIOS.index(10.0)
    assert err["single"][on] < 0.1, err
    assert err["single"][far] > 2.5 * err["single"][on], err
    assert err["multi"][far] < 0.05 and err["multi"][far] < err["multi"][on], err
    assert err["single plane"][far] > 1.0, err
    assert err["single plane"][far] > 5 * err["multi plane"][far], err


def test_main_smoke_writes_figure(script, tmp_path):
    m = script(FILE)
    results = m.main(
        [
            "--dims=2,8",
            "--conc_dims=2,8",
            "--conc_samples=200",
            "--steps=20",
            "--n_probe=16",
            "--n_chains=16",
            "--warm_steps=2",
            "--anneal_steps=5",
            "--cool_steps=2",
            f"--out_dir={tmp_path}",
        ]
    )
    assert (tmp_path / "02_single_noise_failure.png").stat().st_size > 10000
    assert [d for d, _ in results] == [2, 8]
    for _, res in results:
        assert set(res["samples"]) == {"single", "single oracle", "multi", "multi oracle"}
        assert all(math.isfinite(e) for errs in res["errors"].values() for e in errs)
        keys = {f"{n}{k}" for n in ("single", "multi") for k in ("", " plane")}
        assert set(res["errors"]) == keys


# ---- closed forms and exact hand computations: each fails on a wrong sign, factor or power
def quadratic_energy(c):
    """E(x) = ||x||^2 / (2c) per row: grad E = x / c."""

    def energy(x):
        return x.pow(2).sum(1) / (2 * c)

    return energy


def test_loss_weight_is_one_over_sigma_squared(script):
    m = script(FILE)
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    sigma = torch.tensor([0.5, 1.0, 2.0])
    # E = ||x||^2 / (2 sigma0^2): sigma0^2 grad E(x~) = x~, so x - x~ + x~ = x for every noise
    # draw and the loss is mean ||x||^2 / (sigma^2 sigma0^4) = mean(25/0.25, 1/1, 4/4) * 1e4
    loss = m.mdsm_loss(quadratic_energy(0.01), x, sigma, 0.1)
    assert loss.item() == pytest.approx(340000.0, rel=1e-5)
    # another curvature c: the noise no longer cancels; the same draws written out by hand
    torch.manual_seed(3)
    eps = torch.randn(3, 2)
    x_noisy = x + sigma[:, None] * eps
    hand = ((x - x_noisy + 0.01 * x_noisy / 0.5).pow(2).sum(1) / (sigma**2 * 1e-4)).mean()
    torch.manual_seed(3)
    loss = m.mdsm_loss(quadratic_energy(0.5), x, sigma, 0.1)
    assert loss.item() == pytest.approx(hand.item(), rel=1e-5)


def test_temperature_schedule_segment_by_segment(script):
    m = script(FILE)
    argv = ["--t_max=100", "--warm_steps=3", "--anneal_steps=4", "--cool_steps=5"]
    cfg = m.parse_config(vars(m), argv)
    temps = m.temperatures(cfg)
    assert len(temps) == 12
    assert temps[:3] == [100.0] * 3  # warm: flat at T_MAX
    # geometric anneal 100 -> 1 in 4 steps: 100 * 100^(-k/4) = 100, 31.62, 10, 3.162
    assert temps[3:7] == pytest.approx([100.0, 31.6227766, 10.0, 3.16227766], rel=1e-6)
    # linear cool-down 1 -> 0
    assert temps[7:] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2], abs=1e-12)


def test_one_langevin_step_is_the_written_out_update(script):
    m = script(FILE)
    x = torch.tensor([[1.0, -2.0, 0.5]])
    g = torch.tensor([[4.0, 2.0, -6.0]])

    def constant_gradient(_):
        return g

    out = m.langevin(constant_gradient, x, [9.0], 0.1, torch.Generator().manual_seed(7))
    xi = torch.randn(1, 3, generator=torch.Generator().manual_seed(7))
    # x - 0.5 sigma_s^2 grad E + sqrt(T) sigma_s xi with sigma_s = 0.1, T = 9
    assert torch.allclose(out, x - 0.005 * g + 0.3 * xi, atol=1e-7)
    # T <= 0 (the end of the cool-down) is a pure gradient step
    out0 = m.langevin(constant_gradient, x, [0.0], 0.1, torch.Generator().manual_seed(7))
    assert torch.allclose(out0, x - 0.005 * g, atol=1e-7)


def test_tweedie_step_returns_the_posterior_mean_of_a_gaussian(script):
    """Data N(0, s^2 I) smoothed by sigma0: E = ||x||^2 / (2 (s^2 + sigma0^2)) exactly, and
    E[x | x~] = s^2 / (s^2 + sigma0^2) x~. With s = 0.2, sigma0 = 0.1: 0.8 x~."""
    m = script(FILE)
    x_noisy = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    energy = quadratic_energy(0.05)

    def gradient(x):
        return m.grad_energy(energy, x)

    assert torch.allclose(m.tweedie_step(gradient, x_noisy, 0.1), 0.8 * x_noisy, atol=1e-6)


def test_shell_radius_closed_forms(script, capsys):
    m = script(FILE)
    # chi law with d = 1, 2, 3 by hand: means sqrt(2/pi), sqrt(pi/2), 2 sqrt(2/pi);
    # variances d - mean^2
    for d, mean in (
        (1, math.sqrt(2 / math.pi)),
        (2, math.sqrt(math.pi / 2)),
        (3, 2 * math.sqrt(2 / math.pi)),
    ):
        got = m.shell_radius(d, 2.0)
        assert got[0] == pytest.approx(2 * mean, rel=1e-9)
        assert got[1] == pytest.approx(2 * math.sqrt(d - mean**2), rel=1e-9)
        assert got[2:] == pytest.approx((2 * math.sqrt(d), 2 / math.sqrt(2)), rel=1e-12)
    cfg = m.parse_config(vars(m), ["--conc_dims=400", "--conc_samples=2000"])
    ((d, r),) = m.concentration_table(cfg, torch.Generator().manual_seed(0))
    assert d == 400 and abs(r.mean().item() - 20) < 0.1 and abs(r.std().item() - 0.707) < 0.05
    assert "sigma=0.1: 5.54, sigma=1.0: 55.4, sigma=1.2: 66.5" in capsys.readouterr().out


def test_sample_quality_by_hand(script):
    m = script(FILE)
    toy, cfg, gen = make_toy(m, 5)
    c = toy.centers  # (3, 2) mode centres in the plane
    perfect = torch.cat([c[0].repeat(6, 1), c[1].repeat(3, 1), c[2].repeat(1, 1)]) @ toy.Q.T
    q = m.sample_quality(toy, perfect)
    assert q["tv"] == pytest.approx(0, abs=1e-6) and q["on_data"] == 1.0
    assert q["plane"] == pytest.approx(0, abs=1e-3) and q["diverged"] == 0
    # 5 at mode 0, 5 near mode 1: one 0.5 off the plane, one 0.3 and one 0.175 (3.5 std) from
    # the centre
    u = torch.cat([c[0].repeat(5, 1), c[1].repeat(5, 1)])
    u[9] += torch.tensor([0.3, 0.0])
    u[8] += torch.tensor([0.0, 0.175])
    x = u @ toy.Q.T
    off = torch.randn(5, generator=gen)
    off = off - toy.Q @ (toy.Q.T @ off)  # orthogonal to the plane
    x[5] += 0.5 * off / off.norm()
    q = m.sample_quality(toy, x)
    # mode weights (0.5, 0.5, 0) vs (0.6, 0.3, 0.1): TV = (0.1 + 0.2 + 0.1) / 2 = 0.2;
    # 8 of 10 within 4 std
    assert q["tv"] == pytest.approx(0.2, abs=1e-6) and q["on_data"] == pytest.approx(0.8)
    assert q["freq"] == pytest.approx([0.5, 0.5, 0.0])


def switched_off_subspace_energy(m, toy, c):
    """Energy with P = the data plane, f switched off and the off-plane coefficient c at every
    distance."""
    net = m.Energy(toy.d, 8, 0.1, "subspace", 2)
    with torch.no_grad():
        net.basis.copy_(toy.Q)
        net.logit_c.fill_(math.log(math.expm1(c)))  # softplus(logit) = c; the bins sum to 1
        for p in (*net.pair.parameters(), *net.square.parameters()):
            p.zero_()
    return net


@pytest.mark.parametrize("c", [0.1, 1.0])
def test_subspace_energy_pulls_back_across_the_plane_with_c_v_over_sigma0_squared(script, c):
    """sigma0^2 E = c dist^2 / 2 with a flat profile c: grad E = c v / sigma0^2 (c = 1 is the exact
    optimum across the plane at every noise level, x~ - E[x|x~] = v; c = 0.1 is the start)."""
    m = script(FILE)
    toy, cfg, gen = make_toy(m, 12)
    net = switched_off_subspace_energy(m, toy, c)
    x = torch.randn(4, 12, generator=gen)
    v = x - (x @ toy.Q) @ toy.Q.T
    assert torch.allclose(m.grad_energy(net, x), c * v / 0.01, atol=1e-4 * c)
    assert torch.allclose(net(x), 0.5 * c * v.pow(2).sum(1) / 0.01, atol=1e-4)


def test_in_plane_network_adds_no_energy_of_the_distance_alone(script):
    """f(u, log rho) - f(0, log rho) vanishes at u = 0 whatever the weights: straight out of the
    plane only c pulls, sigma0^2 E = c dist^2 / 2 exactly (here with a random, untrained f)."""
    m = script(FILE)
    toy, cfg, gen = make_toy(m, 12)
    torch.manual_seed(0)
    net = m.Energy(12, 8, 0.1, "subspace", 2)
    with torch.no_grad():
        net.basis.copy_(toy.Q)
        net.logit_c.fill_(math.log(math.expm1(0.5)))
    v = torch.randn(3, 12, generator=gen)
    v = v - (v @ toy.Q) @ toy.Q.T  # u = 0
    pull = 0.5 * 0.5 * v.pow(2).sum(1) / 0.01
    assert torch.allclose(net(v), pull, rtol=1e-5)
    assert not torch.allclose(net(v + toy.Q[:, 0]), pull, rtol=1e-3)  # f acts in P


def test_off_plane_coefficient_is_local_in_distance(script):
    """The profile c(rho) at rho = dist/sqrt(d) is a bin mix: the bin at rho = 5 does not reach the
    single-noise shell rho = 0.1, and outside [0.05, 5] c is the end bin's value (no slope)."""
    m = script(FILE)
    toy, cfg, gen = make_toy(m, 16)
    net = switched_off_subspace_energy(m, toy, 1.0)
    v = torch.randn(1, 16, generator=gen)
    v = v - (v @ toy.Q) @ toy.Q.T
    # rho = 0.01, 0.1, 20 (sqrt(d) = 4)
    x = torch.cat([rho * 4.0 * v / v.norm() for rho in (0.01, 0.1, 20.0)])
    before = net(x).detach()
    with torch.no_grad():
        net.logit_c[-1] = 5.0  # the bin centred at rho = 5 (c = 5.007 there)
    after = net(x).detach()
    # near and on the single shell: untouched
    assert after[:2] == pytest.approx(before[:2].tolist(), rel=1e-6)
    # rho = 20 reads the profile at rho = 5: bump weights exp(-k^2/2) normalized, k = bins from
    # the end; sigma0^2 E = c dist^2 / 2 with dist = 20 sqrt(16) = 80
    bump = [math.exp(-0.5 * k * k) for k in range(16)]
    mix = (bump[0] * 5.0 + sum(bump[1:]) * math.log(math.expm1(1.0))) / sum(bump)
    expected = 0.5 * math.log1p(math.exp(mix)) * 80.0**2 / 0.01
    assert after[2].item() == pytest.approx(expected, rel=1e-5)


# ---- the "on the data" measure: distances, not squared distances
def off_plane_unit(toy, gen):
    v = torch.randn(toy.d, generator=gen)
    v = v - toy.Q @ (toy.Q.T @ v)
    return v / v.norm()


def test_on_data_counts_distances_within_four_mode_std(script):
    """A sample is on the data when its distance to the plane AND its in-plane distance to a mode
    centre are below 4 MODE_STD = 0.2. Points at known distances: 4 of 8 lie inside each way.
    (Comparing the squared distance 0.44^2 = 0.19 with 0.2 would count all 8.)"""
    m = script(FILE)
    toy, cfg, gen = make_toy(m, 6)
    r = torch.tensor([0.05, 0.1, 0.15, 0.19, 0.21, 0.3, 0.39, 0.44])
    centre = toy.centers[1] @ toy.Q.T  # (d,)
    across = centre + r[:, None] * off_plane_unit(toy, gen)
    assert m.sample_quality(toy, across)["on_data"] == pytest.approx(0.5)
    inside = (toy.centers[1] + r[:, None] * torch.tensor([0.6, 0.8])) @ toy.Q.T
    assert m.sample_quality(toy, inside)["on_data"] == pytest.approx(0.5)
    # the threshold scales with the mode std: --mode_std=0.1 puts it at 0.4
    wide, _, _ = make_toy(m, 6, ["--mode_std=0.1"])
    centre = wide.centers[1] @ wide.Q.T
    across = centre + r[:, None] * off_plane_unit(wide, gen)
    assert m.sample_quality(wide, across)["on_data"] == pytest.approx(7 / 8)


def test_on_data_fraction_of_gaussian_clouds_matches_chi_laws(script):
    """Points at a mode centre plus N(0, tau^2) noise across the plane (k = d - 2 = 4 dims) are on
    the data with probability P(chi2_4 < (0.2/tau)^2) = 1 - exp(-x/2)(1 + x/2): with tau = 0.1,
    1 - 3 exp(-2) = 0.594. In the plane (2 dims) the Rayleigh law gives 1 - exp(-2) = 0.865."""
    m = script(FILE)
    toy, cfg, gen = make_toy(m, 6)
    n, tau = 20000, 0.1
    centre = toy.centers[0] @ toy.Q.T
    noise = torch.randn(n, 6, generator=gen)
    noise = noise - (noise @ toy.Q) @ toy.Q.T  # across the plane only
    q = m.sample_quality(toy, centre + tau * noise)
    assert q["on_data"] == pytest.approx(1 - 3 * math.exp(-2), abs=0.02)
    u = toy.centers[0] + tau * torch.randn(n, 2, generator=gen)  # in the plane only
    q = m.sample_quality(toy, u @ toy.Q.T)
    assert q["on_data"] == pytest.approx(1 - math.exp(-2), abs=0.02)
    assert q["diverged"] == 0


def test_diverged_chains_are_counted_and_far_from_the_data(script):
    m = script(FILE)
    toy, cfg, gen = make_toy(m, 5)
    x = toy.centers[0].repeat(4, 1) @ toy.Q.T
    x[1, 0] = float("nan")
    x[2, 3] = float("inf")
    x[3, 2] = 2e3  # beyond 1000x the data's scale
    q = m.sample_quality(toy, x)
    assert q["diverged"] == 3 and q["on_data"] == pytest.approx(0.25)
    assert q["freq"] == pytest.approx([0.25, 0.0, 0.0])  # diverged chains belong to no mode
    assert q["tv"] == pytest.approx(0.5 * (0.35 + 0.3 + 0.1 + 0.75))  # diverged: target weight 0
    assert all(math.isfinite(v) for v in (q["tv"], q["plane"], q["on_data"]))


# ---- bad input: one line naming the knob, before any work
def no_work(*args):
    raise AssertionError("work started before the knobs were checked")


@pytest.mark.parametrize(
    "args",
    [
        ["--steps=0"],
        ["--batch=1"],
        ["--log_every=0"],
        ["--hidden=0"],
        ["--n_chains=0"],
        ["--seed=-1"],
        ["--threads=100000"],
        ["--device=cuda"],
        ["--lr=-0.1"],
        ["--lr=2"],
        ["--sigma0=0"],
        ["--sigma_min=1e-9"],
        ["--mode_std=1e9"],
        ["--init_std=1e5"],
        ["--step_size=-1"],
        ["--step_size=0.2"],  # = 2 sigma0: the exact chains no longer converge
        ["--sigma0=0.2", "--step_size=0.5"],
        ["--sigma_max=0.01"],
        ["--t_max=0.5"],
        ["--t_max=200"],  # sqrt(200) sigma0 = 1.41 lies beyond --sigma_max=1.2
        ["--energy=resnet"],
        ["--dims=2,x"],
        ["--dims=2,1e3"],
        ["--dims=1"],
        ["--dims=2,\u00b2"],
        ["--latent=3"],  # the smallest --dims is 2
        ["--conc_dims=0"],
        ["--warm_steps=-1"],
    ],
)
def test_bad_knob_gives_one_line_naming_it(script, args, tmp_path, monkeypatch):
    m = script(FILE)
    monkeypatch.setattr(m, "concentration_table", no_work)
    knob = args[-1].split("=")[0]
    with pytest.raises(SystemExit, match=f"^error: {knob}=.*allowed: ") as err:
        m.main([*args, f"--out_dir={tmp_path}"])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("arg", ["--lr=nan", "--t_max=inf", "--sigma0=-inf"])
def test_non_finite_numbers_are_refused_by_the_parser(script, arg, tmp_path, monkeypatch):
    m = script(FILE)
    monkeypatch.setattr(m, "concentration_table", no_work)
    with pytest.raises(SystemExit, match=f"^error: {arg}: not a valid float"):
        m.main([arg, f"--out_dir={tmp_path}"])


@pytest.mark.parametrize(
    "args",
    [
        ["--sigma0=0.2", "--step_size=0.39", "--t_max=36"],  # below 2 sigma0, (1.2 / 0.2)^2
        ["--t_max=400", "--sigma_max=2"],  # (sigma_max / sigma0)^2 = 400
        ["--t_max=1", "--warm_steps=0", "--anneal_steps=0"],
        ["--dims=3,5", "--latent=3", "--energy=mlp", "--threads=0"],
    ],
)
def test_related_knobs_in_range_are_accepted(script, args, tmp_path):
    m = script(FILE)
    m.check_config(m.parse_config(vars(m), [*args, f"--out_dir={tmp_path}"]))


@pytest.mark.parametrize(
    "arg, knob",
    [
        ("--n_chains=1e12", "--n_chains"),
        ("--n_probe=1e12", "--n_probe"),
        ("--dims=2,1000000000000", "--dims"),
        ("--hidden=1e12", "--hidden"),
        ("--conc_samples=1e12", "--conc_samples"),
        ("--warm_steps=1e15", "--warm_steps"),
    ],
)
def test_a_size_that_cannot_fit_gets_one_line_before_allocation(
    script, arg, knob, tmp_path, monkeypatch
):
    m = script(FILE)
    monkeypatch.setattr(m, "concentration_table", no_work)
    monkeypatch.setattr(m, "PlaneMixture", no_work)
    with pytest.raises(SystemExit, match=f"^error: this run needs about .* GB for .*{knob}") as err:
        m.main([arg, f"--out_dir={tmp_path}"])
    assert "\n" not in str(err.value)


def test_the_default_run_fits_in_a_small_memory(script):
    m = script(FILE)
    need, _ = m.memory_estimate(m.parse_config(vars(m), []))
    assert 1e6 < need < 0.5e9


def test_unwritable_out_dir_is_refused_before_any_work(script, tmp_path, monkeypatch):
    m = script(FILE)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # a folder under a regular file: unwritable for root too
    monkeypatch.setattr(m, "concentration_table", no_work)
    with pytest.raises(SystemExit, match=r"^error: --out_dir=.*a_file/out is not writable"):
        m.main([f"--out_dir={blocker}/out"])


# ---- diverging runs: one line naming what diverged and the knob to change, never a nan result
TINY = [
    "--dims=2",
    "--conc_dims=2",
    "--conc_samples=20",
    "--steps=4",
    "--batch=8",
    "--n_probe=4",
    "--n_chains=4",
    "--warm_steps=1",
    "--anneal_steps=2",
    "--cool_steps=1",
    "--hidden=4",
]


def test_diverged_training_stops_with_one_line_naming_the_learning_rate(
    script, tmp_path, monkeypatch
):
    m = script(FILE)
    loss = m.mdsm_loss
    calls = []

    def loss_that_diverges_at_step_3(*args):
        calls.append(1)
        return loss(*args) * (float("nan") if len(calls) == 3 else 1.0)

    monkeypatch.setattr(m, "mdsm_loss", loss_that_diverges_at_step_3)
    message = r"^error: single training at d = 2, step 3 diverged; lower --lr=0.01$"
    with pytest.raises(SystemExit, match=message):
        m.main([*TINY, f"--out_dir={tmp_path}"])


def test_a_non_finite_gradient_stops_with_one_line(script):
    m = script(FILE)
    toy, cfg, gen = make_toy(m, 4, TINY)

    def broken(x):
        return x.pow(2).sum(1) * float("nan")

    nets = {"single": broken, "multi": quadratic_energy(0.01)}
    message = r"^error: the gradient of the trained single energy at d = 4 diverged; lower --lr"
    with pytest.raises(SystemExit, match=message):
        m.gradient_errors(toy, nets, cfg, gen)


def test_diverged_exact_chains_stop_with_one_line_naming_the_step_size(script, monkeypatch):
    """Learned chains that diverge are a result (counted); the exact fields' chains never do unless
    a sampler knob is off."""
    m = script(FILE)
    toy, cfg, gen = make_toy(m, 4, TINY)
    monkeypatch.setattr(m, "langevin", lambda grad_fn, x, temps, step_size, gen: x * float("inf"))
    nets = {"single": quadratic_energy(0.01), "multi": quadratic_energy(0.01)}
    message = r"^error: 4 chains of the single oracle sampler at d = 4 diverged; lower --step_size"
    with pytest.raises(SystemExit, match=message):
        m.run_samplers(toy, nets, cfg, gen)


def test_output_depends_only_on_the_seed(script, tmp_path, capsys):
    """Two runs with one seed print the same text (no timings); the printed results are finite."""
    m = script(FILE)
    outputs = []
    for run in range(2):
        m.main([*TINY, "--dims=2,3", f"--out_dir={tmp_path}"])
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    assert not re.search(r"\bnan\b|\binf\b|it/s|\d s\b", outputs[0]), outputs[0]
