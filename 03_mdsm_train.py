r"""03 - Multiscale denoising score matching (MDSM): train an energy-based model on images.
  python 03_mdsm_train.py --dataset=mnist --data_dir=data --image_size=16 --width=32 \
      --blocks_per_stage=1 --batch_size=64 --steps=3000 --lr=5e-4 --lr_min=1e-5   # a CPU run
  python 03_mdsm_train.py --dataset=cifar10     # the paper's run: 62M parameters, 300k steps, GPU

Paper: Z. Li, Y. Chen, F. T. Sommer, "Learning Energy-Based Models in High-Dimensional Spaces with
Multiscale Denoising Score Matching", arXiv 1910.07762 (Entropy 2023), and the authors' code.
One network E(x) gives a scalar energy per image (low energy = likely image; the score is -grad E).
MDSM (eq. 10 of the paper, weighted by 1/sigma^2 as in the authors' code) trains it at every noise
level sigma in [0.05, 1.2] at once, with x~ = x + sigma * eps, eps ~ N(0, I):
    L = E_{x, sigma, eps} || x - x~ + sigma0^2 grad E(x~) ||^2 / (sigma^2 sigma0^4)
Its minimizer is sigma0^2 grad E(x~) = x~ - E[x | x~] (Tweedie): one step of size sigma0^2 down
the energy denoises x~, and exp(-E / T) matches the noisy data at T = sigma^2 / sigma0^2 (04
anneals through T).

More commands (--out_dir gets ckpt.pt and denoise_*.png grids: clean, noisy, one step denoised):
  python 03_mdsm_train.py --dataset=fashion-mnist --sigma_min=0.1 --sigma_max=3 \
      --sigma_spacing=log --lr=1e-4 --steps=100000  # the authors' Fashion-MNIST setting
  python 03_mdsm_train.py --dataset=cifar10 --resume     # continue out/03_mdsm_train/ckpt.pt
  python 03_mdsm_train.py --dataset=cifar10 --benchmark  # speed and loss of each --precision
  torchrun --standalone --nproc_per_node=8 03_mdsm_train.py --dataset=cifar10  # same steps, 8 GPUs
  python 03_mdsm_train.py --dataset=images.npz  # your own uint8 x_train (N, H, W[, C]), sides % 8
"""

import contextlib
import functools
import gzip
import hashlib
import math
import os
import pathlib
import pickle
import shutil
import signal
import sys
import tarfile
import tempfile
import time
import types
import urllib.request

import matplotlib.image
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# ---- config: every knob can be overridden with --key=value (see --help) ----
DATASET = "cifar10"  # cifar10 | mnist | fashion-mnist | path to a .npz/.npy of uint8 images
DATA_DIR = "data"  # where the official archives are downloaded, checked and extracted
IMAGE_SIZE = 0  # 0 = native (MNIST padded to 32); > 0: area-downsampled to this side (16: CPU)
OUT_DIR = "out/03_mdsm_train"  # checkpoint and PNG grids of this run
WIDTH = 0  # base channels; 0 = the paper's (128 for colour, 64 for grayscale)
BLOCKS_PER_STAGE = 0  # residual blocks per resolution; 0 = the paper's (3 colour, 2 grayscale)
SIGMA0 = 0.1  # the small fixed noise scale of the target (paper: 0.1)
SIGMA_MIN = 0.05  # smallest training noise std (pixels in [0, 1])
SIGMA_MAX = 1.2  # largest training noise std
SIGMA_SPACING = "linear"  # linear (the authors' CIFAR-10 code) | log (their Fashion-MNIST one)
BATCH_SIZE = 128  # images per step; one noise level per batch slot
STEPS = 300_000  # training iterations (the paper's released model: 270k)
LR = 5e-5  # Adam learning rate at step 0
LR_MIN = 1e-6  # cosine decay floor, reached at STEPS
BETA1 = 0.9  # Adam beta1
BETA2 = 0.95  # Adam beta2
EMA_DECAY = 0.0  # EMA of the weights, saved beside them; 0 = off (paper), 0.9999 typical
LOG_EVERY = 50  # steps between log lines and loss checks (the authors logged every 50)
GRID_EVERY = 2000  # steps between noisy -> denoised PNG grids
CKPT_EVERY = 5000  # steps between checkpoints (one more at the end) ...
CKPT_MINUTES = 10.0  # ... and at the first loss check this many minutes after the last save
RESUME = False  # continue from OUT_DIR/ckpt.pt; a new --lr/--lr_min/--steps gives a new schedule
PRECISION = "fp32"  # fp32 (TF32 off) | tf32 | bf16 (autocast), CUDA; +compile: torch.compile
BENCHMARK = False  # train BENCH_STEPS steps in fp32 and in --precision (fp32: all), compare
BENCH_STEPS = 100  # steps per benchmark variant (the same start, data and noise for each)
BENCH_TOL = 0.01  # largest relative loss difference from fp32 that the benchmark accepts
SMOKE = False  # width 8, 1 block per stage, batch 16, 20 steps for the knobs you did not pass
DEVICE = "auto"  # auto | cpu | cuda | cuda:N | mps
SEED = 0  # seeds the data order, the noise and the initial weights


# ==== The model: a ResNet energy with smooth ELUs (the loss differentiates grad_x E) ====
class ResBlock(nn.Module):
    """Pre-activation: out = shortcut(x) + conv2(elu(conv1(elu(x)))), optionally 2x mean-pooled."""

    def __init__(self, c_in, c_out, down):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_in, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1)  # a learned 1x1 shortcut in every block
        self.down = down

    def forward(self, x):  # (B, c_in, H, W) -> (B, c_out, H, W), or H/2 x W/2 when down
        h = self.conv2(F.elu(self.conv1(F.elu(x))))
        if self.down:  # conv then pool on the residual path; pool then 1x1 conv on the shortcut
            return F.avg_pool2d(h, 2) + self.shortcut(F.avg_pool2d(x, 2))
        return h + self.shortcut(x)


class EnergyNet(nn.Module):
    """E(x): (B, C, H, W) -> (B,), no normalization layers. CIFAR-10: EnergyNet(3, 128, 3), 62M
    parameters; 32x32 -> 16 -> 8 -> 4 with 2, 4, 8 times `width` channels. image_size: the side
    of square images, or [height, width]."""

    def __init__(self, in_channels=3, width=128, blocks_per_stage=3, image_size=32):
        super().__init__()
        self.model_args = dict(
            in_channels=in_channels,
            width=width,
            blocks_per_stage=blocks_per_stage,
            image_size=image_size,
        )
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        self.conv_in = nn.Conv2d(in_channels, width, 3, padding=1)
        blocks = []
        for c_in, c_out in ((width, 2 * width), (2 * width, 4 * width), (4 * width, 8 * width)):
            blocks.append(ResBlock(c_in, c_out, down=True))  # halves the side
            blocks += [ResBlock(c_out, c_out, down=False) for _ in range(blocks_per_stage - 1)]
        self.blocks = nn.Sequential(*blocks)
        n_features = 8 * width * (h // 8) * (w // 8)  # 1024 * 4 * 4 = 16384 for CIFAR-10
        self.lin1 = nn.Linear(n_features, 1)
        self.lin2 = nn.Linear(n_features, 1)
        self.lin3 = nn.Linear(n_features, 1)

    def forward(self, x):
        h = self.blocks(self.conv_in(x)).flatten(1)  # (B, 8 width H/8 W/8); no activation, as coded
        with torch.autocast(x.device.type, enabled=False):  # the head: fp32 or float64, never bf16
            h = h.to(torch.promote_types(h.dtype, torch.float32))
            # the "quadratic neuron": E = (w1.h + b1)(w2.h + b2) + w3.(h*h) + b3. The constant b3
            # drops out of grad_x E, so it never gets a gradient; b1 and b2 do, through the product.
            energy = self.lin1(h) * self.lin2(h) + self.lin3(h * h)
        return energy.squeeze(1)  # (B,)


# ==== The loss: MDSM as the authors coded it ====
def noise_levels(batch_size, sigma_min, sigma_max, spacing="linear", device="cpu"):
    """One sigma per batch slot, stratified over [sigma_min, sigma_max]: (B,). The data are
    shuffled, so each image meets a random level."""
    if spacing == "log":  # the authors' Fashion-MNIST setting
        return torch.logspace(np.log10(sigma_min), np.log10(sigma_max), batch_size, device=device)
    return torch.linspace(sigma_min, sigma_max, batch_size, device=device)


def mdsm_loss(model, x, sigmas, eps, sigma0, functional=False):
    """The batch mean of eq. 10's per-sample loss; x, eps: (B, C, H, W), sigmas: (B,).
    grad_x E keeps its graph, so the weights' gradient differentiates it (double backprop).
    functional=True takes grad_x E by torch.func.grad: the same numbers, and the one form that
    torch.compile can differentiate twice (the +compile precisions use it)."""
    s = sigmas.view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    # x~ = x + sigma * eps
    x_noisy = (x + s * eps).requires_grad_(not functional)
    if functional:
        grad_energy = torch.func.grad(lambda y: model(y).sum())(x_noisy)
    else:
        grad_energy = torch.autograd.grad(model(x_noisy).sum(), x_noisy, create_graph=True)[0]
    # eq. 10, times the code's 1/sigma^2: ||x - x~ + sigma0^2 grad E(x~)||^2 / (sigma^2 sigma0^4),
    # where x - x~ = -sigma eps. The residual is fp32 even under bf16 autocast.
    r = sigma0**2 * grad_energy.to(eps.dtype) - s * eps  # (B, C, H, W)
    return (r.pow(2).flatten(1).sum(1) / (sigmas**2 * sigma0**4)).mean()


# ==== Training: batch -> noise -> loss -> backward -> Adam step -> log ====
def cosine_lr(step, lr, lr_min, steps):
    """The authors' CosineAnnealingLR(T_max=steps, eta_min=lr_min), in closed form."""
    return lr_min + (lr - lr_min) * (1 + math.cos(math.pi * step / steps)) / 2


def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * w, one fused call (state_dict() is detached)."""
    torch._foreach_lerp_(list(ema.values()), list(model.state_dict().values()), 1 - decay)


def batch_indices(seed, n, batch_size, step, device):
    """The images of `step` (1-based): a new permutation of the n images every epoch, a function
    of (seed, epoch) alone, so that a resumed run sees the same batches."""
    epoch, i = divmod(step - 1, n // batch_size)
    return epoch_order(seed, epoch, n, device)[i * batch_size : (i + 1) * batch_size]


def energy_monitors(model, x, generator, use_bf16):
    """The authors' monitors: the mean energy of clean images x and of U[0, 1] noise images, drawn
    on the CPU from `generator` (a checkpoint saves it, so a resumed run logs the same numbers)."""
    noise = torch.rand(x.shape, generator=generator).to(x.device)
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=use_bf16):
        e_data = model(x).float().mean().item()
        e_noise = model(noise).float().mean().item()
    return e_data, e_noise


def denoise_grid(model, x, sigma0, path):
    """Rows: clean x, then for each sigma the noisy x~ and one step down the energy,
    x~ - sigma0^2 grad E(x~) (Tweedie's denoiser at the optimum). Returns (9 n, C, H, W)."""
    g = torch.Generator().manual_seed(1)
    rows = [x]
    for sigma in (0.1, 0.3, 0.6, 1.0):
        x_noisy = (x + sigma * torch.randn(x.shape, generator=g).to(x.device)).requires_grad_(True)
        (grad,) = torch.autograd.grad(model(x_noisy).sum(), x_noisy)
        rows += [x_noisy.detach(), (x_noisy - sigma0**2 * grad).detach()]
    save_image_grid(torch.cat(rows), path, nrow=len(x))
    return torch.cat(rows)


def train(cfg, data, device, rank=0, world=1, caught=None):
    """MDSM on uint8 images (N, C, H, W) on `device`; returns [(step, normalized loss, it/s)]."""
    n, c, h, w = data.shape
    run = start_run(cfg, (c, h, w), device, caught)  # EnergyNet, Adam, EMA, generators; --resume
    model, opt, ema, fmt = run.model, run.opt, run.ema, run.memory_format
    mine = slice(rank * cfg.BATCH_SIZE // world, (rank + 1) * cfg.BATCH_SIZE // world)  # our slots
    sigmas = noise_levels(cfg.BATCH_SIZE, cfg.SIGMA_MIN, cfg.SIGMA_MAX, cfg.SIGMA_SPACING, device)
    for step in range(run.start + 1, cfg.STEPS + 1):
        # batch: (B / world, C, H, W) in [0, 1]
        batch = batch_indices(cfg.SEED, n, cfg.BATCH_SIZE, step, device)[mine]
        x = images_to_float(data[batch]).contiguous(memory_format=fmt)
        # noise: the global batch's eps from a seeded CPU generator (the same on any device)
        eps = torch.randn((cfg.BATCH_SIZE, c, h, w), generator=run.noise_gen)[mine]
        eps = eps.to(device, memory_format=fmt)
        # loss: eq. 10, one sigma per batch slot (the trunk in bf16 under --precision=bf16)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.use_bf16):
            loss = run.loss_fn(model, x, sigmas[mine], eps, cfg.SIGMA0)
        # backward: d loss / d weights, through grad_x E
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:  # data parallel: the mean of the processes' gradients on every process
            average_gradients(model, world)
        # step: Adam at the cosine schedule's lr, then the EMA of the weights
        opt.param_groups[0]["lr"] = cosine_lr(step - 1, cfg.LR, cfg.LR_MIN, cfg.STEPS)
        opt.step()
        if ema is not None:
            ema_update(ema, model, cfg.EMA_DECAY)
        # log: the mean loss since the last check (a diverging run stops) and the monitors
        run.loss_sum += loss.detach()  # on the device: no host sync per step
        checked = step % cfg.LOG_EVERY == 0 or step % cfg.CKPT_EVERY == 0 or step == cfg.STEPS
        if checked:
            mean_loss, rate = check_divergence(cfg, run, step, world, c * h * w)
            if rank == 0 and (step % cfg.LOG_EVERY == 0 or step == cfg.STEPS):
                e_data, e_noise = energy_monitors(model, x, run.monitor_gen, run.use_bf16)
                lr = opt.param_groups[0]["lr"]
                metrics = {"loss": mean_loss, "normalized": mean_loss * cfg.SIGMA0**4}
                metrics.update({"E(data)": e_data, "E(noise)": e_noise, "lr": lr})
                log_line(step, {**metrics, "it/s": rate, "img/s": rate * cfg.BATCH_SIZE})
        if rank == 0:  # rank 0 alone shows progress, draws grids and saves checkpoints
            draw_and_save(cfg, run, step, data, checked)
        if step < cfg.STEPS and stop_signal(run, world, checked):  # Ctrl-C, SIGTERM: save, exit
            save_and_exit(cfg, run, step, rank, world)
    minutes = (time.time() - run.t_start) / 60
    print(f"done: {cfg.STEPS - run.start} steps in {minutes:.1f} min; checkpoint {run.ckpt_path}")
    return run.history


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    world, rank, local_rank = torchrun_ranks()  # 1, 0, 0 without torchrun
    if rank > 0:  # rank 0 alone prints, saves and draws
        sys.stdout = open(os.devnull, "w")
    cfg = parse_config(globals(), argv)
    if cfg.SMOKE:
        apply_smoke(cfg, argv)
    check_config(cfg, world)  # every knob in its range, before any work
    device = pick_device(cfg.DEVICE)
    if world > 1:
        device = join_process_group(device, local_rank)
    check_writable(cfg.OUT_DIR)  # fail now, not after hours of training
    check_memory(cfg, shape_before_loading(cfg), device, world)  # a model that cannot fit
    torch.manual_seed(cfg.SEED)  # the initial weights
    data = load_training_data(cfg, device, world, local_rank)  # uint8 (N, C, H, W) on the device
    cfg.WIDTH, cfg.BLOCKS_PER_STAGE = network_size(cfg, data.shape[1])  # 0: the paper's
    check_data(cfg, data, device, world)  # enough images, and memory for them and the model
    try:
        if cfg.BENCHMARK:
            return benchmark(cfg, data, device)
        with stop_signals_caught() as caught:  # SIGINT, SIGTERM: train saves at its step, exits
            return train(cfg, data, device, rank, world, caught)
    except torch._dynamo.exc.BackendCompilerFailed as e:  # inductor needs a C++ compiler / Triton
        name = type(e.inner_exception).__name__
        raise SystemExit(
            f"error: torch.compile failed here ({name}); drop +compile from --precision"
        ) from None
    except KeyboardInterrupt:  # Ctrl-C in the benchmark: nothing to save
        print("interrupted; nothing saved", flush=True)
        raise SystemExit(130) from None


# ==== plumbing: nothing below this line is about the method ====
# ---- data: the official archives, downloaded once, checked, kept whole on the device as uint8 ----
IDX_FILES = {  # name -> (mirrors, md5 of the train and t10k image .gz files)
    "mnist": (
        ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
        {"train": "f68b3c2dcbeaaa9fbdd348bbdeb94873", "t10k": "9fb629c4189551a2d022fa330f9573f3"},
    ),
    "fashion-mnist": (
        ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        {"train": "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "t10k": "bef4ecab320f06d8554ea6380940ec79"},
    ),
}
CIFAR10 = (  # the archive and its md5
    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "c58f30108f718f92721af3b95e74349a",
)
array_format = (  # (lower case: not a knob)
    "a .npz of uint8 images (N, H, W) or (N, H, W, C), e.g. np.savez(path, x_train=x, x_test=y)"
)


def load_images(dataset, data_dir="data", split="train", image_size=0):
    """All images of a split as uint8 (N, C, H, W), downloaded on first use; image_size > 0
    area-averages them to image_size x image_size (never up)."""
    if dataset == "cifar10":
        x = read_cifar10(data_dir, split)
    elif dataset in IDX_FILES:
        x = read_idx_images(data_dir, dataset, split)
    elif dataset.endswith((".npz", ".npy")):
        x = read_array_file(dataset, split)
    else:
        raise SystemExit(
            f"error: unknown --dataset={dataset}; use cifar10, mnist, fashion-mnist or "
            f"{array_format}"
        )
    x = torch.from_numpy(np.ascontiguousarray(x))
    height, width = x.shape[2:]
    if image_size > min(height, width):
        native = "0 (28x28 padded to 32x32, the paper's)" if dataset in IDX_FILES else "0 (native)"
        smaller = f" or at most {min(height, width) // 8 * 8}" if min(height, width) >= 8 else ""
        raise SystemExit(
            f"error: {dataset} has images of {height}x{width}; --image_size={image_size} would "
            f"upsample them: pass --image_size={native}{smaller}"
        )
    if image_size > 0:  # to a square side, rounded to 8 bits
        x = F.adaptive_avg_pool2d(x.float(), image_size).round().to(torch.uint8)
    elif dataset in IDX_FILES:  # the native size, but the paper pads 28x28 digits with zeros to
        x = F.pad(x, (2, 2, 2, 2))  # 32x32, so that three 2x poolings give 4x4
    if x.shape[2] % 8 or x.shape[3] % 8:
        raise SystemExit(
            f"error: {dataset}: images of {x.shape[2]}x{x.shape[3]} pixels; the network needs sides"
            f" divisible by 8: pad or crop them, or pass --image_size (8, 16, 24, 32, ...)"
        )
    return x


def images_to_float(x):  # uint8 in {0..255} -> float in [0, 1]
    return x.float() / 255.0  # no centring or dequantization, as in the paper


def fetch(urls, path, md5, instead=""):
    """Download to `path` (trying each mirror) unless it is there; check its MD5 either way.
    `instead`: what else the user may put in place of the file."""
    for url in urls if not os.path.exists(path) else []:
        try:
            print(f"downloading {url}", flush=True)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with urllib.request.urlopen(url, timeout=60) as r, open(path + ".part", "wb") as f:
                shutil.copyfileobj(r, f)
            os.replace(path + ".part", path)
            break
        except OSError as e:
            print(f"  failed: {e}", flush=True)
    if not os.path.exists(path):
        raise SystemExit(
            f"error: the download of {path} failed; download {urls[0]} by hand and put it there"
            f"{instead}, then run again"
        )
    if hashlib.md5(pathlib.Path(path).read_bytes()).hexdigest() != md5:
        raise SystemExit(
            f"error: {path} is corrupt or incomplete (MD5 mismatch). Delete it and run again, or "
            f"download {urls[0]} by hand and put it there{instead}"
        )


def read_cifar10(data_dir, split):
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    if not all(os.path.exists(os.path.join(folder, name)) for name in names):
        archive = os.path.join(data_dir, "cifar-10-python.tar.gz")
        instead = f" (or its extracted folder cifar-10-batches-py/ in {data_dir})"
        fetch([CIFAR10[0]], archive, CIFAR10[1], instead)
        with tarfile.open(archive) as tar:
            tar.extractall(data_dir, filter="data")
    try:
        batches = [
            pickle.loads(pathlib.Path(folder, n).read_bytes(), encoding="bytes") for n in names
        ]
        planes = [np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32) for batch in batches]
    except Exception as e:  # a truncated or foreign file: say how to fix it
        raise SystemExit(
            f"error: {folder} holds no readable CIFAR-10 batches ({type(e).__name__}). Delete it "
            f"and run again to re-extract it"
        ) from None
    return np.concatenate(planes)  # (N, 3, 32, 32): the official R, G, B planes


def read_idx_images(data_dir, name, split):
    mirrors, md5 = IDX_FILES[name]
    part = "train" if split == "train" else "t10k"
    path = os.path.join(data_dir, name, f"{part}-images-idx3-ubyte.gz")
    if not os.path.exists(path):  # files put there by hand are checked by their IDX header below
        fetch([m + os.path.basename(path) for m in mirrors], path, md5[part])
    try:
        raw = bytearray(gzip.open(path).read())  # writable, so torch.from_numpy warns about nothing
        magic, n, h, w = np.frombuffer(raw[:16], ">u4")
        if magic != 2051 or len(raw) != 16 + n * h * w:
            raise ValueError
    except (OSError, ValueError, EOFError):
        raise SystemExit(
            f"error: {path} is not an IDX image file (corrupt or incomplete). Delete it and run "
            f"again"
        ) from None
    return np.frombuffer(raw, np.uint8, offset=16).reshape(n, 1, h, w)  # 28x28 digits


def read_array_file(path, split):
    """A user's own images: a .npz with x_train (and x_test), or a .npy of training images;
    channels last."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: --dataset={path}: file not found")
    try:
        data = np.load(path)
        if isinstance(data, np.ndarray):
            arrays = {"x_train": data}  # a .npy holds the training images
        else:
            arrays = {k: data[k] for k in data.files}
    except Exception as e:  # a text file renamed .npz, a pickle, a truncated archive
        raise SystemExit(
            f"error: --dataset={path} is not a NumPy file ({type(e).__name__}); use {array_format}"
        ) from None
    key = "x_train" if split == "train" else "x_test"
    if key not in arrays:
        found = ", ".join(arrays) or "none"
        raise SystemExit(f"error: {path} has no {key} array (it has: {found}); use {array_format}")
    x = arrays[key]
    if x.dtype != np.uint8 or x.ndim not in (3, 4) or x.ndim == 4 and x.shape[3] not in (1, 3):
        raise SystemExit(
            f"error: {path} holds {x.dtype} {x.shape}; expected uint8 images (N, H, W) or "
            f"channels-last (N, H, W, C) with C = 1 or 3 (for channels-first (N, C, H, W) save "
            f"x.transpose(0, 2, 3, 1))"
        )
    if x.ndim == 3:
        return x[:, None]
    return x.transpose(0, 3, 1, 2)  # -> (N, C, H, W)


def load_training_data(cfg, device, world, local_rank):
    """The training images on the device, uint8 (N, C, H, W). Under torchrun each node's first
    process downloads and extracts them, then the others read them."""
    if world > 1 and local_rank > 0:
        dist.barrier()
    data = load_images(cfg.DATASET, cfg.DATA_DIR, "train", cfg.IMAGE_SIZE).to(device)
    if world > 1 and local_rank == 0:
        dist.barrier()
    return data


@functools.lru_cache(maxsize=1)  # one epoch's order, kept until the next epoch asks for another
def epoch_order(seed, epoch, n, device):
    """A permutation of the n images, a function of (seed, epoch) alone."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).to(device)


# ---- checkpoints: one dict, written atomically, refused with one line when it does not fit ----
WRITERS = {"mdsm-energy": "03_mdsm_train.py", "dual-score": "05_dual_score.py"}  # kind -> script


def make_checkpoint(
    model, config, step=0, optimizer=None, scheduler=None, ema=None, kind="mdsm-energy", **extra
):
    """Everything to resume or sample from: model_args rebuild the net, config holds every knob."""
    ckpt = {
        "kind": kind,
        "model_args": dict(model.model_args),
        "config": dict(config),
        "step": step,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        ckpt["scheduler"] = scheduler.state_dict()
    if ema is not None:
        ckpt["ema"] = {k: v.detach().cpu() for k, v in ema.items()}
    return ckpt


def save_checkpoint(ckpt, path):
    """Atomic: a temporary file renamed over `path`; a failed write keeps the old one."""
    tmp = path + ".tmp"
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch reports a full disk as RuntimeError
        pathlib.Path(tmp).unlink(missing_ok=True)
        if os.path.exists(path):
            kept = "the previous checkpoint is kept"
        else:
            kept = "no checkpoint was written yet"
        free = shutil.disk_usage(folder).free / 2**20
        raise SystemExit(
            f"error: could not write {path} ({e}; {free:.0f} MiB free there); {kept}. Free some "
            f"space or pass another --out_dir, then --resume"
        ) from None


def load_checkpoint(path, kind="mdsm-energy", map_location="cpu"):
    if not os.path.isfile(path):
        raise SystemExit(
            f"error: no checkpoint at {path}. Train one with {WRITERS.get(kind, 'its script')}, or "
            f"pass the right path"
        )
    try:  # weights_only: plain tensors and Python containers, no arbitrary code
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise SystemExit(
            f"error: {path} is not a readable checkpoint ({type(e).__name__}): truncated or foreign"
        ) from None
    if not isinstance(ckpt, dict) or "kind" not in ckpt or "model" not in ckpt:
        raise SystemExit(
            f"error: {path} is not a checkpoint of this repository (no 'kind'/'model' entries)"
        )
    if ckpt["kind"] != kind:
        raise SystemExit(
            f"error: {path} holds a '{ckpt['kind']}' checkpoint, but this needs '{kind}', which "
            f"{WRITERS.get(kind, 'another script')} writes"
        )
    return ckpt


def load_model(path, device="cpu", use_ema=False):
    """EnergyNet from a checkpoint, in eval mode: (model, ckpt)."""
    ckpt = load_checkpoint(path)
    args = ckpt.get("model_args")
    ints = ("in_channels", "width", "blocks_per_stage")
    try:  # a hand-edited model_args (a key added or lost, a wrong type) gets one line
        if not isinstance(args, dict) or set(args) != {*ints, "image_size"}:
            raise TypeError
        if any(type(args[k]) is not int for k in ints):
            raise TypeError
        model = EnergyNet(**args)
        model.load_state_dict(ckpt["ema"] if use_ema and "ema" in ckpt else ckpt["model"])
    except (TypeError, ValueError, RuntimeError):
        raise SystemExit(
            f"error: {path} has model_args {args}, which do not build its weights; expected "
            f"integers in_channels, width, blocks_per_stage and image_size (or [height, width])"
        ) from None
    return model.to(device).eval(), ckpt


def start_run(cfg, shape, device, caught=None):
    """The state of a run: EnergyNet (C, H, W), Adam, the EMA, the noise and monitor generators,
    the loss window and the clocks; --resume loads them from OUT_DIR/ckpt.pt. `caught` holds the
    stop signal (stop_signals_caught)."""
    c, h, w = shape
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format  # cuDNN: NHWC
    model = EnergyNet(c, cfg.WIDTH, cfg.BLOCKS_PER_STAGE, h if h == w else [h, w])
    model = model.to(device, memory_format=fmt)
    torch.backends.cuda.matmul.allow_tf32 = cfg.PRECISION.startswith("tf32")
    torch.backends.cudnn.allow_tf32 = cfg.PRECISION.startswith("tf32")
    torch.backends.cudnn.benchmark = device.type == "cuda"  # the fastest convolution algorithms
    betas = (cfg.BETA1, cfg.BETA2)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.LR, betas=betas, fused=device.type == "cuda")
    ema = None
    if cfg.EMA_DECAY > 0:
        ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    loss_fn = mdsm_loss
    if cfg.PRECISION.endswith("+compile"):
        loss_fn = torch.compile(lambda *args: mdsm_loss(*args, functional=True))
    run = types.SimpleNamespace(model=model, opt=opt, ema=ema, memory_format=fmt, loss_fn=loss_fn)
    run.use_bf16 = cfg.PRECISION.startswith("bf16")
    run.noise_gen = torch.Generator().manual_seed(cfg.SEED)  # on the CPU: the same on any device
    run.monitor_gen = torch.Generator().manual_seed(cfg.SEED + 1)  # the E(noise) images
    run.caught = caught or types.SimpleNamespace(signal=0)
    run.loss_sum = torch.zeros((), device=device)  # the loss summed since the last check ...
    run.window_start = 0  # ... which was at this step
    run.ckpt_path = os.path.join(cfg.OUT_DIR, "ckpt.pt")
    if os.path.exists(run.ckpt_path) and not cfg.RESUME:
        raise SystemExit(
            f"error: {run.ckpt_path} already exists; pass --resume to continue it, or another "
            f"--out_dir"
        )
    run.start = resume(cfg, run) if cfg.RESUME else 0
    n_params = sum(p.numel() for p in model.parameters())
    print(f"EnergyNet: {n_params / 1e6:.2f}M parameters, {cfg.PRECISION} on {device}")
    run.history = []  # (step, normalized loss, it/s) of every loss check
    run.t_start = run.t_window = run.t_saved = time.time()
    return run


def resume(cfg, run):
    """Loads OUT_DIR/ckpt.pt into the run: weights, Adam, EMA, generators and the loss window;
    returns its step."""
    ckpt = load_checkpoint(run.ckpt_path)
    model, opt = run.model, run.opt
    if ckpt.get("model_args") != model.model_args or ckpt["step"] >= cfg.STEPS:
        raise SystemExit(
            f"error: {run.ckpt_path} holds step {ckpt['step']} of {ckpt.get('model_args')}, this "
            f"run {model.model_args} to --steps={cfg.STEPS}: pass the same --width/"
            f"--blocks_per_stage/--dataset/--image_size, more --steps"
        )
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    for p, state in opt.state.items():  # Adam's state to the model's device and memory layout
        for k, v in state.items():
            if torch.is_tensor(v) and v.shape == p.shape:
                state[k] = torch.empty_like(p).copy_(v)
    opt.param_groups[0]["betas"] = (cfg.BETA1, cfg.BETA2)  # a new --beta1/--beta2 applies too
    if run.ema is not None:  # no EMA saved: it starts at the loaded weights
        for k, v in ckpt.get("ema", ckpt["model"]).items():
            run.ema[k].copy_(v)
    run.noise_gen.set_state(ckpt["noise_rng"])
    if "monitor_rng" in ckpt:
        run.monitor_gen.set_state(ckpt["monitor_rng"])
    loss_sum, run.window_start = ckpt.get("loss_window", (0.0, ckpt["step"]))
    run.loss_sum.fill_(loss_sum)  # a run stopped between two checks goes on with its mean
    knobs = ["LR", "LR_MIN", "STEPS", "BETA1", "BETA2"]
    changed = [
        f"{k.lower()} {ckpt['config'].get(k)} -> {getattr(cfg, k)}"
        for k in knobs
        if ckpt["config"].get(k) != getattr(cfg, k)
    ]
    if changed:  # the lr is a function of (step, lr, lr_min, steps): the new schedule goes on
        print(
            f"note: from step {ckpt['step']} on, {', '.join(changed)}: the cosine schedule is the "
            f"new one's",
            flush=True,
        )
    print(f"resumed at step {ckpt['step']} from {run.ckpt_path}", flush=True)
    return ckpt["step"]


def save_run(cfg, run, step):
    """The checkpoint of the run at `step`, with its generators and the loss window."""
    extra = {"noise_rng": run.noise_gen.get_state(), "monitor_rng": run.monitor_gen.get_state()}
    extra["loss_window"] = (run.loss_sum.item(), run.window_start)
    ckpt = make_checkpoint(run.model, vars(cfg), step, run.opt, ema=run.ema, **extra)
    save_checkpoint(ckpt, run.ckpt_path)
    run.t_saved = time.time()


def draw_and_save(cfg, run, step, data, checked):
    """Rank 0 after each step: the progress bar, the denoise grid and the checkpoint when due."""
    progress(step - run.start, cfg.STEPS - run.start, run.t_start)  # this session's steps
    if step % cfg.GRID_EVERY == 0 or step == cfg.STEPS:
        path = os.path.join(cfg.OUT_DIR, f"denoise_{step:06d}.png")
        denoise_grid(run.model, images_to_float(data[:8]), cfg.SIGMA0, path)
    clock = checked and time.time() - run.t_saved > 60 * cfg.CKPT_MINUTES
    if step % cfg.CKPT_EVERY == 0 or step == cfg.STEPS or clock:
        save_run(cfg, run, step)


# ---- divergence, stop signals and multi-process set-up ----
def check_divergence(cfg, run, step, world, dim):
    """The global batch's mean loss since the last check and the weights' norm, in one host sync;
    stops the run when either is not finite or the loss exploded. Returns (mean loss, it/s)."""
    weights = [p.detach() for p in run.model.parameters()]
    norm = sum(torch._foreach_norm(weights))  # a NaN anywhere shows in it
    stats = torch.stack([run.loss_sum / (step - run.window_start), norm])
    if world > 1:  # every process takes the same decision
        dist.all_reduce(stats)
    mean_loss, weight_norm = (stats / world).tolist()
    normalized = mean_loss * cfg.SIGMA0**4  # an untrained net: about 1 per dimension
    rate = (step - max(run.window_start, run.start)) / (time.time() - run.t_window)
    median = float(np.median([past for _, past, _ in run.history])) if run.history else math.inf
    if not math.isfinite(normalized):
        diverged = f"the loss became {mean_loss:.3g}"
    elif not math.isfinite(weight_norm):
        diverged = f"the weights became non-finite (norm {weight_norm:.3g})"
    elif normalized > 1000 * dim or normalized > 100 * median:
        earlier = (
            f"median of the earlier checks {median:.3g}" if run.history else "no earlier check"
        )
        diverged = f"the normalized loss became {normalized:.3g} ({earlier}; untrained: ~{dim})"
    else:
        run.history.append((step, normalized, rate))
        run.loss_sum.zero_()
        run.t_window = time.time()
        run.window_start = step
        return mean_loss, rate
    if os.path.exists(run.ckpt_path):
        advice = f"the last good checkpoint {run.ckpt_path} is kept; continue it with a lower lr: "
        advice += f"--resume --lr={cfg.LR / 10:.1e}"
    else:
        advice = f"nothing was saved; start again with a lower lr, e.g. --lr={cfg.LR / 10:.1e}"
    raise SystemExit(f"error: {diverged} by step {step}; stopped, {advice}")


@contextlib.contextmanager
def stop_signals_caught():
    """Inside, SIGINT (Ctrl-C) and SIGTERM (a scheduler's notice) only note their number in
    caught.signal: the training loop saves a checkpoint at the end of its step and exits."""
    caught = types.SimpleNamespace(signal=0)

    def note(signum, frame):
        caught.signal = signum

    previous = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def stop_signal(run, world, checked):
    """The signal that stops the run after this step, 0 for none. Several processes agree on it
    at the loss checks (the host syncs there anyway), so they stop at the same step."""
    if world == 1:
        return run.caught.signal
    if not checked:
        return 0
    flag = torch.tensor(float(run.caught.signal), device=run.loss_sum.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def save_and_exit(cfg, run, step, rank, world):
    """Saves the run at `step` (rank 0), then every process exits with 128 + the signal's number
    (130 for SIGINT, 143 for SIGTERM), as a process killed by it would."""
    signum = run.caught.signal or signal.SIGTERM  # another process got it: as if terminated
    if rank == 0:
        save_run(cfg, run, step)
        print(f"interrupted at step {step}; saved {run.ckpt_path}; continue with --resume")
    if world > 1:  # no process leaves before the checkpoint is written
        dist.barrier()
    raise SystemExit(128 + signum)


def torchrun_ranks():
    """(WORLD_SIZE, RANK, LOCAL_RANK) as torchrun sets them; (1, 0, 0) for a plain run."""
    env = os.environ
    return int(env.get("WORLD_SIZE", 1)), int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0))


def join_process_group(device, local_rank):
    """NCCL between GPUs (one per process), gloo between CPU processes; returns our device."""
    if device.type == "cuda":  # NCCL's collectives run on the current device
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def average_gradients(model, world):
    """Data parallel by hand: the mean of the processes' gradients = the global batch's gradient.
    One all-reduce of one flat buffer; lin3.bias has no gradient on any process (which DDP would
    refuse as an unused parameter)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    sizes = [g.numel() for g in grads]
    torch._foreach_copy_(grads, [f.view_as(g) / world for f, g in zip(flat.split(sizes), grads)])


# ---- benchmark: each precision trains BENCH_STEPS steps from the same start, data and noise ----
def benchmark(cfg, data, device):
    """fp32, then --precision (fp32: every other one); returns precision -> (checks, 3) array of
    step, normalized loss and it/s."""
    runs = {}
    cuda = device.type == "cuda"
    every = ["tf32", "bf16", "tf32+compile", "bf16+compile"] if cuda else ["bf16"]
    for precision in ["fp32", *(every if cfg.PRECISION == "fp32" else [cfg.PRECISION])]:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        with tempfile.TemporaryDirectory() as out:
            torch.manual_seed(cfg.SEED)  # the same initial weights for every precision
            bench = types.SimpleNamespace(**vars(cfg))
            bench.PRECISION = precision
            bench.OUT_DIR = out
            bench.STEPS = cfg.BENCH_STEPS
            bench.LOG_EVERY = max(1, cfg.BENCH_STEPS // 10)
            bench.GRID_EVERY = 10**9
            bench.RESUME = False
            runs[precision] = trajectory = np.array(train(bench, data, device))
        ms = 1000 / np.median(trajectory[len(trajectory) > 1 :, 2])  # past the first check: warm-up
        if cuda:
            peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB peak"
        else:
            peak = "peak memory: CUDA only"
        stray = np.abs(trajectory[:, 1] / runs["fp32"][:, 1] - 1).max()  # the loss against fp32's
        verdict = "ok" if stray <= cfg.BENCH_TOL else "REFUSED"
        print(
            f"benchmark {precision}: {ms:.1f} ms/step, {cfg.BATCH_SIZE * 1000 / ms:.0f} img/s, "
            f"{peak}, --steps={cfg.STEPS} in {cfg.STEPS * ms / 3.6e6:.2f} h | loss vs fp32's: "
            f"{stray:.1e} {verdict}"
        )
    return runs


# ---- knobs and their checks ----
def apply_smoke(cfg, argv):
    """Tiny values for the knobs not passed on the command line: passed ones win."""
    passed = {a[2:].split("=")[0].upper() for a in argv if a.startswith("--")}
    tiny = dict(WIDTH=8, BLOCKS_PER_STAGE=1, BATCH_SIZE=16, STEPS=20, LOG_EVERY=5, GRID_EVERY=10)
    tiny.update(CKPT_EVERY=10, BENCH_STEPS=3)
    for k, v in tiny.items():
        if k not in passed:
            setattr(cfg, k, v)
    values = [f"{k.lower()}={getattr(cfg, k)}" + (" (yours)" if k in passed else "") for k in tiny]
    print("smoke: " + " ".join(values))


def check_config(c, world=1):
    """Every knob in its range and related knobs together, before any work; one line names the
    first bad one. (parse_config has refused non-finite numbers already.)"""
    rules = {
        "DATASET": (
            c.DATASET in ("cifar10", *IDX_FILES) or c.DATASET.endswith((".npz", ".npy")),
            "cifar10, mnist, fashion-mnist or a path to a .npz/.npy file",
        ),
        "BATCH_SIZE": (
            c.BATCH_SIZE >= 1 and c.BATCH_SIZE % world == 0,
            f">= 1, a multiple of WORLD_SIZE={world}",
        ),
    }
    for k in ["STEPS", "LOG_EVERY", "GRID_EVERY", "CKPT_EVERY", "BENCH_STEPS"]:
        rules[k] = (getattr(c, k) >= 1, ">= 1")
    rules.update(
        LR=(0 < c.LR <= 1, "(0, 1]"),
        LR_MIN=(0 <= c.LR_MIN <= c.LR, f"[0, --lr={c.LR:g}]"),
        BETA1=(0 <= c.BETA1 < 1, "[0, 1)"),
        BETA2=(0 <= c.BETA2 < 1, "[0, 1)"),
        EMA_DECAY=(0 <= c.EMA_DECAY < 1, "[0, 1)"),
        SEED=(0 <= c.SEED < 2**32, "0 to 2**32 - 1"),
        WIDTH=(c.WIDTH >= 0, ">= 0"),
        BLOCKS_PER_STAGE=(c.BLOCKS_PER_STAGE >= 0, ">= 0"),
        SIGMA0=(c.SIGMA0 > 0, "> 0"),
        IMAGE_SIZE=(c.IMAGE_SIZE >= 0 and c.IMAGE_SIZE % 8 == 0, "0, 8, 16, 24, ..."),
        BENCH_TOL=(c.BENCH_TOL > 0, "> 0"),
        SIGMA_MIN=(0 < c.SIGMA_MIN < c.SIGMA_MAX, f"(0, --sigma_max={c.SIGMA_MAX:g})"),
        CKPT_MINUTES=(c.CKPT_MINUTES > 0, "> 0"),
        SIGMA_SPACING=(c.SIGMA_SPACING in ("linear", "log"), "linear, log"),
        PRECISION=(
            c.PRECISION.removesuffix("+compile") in ("fp32", "tf32", "bf16"),
            "fp32, tf32, bf16 (+compile)",
        ),
    )
    for knob, (ok, allowed) in rules.items():
        if not ok:
            value = getattr(c, knob)
            raise SystemExit(f"error: --{knob.lower()}={value} is out of range; allowed: {allowed}")
    if c.DATASET.endswith((".npz", ".npy")) and not os.path.isfile(c.DATASET):
        raise SystemExit(f"error: --dataset={c.DATASET}: file not found")


def check_writable(out_dir):
    try:
        os.makedirs(out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as e:
        raise SystemExit(
            f"error: --out_dir={out_dir} is not writable ({e.strerror or e}); pass another one"
        ) from None


def network_size(cfg, channels):
    """(width, blocks per stage): the knobs, or where they are 0 the paper's for these channels."""
    width = cfg.WIDTH or (128 if channels == 3 else 64)
    return width, cfg.BLOCKS_PER_STAGE or (3 if channels == 3 else 2)


def shape_before_loading(cfg):
    """The smallest (C, H, W) that --dataset and --image_size can give, known before loading."""
    side = cfg.IMAGE_SIZE or (32 if cfg.DATASET in ("cifar10", *IDX_FILES) else 8)
    return (3 if cfg.DATASET == "cifar10" else 1), side, side


def network_counts(c, width, blocks, h, w):
    """EnergyNet's parameter count, and the values its blocks take in per image; Python integers,
    so that any --width gives a number instead of an overflow."""
    params = 9 * c * width + width  # conv_in
    values = width * h * w  # its output
    for stage in range(3):
        c_in, c_out = width * 2**stage, width * 2 ** (stage + 1)
        params += 9 * c_in * c_in + 10 * c_in * c_out + 2 * c_out  # the downsampling block
        params += (blocks - 1) * (19 * c_out * c_out + 2 * c_out)  # the others
        values += c_in * h * w + (blocks - 1) * c_out * (h // 2) * (w // 2)
        h, w = h // 2, w // 2
    return params + 3 * (8 * width * h * w + 1), values  # + the head's three linear maps


def device_memory(device):
    """Bytes of memory on `device`: the GPU's, or the machine's RAM (cpu, mps); inf if unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return math.inf


def check_memory(cfg, shape, device, world, data_bytes=0):
    """One line, before anything is allocated, where a rough fp32 estimate of a training step's
    memory exceeds the device's: weights, gradients, Adam's two moments and the EMA, and about
    24 floats per value a block takes in (double backprop keeps the graph of grad_x E)."""
    c, h, w = shape
    width, blocks = network_size(cfg, c)
    params, values = network_counts(c, width, blocks, h, w)
    copies = 5 if cfg.EMA_DECAY > 0 else 4
    need = 4 * (copies * params + 24 * values * (cfg.BATCH_SIZE // world)) + data_bytes
    have = device_memory(device)
    if need > have:
        raise SystemExit(
            f"error: training EnergyNet({c}, width={width}, blocks_per_stage={blocks}) on {h}x{w} "
            f"images, batch {cfg.BATCH_SIZE}, needs about {need / 2**30:.3g} GiB ({params:.3g} "
            f"parameters), more than the {have / 2**30:.3g} GiB of {device}; use a smaller "
            f"--width, --batch_size or --image_size"
        )


def check_data(cfg, data, device, world):
    if len(data) < cfg.BATCH_SIZE:
        raise SystemExit(
            f"error: {cfg.DATASET} has {len(data)} images, fewer than --batch_size={cfg.BATCH_SIZE}"
        )
    check_memory(cfg, data.shape[1:], device, world, data.numel())
    mib = data.numel() / 2**20
    print(f"data: {cfg.DATASET} {tuple(data.shape)} uint8 ({mib:.0f} MiB), kept on {device}")
    if device.type == "cpu" and cfg.WIDTH >= 64:
        print("note: the paper-size model is meant for a GPU; --help shows a command for a CPU")


# ==== shared helpers: the same text in every numbered file (tests/test_shared_helpers.py) ====
def pick_device(name="auto"):  # auto: cuda, then Apple's mps, then the cpu; TF32 stays off
    ok = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    name = next(d for d in ok if ok[d]) if name == "auto" else name
    if not ok.get(name.split(":")[0]):
        raise SystemExit(f"error: --device={name} is not here; use auto, cpu, cuda, cuda:N or mps")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    return torch.device(name)


def parse_config(namespace, argv=None):  # --key=value overrides of the UPPER_CASE constants
    cfg = {k: v for k, v in namespace.items() if k.isupper() and isinstance(v, (int, float, str))}
    for arg in sys.argv[1:] if argv is None else argv:
        if arg in ("-h", "--help"):  # the docstring's first paragraph, then the config block
            lines = [line for line in open(namespace["__file__"]) if line.split(" ")[0] in cfg]
            print(namespace["__doc__"].split("\n\n")[0] + "\n\nOptions (--key=value):")
            print("".join(lines), end="")
            raise SystemExit(0)
        key, _, text = arg.partition("=")
        name = key[2:].upper()
        if name not in cfg or key != "--" + name.lower():
            raise SystemExit(f"error: unknown option {arg}; valid: --{' --'.join(cfg).lower()}")
        kind, bools = type(cfg[name]), {"": 1, "true": 1, "1": 1, "false": 0, "0": 0}
        try:  # bools: bare, true/false or 1/0; numbers: finite, an int whole (3e5 = 300_000)
            value = bools[text.lower()] if kind is bool else text if kind is str else float(text)
            ok = kind in (bool, str) or abs(value) < 2**62 and (kind is float or value % 1 == 0)
        except (KeyError, ValueError):
            ok = False
        if not ok:
            raise SystemExit(f"error: {arg}: not a valid {kind.__name__} (finite, below 2**62)")
        cfg[name] = kind(value)
    print("config: " + " ".join(f"{k.lower()}={v}" for k, v in cfg.items()), flush=True)
    return types.SimpleNamespace(**cfg)


def log_line(step, metrics):  # the one log format: 'step 1200 | loss 0.41 | 38.2 it/s'
    text = {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in metrics.items()}
    parts = [f"{v} {k}" if k.endswith("/s") else f"{k} {v}" for k, v in text.items()]
    print("\r\033[K" * sys.stderr.isatty() + " | ".join([f"step {step}", *parts]), flush=True)


def progress(i, total, t_start, note=""):  # '[####    ] 120/300 41s<62s note', on terminals only
    if sys.stderr.isatty() and (i % max(1, total // 200) == 0 or i == total):
        spent, bar = time.time() - t_start, "#" * (30 * i // max(total, 1))
        left, end = spent * (total - i) / max(i, 1), "\n" if i == total else ""
        sys.stderr.write(f"\r[{bar:<30}] {i}/{total} {spent:.0f}s<{left:.0f}s {note}\033[K{end}")


def save_image_grid(images, path, nrow=8):  # (N, C, H, W) in [0, 1], C = 1 or 3 -> one PNG
    s = max(1, 32 // images.shape[-1])  # nearest-neighbour enlargement: 8x8 is drawn 32x32
    x = images.detach().float().cpu().clamp(0, 1).repeat_interleave(s, -1).repeat_interleave(s, -2)
    x = torch.nn.functional.pad(x, (1, 1, 1, 1), value=1.0)  # a white frame around each image
    (n, c, h, w), cols = x.shape, min(nrow, len(x))
    x = torch.cat([x, torch.ones(-n % cols, c, h, w)]).view(-1, cols, c, h, w)
    grid = x.permute(0, 3, 1, 4, 2).reshape(-1, cols * w, c).numpy()  # (rows * h, cols * w, C)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    matplotlib.image.imsave(path, grid[..., 0] if c == 1 else grid, cmap="gray", vmin=0, vmax=1)


# ==== end of shared helpers ====


if __name__ == "__main__":
    main()
