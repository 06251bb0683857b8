"""03 - Multiscale denoising score matching (MDSM): train an energy-based model on images.

Paper: Z. Li, Y. Chen, F. T. Sommer, "Learning Energy-Based Models in High-Dimensional Spaces with
Multiscale Denoising Score Matching", arXiv 1910.07762 (Entropy 2023). Facts: shared spec MDSM.md.

One network E(x) gives a scalar energy per image (low energy = likely image; the score is -grad E).
It is trained so that, for noise levels sigma in [0.05, 1.2] at once,
    sigma0^2 * grad E(x~) = x~ - E[x | x~],    x~ = x + sigma * eps,
i.e. one step of size sigma0^2 down the energy denoises x~ (Tweedie). Then exp(-E / T) matches the
noisy data density q_sigma at temperature T = sigma^2 / sigma0^2, which is what 04 anneals through.
The training step differentiates through grad_x E ("double backprop"), so it costs about six
forward passes; the file shows that step in full (see `mdsm_loss` and the loop in `train`).

Commands
  python 03_mdsm_train.py --dataset=cifar10            # the paper's run: 62M params, 300k steps (GPU)
  python 03_mdsm_train.py --dataset=cifar10 --benchmark   # ms/step of each precision/compile variant
  python 03_mdsm_train.py --dataset=mnist --width=16 --steps=300 --batch_size=32   # CPU, minutes
  python 03_mdsm_train.py --dataset=mnist --smoke       # seconds: tiny net, a few steps
  python 03_mdsm_train.py --resume                      # continue the run in --out_dir
Outputs (in --out_dir): ckpt.pt (everything needed to resume), denoise_XXXXXX.png progress grids.
Fashion-MNIST as in the paper: --dataset=fashion-mnist --sigma_min=0.1 --sigma_max=3 --sigma_spacing=log.
"""
import gzip
import hashlib
import os
import pickle
import shutil
import sys
import tarfile
import time
import urllib.request

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ---- config: every knob can be overridden with --key=value (see --help) ----
DATASET = "cifar10"          # cifar10 | mnist | fashion-mnist | path to .npz/.npy of uint8 images
DATA_DIR = "data"            # where archives are downloaded, checked and extracted
IMAGE_SIZE = 0               # 0 = native (MNIST padded to 32); >0 area-downsamples to this side (16 for a CPU run)
OUT_DIR = "out/03_mdsm_train"  # checkpoint and PNG grids of this run
WIDTH = 0                    # base channels; 0 = the paper's (128 for colour, 64 for grayscale)
BLOCKS_PER_STAGE = 0         # residual blocks per resolution; 0 = the paper's (3 colour, 2 grayscale)
SIGMA0 = 0.1                 # the small fixed noise scale of the target (paper: 0.1)
SIGMA_MIN = 0.05             # smallest training noise std (pixels in [0, 1])
SIGMA_MAX = 1.2              # largest training noise std
SIGMA_SPACING = "linear"     # linear (CIFAR-10 code) | log (the paper's Fashion-MNIST setting)
BATCH_SIZE = 128             # images per step; one noise level per batch slot
STEPS = 300_000              # training iterations (the paper's released model: 270k)
LR = 5e-5                    # Adam learning rate at step 0
LR_MIN = 1e-6                # cosine decay floor, reached at STEPS
BETA1 = 0.9                  # Adam beta1
BETA2 = 0.95                 # Adam beta2
EMA_DECAY = 0.0              # EMA of the weights, saved beside them; 0 = off (paper), 0.9999 typical
LOG_EVERY = 50               # steps between log lines (the authors logged every 50)
GRID_EVERY = 2000            # steps between noisy -> denoised PNG grids
CKPT_EVERY = 5000            # steps between checkpoints (one more at the end)
RESUME = False               # continue from OUT_DIR/ckpt.pt
PRECISION = "auto"           # auto (bf16 trunk on CUDA, fp32 elsewhere) | fp32 | bf16
COMPILE = False              # torch.compile the loss through torch.func (double backprop inside)
BENCHMARK = False            # time each variant for BENCH_STEPS steps instead of training
BENCH_STEPS = 100            # timed steps per benchmark variant (after warm-up)
SMOKE = False                # shorthand: width 8, 1 block per stage, batch 16, 20 steps (plumbing check)
DEVICE = "auto"              # auto | cpu | cuda | cuda:N | mps
SEED = 0                     # seeds data order, noise and initialization

# The shared helpers (device, seed, --key=value overrides, logging, image grids) are at the end of the file.


# ---------------------------------------------------------------------------------------------
# Data: the official archives, downloaded once, checked, and kept whole on the device as uint8.
# ---------------------------------------------------------------------------------------------
CIFAR10_ARCHIVE = {"url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                   "md5": "c58f30108f718f92721af3b95e74349a"}
IDX_FILES = {  # name -> (mirrors, {file: md5 of the .gz})
    "mnist": (["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
              {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
               "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3"}),
    "fashion-mnist": (["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
                      {"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                       "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79"}),
}


def md5_of(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    if md5_of(path) != md5:
        raise SystemExit(f"error: {path} is corrupt or incomplete (MD5 mismatch). Delete it and run again, "
                         f"or download it by hand from {urls[0]} and put it there")


def read_cifar10(data_dir, split):
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    if not all(os.path.exists(os.path.join(folder, n)) for n in names):
        archive = os.path.join(data_dir, "cifar-10-python.tar.gz")
        fetch([CIFAR10_ARCHIVE["url"]], archive, CIFAR10_ARCHIVE["md5"])
        with tarfile.open(archive) as tar:
            tar.extractall(data_dir, filter="data")
    chunks = []
    for n in names:
        try:
            with open(os.path.join(folder, n), "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            chunks.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
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
        raw = gzip.open(path).read()
        magic, n, h, w = np.frombuffer(raw[:16], ">u4")
        assert magic == 2051 and len(raw) == 16 + n * h * w
    except Exception:
        raise SystemExit(f"error: {path} is not an IDX image file (corrupt or incomplete). "
                         f"Delete it and run again to download it") from None
    return np.frombuffer(raw, np.uint8, offset=16).reshape(n, 1, h, w)  # 28x28 digits


def read_array_file(path, split):
    """A user's own images: .npy, or .npz with x_train/x_test (else its first array)."""
    if not os.path.exists(path):
        raise SystemExit(f"error: --dataset={path}: no such file; use cifar10, mnist, fashion-mnist, "
                         f"or a .npz/.npy of uint8 images (N, H, W) or (N, H, W, C)")
    data = np.load(path)
    if isinstance(data, np.ndarray):
        if split == "test":
            raise SystemExit(f"error: {path} is one array of training images; for test images save a "
                             f".npz with x_train and x_test")
        x = data
    else:
        key = {"train": "x_train", "test": "x_test"}[split]
        if key not in data.files and split == "test":
            raise SystemExit(f"error: {path} has no x_test array, so there are no test images; "
                             f"save held-out images as x_test (arrays found: {', '.join(data.files)})")
        x = data[key] if key in data.files else data[data.files[0]]  # a single array = training images
    if x.dtype != np.uint8 or x.ndim not in (3, 4):
        raise SystemExit(f"error: {path} holds {x.dtype} {x.shape}; expected uint8 images (N, H, W) or (N, H, W, C)")
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # -> (N, C, H, W)
    if x.shape[1] not in (1, 3) or x.shape[2] % 8 or x.shape[3] % 8:
        raise SystemExit(f"error: {path}: images are {x.shape[2]}x{x.shape[3]} with {x.shape[1]} channels; "
                         f"the network needs 1 or 3 channels and sides divisible by 8 (pad or crop them)")
    return x


def load_images(dataset, data_dir="data", split="train", image_size=0):
    """All images of a split as a uint8 tensor (N, C, H, W); downloads on first use. image_size > 0
    area-averages them to image_size x image_size (rounded back to 8 bits: MNIST 28 -> 16 for a CPU run);
    0 keeps them, except that 28x28 digits are zero-padded to 32x32 as in the paper."""
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
    """E(x): (B, C, H, W) -> (B,). CIFAR-10: EnergyNet(3, 128, 3), 62M parameters, 6.6 GFLOP/image."""

    def __init__(self, in_channels=3, width=128, blocks_per_stage=3, image_size=32):
        super().__init__()
        self.model_args = dict(in_channels=in_channels, width=width, blocks_per_stage=blocks_per_stage,
                               image_size=image_size)
        self.conv_in = nn.Conv2d(in_channels, width, 3, padding=1)
        blocks, c = [], width
        for c_out in (2 * width, 4 * width, 8 * width):  # 32x32 -> 16x16 -> 8x8 -> 4x4
            blocks.append(ResBlock(c, c_out, down=True))
            blocks += [ResBlock(c_out, c_out, down=False) for _ in range(blocks_per_stage - 1)]
            c = c_out
        self.blocks = nn.Sequential(*blocks)
        n_features = c * (image_size // 8) ** 2  # 1024 * 4 * 4 = 16384 for CIFAR-10
        self.lin1, self.lin2, self.lin3 = (nn.Linear(n_features, 1) for _ in range(3))

    def forward(self, x):
        h = self.blocks(self.conv_in(x)).flatten(1)  # (B, 8*width*(H/8)*(W/8)); no activation before the head, as coded
        with torch.autocast(x.device.type, enabled=False):  # the head and its output stay fp32
            h = h.float()
            # "quadratic neuron": E = (w1.h + b1)(w2.h + b2) + w3.(h*h) + b3
            energy = self.lin1(h) * self.lin2(h) + self.lin3(h * h)
        return energy.squeeze(1)  # (B,)


# ---------------------------------------------------------------------------------------------
# Loss: MDSM as the authors coded it.
# ---------------------------------------------------------------------------------------------
def noise_levels(batch_size, sigma_min, sigma_max, spacing="linear", device="cpu"):
    """One sigma per batch slot, stratified over [sigma_min, sigma_max] (shuffled data pairs them)."""
    if spacing == "log":
        return torch.logspace(np.log10(sigma_min), np.log10(sigma_max), batch_size, device=device)
    return torch.linspace(sigma_min, sigma_max, batch_size, device=device)


def mdsm_residual(x, sigmas, eps, grad_energy, sigma0):
    """Per-sample MDSM loss from grad_x E evaluated at x~ = x + sigma * eps.

    The paper's objective, weighted by 1/sigma^2 as in the authors' code:
        L = E_{x, sigma, eps} || x - x~ + sigma0^2 grad E(x~) ||^2 / (sigma^2 sigma0^4)
    Its minimizer is sigma0^2 grad E(x~) = x~ - E[x | x~] for every sigma (Tweedie).
    """
    s = sigmas.view(-1, *([1] * (x.dim() - 1)))  # (B, 1, 1, 1)
    # x - x~ + sigma0^2 grad E(x~) = -sigma * eps + sigma0^2 grad E(x~)
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
    """The same loss written with torch.func, the form torch.compile can trace: grad_x E comes
    from func.grad inside the function and the caller runs one ordinary .backward()."""

    def loss_fn(params, x, sigmas, eps):
        def total_energy(x_noisy):
            return torch.func.functional_call(model, params, (x_noisy,)).sum()

        x_noisy = x + sigmas.view(-1, 1, 1, 1) * eps
        grad_energy = torch.func.grad(total_energy)(x_noisy)
        return mdsm_residual(x, sigmas, eps, grad_energy, sigma0).mean()

    return loss_fn


# ---------------------------------------------------------------------------------------------
# Checkpoints: one dict, written atomically, refused with a clear message when it does not fit.
# ---------------------------------------------------------------------------------------------
def make_checkpoint(model, config, step=0, optimizer=None, scheduler=None, ema=None, kind="mdsm-energy", **extra):
    """Everything needed to resume or sample; weights come from the uncompiled model."""
    ckpt = {"kind": kind, "model_args": dict(model.model_args), "config": dict(config), "step": step,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        ckpt["scheduler"] = scheduler.state_dict()
    if ema is not None:
        ckpt["ema"] = {k: v.detach().cpu() for k, v in ema.items()}
    ckpt.update(extra)
    return ckpt


def save_checkpoint(ckpt, path):
    """Write to a temporary file, then rename: a crash mid-write never leaves a broken ckpt.pt."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)


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
    model = EnergyNet(**ckpt["model_args"])
    weights = ckpt["ema"] if use_ema and "ema" in ckpt else ckpt["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError:
        raise SystemExit(f"error: the weights in {path} do not fit EnergyNet({ckpt['model_args']})") from None
    return model.to(device).eval(), ckpt


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def resolve_defaults(cfg, channels):
    """Fill the 0 = 'paper default' knobs from the data; apply --smoke."""
    if cfg.SMOKE:
        cfg.WIDTH, cfg.BLOCKS_PER_STAGE, cfg.BATCH_SIZE, cfg.STEPS = 8, 1, 16, 20
        cfg.LOG_EVERY, cfg.GRID_EVERY, cfg.CKPT_EVERY, cfg.BENCH_STEPS = 5, 10, 10, 3
    cfg.WIDTH = cfg.WIDTH or (128 if channels == 3 else 64)
    cfg.BLOCKS_PER_STAGE = cfg.BLOCKS_PER_STAGE or (3 if channels == 3 else 2)
    if cfg.PRECISION not in ("auto", "fp32", "bf16") or cfg.SIGMA_SPACING not in ("linear", "log"):
        raise SystemExit("error: --precision is auto|fp32|bf16 and --sigma_spacing is linear|log")
    return cfg


def epoch_order(seed, epoch, n, device):
    """The shuffled order of one epoch, a function of (seed, epoch) only: a resumed run sees the
    same batches. Drawn on the CPU (same on every device), moved to the device once per epoch."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).to(device)


def denoise_grid(model, x, sigma0, path, device):
    """Rows: clean, then noisy / one-step denoised x~ - sigma0^2 grad E(x~) at sigma 0.1, 0.3, 0.6, 1.0."""
    g = torch.Generator(device=device).manual_seed(1)
    rows = [x]
    for sigma in (0.1, 0.3, 0.6, 1.0):
        x_noisy = (x + sigma * torch.randn(x.shape, generator=g, device=device)).requires_grad_(True)
        (grad,) = torch.autograd.grad(model(x_noisy).sum(), x_noisy)
        rows += [x_noisy.detach(), (x_noisy - sigma0**2 * grad).detach()]
    save_image_grid(torch.cat(rows), path, nrow=len(x))


def train(cfg, data, device):
    """The training loop. data: uint8 (N, C, H, W) already on `device`."""
    n, c, h, w = data.shape
    model = EnergyNet(c, cfg.WIDTH, cfg.BLOCKS_PER_STAGE, h).to(device)
    use_bf16 = cfg.PRECISION == "bf16" or (cfg.PRECISION == "auto" and device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.LR, betas=(cfg.BETA1, cfg.BETA2),
                           fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.STEPS, eta_min=cfg.LR_MIN)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()} if cfg.EMA_DECAY > 0 else None
    noise_gen = torch.Generator(device=device).manual_seed(cfg.SEED)
    ckpt_path, start = os.path.join(cfg.OUT_DIR, "ckpt.pt"), 0
    if cfg.RESUME:
        ckpt = load_checkpoint(ckpt_path)
        if ckpt["model_args"] != model.model_args:
            raise SystemExit(f"error: {ckpt_path} is a {ckpt['model_args']} model but this run builds "
                             f"{model.model_args}; pass the same --width/--blocks_per_stage/--dataset")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        ema = {k: v.to(device) for k, v in ckpt["ema"].items()} if "ema" in ckpt else ema
        noise_gen.set_state(ckpt["noise_rng"].to(noise_gen.get_state().device))
        start = ckpt["step"]
        print(f"resumed at step {start} from {ckpt_path}", flush=True)
    elif os.path.exists(ckpt_path):
        raise SystemExit(f"error: {ckpt_path} already exists; pass --resume to continue it, or choose "
                         f"another --out_dir (nothing was overwritten)")
    print(f"EnergyNet: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{'bf16' if use_bf16 else 'fp32'} on {device}", flush=True)

    loss_fn = torch.compile(make_functional_loss(model, cfg.SIGMA0)) if cfg.COMPILE else None
    sigmas = noise_levels(cfg.BATCH_SIZE, cfg.SIGMA_MIN, cfg.SIGMA_MAX, cfg.SIGMA_SPACING, device)  # (B,)
    fixed = images_to_float(data[:8])  # the same 8 images in every progress grid
    window = torch.zeros((), device=device)  # running loss sum: no host sync per step
    t0, t_window, window_start = time.time(), time.time(), start

    def save(step):
        save_checkpoint(make_checkpoint(model, vars(cfg), step, opt, sched, ema,
                                        noise_rng=noise_gen.get_state()), ckpt_path)

    per_epoch, order = n // cfg.BATCH_SIZE, None
    for step in range(start + 1, cfg.STEPS + 1):
        epoch, k = divmod(step - 1, per_epoch)
        if order is None or k == 0:
            order = epoch_order(cfg.SEED, epoch, n, device)
        x = images_to_float(data[order[k * cfg.BATCH_SIZE:(k + 1) * cfg.BATCH_SIZE]])  # (B, C, H, W) in [0, 1]
        eps = torch.randn(x.shape, generator=noise_gen, device=device)
        if device.type == "cuda":
            x, eps = x.contiguous(memory_format=torch.channels_last), eps.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            if loss_fn is not None:
                loss = loss_fn(dict(model.named_parameters()), x, sigmas, eps)
            else:
                loss = mdsm_loss(model, x, sigmas, eps, cfg.SIGMA0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()  # cosine decay, stepped every iteration
        if ema is not None:
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    ema[k].lerp_(v, 1 - cfg.EMA_DECAY) if v.is_floating_point() else ema[k].copy_(v)
        window += loss.detach()
        progress(step - start, cfg.STEPS - start, t0)  # time left counts only this session's steps

        if step % cfg.LOG_EVERY == 0 or step == cfg.STEPS or step % cfg.CKPT_EVERY == 0:
            mean_loss = window.item() / (step - window_start)  # the one host sync, every LOG_EVERY steps
            finite = np.isfinite(mean_loss) and all(torch.isfinite(p).all() for p in model.parameters())
            if not finite:
                kept = f"the last good checkpoint {ckpt_path} is kept" if os.path.exists(ckpt_path) else \
                    "no checkpoint had been written yet"
                raise SystemExit(f"error: the loss became {mean_loss} between steps {window_start} and {step}; "
                                 f"stopped without saving, {kept}. Try a lower --lr or --precision=fp32")
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                e_data = model(x).float().mean().item()  # the authors' monitors: E of clean data
                e_noise = model(torch.rand_like(x)).float().mean().item()  # and of U[0,1] noise images
            rate = (step - window_start) / (time.time() - t_window)
            if step % cfg.LOG_EVERY == 0 or step == cfg.STEPS:
                log_line(step, {"loss": mean_loss, "normalized": mean_loss * cfg.SIGMA0**4, "E(data)": e_data,
                                "E(noise)": e_noise, "lr": sched.get_last_lr()[0], "it/s": rate,
                                "img/s": rate * cfg.BATCH_SIZE})
            window.zero_()
            t_window, window_start = time.time(), step
        if step % cfg.GRID_EVERY == 0 or step == cfg.STEPS:
            denoise_grid(model, fixed, cfg.SIGMA0, os.path.join(cfg.OUT_DIR, f"denoise_{step:06d}.png"), device)
        if step % cfg.CKPT_EVERY == 0 or step == cfg.STEPS:
            save(step)
    print(f"done: {cfg.STEPS - start} steps in {(time.time() - t0) / 60:.1f} min; checkpoint {ckpt_path}", flush=True)
    return model


# ---------------------------------------------------------------------------------------------
# Benchmark: the same step in each precision/compile variant, timed after warm-up, with each
# variant's parameter-gradient error against the fp32 eager reference on one fixed batch.
# ---------------------------------------------------------------------------------------------
def param_grads(model, loss):
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)  # the head's bias b1*b2 term is used
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().float()
                      for g, p in zip(grads, model.parameters())])


def benchmark(cfg, data, device):
    n, c, h, w = data.shape
    model = EnergyNet(c, cfg.WIDTH, cfg.BLOCKS_PER_STAGE, h).to(device)
    sigmas = noise_levels(cfg.BATCH_SIZE, cfg.SIGMA_MIN, cfg.SIGMA_MAX, cfg.SIGMA_SPACING, device)
    x = images_to_float(data[:cfg.BATCH_SIZE]).to(device)
    eps = torch.randn(x.shape, generator=torch.Generator(device=device).manual_seed(0), device=device)
    ref = param_grads(model, mdsm_loss(model, x, sigmas, eps, cfg.SIGMA0))  # fp32 eager reference
    functional = make_functional_loss(model, cfg.SIGMA0)
    variants = [("fp32 eager", False, False, None), ("bf16 eager", True, False, None)]
    if device.type == "cuda":
        variants = [("fp32 eager", False, False, None), ("bf16+channels_last eager", True, True, None),
                    ("bf16+channels_last compiled", True, True, torch.compile(functional))]
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    print(f"benchmark: EnergyNet {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
          f"batch {cfg.BATCH_SIZE}, {cfg.BENCH_STEPS} timed steps per variant, {device}", flush=True)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    for name, bf16, channels_last, compiled in variants:
        model.load_state_dict(initial)  # every variant starts from the reference weights
        opt = torch.optim.Adam(model.parameters(), lr=cfg.LR, betas=(cfg.BETA1, cfg.BETA2), fused=device.type == "cuda")
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model.to(memory_format=fmt)
        xb, eb = x.contiguous(memory_format=fmt), eps.contiguous(memory_format=fmt)

        def step_loss():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                if compiled is not None:
                    return compiled(dict(model.named_parameters()), xb, sigmas, eb)
                return mdsm_loss(model, xb, sigmas, eb, cfg.SIGMA0)

        grad = param_grads(model, step_loss())  # same weights as the reference: compare before any step
        err = ((grad - ref).norm() / ref.norm()).item()
        for i in range(3 + cfg.BENCH_STEPS):
            if i == 3:  # after warm-up (and compilation)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t = time.time()
            opt.zero_grad(set_to_none=True)
            step_loss().backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        ms = (time.time() - t) / cfg.BENCH_STEPS * 1000
        mem = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device.type == "cuda" else "n/a"
        print(f"{name:<30} {ms:8.1f} ms/step | {cfg.BATCH_SIZE / ms * 1000:8.0f} img/s | peak {mem} | "
              f"grad rel. error vs fp32 {err:.2e} | {cfg.STEPS} steps = {ms * cfg.STEPS / 3.6e6:.2f} h",
              flush=True)
    return model


def main(argv=None):
    cfg = parse_config(globals(), argv)
    device = pick_device(cfg.DEVICE)
    set_seed(cfg.SEED)
    data = load_images(cfg.DATASET, cfg.DATA_DIR, "train", cfg.IMAGE_SIZE)  # uint8 (N, C, H, W)
    cfg = resolve_defaults(cfg, data.shape[1])
    if len(data) < cfg.BATCH_SIZE:
        raise SystemExit(f"error: {cfg.DATASET} has {len(data)} images, fewer than --batch_size={cfg.BATCH_SIZE}")
    print(f"data: {cfg.DATASET} {tuple(data.shape)} uint8 ({data.numel() / 2**20:.0f} MiB), kept on {device}")
    if device.type == "cpu" and cfg.WIDTH >= 64 and not cfg.BENCHMARK:
        print("note: this is the paper-size model, meant for a GPU (the CIFAR-10 one takes 2.4 s per step at "
              "batch 8 on a 2-core CPU). "
              "For a CPU run try: --dataset=mnist --width=16 --blocks_per_stage=1 --batch_size=64 --steps=3000 "
              "--lr=5e-4 --lr_min=1e-5", flush=True)
    data = data.to(device)  # 150 MiB for CIFAR-10: batches are then drawn without host copies
    if cfg.BENCHMARK:
        return benchmark(cfg, data, device)
    return train(cfg, data, device)


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
