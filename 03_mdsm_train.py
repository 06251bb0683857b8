"""03 - Multiscale denoising score matching (MDSM): train an energy-based model on images.

Paper: Z. Li, Y. Chen, F. T. Sommer, "Learning Energy-Based Models in High-Dimensional Spaces with
Multiscale Denoising Score Matching", arXiv 1910.07762 (Entropy 2023). Facts: shared spec MDSM.md.

One network E(x) gives a scalar energy per image (low energy = likely image; the score is -grad E).
MDSM (eq. 10 of the paper, weighted by 1/sigma^2 as in the authors' code) trains it at every noise
level sigma in [0.05, 1.2] at once, with x~ = x + sigma * eps:
    L = E_{x, sigma, eps} || x - x~ + sigma0^2 grad E(x~) ||^2 / (sigma^2 sigma0^4)
Its minimizer is sigma0^2 grad E(x~) = x~ - E[x | x~] (Tweedie): one step of size sigma0^2 down the
energy denoises x~, and exp(-E / T) matches the noisy data at T = sigma^2 / sigma0^2, which 04 anneals
through. The step differentiates through grad_x E ("double backprop": about six forward passes).

Commands (the progress grids show clean / noisy / denoised rows; see the README for measured runs)
  python 03_mdsm_train.py --dataset=mnist --image_size=16 --width=16 --blocks_per_stage=1 --batch_size=64 \
      --steps=3000 --lr=5e-4 --lr_min=1e-5           # CPU: tens of minutes, a few denoised digits
  python 03_mdsm_train.py --dataset=cifar10          # the paper's run: 62M params, 300k steps (GPU)
  torchrun --nproc_per_node=8 03_mdsm_train.py --dataset=cifar10   # the same steps on 8 GPUs
  python 03_mdsm_train.py --dataset=fashion-mnist --lr=1e-4 --steps=100000 --sigma_min=0.1 \
      --sigma_max=3 --sigma_spacing=log             # the authors' Fashion-MNIST settings (GPU)
  python 03_mdsm_train.py --benchmark                # ms/step and loss trajectory of each precision
  python 03_mdsm_train.py --resume --lr=2e-5         # continue --out_dir's run (new lr/steps apply)
  python 03_mdsm_train.py --dataset=mnist --smoke    # seconds: plumbing check
Outputs (in --out_dir): ckpt.pt (everything needed to resume), denoise_XXXXXX.png progress grids.
"""
import hashlib
import math
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.request
import gzip

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# ---- config: every knob can be overridden with --key=value (see --help) ----
DATASET = "cifar10"          # cifar10 | mnist | fashion-mnist | path to .npz/.npy of uint8 images (N, H, W[, C])
DATA_DIR = "data"            # where archives are downloaded, checked and extracted
IMAGE_SIZE = 0               # 0 = native (MNIST padded to 32); >0 area-downsamples to this side (16 for a CPU run)
OUT_DIR = "out/03_mdsm_train"  # checkpoint and PNG grids of this run
WIDTH = 0                    # base channels; 0 = the paper's (128 for colour, 64 for grayscale)
BLOCKS_PER_STAGE = 0         # residual blocks per resolution; 0 = the paper's (3 colour, 2 grayscale)
SIGMA0 = 0.1                 # the small fixed noise scale of the target (paper: 0.1)
SIGMA_MIN = 0.05             # smallest training noise std (pixels in [0, 1])
SIGMA_MAX = 1.2              # largest training noise std
SIGMA_SPACING = "linear"     # linear (CIFAR-10 code) | log (the paper's Fashion-MNIST setting)
BATCH_SIZE = 128             # global batch, one noise level per slot; torchrun ranks split it evenly
STEPS = 300_000              # training iterations (the paper's released model: 270k)
LR = 5e-5                    # Adam learning rate at step 0
LR_MIN = 1e-6                # cosine decay floor, reached at STEPS
BETA1 = 0.9                  # Adam beta1
BETA2 = 0.95                 # Adam beta2
EMA_DECAY = 0.0              # EMA of the weights, saved beside them; 0 = off (paper), 0.9999 typical
LOG_EVERY = 50               # steps between log lines and loss checks (the authors logged every 50)
GRID_EVERY = 2000            # steps between noisy -> denoised PNG grids
CKPT_EVERY = 5000            # steps between checkpoints (one more at the end) ...
CKPT_MINUTES = 10.0          # ... and at the first log line this many minutes after the last save
RESUME = False               # continue from OUT_DIR/ckpt.pt; a new --lr/--lr_min/--steps rebuilds the schedule
PRECISION = "fp32"           # fp32 (true fp32, TF32 off: the authors') | tf32 | bf16 (autocast trunk; CUDA)
COMPILE = False              # torch.compile the loss through torch.func (checked against eager on step 1)
BENCHMARK = False            # run each precision/compile variant BENCH_STEPS steps instead of training
BENCH_STEPS = 100            # steps per benchmark variant (the same start, data and noise for each)
BENCH_TOL = 0.01             # largest relative loss difference accepted against the fp32 / eager reference
SMOKE = False                # width 8, 1 block per stage, batch 16, 20 steps for knobs you did not pass
DEVICE = "auto"              # auto | cpu | cuda | mps (under torchrun each rank takes cuda:LOCAL_RANK)
SEED = 0                     # seeds data order, noise and initialization

# The shared helpers (device, seed, --key=value overrides, logging, image grids) are at the end of the file.


# ---------------------------------------------------------------------------------------------
# Data: the official archives, downloaded once, checked, and kept whole on the device as uint8.
# ---------------------------------------------------------------------------------------------
CIFAR10_ARCHIVE = ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")
IDX_FILES = {  # name -> (mirrors, {file: md5 of the .gz})
    "mnist": (["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
              {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
               "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3"}),
    "fashion-mnist": (["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
                      {"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                       "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79"}),
}


def fetch(urls, path, md5):
    """Download to `path` (trying each mirror) unless it is there; verify the MD5 either way."""
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        for url in urls:
            try:
                print(f"downloading {url}", flush=True)
                with urllib.request.urlopen(url, timeout=60) as r, open(path + ".part", "wb") as f:
                    shutil.copyfileobj(r, f)
                os.replace(path + ".part", path)
                break
            except OSError as e:
                print(f"  failed: {e}", flush=True)
        else:
            raise SystemExit(f"error: could not download {os.path.basename(path)}. Download it by hand from "
                             f"{urls[0]} and put it at {path} (or point --data_dir at a folder that has it)")
    with open(path, "rb") as f:
        if hashlib.file_digest(f, "md5").hexdigest() != md5:
            raise SystemExit(f"error: {path} is corrupt or incomplete (MD5 mismatch). Delete it and run again, "
                             f"or download it by hand from {urls[0]} and put it there")


def read_cifar10(data_dir, split):
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    if not all(os.path.exists(os.path.join(folder, n)) for n in names):
        archive = os.path.join(data_dir, "cifar-10-python.tar.gz")
        fetch([CIFAR10_ARCHIVE[0]], archive, CIFAR10_ARCHIVE[1])
        with tarfile.open(archive) as tar:
            tar.extractall(data_dir, filter="data")
    chunks = []
    for n in names:
        try:
            with open(os.path.join(folder, n), "rb") as f:
                chunks.append(np.asarray(pickle.load(f, encoding="bytes")[b"data"], np.uint8).reshape(-1, 3, 32, 32))
        except Exception as e:  # a truncated or foreign file: say which, and how to fix it
            raise SystemExit(f"error: {os.path.join(folder, n)} is not a CIFAR-10 batch ({type(e).__name__}). "
                             f"Delete {folder} and run again to re-extract it") from None
    return np.concatenate(chunks)  # (N, 3, 32, 32), official R, G, B planes


def read_idx_images(data_dir, name, split):
    mirrors, files = IDX_FILES[name]
    fname = ("train" if split == "train" else "t10k") + "-images-idx3-ubyte.gz"
    path = os.path.join(data_dir, name, fname)
    if not os.path.exists(path):  # files put there by hand are checked by their IDX header below
        fetch([m + fname for m in mirrors], path, files[fname])
    try:
        raw = bytearray(gzip.open(path).read())  # writable, so torch.from_numpy needs no copy and no warning
        magic, n, h, w = np.frombuffer(raw[:16], ">u4")
        if magic != 2051 or len(raw) != 16 + n * h * w:
            raise ValueError("bad header")
    except (OSError, ValueError, EOFError):
        raise SystemExit(f"error: {path} is not an IDX image file (corrupt or incomplete). "
                         f"Delete it and run again to download it") from None
    return np.frombuffer(raw, np.uint8, offset=16).reshape(n, 1, h, w)  # 28x28 digits


def read_array_file(path, split):
    """A user's own images: .npy, or .npz with x_train/x_test (else its first array), channels last."""
    expected = "a .npz/.npy of uint8 images (N, H, W) or (N, H, W, C), e.g. np.savez(path, x_train=x, x_test=y)"
    if not os.path.exists(path):
        raise SystemExit(f"error: --dataset={path}: no such file; use cifar10, mnist, fashion-mnist, or {expected}")
    try:
        data = np.load(path)
        x = data if isinstance(data, np.ndarray) else {k: data[k] for k in data.files}
    except Exception as e:  # a text file renamed .npz, a pickle, a truncated archive
        raise SystemExit(f"error: {path} is not a NumPy array file ({type(e).__name__}); expected {expected}") from None
    if isinstance(x, dict):
        key = {"train": "x_train", "test": "x_test"}[split]
        if key not in x and (split == "test" or not x):
            raise SystemExit(f"error: {path} has no {key} array (arrays found: {', '.join(x) or 'none'}); "
                             f"save held-out images as x_test")
        x = x[key] if key in x else next(iter(x.values()))  # a single array = training images
    elif split == "test":
        raise SystemExit(f"error: {path} is one array of training images; for test images save a .npz with x_test")
    if x.dtype != np.uint8 or x.ndim not in (3, 4):
        raise SystemExit(f"error: {path} holds {x.dtype} {x.shape}; expected uint8 images (N, H, W) or (N, H, W, C)")
    if x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[3] not in (1, 3):
        raise SystemExit(f"error: {path} holds {x.shape}, which looks channels-first (N, C, H, W); save "
                         f"channels-last images (N, H, W, C), e.g. np.savez(path, x_train=x.transpose(0, 2, 3, 1))")
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # -> (N, C, H, W)
    if x.shape[1] not in (1, 3) or x.shape[2] % 8 or x.shape[3] % 8 or min(x.shape[2:]) < 8:
        raise SystemExit(f"error: {path}: images are {x.shape[2]}x{x.shape[3]} with {x.shape[1]} channels; the "
                         f"network needs 1 or 3 channels and sides divisible by 8 (pad or crop, or pass --image_size)")
    return x


def load_images(dataset, data_dir="data", split="train", image_size=0):
    """All images of a split as a uint8 tensor (N, C, H, W); downloads on first use. image_size > 0
    area-averages them to image_size x image_size (rounded back to 8 bits: MNIST 28 -> 16 for a CPU run);
    0 keeps them (any H x W with sides divisible by 8), except that 28x28 digits are padded to 32x32."""
    if dataset == "cifar10":
        x = read_cifar10(data_dir, split)
    elif dataset in IDX_FILES:
        x = read_idx_images(data_dir, dataset, split)
    elif dataset.endswith((".npz", ".npy")):
        x = read_array_file(dataset, split)
    else:
        raise SystemExit(f"error: unknown --dataset={dataset}; use cifar10, mnist, fashion-mnist, "
                         f"or a path to a .npz/.npy of uint8 images")
    x = torch.from_numpy(np.ascontiguousarray(x))
    if image_size > 0:
        if image_size % 8:
            raise SystemExit(f"error: --image_size={image_size}: the network needs sides divisible by 8 (8, 16, 24, 32)")
        x = F.adaptive_avg_pool2d(x.float(), image_size).round().to(torch.uint8)  # area averaging
    elif dataset in IDX_FILES:
        x = F.pad(x, (2, 2, 2, 2))  # the paper pads 28x28 digits with zeros so three 2x poolings give 4x4
    return x


def images_to_float(x):
    """uint8 in {0..255} -> float in [0, 1]. No centring or dequantization, as in the paper."""
    return x.float() / 255.0


# ---------------------------------------------------------------------------------------------
# Model: a ResNet energy with ELU (smooth: the loss differentiates through grad_x E, which ReLU
# would make piecewise constant), no normalization layers, and a quadratic scalar head.
# ---------------------------------------------------------------------------------------------
class ResBlock(nn.Module):
    """Pre-activation block: out = shortcut(x) + conv2(elu(conv1(elu(x)))), optional 2x mean-pool."""

    def __init__(self, c_in, c_out, down):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_in, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1)  # learned 1x1 shortcut in every block
        self.down = down

    def forward(self, x):
        h = self.conv2(F.elu(self.conv1(F.elu(x))))
        if self.down:  # conv then pool on the residual path; pool then 1x1 conv on the shortcut
            return F.avg_pool2d(h, 2) + self.shortcut(F.avg_pool2d(x, 2))
        return h + self.shortcut(x)


class EnergyNet(nn.Module):
    """E(x): (B, C, H, W) -> (B,). CIFAR-10: EnergyNet(3, 128, 3), 62M parameters, 6.6 GFLOP/image.
    image_size: the side, or [height, width] of non-square images (sides divisible by 8)."""

    def __init__(self, in_channels=3, width=128, blocks_per_stage=3, image_size=32):
        super().__init__()
        self.model_args = dict(in_channels=in_channels, width=width, blocks_per_stage=blocks_per_stage,
                               image_size=image_size)
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        self.conv_in = nn.Conv2d(in_channels, width, 3, padding=1)
        blocks, c = [], width
        for c_out in (2 * width, 4 * width, 8 * width):  # 32x32 -> 16x16 -> 8x8 -> 4x4
            blocks.append(ResBlock(c, c_out, down=True))
            blocks += [ResBlock(c_out, c_out, down=False) for _ in range(blocks_per_stage - 1)]
            c = c_out
        self.blocks = nn.Sequential(*blocks)
        n_features = c * (h // 8) * (w // 8)  # 1024 * 4 * 4 = 16384 for CIFAR-10
        self.lin1, self.lin2, self.lin3 = (nn.Linear(n_features, 1) for _ in range(3))

    def forward(self, x):
        h = self.blocks(self.conv_in(x)).flatten(1)  # (B, 8*width*(H/8)*(W/8)); no activation before the head, as coded
        with torch.autocast(x.device.type, enabled=False):  # the head and its output stay fp32
            h = h.float()
            # "quadratic neuron": E = (w1.h + b1)(w2.h + b2) + w3.(h*h) + b3. The constant b3 (lin3.bias)
            # drops out of grad_x E, so it never gets a gradient; b1 and b2 do, through the product.
            energy = self.lin1(h) * self.lin2(h) + self.lin3(h * h)
        return energy.squeeze(1)  # (B,)


# ---------------------------------------------------------------------------------------------
# Loss: MDSM as the authors coded it.
# ---------------------------------------------------------------------------------------------
def noise_levels(batch_size, sigma_min, sigma_max, spacing="linear", device="cpu"):
    """One sigma per global batch slot, stratified over [sigma_min, sigma_max] (shuffled data pairs them)."""
    if spacing == "log":
        return torch.logspace(np.log10(sigma_min), np.log10(sigma_max), batch_size, device=device)
    return torch.linspace(sigma_min, sigma_max, batch_size, device=device)


def mdsm_residual(x, sigmas, eps, grad_energy, sigma0):
    """Per-sample loss from grad_x E evaluated at x~ = x + sigma * eps: (B,)."""
    s = sigmas.view(-1, *([1] * (x.dim() - 1)))  # (B, 1, 1, 1)
    # eq. 10 with the code's 1/sigma^2 weight: ||x - x~ + sigma0^2 grad E(x~)||^2 / (sigma^2 sigma0^4),
    # where x - x~ = -sigma * eps
    r = sigma0**2 * grad_energy.to(eps.dtype) - s * eps  # (B, C, H, W), fp32 even under autocast
    return r.pow(2).flatten(1).sum(1) / (sigmas**2 * sigma0**4)  # (B,)


def mdsm_loss(model, x, sigmas, eps, sigma0):
    """Eager reference: E(x~), then grad_x E with create_graph=True so the loss can be
    differentiated again with respect to the weights (double backprop)."""
    x_noisy = (x + sigmas.view(-1, 1, 1, 1) * eps).requires_grad_(True)  # x~ = x + sigma*eps
    energy = model(x_noisy)  # (B,)
    (grad_energy,) = torch.autograd.grad(energy.sum(), x_noisy, create_graph=True)  # (B, C, H, W)
    return mdsm_residual(x, sigmas, eps, grad_energy, sigma0).mean()


def make_functional_loss(model, sigma0):
    """The same loss with torch.func, the form torch.compile can trace: grad_x E comes from
    func.grad inside the function and the caller runs one ordinary .backward()."""
    def loss_fn(params, x, sigmas, eps):
        def total_energy(x_noisy):
            return torch.func.functional_call(model, params, (x_noisy,)).sum()
        grad_energy = torch.func.grad(total_energy)(x + sigmas.view(-1, 1, 1, 1) * eps)
        return mdsm_residual(x, sigmas, eps, grad_energy, sigma0).mean()
    return loss_fn


# ---------------------------------------------------------------------------------------------
# Checkpoints: one dict, written atomically, refused with a clear message when it does not fit.
# ---------------------------------------------------------------------------------------------
def make_checkpoint(model, config, step=0, optimizer=None, scheduler=None, ema=None, kind="mdsm-energy", **extra):
    """Everything needed to resume or sample; weights come from the uncompiled model."""
    ckpt = {"kind": kind, "model_args": dict(model.model_args), "config": dict(config), "step": step,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    for name, part in (("optimizer", optimizer), ("scheduler", scheduler)):
        if part is not None:
            ckpt[name] = part.state_dict()
    if ema is not None:
        ckpt["ema"] = {k: v.detach().cpu() for k, v in ema.items()}
    return {**ckpt, **extra}


def save_checkpoint(ckpt, path):
    """Write a temporary file, then rename it over `path` (atomic): a crash or a full disk mid-write
    leaves the previous checkpoint whole, and the partial temporary file is removed."""
    tmp = path + ".tmp"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch reports a full disk as RuntimeError "unexpected pos ..."
        if os.path.exists(tmp):
            os.remove(tmp)
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2**20
        kept = "the previous checkpoint is kept" if os.path.exists(path) else "no checkpoint was written yet"
        raise SystemExit(f"error: could not write {path} ({e}; {free:.0f} MiB free on that disk); {kept}. "
                         f"Free some space or pass another --out_dir, then --resume") from None


def load_checkpoint(path, kind="mdsm-energy", map_location="cpu"):
    if not os.path.isfile(path):
        raise SystemExit(f"error: no checkpoint at {path}. Train one with 03_mdsm_train.py, or pass the right path")
    try:  # weights_only: plain tensors and Python containers, no arbitrary code
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: {path} is not a readable checkpoint ({type(e).__name__}); it may be truncated "
                         f"or written by another program: pass another file") from None
    if not isinstance(ckpt, dict) or "kind" not in ckpt or "model" not in ckpt:
        raise SystemExit(f"error: {path} is not a checkpoint of this repository (no 'kind'/'model' entries)")
    if ckpt["kind"] != kind:
        raise SystemExit(f"error: {path} holds a '{ckpt['kind']}' checkpoint, but this needs '{kind}' "
                         f"(03_mdsm_train.py writes mdsm-energy, 05_dual_score.py writes dual-score)")
    return ckpt


def load_model(path, device="cpu", use_ema=False):
    """EnergyNet from a checkpoint, in eval mode: (model, ckpt)."""
    ckpt = load_checkpoint(path)
    args, ints = ckpt.get("model_args"), ("in_channels", "width", "blocks_per_stage")
    try:  # a hand-edited model_args (a key added or lost, a wrong type) gets one line, not a traceback
        if not isinstance(args, dict) or set(args) != {*ints, "image_size"} or any(type(args[k]) is not int for k in ints):
            raise TypeError
        model = EnergyNet(**args)
        model.load_state_dict(ckpt["ema"] if use_ema and "ema" in ckpt else ckpt["model"])
    except (TypeError, ValueError, RuntimeError):
        raise SystemExit(f"error: {path} has model_args {args} that do not build the saved weights; expected "
                         f"integers in_channels, width, blocks_per_stage and image_size (or [height, width])") from None
    return model.to(device).eval(), ckpt


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def check_config(cfg):
    """Every knob against its allowed range before any work: one line names the first one outside it."""
    rules = [("BATCH_SIZE", cfg.BATCH_SIZE >= 1, "an integer >= 1"), ("STEPS", cfg.STEPS >= 1, "an integer >= 1"),
             ("LR", cfg.LR > 0, "a number > 0"), ("LR_MIN", 0 <= cfg.LR_MIN <= cfg.LR, "between 0 and --lr"),
             ("BETA1", 0 <= cfg.BETA1 < 1, "in [0, 1)"), ("BETA2", 0 <= cfg.BETA2 < 1, "in [0, 1)"),
             ("EMA_DECAY", 0 <= cfg.EMA_DECAY < 1, "in [0, 1); 0 = off"), ("WIDTH", cfg.WIDTH >= 0, ">= 0; 0 = the paper's"),
             ("BLOCKS_PER_STAGE", cfg.BLOCKS_PER_STAGE >= 0, ">= 0; 0 = the paper's"),
             ("IMAGE_SIZE", cfg.IMAGE_SIZE >= 0 and cfg.IMAGE_SIZE % 8 == 0, "0 (native) or a multiple of 8"),
             ("SIGMA0", cfg.SIGMA0 > 0, "a number > 0"), ("SIGMA_MIN", 0 < cfg.SIGMA_MIN <= cfg.SIGMA_MAX, "in (0, --sigma_max]"),
             ("SIGMA_SPACING", cfg.SIGMA_SPACING in ("linear", "log"), "linear or log"),
             ("PRECISION", cfg.PRECISION in ("fp32", "tf32", "bf16"), "fp32, tf32 or bf16"),
             ("LOG_EVERY", cfg.LOG_EVERY >= 1, "an integer >= 1"), ("GRID_EVERY", cfg.GRID_EVERY >= 1, "an integer >= 1"),
             ("CKPT_EVERY", cfg.CKPT_EVERY >= 1, "an integer >= 1"), ("CKPT_MINUTES", cfg.CKPT_MINUTES > 0, "minutes > 0"),
             ("BENCH_STEPS", cfg.BENCH_STEPS >= 1, "an integer >= 1"), ("BENCH_TOL", cfg.BENCH_TOL > 0, "a number > 0"),
             ("SEED", cfg.SEED >= 0, "an integer >= 0")]
    for knob, ok, allowed in rules:
        if not ok:
            raise SystemExit(f"error: --{knob.lower()}={getattr(cfg, knob)} is out of range; allowed: {allowed}")


def apply_smoke(cfg, passed):
    """--smoke: tiny values for the knobs the user did not pass on the command line; passed ones win."""
    tiny = dict(WIDTH=8, BLOCKS_PER_STAGE=1, BATCH_SIZE=16, STEPS=20, LOG_EVERY=5, GRID_EVERY=10, CKPT_EVERY=10,
                BENCH_STEPS=3)
    chosen = {k: v for k, v in tiny.items() if k not in passed}
    vars(cfg).update(chosen)
    print("smoke: " + " ".join(f"{k.lower()}={v}" for k, v in chosen.items())
          + "".join(f" (kept your --{k.lower()}={getattr(cfg, k)})" for k in tiny if k in passed), flush=True)


def check_writable(folder):
    """Fail in a second, not after hours of training, if the checkpoint cannot be written there."""
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise SystemExit(f"error: --out_dir={folder} is not writable ({e.strerror or e}); pass another --out_dir") from None


def start_distributed(cfg):
    """Under torchrun (WORLD_SIZE > 1) join the process group, NCCL on GPUs and gloo on CPUs, and take
    this rank's device. Returns (rank, local_rank, world_size, device)."""
    world, device = int(os.environ.get("WORLD_SIZE", 1)), pick_device(cfg.DEVICE)
    if world == 1:
        return 0, 0, 1, device
    if cfg.BATCH_SIZE % world or cfg.BENCHMARK or device.type == "mps":
        raise SystemExit(f"error: under torchrun --batch_size={cfg.BATCH_SIZE} must be a multiple of the {world} "
                         f"ranks, on CUDA or CPU, without --benchmark")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, local_rank, world, device


def set_precision(precision, device):
    """fp32: true fp32 (TF32 off), the authors' arithmetic; tf32: TF32 matrix products and convolutions
    on CUDA (10-bit mantissa inputs); bf16: autocast of the trunk, head and loss stay fp32. -> use_bf16."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed shapes: let cuDNN pick its fastest kernels
    return precision == "bf16"


def cosine_lr(step, lr, lr_min, steps):
    """The learning rate after `step` steps: the authors' CosineAnnealingLR(T_max=steps, eta_min=lr_min)
    in closed form. A function of the step alone, so a resumed run can take a new lr or horizon."""
    return lr_min + (lr - lr_min) * (1 + math.cos(math.pi * step / steps)) / 2


def epoch_order(seed, epoch, n, device):
    """The shuffled order of one epoch, a function of (seed, epoch) only: a resumed run sees the
    same batches. Drawn on the CPU (same on every device), moved to the device once per epoch."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).to(device)


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * w for every tensor of the state dict, in one fused call."""
    torch._foreach_lerp_(list(ema.values()), list(model.state_dict().values()), 1 - decay)


def average_gradients(model, world):
    """Data parallel by hand: one all-reduce sums the ranks' gradients, then / world, so every rank
    steps with the gradient of the global batch mean. lin3.bias gets no gradient (grad_x E does not
    depend on the constant b3): it stays None on every rank and Adam skips it, as in one process.
    DDP would reject such a parameter (or need find_unused_parameters) and hook into the inner grad."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    for g, total in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(total.view_as(g) / world)


def resume(cfg, path, model, opt, ema, noise_gen):
    """Load `path` into this run's objects and return its step. Optimizer and EMA tensors are copied into
    tensors like the model's own (device, memory layout): a CPU run can continue on CUDA and back."""
    ckpt = load_checkpoint(path)
    if ckpt.get("model_args") != model.model_args:
        raise SystemExit(f"error: {path} is a {ckpt.get('model_args')} model but this run builds "
                         f"{model.model_args}; pass the same --width/--blocks_per_stage/--dataset/--image_size")
    if ckpt["step"] >= cfg.STEPS:
        raise SystemExit(f"error: {path} is at step {ckpt['step']}; pass --steps > {ckpt['step']} to train on")
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    for p, state in opt.state.items():
        state.update({k: torch.empty_like(p).copy_(v) for k, v in state.items() if torch.is_tensor(v) and v.shape == p.shape})
    for group in opt.param_groups:
        group["betas"] = (cfg.BETA1, cfg.BETA2)
    for k, v in (ckpt.get("ema", {}) if ema is not None else {}).items():
        ema[k].copy_(v)
    noise_gen.set_state(ckpt["noise_rng"])
    old = ckpt["config"]
    changed = [f"{k.lower()} {old.get(k)} -> {getattr(cfg, k)}" for k in ("LR", "LR_MIN", "STEPS", "BETA1", "BETA2")
               if old.get(k) != getattr(cfg, k)]
    if changed:
        print(f"note: new values apply from step {ckpt['step']} ({', '.join(changed)}); the cosine schedule "
              f"is the one of the new lr, lr_min and steps, continued at step {ckpt['step']}", flush=True)
    print(f"resumed at step {ckpt['step']} from {path}", flush=True)
    return ckpt["step"]


def loss_trouble(normalized, history, dims):
    """Why the normalized loss (an untrained net sits near 1 per dimension) is unhealthy, or ''."""
    median = float(np.median(history)) if history else math.inf
    if not math.isfinite(normalized) or normalized > 1000 * dims or normalized > 100 * median:
        return f"became {normalized:.3g} (median of the earlier log intervals {median:.3g})"
    return ""


def denoise_grid(model, x, sigma0, path):
    """Rows: clean, then noisy x~ / one-step denoised x~ - sigma0^2 grad E(x~) at sigma 0.1, 0.3, 0.6, 1.0."""
    g, rows = torch.Generator().manual_seed(1), [x]
    for sigma in (0.1, 0.3, 0.6, 1.0):
        x_noisy = (x + sigma * torch.randn(x.shape, generator=g).to(x.device)).requires_grad_(True)
        (grad,) = torch.autograd.grad(model(x_noisy).sum(), x_noisy)
        rows += [x_noisy.detach(), (x_noisy - sigma0**2 * grad).detach()]
    save_image_grid(torch.cat(rows), path, nrow=len(x))
    return torch.cat(rows)  # (9 * n, C, H, W)


def train(cfg, data, device, rank=0, world=1):
    """The training loop. data: uint8 (N, C, H, W) on `device`. Every rank follows the same global batch
    order and noise; rank r computes the slots [r*b, (r+1)*b) of each batch, b = BATCH_SIZE / world."""
    n, c, h, w = data.shape
    model = EnergyNet(c, cfg.WIDTH, cfg.BLOCKS_PER_STAGE, h if h == w else [h, w]).to(device)
    use_bf16 = set_precision(cfg.PRECISION, device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.LR, betas=(cfg.BETA1, cfg.BETA2), fused=device.type == "cuda")
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()} if cfg.EMA_DECAY > 0 else None
    noise_gen = torch.Generator().manual_seed(cfg.SEED)  # CPU: the same noise on every device and rank count
    ckpt_path, start = os.path.join(cfg.OUT_DIR, "ckpt.pt"), 0
    if cfg.RESUME:
        start = resume(cfg, ckpt_path, model, opt, ema, noise_gen)
    elif os.path.exists(ckpt_path):
        raise SystemExit(f"error: {ckpt_path} already exists; pass --resume to continue it, or choose "
                         f"another --out_dir (nothing was overwritten)")
    print(f"EnergyNet: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {cfg.PRECISION} on "
          f"{device}" + (f" x {world} ranks" if world > 1 else ""), flush=True)

    loss_fn = torch.compile(make_functional_loss(model, cfg.SIGMA0)) if cfg.COMPILE else None
    mine = slice(rank * (cfg.BATCH_SIZE // world), (rank + 1) * (cfg.BATCH_SIZE // world))  # this rank's slots
    sigmas = noise_levels(cfg.BATCH_SIZE, cfg.SIGMA_MIN, cfg.SIGMA_MAX, cfg.SIGMA_SPACING, device)[mine]  # (b,)
    fixed = images_to_float(data[:8])  # the same 8 images in every progress grid
    window, history = torch.zeros((), device=device), []  # running loss sum (no host sync per step); past means
    t0 = t_window = t_saved = time.time()
    window_start, per_epoch, order = start, n // cfg.BATCH_SIZE, None
    for step in range(start + 1, cfg.STEPS + 1):
        epoch, batch_in_epoch = divmod(step - 1, per_epoch)
        if order is None or batch_in_epoch == 0:
            order = epoch_order(cfg.SEED, epoch, n, device)
        batch = order[batch_in_epoch * cfg.BATCH_SIZE:(batch_in_epoch + 1) * cfg.BATCH_SIZE]  # global batch
        x = images_to_float(data[batch[mine]])  # (b, C, H, W) in [0, 1]
        eps = torch.randn((cfg.BATCH_SIZE, c, h, w), generator=noise_gen)[mine].to(device)  # global draw, sliced
        if device.type == "cuda":
            x, eps = x.contiguous(memory_format=torch.channels_last), eps.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = mdsm_loss(model, x, sigmas, eps, cfg.SIGMA0) if loss_fn is None else \
                loss_fn(dict(model.named_parameters()), x, sigmas, eps)
            if loss_fn is not None and step == start + 1:  # the compiled loss must agree with eager on step 1
                eager = mdsm_loss(model, x, sigmas, eps, cfg.SIGMA0).item()
                if abs(loss.item() - eager) > cfg.BENCH_TOL * abs(eager):
                    raise SystemExit(f"error: --compile gives loss {loss.item():.6g} but eager {eager:.6g} under "
                                     f"--precision={cfg.PRECISION}; refused: run without --compile")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            average_gradients(model, world)
        for group in opt.param_groups:  # cosine decay, stepped every iteration
            group["lr"] = cosine_lr(step - 1, cfg.LR, cfg.LR_MIN, cfg.STEPS)
        opt.step()
        if ema is not None:
            ema_update(ema, model, cfg.EMA_DECAY)
        window += loss.detach()
        if rank == 0:
            progress(step - start, cfg.STEPS - start, t0)  # time left counts only this session's steps

        checked = step % cfg.LOG_EVERY == 0 or step % cfg.CKPT_EVERY == 0 or step == cfg.STEPS
        if checked:  # mean loss and a weight norm (NaN/inf anywhere shows in it): one host sync per interval
            stats = torch.stack([window / (step - window_start), torch.stack(torch._foreach_norm(
                [p.detach().float() for p in model.parameters()])).sum()])
            if world > 1:
                dist.all_reduce(stats)
                stats /= world
            mean_loss, weight_norm = stats.tolist()
            normalized = mean_loss * cfg.SIGMA0**4
            trouble = loss_trouble(normalized if math.isfinite(weight_norm) else math.nan, history, c * h * w)
            if trouble:
                kept = f"the last good checkpoint {ckpt_path} is kept" if os.path.exists(ckpt_path) else \
                    "no checkpoint had been written yet"
                raise SystemExit(f"error: the normalized loss {trouble} between steps {window_start} and {step}; "
                                 f"stopped without saving, {kept}. Lower the learning rate and continue from it: "
                                 f"--resume --lr={cfg.LR / 10:.1e}")
            history.append(normalized)
            if rank == 0 and (step % cfg.LOG_EVERY == 0 or step == cfg.STEPS):
                with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    e_data = model(x).float().mean().item()  # the authors' monitors: E of clean data
                    e_noise = model(torch.rand_like(x)).float().mean().item()  # and of U[0,1] noise images
                rate = (step - window_start) / (time.time() - t_window)
                log_line(step, {"loss": mean_loss, "normalized": normalized, "E(data)": e_data, "E(noise)": e_noise,
                                "lr": opt.param_groups[0]["lr"], "it/s": rate, "img/s": rate * cfg.BATCH_SIZE})
            window.zero_()
            t_window, window_start = time.time(), step
        if rank == 0 and (step % cfg.GRID_EVERY == 0 or step == cfg.STEPS):
            denoise_grid(model, fixed, cfg.SIGMA0, os.path.join(cfg.OUT_DIR, f"denoise_{step:06d}.png"))
        if rank == 0 and (step % cfg.CKPT_EVERY == 0 or step == cfg.STEPS or
                          checked and time.time() - t_saved > 60 * cfg.CKPT_MINUTES):
            save_checkpoint(make_checkpoint(model, vars(cfg), step, opt, None, ema, noise_rng=noise_gen.get_state()),
                            ckpt_path)
            t_saved = time.time()
    print(f"done: {cfg.STEPS - start} steps in {(time.time() - t0) / 60:.1f} min; checkpoint {ckpt_path}", flush=True)
    return model


# ---------------------------------------------------------------------------------------------
# Benchmark: each precision/compile variant runs the same steps from the same start on the same data
# and noise; its loss trajectory is compared with fp32 eager (and a compiled one with its eager twin).
# ---------------------------------------------------------------------------------------------
def benchmark(cfg, data, device):
    n, c, h, w = data.shape
    model = EnergyNet(c, cfg.WIDTH, cfg.BLOCKS_PER_STAGE, h if h == w else [h, w]).to(device)
    sigmas = noise_levels(cfg.BATCH_SIZE, cfg.SIGMA_MIN, cfg.SIGMA_MAX, cfg.SIGMA_SPACING, device)
    g = torch.Generator().manual_seed(cfg.SEED)
    batches = [(images_to_float(data[torch.randint(n, (cfg.BATCH_SIZE,), generator=g).to(device)]),
                torch.randn((cfg.BATCH_SIZE, c, h, w), generator=g).to(device)) for _ in range(cfg.BENCH_STEPS)]
    variants = [("fp32", False), ("bf16", False)]
    if device.type == "cuda":
        variants = [("fp32", False), ("tf32", False), ("bf16", False), ("fp32", True), ("tf32", True), ("bf16", True)]
    print(f"benchmark: EnergyNet {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, batch "
          f"{cfg.BATCH_SIZE}, {cfg.BENCH_STEPS} steps per variant from the same start, {device}", flush=True)
    initial, trajectories, warm = {k: v.clone() for k, v in model.state_dict().items()}, {}, min(3, cfg.BENCH_STEPS - 1)
    for precision, compiled in variants:
        model.load_state_dict(initial)
        use_bf16 = set_precision(precision, device)
        fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        model.to(memory_format=fmt)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.LR, betas=(cfg.BETA1, cfg.BETA2), fused=device.type == "cuda")
        loss_fn = torch.compile(make_functional_loss(model, cfg.SIGMA0)) if compiled else None
        losses = []
        for i, (x, eps) in enumerate(batches):
            if i == warm:  # time after warm-up (and compilation)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t = time.time()
            x, eps = x.contiguous(memory_format=fmt), eps.contiguous(memory_format=fmt)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = mdsm_loss(model, x, sigmas, eps, cfg.SIGMA0) if loss_fn is None else \
                    loss_fn(dict(model.named_parameters()), x, sigmas, eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        if device.type == "cuda":
            torch.cuda.synchronize()
        ms = (time.time() - t) / (cfg.BENCH_STEPS - warm) * 1000
        trajectory = trajectories[precision, compiled] = torch.stack(losses).double().cpu()
        reference = ("fp32", False) if not compiled else (precision, False)
        stray = ((trajectory - trajectories[reference]) / trajectories[reference]).abs().max().item()
        verdict = "ok" if stray <= cfg.BENCH_TOL else f"REFUSED: beyond --bench_tol={cfg.BENCH_TOL}, do not use it"
        mem = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device.type == "cuda" else "n/a"
        print(f"{precision} {'compiled' if compiled else 'eager':<8} {ms:8.1f} ms/step | {cfg.BATCH_SIZE / ms * 1000:7.0f} "
              f"img/s | peak {mem} | loss after {cfg.BENCH_STEPS} steps {trajectory[-1]:.5g}, largest relative "
              f"difference from {' '.join(reference[:1])} {'eager' if compiled else ''} {stray:.1e}: {verdict}", flush=True)
    return trajectories


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_config(globals(), argv)
    if cfg.SMOKE:
        apply_smoke(cfg, {a[2:].split("=")[0].upper() for a in argv if a.startswith("--")})
    check_config(cfg)
    rank, local_rank, world, device = start_distributed(cfg)
    if rank > 0:  # rank 0 alone prints, writes grids and checkpoints; errors still reach stderr
        sys.stdout = open(os.devnull, "w")
    if rank == 0 and not cfg.BENCHMARK:
        check_writable(cfg.OUT_DIR)
    set_seed(cfg.SEED)
    if local_rank > 0:
        dist.barrier()  # the node's first rank downloads and extracts the data set, then the others read it
    data = load_images(cfg.DATASET, cfg.DATA_DIR, "train", cfg.IMAGE_SIZE)  # uint8 (N, C, H, W)
    if local_rank == 0 and world > 1:
        dist.barrier()
    cfg.WIDTH = cfg.WIDTH or (128 if data.shape[1] == 3 else 64)
    cfg.BLOCKS_PER_STAGE = cfg.BLOCKS_PER_STAGE or (3 if data.shape[1] == 3 else 2)
    if len(data) < cfg.BATCH_SIZE:
        raise SystemExit(f"error: {cfg.DATASET} has {len(data)} images, fewer than --batch_size={cfg.BATCH_SIZE}")
    print(f"data: {cfg.DATASET} {tuple(data.shape)} uint8 ({data.numel() / 2**20:.0f} MiB), kept on {device}")
    if device.type == "cpu" and cfg.WIDTH >= 64 and not cfg.BENCHMARK:
        print("note: this is the paper-size model, meant for a GPU (CIFAR-10: 2.4 s per step at batch 8 on a "
              "2-core CPU). For a CPU run: --dataset=mnist --image_size=16 "
              "--width=16 --blocks_per_stage=1 --batch_size=64 --steps=3000 --lr=5e-4 --lr_min=1e-5", flush=True)
    data = data.to(device)  # 150 MiB for CIFAR-10: batches are then drawn without host copies
    result = benchmark(cfg, data, device) if cfg.BENCHMARK else train(cfg, data, device, rank, world)
    if world > 1:
        dist.destroy_process_group()
    return result


# ==== shared helpers: the same text in every numbered file (tests/test_shared_helpers.py) ====
# Device, seed, --key=value overrides, log line, progress bar, image grid, loading an earlier file.
# They use the file's own imports of os, sys, time, numpy as np and torch.
def pick_device(name="auto"):  # 'auto' takes cuda, then Apple's mps, then the cpu
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    name = ("cuda" if available["cuda"] else "mps" if available["mps"] else "cpu") if name == "auto" else name
    if not available.get(name.split(":")[0]):
        raise SystemExit(f"error: --device={name} is not available here; use auto, cpu, cuda, cuda:N or mps")
    return torch.device(name)

def set_seed(seed):
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds the CPU and every GPU

def parse_config(namespace, argv=None):
    """--key=value overrides of the UPPER_CASE constants, typed like their defaults; prints the result."""
    import argparse, re, types
    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line instead of argparse's usage block
            raise SystemExit(f"error: {message}; valid options: " + " ".join("--" + k.lower() for k in knobs))
    def typed(default):  # argparse calls cast(text) and turns a ValueError into "invalid int value: '1.5'"
        def cast(text):
            if isinstance(default, bool) and text.lower() in ("true", "false", "1", "0"):
                return text.lower() in ("true", "1")
            if isinstance(default, int) and not isinstance(default, bool) and float(text) % 1 == 0:
                return int(float(text))  # 300000, 300_000 and 3e5 all work
            if isinstance(default, (float, str)):
                return type(default)(text)
            raise ValueError(text)
        cast.__name__ = type(default).__name__
        return cast
    knobs = {k: v for k, v in namespace.items() if k.isupper() and isinstance(v, (bool, int, float, str))}
    comments = dict(re.findall(r"(?m)^([A-Z][A-Z0-9_]*) *=.*?# *(.*)$", open(namespace["__file__"]).read()))
    parser = Parser(prog=os.path.basename(namespace["__file__"]), allow_abbrev=False,
                    description=(namespace.get("__doc__") or "").strip().split("\n\n")[0])
    for key, default in knobs.items():
        bare = {"nargs": "?", "const": True} if isinstance(default, bool) else {}  # a bare --resume means true
        parser.add_argument("--" + key.lower(), dest=key, default=default, type=typed(default), **bare,
                            metavar=type(default).__name__,
                            help=comments.get(key, "").replace("%", "%%") + f" [default: {default}]")
    cfg = types.SimpleNamespace(**vars(parser.parse_args(sys.argv[1:] if argv is None else argv)))
    print("config: " + " ".join(f"{k.lower()}={v}" for k, v in vars(cfg).items()), flush=True)
    return cfg

def log_line(step, metrics):  # the one log format: 'step 1200 | loss 0.41 | 38.2 it/s'
    text = {k: f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in metrics.items()}
    parts = [f"step {step}"] + [f"{v} {k}" if k.endswith("/s") else f"{k} {v}" for k, v in text.items()]
    print(("\r\033[K" if sys.stderr.isatty() else "") + " | ".join(parts), flush=True)  # wipes a progress bar

def progress(i, total, t_start, note=""):  # a one-line bar with elapsed<remaining time, on terminals only
    if sys.stderr.isatty() and (i % max(1, total // 500) == 0 or i == total):
        frac, elapsed = i / max(total, 1), time.time() - t_start
        clock = lambda seconds: f"{int(seconds) // 60}m{int(seconds) % 60:02d}s"  # 125 -> '2m05s'
        left = clock(elapsed / frac * (1 - frac) if frac > 0 else 0)
        sys.stderr.write(f"\r[{'#' * int(30 * frac):<30}] {i}/{total} {clock(elapsed)}<{left} {note}\033[K"
                         + ("\n" if i == total else ""))

def save_image_grid(images, path, nrow=8, pad=2):  # (N, C, H, W) in [0, 1], C = 1 or 3 -> one PNG
    import matplotlib.image
    s = max(1, 32 // images.shape[-1])  # nearest-neighbour enlargement: an 8x8 digit is drawn 32x32
    x = images.detach().float().cpu().clamp(0, 1).repeat_interleave(s, -1).repeat_interleave(s, -2)
    x = torch.nn.functional.pad(x, (pad, 0, pad, 0), value=1.0)  # white gap left of and above each image
    (n, c, h, w), cols = x.shape, min(nrow, len(x))
    x = torch.cat([x, torch.ones(-n % cols, c, h, w)]).view(-1, cols, c, h, w).permute(2, 0, 3, 1, 4)
    grid = torch.nn.functional.pad(x.reshape(c, -1, cols * w), (0, pad, 0, pad), value=1.0)  # (C, H, W)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image = grid[0] if c == 1 else grid.permute(1, 2, 0)  # (H, W) or (H, W, 3)
    matplotlib.image.imsave(path, image.numpy(), cmap="gray", vmin=0, vmax=1)

def load_numbered(filename):
    """Import a sibling such as '03_mdsm_train.py' without running its main() (a name starting with a
    digit cannot be imported with `import`); every caller shares one module object."""
    import importlib.util
    name = os.path.splitext(filename)[0]
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(__file__), filename))
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]
# ==== end of shared helpers ====


if __name__ == "__main__":
    main()
