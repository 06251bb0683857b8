"""06: linear inverse problems. The Gaussian toy has exact posteriors, so the samplers are checked
against the closed form (and an unconstrained sampler must fail the same check); the measurement
operators are checked for orthonormality; a tiny checkpoint exercises the image path end to end."""
import numpy as np
import pytest
import torch

FILE = "06_inpainting.py"


@pytest.fixture
def m(script):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is several times faster on a busy machine
    yield script(FILE)
    torch.set_num_threads(threads)


def toy_cfg(m, *extra):
    # a shorter MDSM schedule (800 steps, with step 0.05 instead of 0.02 so that the chains still
    # mix on the 64-pixel toy) and 300 chains keep this test to a few seconds
    return m.parse_config(vars(m), ["--toy_chains=300", "--n_hot=100", "--n_anneal=600", "--n_cool=100",
                                    "--step_size=0.05", *extra])


def test_operators_have_orthonormal_rows_and_pinv_is_transpose(m):
    g = torch.Generator().manual_seed(0)
    shape = (3, 8, 8)
    ops = [m.mask_operator(m.named_mask(k, shape, 0.3, g)) for k in ("right", "centre", "random")]
    ops += [m.block_average_operator(shape, f) for f in (2, 4)]
    ops += [m.random_orthonormal_operator(192, 40, g)]
    x = torch.rand(5, 192)
    for M in ops:
        assert torch.allclose(M @ M.T, torch.eye(M.shape[0]), atol=1e-5)  # M M^T = I
        meas = x @ M.T
        assert torch.allclose((meas @ M) @ M.T, meas, atol=1e-5)  # M (M^+ m) = m with M^+ = M^T
    # 2x2 averaging: m = 2 * block mean, so M^T m repeats each block mean over its block
    B = m.block_average_operator((1, 4, 4), 2)
    img = torch.arange(16.0).view(1, 16)
    assert torch.allclose((img @ B.T) @ B, torch.nn.functional.avg_pool2d(img.view(1, 1, 4, 4), 2)
                          .repeat_interleave(2, 2).repeat_interleave(2, 3).view(1, 16))
    Q = m.orthogonal_completion(ops[-1].double())
    assert torch.allclose(Q @ Q.T, torch.eye(192, dtype=Q.dtype), atol=1e-5) and torch.equal(Q[:40], ops[-1].double())
    mask = m.named_mask("centre", shape, 0.3, g)
    assert mask.sum() == 3 * 4 * 4 and m.mask_operator(mask).shape == (192 - 48, 192)


def test_gaussian_energy_gives_the_tweedie_denoiser_at_sigma0_sqrt_T(m):
    cfg = toy_cfg(m)
    mu, S = m.gaussian_prior(cfg)
    energy_at = m.gaussian_mdsm_energy(mu, S, cfg.SIGMA0)
    sampler = m.sampler_module()
    y = torch.rand(7, 64)
    for T in (0.5, 4.0, 100.0):
        s2 = cfg.SIGMA0**2 * T
        # D(y) = mu + S (S + sigma^2 I)^-1 (y - mu), computed independently of the file's eigenbasis
        D = mu + (S @ torch.linalg.solve(S + s2 * torch.eye(64, dtype=S.dtype), (y.double() - mu).T)).T
        got = sampler.tweedie_denoise(energy_at(T), y, cfg.SIGMA0)  # y - sigma0^2 grad E_T(y)
        assert torch.allclose(got.double(), D, atol=2e-5), T
        # the blind denoiser reads the noise level off the image: close to the oracle
        x = (mu + torch.randn(400, 64, dtype=S.dtype) @ torch.linalg.cholesky(S).T)
        noisy = (x + s2**0.5 * torch.randn_like(x)).float()
        oracle = mu + (S @ torch.linalg.solve(S + s2 * torch.eye(64, dtype=S.dtype), (noisy.double() - mu).T)).T
        blind = m.gaussian_blind_denoiser(mu, S)(noisy).double()
        assert ((blind - oracle) ** 2).mean() < 0.1 * ((oracle - x) ** 2).mean(), T


def test_gaussian_posterior_is_consistent(m):
    cfg = toy_cfg(m)
    mu, S = m.gaussian_prior(cfg)
    mask = m.named_mask("right", (1, 8, 8), 0.0, None)
    M = m.mask_operator(mask).double()
    x = torch.rand(64, dtype=torch.float64)
    mean, cov = m.gaussian_posterior(mu, S, M, M @ x)
    assert torch.allclose(M @ mean, M @ x) and (M @ cov).abs().max() < 1e-12
    u, k = mask.flatten() > 0, mask.flatten() == 0  # Schur complement written out for a pixel mask
    ref = S[u][:, u] - S[u][:, k] @ torch.linalg.solve(S[k][:, k], S[k][:, u])
    assert torch.allclose(cov[u][:, u], ref, atol=1e-10)


@pytest.mark.parametrize("task", ["inpaint", "block2"])
def test_samplers_match_the_exact_posterior_and_unconstrained_ones_fail(m, task):
    torch.manual_seed(0)
    cfg = toy_cfg(m)
    mu, S = m.gaussian_prior(cfg)
    truth = mu + torch.linalg.cholesky(S) @ torch.randn(64, dtype=S.dtype)
    if task == "inpaint":
        mask = m.named_mask("right", (1, 8, 8), 0.0, None)
        out = m.toy_task(task, m.mask_operator(mask), truth, mu, S, cfg, mask, variants=False)
    else:
        out = m.toy_task(task, m.block_average_operator((1, 8, 8), 2), truth, mu, S, cfg, variants=False)
    res = out["results"]
    # tolerances: mean error below 0.25 (Monte Carlo floor ~0.06; K&S sits near 0.15, it is not an
    # exact posterior sampler), covariance error below 0.8 (floor ~0.37); ignoring m gives > 1.5 and > 9
    ok = lambda r: r[0] < 0.25 and r[1] < 0.8
    assert ok(res["exact draws (Monte Carlo floor)"])
    for label in ("masked Langevin (MDSM), sigma0*sqrt(T)", "projected coarse-to-fine (K&S)"):
        assert ok(res[label]), (label, res[label])
        assert res[label][2] < 1e-5  # the measurements hold
    for label in ("unconstrained Langevin (ignores m)", "unconstrained coarse-to-fine"):
        assert not ok(res[label]), (label, res[label])


def test_masked_langevin_never_changes_observed_pixels(m):
    cfg = toy_cfg(m, "--n_hot=3", "--n_anneal=10", "--n_cool=3")
    mu, S = m.gaussian_prior(cfg)
    energy_at = m.gaussian_mdsm_energy(mu, S, cfg.SIGMA0)
    mask = m.named_mask("random", (1, 8, 8), 0.5, torch.Generator().manual_seed(1)).expand(4, 1, 8, 8)
    truth = torch.rand(4, 1, 8, 8)
    known = truth * (1 - mask)
    x = m.masked_langevin(energy_at, known, mask, cfg, cfg.SIGMA0)
    assert torch.equal(x[mask == 0], truth[mask == 0])
    assert (x[mask == 1] - truth[mask == 1]).abs().min() > 0  # the unknown ones did move


@pytest.fixture
def tiny_checkpoint(m, tmp_path):
    mdsm = m.load_numbered("03_mdsm_train.py")
    torch.manual_seed(0)
    net = mdsm.EnergyNet(in_channels=1, width=4, blocks_per_stage=1, image_size=16)
    rng = np.random.default_rng(0)
    data = tmp_path / "tiny.npz"
    np.savez(data, x_train=rng.integers(0, 256, (4, 16, 16), dtype=np.uint8),
             x_test=rng.integers(0, 256, (3, 16, 16), dtype=np.uint8))
    path = str(tmp_path / "ckpt.pt")
    mdsm.save_checkpoint(mdsm.make_checkpoint(net, {"SIGMA0": 0.1, "DATASET": str(data), "DATA_DIR": "data"}), path)
    return path


def test_smoke_run_with_a_tiny_checkpoint(m, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    res = m.main([f"--ckpt={tiny_checkpoint}", "--n_hot=3", "--n_anneal=10", "--n_cool=3", "--n_images=2",
                  "--n_samples=2", "--ks_max_steps=20", f"--out_dir={out}"])
    assert set(res) == {"right", "centre", "random", "sr2", "sr4", "cs"}
    for task, r in res.items():
        assert np.isfinite(r["psnr_mean"]) and (out / f"{task}.png").exists()
        # pixel masks are kept exactly; other measurements up to float rounding
        assert r["gap"] == 0 if task in ("right", "centre", "random") else r["gap"] < 1e-5, (task, r["gap"])
    res = m.main([f"--ckpt={tiny_checkpoint}", "--tasks=centre", "--mask_sampler=projected", "--n_images=1",
                  "--n_samples=1", "--ks_max_steps=5", f"--out_dir={out}"])
    assert res["centre"]["gap"] == 0


@pytest.mark.parametrize("args, words", [(["--tasks=blur"], "unknown task"), (["--known_noise=cubic"], "--known_noise"),
                                         (["--mask_sampler=gibbs"], "--mask_sampler")])
def test_bad_options_give_one_line_errors(m, tiny_checkpoint, tmp_path, args, words):
    with pytest.raises(SystemExit) as info:
        m.main([f"--ckpt={tiny_checkpoint}", "--n_hot=1", "--n_anneal=1", "--n_cool=1", "--n_images=1",
                "--n_samples=1", f"--out_dir={tmp_path}", *args])
    assert str(info.value).startswith("error:") and words in str(info.value)
