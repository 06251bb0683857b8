"""04's yardsticks for samples: the Frechet distance and IS against closed forms and hand-made
tables; labels read from tiny files in the official formats, aligned with 03's images; the
classifier score of real images above the Gaussian baseline; IS and FID wired through a stand-in
Inception network (and through the real torch-fidelity, pinned to its own numbers, where it is
installed); every refusal before any sampling. CPU, offline, seeded."""

import gzip
import hashlib
import math
import os
import pickle
import re
import sys
import types
import urllib.error

import numpy as np
import pytest
import torch
from conftest import load_script

FILE = "04_langevin_sampling.py"


@pytest.fixture(scope="module")
def score():
    return load_script(FILE)


@pytest.fixture(scope="module")
def mdsm():
    return load_script("03_mdsm_train.py")


def one_line_error(excinfo):
    text = str(excinfo.value)
    assert text.startswith("error: ") and "\n" not in text, text
    return text


# ---- the Frechet distance: FD of the classifier's features and FID of Inception's, one formula
def test_frechet_distance_matches_the_diagonal_closed_form(score):
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = (torch.randn(6, generator=g, dtype=torch.float64) for _ in range(2))
    a, b = (torch.rand(6, generator=g, dtype=torch.float64) + 0.1 for _ in range(2))
    # FD = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2 for diagonal covariances
    exact = (mu1 - mu2).pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum()
    fd = score.frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b))
    assert fd == pytest.approx(exact.item(), rel=1e-9)


def test_frechet_distance_full_covariances(score):
    g = torch.Generator().manual_seed(1)
    root = torch.randn(8, 8, generator=g, dtype=torch.float64)
    cov = root @ root.T
    mu = torch.randn(8, generator=g, dtype=torch.float64)
    # commuting covariances cov and c cov: FD = tr(cov) (1 - sqrt(c))^2
    assert score.frechet_distance(mu, cov, mu, 4 * cov) == pytest.approx(cov.trace().item())
    other = torch.randn(8, 8, generator=g, dtype=torch.float64)
    cov2 = other @ other.T
    fd12 = score.frechet_distance(mu, cov, mu + 1, cov2)
    assert fd12 == pytest.approx(score.frechet_distance(mu + 1, cov2, mu, cov), rel=1e-9)
    assert fd12 > 8  # at least |mu1 - mu2|^2 = 8


def test_frechet_distance_is_zero_for_a_singular_covariance_with_itself(score):
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(10, 64, generator=g, dtype=torch.float64)  # 10 points in 64-D: rank 9
    mean, cov = score.fit_gaussian(feats)
    assert torch.allclose(cov, torch.cov(feats.T))
    assert abs(score.frechet_distance(mean, cov, mean, cov)) < 1e-6 * cov.trace().item()


def test_frechet_distance_agrees_with_torch_fidelity(score):
    metric_fid = pytest.importorskip("torch_fidelity.metric_fid")
    g = np.random.default_rng(3)
    a, b = g.normal(size=(40, 16)), g.normal(size=(50, 16)) * 1.5 + 0.3
    s1 = {"mu": a.mean(0), "sigma": np.cov(a, rowvar=False)}
    s2 = {"mu": b.mean(0), "sigma": np.cov(b, rowvar=False)}
    fid = metric_fid.fid_statistics_to_metric(s1, s2, False)["frechet_inception_distance"]
    ours = score.frechet_distance(s1["mu"], s1["sigma"], s2["mu"], s2["sigma"])
    assert ours == pytest.approx(fid, rel=1e-7)


# ---- IS, class TV, confident share on hand-made tables
def test_inception_score_on_hand_made_tables(score):
    assert score.inception_score(torch.full((5, 4), 0.25)) == pytest.approx(1.0)  # no information
    assert score.inception_score(torch.eye(4)) == pytest.approx(4.0)  # sure and balanced: K
    one_class = torch.tensor([[1.0, 0.0]] * 3)
    assert score.inception_score(one_class) == pytest.approx(1.0)  # sure but one class
    # p(y) = (0.5, 0.5); KL = 0.9 ln 1.8 + 0.1 ln 0.2 for both rows
    p = torch.tensor([[0.9, 0.1], [0.1, 0.9]])
    assert score.inception_score(p) == pytest.approx(
        math.exp(0.9 * math.log(1.8) + 0.1 * math.log(0.2))
    )
    # rows with different KL: p(y) = (0.75, 0.25); KL = ln(4/3) and 0.5 ln(2/3) + 0.5 ln 2
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    kl = (math.log(4 / 3), 0.5 * math.log(2 / 3) + 0.5 * math.log(2))
    assert score.inception_score(p) == pytest.approx(math.exp((kl[0] + kl[1]) / 2))


def test_split_inception_score_is_the_mean_and_std_over_parts(score):
    g = torch.Generator().manual_seed(5)
    logits = 3 * torch.randn(12, 5, generator=g)
    p = logits.double().softmax(1)
    assert score.split_inception_score(logits, 1) == pytest.approx((score.inception_score(p), 0))
    # 3 parts of 4 images, in the fixed shuffled order of torch-fidelity (and so of its numbers)
    order = np.random.RandomState(2020).permutation(12)
    parts = [score.inception_score(p[order[i : i + 4]]) for i in (0, 4, 8)]
    mean, std = score.split_inception_score(logits, 3)
    assert mean == pytest.approx(np.mean(parts), rel=1e-12)
    assert std == pytest.approx(np.std(parts), rel=1e-9) and std > 0


def test_split_inception_score_agrees_with_torch_fidelity(score):
    metric_isc = pytest.importorskip("torch_fidelity.metric_isc")
    logits = 3 * torch.randn(40, 7, generator=torch.Generator().manual_seed(6))
    theirs = metric_isc.isc_features_to_metric(logits, splits=4)
    ours = score.split_inception_score(logits, 4)
    assert ours[0] == pytest.approx(theirs["inception_score_mean"], rel=1e-9)
    assert ours[1] == pytest.approx(theirs["inception_score_std"], rel=1e-6)


def test_class_total_variation_and_confident_share(score):
    probs = torch.tensor([[0.95, 0.05, 0.0], [0.9, 0.1, 0.0], [0.45, 0.55, 0.0], [0.2, 0.3, 0.5]])
    # predicted classes 0, 0, 1, 2: histogram (0.5, 0.25, 0.25)
    assert score.class_total_variation(probs, torch.tensor([0.5, 0.25, 0.25])) == pytest.approx(0.0)
    assert score.class_total_variation(probs, torch.tensor([0.0, 0.0, 1.0])) == pytest.approx(0.75)
    assert score.confident_share(probs) == pytest.approx(0.5)  # 0.95 and 0.9 (inclusive)


def test_gaussian_pixel_draws_fit_the_training_pixels(score):
    g = torch.Generator().manual_seed(4)
    x = (torch.rand(4000, 1, 8, 8, generator=g) * 120 + 60).round().to(torch.uint8)
    x[:, :, 0, :] = 0  # an always-black row: singular covariance
    x[:, :, 2, 3] = 255 - x[:, :, 2, 2]  # two pixels with correlation -1: a full covariance
    draws = score.gaussian_pixel_draws(x, 4000, g)
    assert draws.dtype == torch.uint8 and draws.shape == (4000, 1, 8, 8)
    assert (draws[:, :, 0, :] == 0).all()
    assert (draws.float().mean(0) - x.float().mean(0)).abs().max() < 3  # grey levels
    assert (draws.float().std(0)[:, 1:] / x.float().std(0)[:, 1:] - 1).abs().max() < 0.1
    pair = draws[:, 0, 2, 2:4].double().T  # (2, 4000)
    assert torch.corrcoef(pair)[0, 1] < -0.99


# ---- labels: the official formats, aligned with 03's load_images (pixel value = 10 * label)
def write_idx(path, array, magic):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    header = np.array([magic, len(array), *array.shape[1:]], ">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_mnist(root, labels, with_labels=True):
    for part, y in labels.items():
        images = np.repeat(10 * y, 28 * 28).reshape(-1, 28, 28)
        write_idx(os.path.join(root, "mnist", f"{part}-images-idx3-ubyte.gz"), images, 2051)
        if with_labels:
            write_idx(os.path.join(root, "mnist", f"{part}-labels-idx1-ubyte.gz"), y, 2049)


def test_idx_labels_align_with_03s_images(score, mdsm, tmp_path):
    labels = {"train": np.array([3, 1, 4, 1, 5]), "t10k": np.array([9, 2, 6])}
    write_mnist(str(tmp_path), labels)
    for split, part in (("train", "train"), ("test", "t10k")):
        x = mdsm.load_images("mnist", str(tmp_path), split, 8)
        y = score.load_labels("mnist", str(tmp_path), split)
        assert y.tolist() == labels[part].tolist()
        assert (x[:, 0, 0, 0] == 10 * y).all()


def test_idx_labels_missing_offline_or_corrupt_give_one_line(score, tmp_path, monkeypatch):
    write_mnist(str(tmp_path), {"train": np.array([1, 2])}, with_labels=False)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(SystemExit) as e:
        score.load_labels("mnist", str(tmp_path), "train")
    assert "train-labels-idx1-ubyte.gz" in one_line_error(e)
    write_idx(str(tmp_path / "mnist" / "train-labels-idx1-ubyte.gz"), np.array([1, 2]), 2051)
    with pytest.raises(SystemExit) as e:
        score.load_labels("mnist", str(tmp_path), "train")
    assert "not an IDX label file" in one_line_error(e)


def write_cifar(root, labels_per_batch):
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    for name, y in labels_per_batch.items():
        data = np.repeat(10 * np.array(y, np.uint8), 3072).reshape(-1, 3072)  # R, G, B planes
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({b"data": data, b"labels": list(y)}, f)


def test_cifar10_labels_align_with_03s_images(score, mdsm, tmp_path):
    batches = {f"data_batch_{i}": [i, (i + 5) % 10] for i in range(1, 6)}
    batches["test_batch"] = [7, 0, 3]
    write_cifar(str(tmp_path), batches)
    y = score.load_labels("cifar10", str(tmp_path), "train")
    assert y.tolist() == [1, 6, 2, 7, 3, 8, 4, 9, 5, 0]  # data_batch_1 .. 5, in order
    x = mdsm.load_images("cifar10", str(tmp_path), "train")
    assert (x[:, :, 5, 5] == 10 * y[:, None]).all()
    assert score.load_labels("cifar10", str(tmp_path), "test").tolist() == [7, 0, 3]
    os.remove(tmp_path / "cifar-10-batches-py" / "test_batch")
    with pytest.raises(SystemExit) as e:
        score.load_labels("cifar10", str(tmp_path), "test")
    assert "test_batch" in one_line_error(e)


def test_npz_labels_align_and_missing_ones_give_one_line(score, mdsm, tmp_path):
    path = str(tmp_path / "mine.npz")
    y_train, y_test = np.array([2, 0, 1, 2]), np.array([1, 0])
    x_train, x_test = (
        np.repeat(10 * y, 64).reshape(-1, 8, 8).astype(np.uint8) for y in (y_train, y_test)
    )
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    for split, y in (("train", y_train), ("test", y_test)):
        x = mdsm.load_images(path, "data", split)
        labels = score.load_labels(path, "data", split)
        assert labels.tolist() == y.tolist() and (x[:, 0, 3, 3] == 10 * labels).all()
    np.savez(path, x_train=x_train, x_test=x_test)
    with pytest.raises(SystemExit) as e:
        score.load_labels(path, "data", "train")
    assert "no y_train" in one_line_error(e)


# ---- the classifier score on a tiny labelled set of strokes
def synthetic_digits(n, seed):
    """4 classes of 8x8 strokes at random places: a row, a column, a diagonal, a 3x3 square."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.zeros(n, 8, 8)
    at = torch.randint(1, 5, (n,), generator=g)
    for i in range(n):
        k = at[i].item()
        if y[i] == 0:
            x[i, k, 1:7] = 1
        elif y[i] == 1:
            x[i, 1:7, k] = 1
        elif y[i] == 2:
            x[i] = torch.eye(8).roll(k - 2, 1)
        else:
            x[i, k : k + 3, k : k + 3] = 1
    x = (x * 220 + 20 * torch.rand(n, 8, 8, generator=g)).round().to(torch.uint8)
    return x.numpy(), y.numpy()


def test_real_images_score_above_the_gaussian_baseline(score, capsys):
    (x_train, y_train), (x_test, y_test) = synthetic_digits(1200, 0), synthetic_digits(400, 1)
    train, test = torch.from_numpy(x_train[:, None]), torch.from_numpy(x_test[:, None])
    labels = (torch.from_numpy(y_train), torch.from_numpy(y_test))
    classifier = score.train_classifier(train, labels[0], 4, epochs=6)
    # "samples" that are the reference half of the test split (seeded): FD 0 exactly; the real
    # images come from the other half, so their FD is the sampling noise at this n
    half = test[torch.randperm(400, generator=torch.Generator().manual_seed(0))[:200]]
    scores = score.sample_scores(classifier, half, train, test, labels, 200)
    assert capsys.readouterr().out.count("classifier score: confident ") == 3
    good = scores["real test images (ceiling)"]
    bad = scores["Gaussian fit to the training pixels (baseline)"]
    assert good["confident"] > 0.9 and good["class TV"] < 0.1 and good["IS"] > 3.5
    assert good["confident"] > bad["confident"] + 0.2 and good["class TV"] < bad["class TV"]
    assert good["IS"] > bad["IS"] and bad["FD"] > 20 * good["FD"] and good["FD"] > 0.1
    assert scores["samples"]["n"] == good["n"] == bad["n"] == 200
    assert abs(scores["samples"]["FD"]) < 1e-4 and scores["samples"]["confident"] > 0.9


# ---- end to end: a tiny checkpoint of 03 on labelled 8x8 strokes
def write_labelled_run(mdsm, tmp_path, n_train=1200, **arrays):
    (x_train, y_train), (x_test, y_test) = synthetic_digits(n_train, 0), synthetic_digits(40, 1)
    data = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    data = {k: v for k, v in {**data, **arrays}.items() if v is not None}
    path = str(tmp_path / "strokes.npz")
    np.savez(path, **data)
    torch.manual_seed(0)
    model = mdsm.EnergyNet(in_channels=1, width=4, blocks_per_stage=1, image_size=8)
    ckpt = str(tmp_path / "tiny.pt")
    mdsm.save_checkpoint(mdsm.make_checkpoint(model, {"SIGMA0": 0.1, "DATASET": path}), ckpt)
    args = [
        f"--ckpt={ckpt}", "--n_samples=6", "--batch=4", "--n_hot=3", "--n_anneal=5", "--n_cool=2",
        "--n_ref=10", "--device=cpu", f"--out_dir={tmp_path / 'out'}", "--classifier_epochs=1",
        "--score_n=6", "--fid_n=6",
    ]  # fmt: skip
    return args, tmp_path / "out" / f"{tmp_path.name}_tiny", path


def test_score_prints_three_lines_and_caches_its_classifier(score, mdsm, tmp_path, capsys):
    args, out, path = write_labelled_run(mdsm, tmp_path)
    score.main(args + ["--score"])
    text = capsys.readouterr().out
    assert "classifier: trained 1 epochs on 1200 images" in text and "test accuracy" in text
    for label in ("samples", "real test images (ceiling)", "Gaussian fit to the training pixels"):
        assert f"| n 6 | {label}" in text
    score.main(args + ["--score"])
    assert "classifier: loaded" in capsys.readouterr().out
    x_other, y_other = synthetic_digits(1200, 2)  # the same name and shapes, other images
    x_test, y_test = synthetic_digits(40, 1)
    np.savez(path, x_train=x_other, y_train=y_other, x_test=x_test, y_test=y_test)
    score.main(args + ["--score"])
    text = capsys.readouterr().out
    assert "is stale" in text and "data_sha256" in text and "trained 1 epochs" in text


def test_samples_of_an_earlier_run_are_scored_without_sampling(score, mdsm, tmp_path, capsys):
    args, out, path = write_labelled_run(mdsm, tmp_path)
    score.main(args + ["--n_samples=5"])
    capsys.readouterr()
    first = np.load(out / "samples.npz")["samples"]
    score.main(args + [f"--samples={out / 'samples.npz'}", "--score"])
    text = capsys.readouterr().out
    assert "5 samples read from" in text and "samples/s" not in text
    assert "| n 5 | samples" in text and "| n 6 | real test images" in text
    assert np.array_equal(np.load(out / "samples.npz")["samples"], first)  # not overwritten


def test_score_n_raises_the_number_of_samples_drawn(score, mdsm, tmp_path, capsys):
    args, out, path = write_labelled_run(mdsm, tmp_path, n_train=200)
    score.main(args + ["--score", "--score_n=9"])
    assert "note: --n_samples=6 raised to 9" in capsys.readouterr().out
    assert np.load(out / "samples.npz")["samples"].shape == (9, 8, 8, 1)


def write_samples(path, shape):
    np.savez(path, samples=np.zeros(shape, np.uint8))
    return f"--samples={path}"


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--score", "y_train=short"], "strokes.npz: 40 train images but 39 labels"),
        (["--score", "y_train=none"], "strokes.npz has no y_train array"),
        (["samples=8x8x3"], "holds 3-channel 8x8 images, but the model makes 1-channel 8x8"),
        (["samples=one"], "expected uint8 .N, H, W, C., N >= 2"),
        (["--samples=nowhere.npz"], "--samples=nowhere.npz is not a samples.npz written by 04"),
        (["--fid", "no_torch_fidelity"], "--fid needs torch-fidelity.*pip install torch-fidelity"),
    ],
)
def test_scoring_problems_stop_before_any_sampling(
    score, mdsm, tmp_path, monkeypatch, capsys, extra, words
):
    kw = {}
    argv = []
    for item in extra:
        if item == "y_train=short":
            kw["y_train"] = synthetic_digits(40, 0)[1][:-1]
        elif item == "y_train=none":
            kw["y_train"] = None
        elif item == "samples=8x8x3":
            argv.append(write_samples(tmp_path / "s.npz", (4, 8, 8, 3)))
        elif item == "samples=one":
            argv.append(write_samples(tmp_path / "s.npz", (1, 8, 8, 1)))
        elif item == "no_torch_fidelity":  # the import fails as if it were not installed
            monkeypatch.setitem(sys.modules, "torch_fidelity", None)
        else:
            argv.append(item)
    args, out, path = write_labelled_run(mdsm, tmp_path, n_train=40, **kw)
    with pytest.raises(SystemExit) as e:
        score.main(args + argv)
    assert re.search(words, one_line_error(e)), str(e.value)
    assert not (out / "samples.png").exists() and "samples/s" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--score"], "--score judges a model's samples; pass --ckpt"),
        (["--fid"], "--fid judges a model's samples; pass --ckpt"),
        (["--samples=s.npz"], "--samples judges a model's samples; pass --ckpt"),
        (["--ckpt=c.pt", "--ais", "--score"], "--score judges samples, and --ais draws none"),
        (["--score_n=1"], "--score_n=1 is out of range; allowed: >= 2"),
        (["--fid_n=0"], "--fid_n=0 is out of range; allowed: >= 2"),
        (["--classifier_epochs=0"], "--classifier_epochs=0 is out of range; allowed: >= 1"),
    ],
)
def test_scoring_knobs_are_one_line_errors(score, tmp_path, argv, words):
    with pytest.raises(SystemExit) as e:
        score.main(argv + [f"--out_dir={tmp_path}"])
    assert words in one_line_error(e)
    assert not list(tmp_path.iterdir())  # refused before anything was written


# ---- IS and FID: the export, the one-line errors, the wiring
def test_export_for_torch_fidelity(score, tmp_path):
    grey = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    rgb = score.rgb_uint8(grey)
    assert rgb.dtype == torch.uint8 and rgb.shape == (5, 3, 8, 8)
    assert (rgb == grey).all()  # the same grey level in R, G and B
    colour = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(score.rgb_uint8(colour), colour)
    path = str(tmp_path / "samples.npz")
    np.savez(path, samples=grey.permute(0, 2, 3, 1).numpy())  # 04 writes (N, H, W, C)
    assert torch.equal(score.read_samples(path, (1, 8, 8)), grey)


class FakeInception(torch.nn.Module):
    """Stands in for torch-fidelity's FeatureExtractorInceptionV3: takes what it takes (uint8
    (B, 3, H, W)) and returns (features, logits) from the image's four quadrant means."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None):
        super().__init__()
        assert name == "inception-v3-compat" and features_list == ["2048", "logits_unbiased"]
        assert os.path.exists(feature_extractor_weights_path)
        self.w = torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3
        h, w = x.shape[2] // 2, x.shape[3] // 2
        quads = [x[:, :, i : i + h, j : j + w] for i in (0, h) for j in (0, w)]
        feats = torch.stack([q.float().mean((1, 2, 3)) / 255 for q in quads], 1)  # (B, 4)
        return feats, 10 * feats @ self.w


def fake_torch_fidelity(monkeypatch, url):
    package = types.ModuleType("torch_fidelity")
    inception = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    inception.URL_INCEPTION_V3 = url
    inception.FeatureExtractorInceptionV3 = FakeInception
    package.feature_extractor_inceptionv3 = inception
    monkeypatch.setitem(sys.modules, "torch_fidelity", package)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", inception)


def fake_weights(monkeypatch, tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"weights")
    prefix = hashlib.sha256(b"weights").hexdigest()[:8]
    fake_torch_fidelity(monkeypatch, f"https://example.invalid/weights-inception-{prefix}.pth")
    return weights


def test_fidelity_check_without_the_package(score, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # import fails as if not installed
    with pytest.raises(SystemExit) as e:
        score.check_fidelity_available()
    assert "pip install torch-fidelity" in one_line_error(e)


def test_fidelity_check_offline_without_the_weights(score, monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    fake_torch_fidelity(
        monkeypatch, "https://example.invalid/weights-inception-2015-12-05-6726825d.pth"
    )
    with pytest.raises(SystemExit) as e:
        score.check_fidelity_available()
    where = os.path.join(
        str(tmp_path), "hub", "checkpoints", "weights-inception-2015-12-05-6726825d.pth"
    )
    assert f"weights at {where} " in one_line_error(e) and "URLError" in str(e.value)


def test_fidelity_check_accepts_the_right_file_and_refuses_another(score, monkeypatch, tmp_path):
    weights = fake_weights(monkeypatch, tmp_path)
    assert score.check_fidelity_available(str(weights)) == str(weights)
    weights.write_bytes(b"a truncated copy")
    with pytest.raises(SystemExit) as e:
        score.check_fidelity_available(str(weights))
    assert "is not weights-inception" in one_line_error(e)


def test_fid_is_the_frechet_distance_of_the_inception_features(score, monkeypatch, tmp_path):
    weights = fake_weights(monkeypatch, tmp_path)
    net = score.inception_network(str(weights), torch.device("cpu"))
    x_train = torch.from_numpy(synthetic_digits(60, 0)[0][:, None])
    x_test = torch.from_numpy(synthetic_digits(30, 1)[0][:, None])
    refs = score.inception_references(net, x_train, x_test, 20)
    feats = {k: net(score.rgb_uint8(v))[0] for k, v in (("train", x_train), ("test", x_test))}
    train_gaussian = (feats["train"].double().mean(0), torch.cov(feats["train"].double().T))
    assert torch.allclose(refs["train"][0], train_gaussian[0])
    assert torch.allclose(refs["train"][1], train_gaussian[1])
    test_gaussian = (feats["test"].double().mean(0), torch.cov(feats["test"].double().T))
    assert refs["test FID"] == pytest.approx(
        score.frechet_distance(*test_gaussian, *train_gaussian)
    )
    assert refs["n real"] == 20 and refs["n test"] == 30 and refs["real IS"][0] >= 1
    out = score.fidelity_scores(net, x_train, refs)  # the training images against themselves
    assert abs(out["FID"]) < 1e-9 and out["IS"] >= 1
    assert score.fidelity_scores(net, x_test, refs)["FID"] == pytest.approx(refs["test FID"])


def test_fid_end_to_end_and_its_cached_references(score, mdsm, monkeypatch, tmp_path, capsys):
    weights = fake_weights(monkeypatch, tmp_path)
    args, out, path = write_labelled_run(mdsm, tmp_path, n_train=40)
    score.main(args + ["--fid", f"--fid_weights={weights}"])
    text = capsys.readouterr().out
    assert "IS and FID (torch-fidelity's Inception): IS " in text
    assert "| n 6 samples vs 40 training images" in text
    assert "real training images: IS" in text and "(n 6, the ceiling)" in text
    assert "FID" in text and "(n 40, the floor)" in text
    assert "paper (MDSM on CIFAR-10, n 50000): IS 8.31 | FID 31.7" in text
    assert "note: n 6 < 50000" in text and "inception references: 40 + 40 images" in text
    score.main(args + ["--fid", f"--fid_weights={weights}"])
    assert "inception references: loaded" in capsys.readouterr().out


def test_ours_equal_torch_fidelitys_own_is_and_fid(score, monkeypatch, tmp_path):
    """The real torch-fidelity where installed, with random Inception weights (no download): 04's
    IS and FID equal calculate_metrics' on the same images."""
    inception = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    torch_fidelity = pytest.importorskip("torch_fidelity")
    with monkeypatch.context() as m:  # build the network without any weights file
        m.setattr(inception, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        torch.manual_seed(0)
        net = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), tmp_path / "random.pth")
    # fast: 75x75 inputs, not 299x299, and FID on the 64 features of the first block, not the
    # 2048 of the last
    monkeypatch.setattr(inception.FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", 75)
    layers = {"isc": "logits_unbiased", "fid": "64"}
    monkeypatch.setattr(
        inception.FeatureExtractorInceptionV3,
        "get_default_feature_layer_for_metric",
        staticmethod(lambda metric: layers[metric]),
    )
    ours = inception.FeatureExtractorInceptionV3(
        "inception-v3-compat",
        ["64", "logits_unbiased"],
        feature_extractor_weights_path=str(tmp_path / "random.pth"),
    ).eval()
    g = torch.Generator().manual_seed(0)
    samples = torch.randint(0, 256, (80, 1, 8, 8), generator=g, dtype=torch.uint8)
    train = torch.randint(0, 256, (100, 1, 8, 8), generator=g, dtype=torch.uint8)
    refs = score.inception_references(ours, train, train[:10], 80)
    mine = score.fidelity_scores(ours, samples, refs)

    class Images(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = score.rgb_uint8(x)

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i]

    theirs = torch_fidelity.calculate_metrics(
        input1=Images(samples),
        input2=Images(train),
        isc=True,
        fid=True,
        cuda=False,
        save_cpu_ram=True,
        verbose=False,
        feature_extractor_weights_path=str(tmp_path / "random.pth"),
    )
    assert mine["IS"] == pytest.approx(theirs["inception_score_mean"], rel=1e-5)
    assert mine["IS std"] == pytest.approx(theirs["inception_score_std"], rel=1e-3, abs=1e-6)
    assert mine["FID"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-4)
