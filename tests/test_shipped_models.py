"""The two laptop models shipped in checkpoints/ load through the scripts' own loaders and run, so a
change to the checkpoint format or to a network cannot silently break them. No data needed."""

import math
import os

import pytest
import torch
from conftest import ROOT

MDSM_FILE = os.path.join(ROOT, "checkpoints", "mdsm_mnist16.pt")
DUAL_FILE = os.path.join(ROOT, "checkpoints", "dual_score_mnist16.pt")


def test_the_shipped_files_are_small_and_carry_no_optimizer_state():
    sizes = [os.path.getsize(p) for p in (MDSM_FILE, DUAL_FILE)]
    assert sum(sizes) <= 10 * 2**20
    for path in (MDSM_FILE, DUAL_FILE):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert "optimizer" not in ckpt and {"kind", "model_args", "model"} <= set(ckpt)


def test_the_mdsm_model_samples_digits_shaped_images_with_04_and_restores_with_06(script):
    mdsm = script("03_mdsm_train.py")
    langevin = script("04_langevin_sampling.py")
    inpainting = script("06_inpainting.py")
    model, ckpt = mdsm.load_model(MDSM_FILE)
    assert ckpt["model_args"]["image_size"] == 16 and ckpt["config"]["DATASET"] == "mnist"
    sigma0 = ckpt["config"]["SIGMA0"]
    torch.manual_seed(0)
    temps = langevin.mdsm_schedule(5, 20, 5, 100.0)
    x = langevin.annealed_langevin(model, 0.5 + torch.randn(4, 1, 16, 16), temps, 0.02)
    x = langevin.tweedie_denoise(model, x, sigma0)
    assert x.shape == (4, 1, 16, 16) and torch.isfinite(x).all()
    # the trained energy prefers a denoised sample to the same image with noise of std 0.3 added
    with torch.no_grad():
        noisy = x + 0.3 * torch.randn_like(x)
        assert (model(x) < model(noisy)).all()
    # 06's masked sampler on the same model keeps the known (left) half exactly
    mask = torch.zeros(4, 1, 16, 16)
    mask[..., 8:] = 1

    def energy(y, temperature):
        return model(y)

    known = torch.rand(4, 1, 16, 16)
    out = inpainting.masked_langevin(energy, known, mask, temps, 0.02, sigma0)
    assert torch.equal(out[..., :8], known[..., :8]) and torch.isfinite(out).all()


def test_the_dual_score_model_loads_and_gives_a_normalized_density_estimate(script):
    dual = script("05_dual_score.py")
    mdsm = script("03_mdsm_train.py")
    ckpt = mdsm.load_checkpoint(DUAL_FILE, kind="dual-score")
    model = dual.ScoreUNet(**ckpt["model_args"])
    model.load_state_dict(ckpt["model"])
    model.eval()
    torch.manual_seed(0)
    images = (torch.rand(8, 1, 16, 16) * 40).to(torch.uint8)  # dark images, digit-like background
    res = dual.image_density(model, images, 1e-9, 1e3, n_draws=1)
    bits = res["deq"]
    assert bits.shape == (8,) and torch.isfinite(bits).all()
    assert math.isfinite(res["c"])
    # U(y, t) of the noisiest level is close to the Gaussian it is normalized against:
    # mean t d_t U / d, which is 0 for a normalized family, is small at T
    y = torch.randn(8, 1, 16, 16) * math.sqrt(1e3)
    t = torch.full((8,), 1e3)
    U, grad_y, grad_t = dual.energy_and_scores(model, y, t)
    assert abs((t * grad_t).mean().item() / 256) < 0.2


@pytest.mark.parametrize("path", [MDSM_FILE, DUAL_FILE])
def test_a_shipped_file_is_refused_by_the_other_script(script, path):
    mdsm = script("03_mdsm_train.py")
    other = "dual-score" if path == MDSM_FILE else "mdsm-energy"
    with pytest.raises(SystemExit, match="error: .* checkpoint, but this needs"):
        mdsm.load_checkpoint(path, kind=other)
