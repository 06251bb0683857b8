"""03 - Multiscale denoising score matching (MDSM): train an energy-based model on images.

Paper: Z. Li, Y. Chen, F. T. Sommer, "Learning Energy-Based Models in High-Dimensional Spaces with
Multiscale Denoising Score Matching", arXiv 1910.07762 (Entropy 2023), and the authors' code.
One network E(x) gives a scalar energy per image (low energy = likely image; the score is -grad E).
MDSM (eq. 10 of the paper, weighted by 1/sigma^2 as in the authors' code) trains it at every noise
level sigma in [0.05, 1.2] at once, with x~ = x + sigma * eps:
    L = E_{x, sigma, eps} || x - x~ + sigma0^2 grad E(x~) ||^2 / (sigma^2 sigma0^4)
Its minimizer is sigma0^2 grad E(x~) = x~ - E[x | x~] (Tweedie): one step of size sigma0^2 down the
energy denoises x~, and exp(-E / T) matches the noisy data at T = sigma^2 / sigma0^2 (04 anneals through T).

Commands (--out_dir gets ckpt.pt and denoise_*.png grids; the README has Fashion-MNIST, --resume, --benchmark, torchrun)
  python 03_mdsm_train.py --dataset=mnist --image_size=16 --width=32 --blocks_per_stage=1 --batch_size=64 \
      --steps=3000 --lr=5e-4 --lr_min=1e-5           # CPU: about 30 minutes; 04 then samples digits
  python 03_mdsm_train.py --dataset=cifar10          # the paper's run: 62M params, 300k steps (GPU)
"""
import gzip, hashlib, math, os, pathlib, pickle, shutil, sys, tarfile, tempfile, time, urllib.request

import numpy as np
import torch, torch.distributed as dist, torch.nn as nn, torch.nn.functional as F

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
BATCH_SIZE = 128             # images per step; one noise level per batch slot
STEPS = 300_000              # training iterations (the paper's released model: 270k)
LR = 5e-5                    # Adam learning rate at step 0
LR_MIN = 1e-6                # cosine decay floor, reached at STEPS
BETA1 = 0.9                  # Adam beta1
BETA2 = 0.95                 # Adam beta2
EMA_DECAY = 0.0              # EMA of the weights, saved beside them; 0 = off (paper), 0.9999 typical
LOG_EVERY = 50               # steps between log lines and loss checks (the authors logged every 50)
GRID_EVERY = 2000            # steps between noisy -> denoised PNG grids
CKPT_EVERY = 5000            # steps between checkpoints (one more at the end) ...
CKPT_MINUTES = 10.0          # ... and at the first loss check this many minutes after the last save
RESUME = False               # continue from OUT_DIR/ckpt.pt; a new --lr/--lr_min/--steps rebuilds the schedule
PRECISION = "fp32"           # fp32 (TF32 off: the authors') | tf32 | bf16 (autocast trunk), CUDA; +compile: torch.compile
BENCHMARK = False            # train BENCH_STEPS steps in fp32 and in --precision (fp32: in every one), compare the losses
BENCH_STEPS = 100            # steps per benchmark variant (the same start, data and noise for each)
BENCH_TOL = 0.01             # largest relative loss difference from fp32 that the benchmark accepts
SMOKE = False                # width 8, 1 block per stage, batch 16, 20 steps for the knobs you did not pass
DEVICE = "auto"              # auto | cpu | cuda | cuda:N | mps
SEED = 0                     # seeds data order, noise and initialization

# The helpers every file repeats (device, seed, --key=value overrides, logging, image grids) are at the end.

# ==== Data: the official archives, downloaded once, checked, kept whole on the device as uint8 ====
IDX_FILES = {  # name -> (mirrors, md5 of the train and t10k image .gz files)
    "mnist": (["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
              {"train": "f68b3c2dcbeaaa9fbdd348bbdeb94873", "t10k": "9fb629c4189551a2d022fa330f9573f3"}),
    "fashion-mnist": (["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
                      {"train": "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "t10k": "bef4ecab320f06d8554ea6380940ec79"})}
array_format = "a .npz/.npy of uint8 images (N, H, W) or (N, H, W, C), e.g. np.savez(path, x_train=x, x_test=y)"

def fetch(urls, path, md5):  # download to `path` (trying each mirror) unless it is there; verify the MD5 either way
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
    if not os.path.exists(path) or hashlib.md5(pathlib.Path(path).read_bytes()).hexdigest() != md5:
        raise SystemExit(f"error: {path}: the download failed, or the file is corrupt or incomplete (MD5 mismatch). "
                         f"Delete it and run again, or download it by hand from {urls[0]} and put it there")

def read_cifar10(data_dir, split):
    folder, archive = os.path.join(data_dir, "cifar-10-batches-py"), os.path.join(data_dir, "cifar-10-python.tar.gz")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    if not all(os.path.exists(os.path.join(folder, n)) for n in names):
        fetch(["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"], archive, "c58f30108f718f92721af3b95e74349a")
        with tarfile.open(archive) as tar:
            tar.extractall(data_dir, filter="data")
    try:
        return np.concatenate([np.asarray(pickle.loads(pathlib.Path(folder, n).read_bytes(), encoding="bytes")[b"data"],
                                          np.uint8).reshape(-1, 3, 32, 32) for n in names])  # official R, G, B planes
    except Exception as e:  # a truncated or foreign file: say how to fix it
        raise SystemExit(f"error: {folder} holds no readable CIFAR-10 batches ({type(e).__name__}). Delete it and run "
                         f"again to re-extract it") from None

def read_idx_images(data_dir, name, split):
    (mirrors, md5), part = IDX_FILES[name], "train" if split == "train" else "t10k"
    path = os.path.join(data_dir, name, f"{part}-images-idx3-ubyte.gz")
    if not os.path.exists(path):  # files put there by hand are checked by their IDX header below
        fetch([m + os.path.basename(path) for m in mirrors], path, md5[part])
    try:
        raw = bytearray(gzip.open(path).read())  # writable, so torch.from_numpy warns about nothing
        magic, n, h, w = np.frombuffer(raw[:16], ">u4")
        if magic != 2051 or len(raw) != 16 + n * h * w:
            raise ValueError
    except (OSError, ValueError, EOFError):
        raise SystemExit(f"error: {path} is not an IDX image file (corrupt or incomplete). Delete it and run again") from None
    return np.frombuffer(raw, np.uint8, offset=16).reshape(n, 1, h, w)  # 28x28 digits

def read_array_file(path, split):  # a user's own images: .npy, or .npz with x_train/x_test, channels last
    try:
        data = np.load(path)
        arrays = {"x_train": data} if isinstance(data, np.ndarray) else {k: data[k] for k in data.files}
    except Exception as e:  # missing, a text file renamed .npz, a pickle, a truncated archive
        raise SystemExit(f"error: --dataset={path} is not a NumPy file ({type(e).__name__}); use {array_format}") from None
    key = "x_train" if split == "train" else "x_test"
    if key not in arrays and (split == "test" or not arrays):
        raise SystemExit(f"error: {path} has no {key} array (found: {', '.join(arrays) or 'none'}); use {array_format}")
    x = arrays.get(key, next(iter(arrays.values())))  # a .npz with one unnamed array = training images
    if x.dtype != np.uint8 or x.ndim not in (3, 4) or x.ndim == 4 and x.shape[3] not in (1, 3):
        raise SystemExit(f"error: {path} holds {x.dtype} {x.shape}; expected uint8 images (N, H, W) or channels-last (N, H,"
                         f" W, C) with C = 1 or 3 (for channels-first (N, C, H, W) save x.transpose(0, 2, 3, 1))")
    return x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # -> (N, C, H, W)

def load_images(dataset, data_dir="data", split="train", image_size=0):
    """All images of a split as uint8 (N, C, H, W), downloaded on first use; image_size > 0 area-averages them."""
    if dataset not in ("cifar10", *IDX_FILES) and not dataset.endswith((".npz", ".npy")):
        raise SystemExit(f"error: unknown --dataset={dataset}; use cifar10, mnist, fashion-mnist or {array_format}")
    x = torch.from_numpy(np.ascontiguousarray(read_cifar10(data_dir, split) if dataset == "cifar10" else
                         read_idx_images(data_dir, dataset, split) if dataset in IDX_FILES else read_array_file(dataset, split)))
    if image_size > 0:
        x = F.adaptive_avg_pool2d(x.float(), image_size).round().to(torch.uint8)  # to a square side, rounded to 8 bits
    elif dataset in IDX_FILES:  # the native size, but the paper pads 28x28 digits with zeros to 32x32,
        x = F.pad(x, (2, 2, 2, 2))  # so that three 2x poolings give 4x4
    if x.shape[2] % 8 or x.shape[3] % 8:
        raise SystemExit(f"error: {dataset}: images of {x.shape[2]}x{x.shape[3]} pixels; the network needs sides divisible"
                         f" by 8: pad or crop them, or pass --image_size (8, 16, 24, 32, ...)")
    return x

def images_to_float(x):  # uint8 in {0..255} -> float in [0, 1]
    return x.float() / 255.0  # no centring or dequantization, as in the paper

# ==== Model: a ResNet energy with smooth ELUs (the loss differentiates grad_x E), no normalization ====
class ResBlock(nn.Module):  # pre-activation: out = shortcut(x) + conv2(elu(conv1(elu(x)))), optional 2x mean-pool
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

class EnergyNet(nn.Module):  # E(x): (B, C, H, W) -> (B,); CIFAR-10: EnergyNet(3, 128, 3), 62M parameters
    def __init__(self, in_channels=3, width=128, blocks_per_stage=3, image_size=32):
        super().__init__()
        self.model_args = dict(in_channels=in_channels, width=width, blocks_per_stage=blocks_per_stage, image_size=image_size)
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size  # image_size: H or [H, W]
        self.conv_in = nn.Conv2d(in_channels, width, 3, padding=1)
        blocks = []
        for c_in, c_out in ((width, 2 * width), (2 * width, 4 * width), (4 * width, 8 * width)):  # 32x32 -> 16 -> 8 -> 4
            blocks += [ResBlock(c_in, c_out, down=True)] + [ResBlock(c_out, c_out, down=False) for _ in range(blocks_per_stage - 1)]
        self.blocks = nn.Sequential(*blocks)
        n_features = 8 * width * (h // 8) * (w // 8)  # 1024 * 4 * 4 = 16384 for CIFAR-10
        self.lin1, self.lin2, self.lin3 = (nn.Linear(n_features, 1) for _ in range(3))
    def forward(self, x):
        h = self.blocks(self.conv_in(x)).flatten(1).float()  # (B, 8*width*(H/8)*(W/8)); no activation before the head, as coded
        with torch.autocast(x.device.type, enabled=False):  # the head and its output stay fp32
            # "quadratic neuron": E = (w1.h + b1)(w2.h + b2) + w3.(h*h) + b3. The constant b3 (lin3.bias)
            # drops out of grad_x E, so it never gets a gradient; b1 and b2 do, through the product.
            energy = self.lin1(h) * self.lin2(h) + self.lin3(h * h)
        return energy.squeeze(1)  # (B,)

# ==== Loss: MDSM as the authors coded it ====
def noise_levels(batch_size, sigma_min, sigma_max, spacing="linear", device="cpu"):
    """One sigma per batch slot, stratified over [sigma_min, sigma_max] (shuffled data pairs them)."""
    return torch.logspace(np.log10(sigma_min), np.log10(sigma_max), batch_size, device=device) if spacing == "log" \
        else torch.linspace(sigma_min, sigma_max, batch_size, device=device)  # log: the paper's Fashion-MNIST setting

def mdsm_loss(model, x, sigmas, eps, sigma0, functional=False):  # functional: the same numbers, by torch.func.grad
    """Batch mean of the per-sample loss; grad_x E keeps its graph for the weights' gradient (double backprop).
    torch.compile (+compile) cannot double-backward through autograd.grad (torch 2.13), but can through torch.func.grad."""
    s = sigmas.view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    x_noisy = (x + s * eps).requires_grad_(not functional)  # x~ = x + sigma*eps
    grad_energy = torch.func.grad(lambda y: model(y).sum())(x_noisy) if functional else \
        torch.autograd.grad(model(x_noisy).sum(), x_noisy, create_graph=True)[0]  # (B, C, H, W)
    # eq. 10 with the code's 1/sigma^2: ||x - x~ + sigma0^2 grad E(x~)||^2 / (sigma^2 sigma0^4), x - x~ = -sigma eps
    r = sigma0**2 * grad_energy.to(eps.dtype) - s * eps  # (B, C, H, W), fp32 even under autocast
    return (r.pow(2).flatten(1).sum(1) / (sigmas**2 * sigma0**4)).mean()

# ==== Checkpoints: one dict, written atomically, refused with a clear message when it does not fit ====
def make_checkpoint(model, config, step=0, optimizer=None, scheduler=None, ema=None, kind="mdsm-energy", **extra):
    ckpt = {"kind": kind, "model_args": dict(model.model_args), "config": dict(config), "step": step,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **extra}
    ckpt.update({name: part.state_dict() for name, part in (("optimizer", optimizer), ("scheduler", scheduler)) if part})
    ckpt.update({"ema": {k: v.detach().cpu() for k, v in ema.items()}} if ema is not None else {})
    return ckpt  # everything needed to resume or sample: model_args rebuild the net, config holds every knob

def save_checkpoint(ckpt, path):  # atomic: a temporary file renamed over `path`; a failed write keeps the old one
    tmp, folder = path + ".tmp", os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch reports a full disk as RuntimeError "unexpected pos ..."
        pathlib.Path(tmp).unlink(missing_ok=True)
        kept = "the previous checkpoint is kept" if os.path.exists(path) else "no checkpoint was written yet"
        raise SystemExit(f"error: could not write {path} ({e}; {shutil.disk_usage(folder).free / 2**20:.0f} MiB free "
                         f"there); {kept}. Free some space or pass another --out_dir, then --resume") from None

def load_checkpoint(path, kind="mdsm-energy", map_location="cpu"):
    if not os.path.isfile(path):
        raise SystemExit(f"error: no checkpoint at {path}. Train one with 03_mdsm_train.py, or pass the right path")
    try:  # weights_only: plain tensors and Python containers, no arbitrary code
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: {path} is not a readable checkpoint ({type(e).__name__}): truncated or foreign") from None
    if not isinstance(ckpt, dict) or "kind" not in ckpt or "model" not in ckpt:
        raise SystemExit(f"error: {path} is not a checkpoint of this repository (no 'kind'/'model' entries)")
    if ckpt["kind"] != kind:
        raise SystemExit(f"error: {path} holds a '{ckpt['kind']}' checkpoint, but this needs '{kind}' (03 or 05's)")
    return ckpt

def load_model(path, device="cpu", use_ema=False):  # EnergyNet from a checkpoint, in eval mode: (model, ckpt)
    ckpt = load_checkpoint(path)
    args, ints = ckpt.get("model_args"), ("in_channels", "width", "blocks_per_stage")
    try:  # a hand-edited model_args (a key added or lost, a wrong type) gets one line, not a traceback
        if not isinstance(args, dict) or set(args) != {*ints, "image_size"} or any(type(args[k]) is not int for k in ints):
            raise TypeError
        model = EnergyNet(**args)
        model.load_state_dict(ckpt["ema"] if use_ema and "ema" in ckpt else ckpt["model"])
    except (TypeError, ValueError, RuntimeError):
        raise SystemExit(f"error: {path} has model_args {args}, which do not build its weights; expected integers "
                         f"in_channels, width, blocks_per_stage and image_size (or [height, width])") from None
    return model.to(device).eval(), ckpt

# ==== Training ====
def check_config(c, world=1):  # every knob against its allowed range, before any work; one line names the first bad one
    rules = {"BATCH_SIZE": (c.BATCH_SIZE >= 1 and c.BATCH_SIZE % world == 0, f">= 1, a multiple of WORLD_SIZE={world}")}
    rules.update({k: (getattr(c, k) >= 1, ">= 1") for k in "STEPS LOG_EVERY GRID_EVERY CKPT_EVERY BENCH_STEPS".split()})
    rules.update(LR=(c.LR > 0, "> 0"), LR_MIN=(0 <= c.LR_MIN <= c.LR, "0 to --lr"), BETA1=(0 <= c.BETA1 < 1, "[0, 1)"),
                 BETA2=(0 <= c.BETA2 < 1, "[0, 1)"), EMA_DECAY=(0 <= c.EMA_DECAY < 1, "[0, 1)"), SEED=(c.SEED >= 0, ">= 0"),
                 WIDTH=(c.WIDTH >= 0, ">= 0"), BLOCKS_PER_STAGE=(c.BLOCKS_PER_STAGE >= 0, ">= 0"), SIGMA0=(c.SIGMA0 > 0, "> 0"),
                 IMAGE_SIZE=(c.IMAGE_SIZE >= 0 and c.IMAGE_SIZE % 8 == 0, "0, 8, 16, 24, ..."), BENCH_TOL=(c.BENCH_TOL > 0, "> 0"),
                 SIGMA_MIN=(0 < c.SIGMA_MIN <= c.SIGMA_MAX, "(0, --sigma_max]"), CKPT_MINUTES=(c.CKPT_MINUTES > 0, "> 0"),
                 SIGMA_SPACING=(c.SIGMA_SPACING in ("linear", "log"), "linear, log"),
                 PRECISION=(c.PRECISION.removesuffix("+compile") in ("fp32", "tf32", "bf16"), "fp32, tf32, bf16 (+compile)"))
    for knob, (ok, allowed) in rules.items():
        if not ok:
            raise SystemExit(f"error: --{knob.lower()}={getattr(c, knob)} is out of range; allowed: {allowed}")

def cosine_lr(step, lr, lr_min, steps):  # the authors' CosineAnnealingLR(T_max=steps, eta_min=lr_min), closed form
    return lr_min + (lr - lr_min) * (1 + math.cos(math.pi * step / steps)) / 2

def ema_update(ema, model, decay):  # ema <- decay * ema + (1 - decay) * w, one fused call (state_dict() is detached)
    torch._foreach_lerp_(list(ema.values()), list(model.state_dict().values()), 1 - decay)

def resume(cfg, path, model, opt, ema, noise_gen):  # loads `path` into this run; returns its step
    ckpt = load_checkpoint(path)
    if ckpt.get("model_args") != model.model_args or ckpt["step"] >= cfg.STEPS:
        raise SystemExit(f"error: {path} holds step {ckpt['step']} of {ckpt.get('model_args')}, this run {model.model_args} to "
                         f"--steps={cfg.STEPS}: pass the same --width/--blocks_per_stage/--dataset/--image_size, more --steps")
    model.load_state_dict(ckpt["model"]), opt.load_state_dict(ckpt["optimizer"])
    for p, state in opt.state.items():  # Adam's state to the model's device and memory layout (CPU <-> CUDA)
        state.update({k: torch.empty_like(p).copy_(v) for k, v in state.items() if torch.is_tensor(v) and v.shape == p.shape})
    opt.param_groups[0]["betas"] = (cfg.BETA1, cfg.BETA2)  # a new --beta1/--beta2 applies too (one param group)
    for k, v in (ckpt.get("ema", ckpt["model"]) if ema is not None else {}).items():  # no EMA saved: start at the weights
        ema[k].copy_(v)
    noise_gen.set_state(ckpt["noise_rng"])
    changed = [f"{k.lower()} {ckpt['config'].get(k)} -> {getattr(cfg, k)}" for k in "LR LR_MIN STEPS BETA1 BETA2".split()
               if ckpt["config"].get(k) != getattr(cfg, k)]
    if changed:  # the lr is a function of (step, lr, lr_min, steps): the new schedule continues at this step
        print(f"note: from step {ckpt['step']} on, {', '.join(changed)}: the cosine schedule is the new one's", flush=True)
    print(f"resumed at step {ckpt['step']} from {path}", flush=True)
    return ckpt["step"]

def denoise_grid(model, x, sigma0, path):
    g, rows = torch.Generator().manual_seed(1), [x]
    for sigma in (0.1, 0.3, 0.6, 1.0):
        x_noisy = (x + sigma * torch.randn(x.shape, generator=g).to(x.device)).requires_grad_(True)
        (grad,) = torch.autograd.grad(model(x_noisy).sum(), x_noisy)
        rows += [x_noisy.detach(), (x_noisy - sigma0**2 * grad).detach()]
    save_image_grid(torch.cat(rows), path, nrow=len(x))
    return torch.cat(rows)  # (9 n, C, H, W): clean, then per sigma noisy x~ and one-step denoised x~ - sigma0^2 grad E(x~)

def train(cfg, data, device, rank=0, world=1):  # the training loop; data: uint8 (N, C, H, W) on `device`
    (n, c, h, w), fmt = data.shape, torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model = EnergyNet(c, cfg.WIDTH, cfg.BLOCKS_PER_STAGE, h if h == w else [h, w]).to(device, memory_format=fmt)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.PRECISION.startswith("tf32")
    torch.backends.cudnn.benchmark, use_bf16 = device.type == "cuda", cfg.PRECISION.startswith("bf16")  # cuDNN: fastest
    opt = torch.optim.Adam(model.parameters(), lr=cfg.LR, betas=(cfg.BETA1, cfg.BETA2), fused=device.type == "cuda")
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()} if cfg.EMA_DECAY > 0 else None
    noise_gen = torch.Generator().manual_seed(cfg.SEED)  # on the CPU: the same noise on every device
    loss_fn = torch.compile(lambda *a: mdsm_loss(*a, functional=True)) if cfg.PRECISION.endswith("+compile") else mdsm_loss
    ckpt_path = os.path.join(cfg.OUT_DIR, "ckpt.pt")
    if os.path.exists(ckpt_path) and not cfg.RESUME:
        raise SystemExit(f"error: {ckpt_path} already exists; pass --resume to continue it, or another --out_dir")
    start = resume(cfg, ckpt_path, model, opt, ema, noise_gen) if cfg.RESUME else 0
    print(f"EnergyNet: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {cfg.PRECISION} on {device}")
    mine = slice(rank * cfg.BATCH_SIZE // world, (rank + 1) * cfg.BATCH_SIZE // world)  # this rank's batch slots
    sigmas = noise_levels(cfg.BATCH_SIZE, cfg.SIGMA_MIN, cfg.SIGMA_MAX, cfg.SIGMA_SPACING, device)[mine]  # (B / world,)
    window, history = torch.zeros((), device=device), []  # running loss sum (no host sync per step); past means
    t0 = t_window = t_saved = time.time()
    window_start, per_epoch, order = start, n // cfg.BATCH_SIZE, None
    for step in range(start + 1, cfg.STEPS + 1):
        epoch, batch_in_epoch = divmod(step - 1, per_epoch)
        if order is None or batch_in_epoch == 0:  # a function of (seed, epoch) alone: a resumed run sees the same batches
            order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.SEED * 100_003 + epoch)).to(device)
        batch = order[batch_in_epoch * cfg.BATCH_SIZE:(batch_in_epoch + 1) * cfg.BATCH_SIZE]
        x = images_to_float(data[batch[mine]]).contiguous(memory_format=fmt)  # (B / world, C, H, W) in [0, 1]
        eps = torch.randn((cfg.BATCH_SIZE, c, h, w), generator=noise_gen)[mine].to(device, memory_format=fmt)  # global draw
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = loss_fn(model, x, sigmas, eps, cfg.SIGMA0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:  # data parallel by hand: the mean of the ranks' gradients = the global batch's gradient.
            grads = [p.grad for p in model.parameters() if p.grad is not None]  # lin3.bias: None on every rank
            flat = torch.cat([g.flatten() for g in grads])  # (DDP would refuse that unused parameter)
            dist.all_reduce(flat)
            torch._foreach_copy_(grads, [f.view_as(g) / world for f, g in zip(flat.split([g.numel() for g in grads]), grads)])
        opt.param_groups[0]["lr"] = cosine_lr(step - 1, cfg.LR, cfg.LR_MIN, cfg.STEPS)  # cosine decay, set every step
        opt.step()
        if ema is not None:
            ema_update(ema, model, cfg.EMA_DECAY)
        window += loss.detach()
        checked = step % cfg.LOG_EVERY == 0 or step % cfg.CKPT_EVERY == 0 or step == cfg.STEPS
        if checked:  # the mean loss and the weights' norm, with one host sync per check
            norm = sum(torch._foreach_norm([p.detach() for p in model.parameters()]))  # a NaN anywhere shows in it
            stats = torch.stack([window / (step - window_start), norm])
            if world > 1:  # the global batch's mean loss: every rank takes the same decision below
                dist.all_reduce(stats)
            mean_loss, weight_norm = (stats / world).tolist()
            normalized, rate = mean_loss * cfg.SIGMA0**4, (step - window_start) / (time.time() - t_window)
            median = float(np.median([past for _, past, _ in history])) if history else math.inf
            # an untrained net sits near 1 per dimension: far above that, or 100x the median so far, is divergence
            if not math.isfinite(normalized + weight_norm) or normalized > 1000 * c * h * w or normalized > 100 * median:
                kept = f"the last good checkpoint {ckpt_path} is kept" if os.path.exists(ckpt_path) else "none was saved"
                raise SystemExit(f"error: the normalized loss became {normalized:.3g} (median so far {median:.3g}) by step "
                                 f"{step}; stopped, {kept}. Continue with a lower lr: --resume --lr={cfg.LR / 10:.1e}")
            history.append((step, normalized, rate))
            if rank == 0 and (step % cfg.LOG_EVERY == 0 or step == cfg.STEPS):
                with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    e_data = model(x).float().mean().item()  # the authors' monitors: E of clean data
                    e_noise = model(torch.rand_like(x)).float().mean().item()  # and of U[0,1] noise images
                log_line(step, {"loss": mean_loss, "normalized": normalized, "E(data)": e_data, "E(noise)": e_noise,
                                "lr": opt.param_groups[0]["lr"], "it/s": rate, "img/s": rate * cfg.BATCH_SIZE})
            window, t_window, window_start = torch.zeros_like(window), time.time(), step
        if rank == 0:  # rank 0 alone shows progress, draws grids and saves checkpoints
            progress(step - start, cfg.STEPS - start, t0)  # time left counts only this session's steps
            if step % cfg.GRID_EVERY == 0 or step == cfg.STEPS:
                denoise_grid(model, images_to_float(data[:8]), cfg.SIGMA0, os.path.join(cfg.OUT_DIR, f"denoise_{step:06d}.png"))
            if step % cfg.CKPT_EVERY == 0 or step == cfg.STEPS or checked and time.time() - t_saved > 60 * cfg.CKPT_MINUTES:
                save_checkpoint(make_checkpoint(model, vars(cfg), step, opt, ema=ema, noise_rng=noise_gen.get_state()), ckpt_path)
                t_saved = time.time()
    print(f"done: {cfg.STEPS - start} steps in {(time.time() - t0) / 60:.1f} min; checkpoint {ckpt_path}", flush=True)
    return history  # (step, normalized loss, it/s) of every loss check

# ==== Benchmark: each precision trains BENCH_STEPS steps from the same start, data and noise (same seed) ====
def benchmark(cfg, data, device):
    runs, cuda = {}, device.type == "cuda"  # precision -> (checks, 3): step, normalized loss, it/s
    every = ["tf32", "bf16", "tf32+compile", "bf16+compile"] if cuda else ["bf16"]  # (+compile on a CPU: --precision)
    for precision in ["fp32", *(every if cfg.PRECISION == "fp32" else [cfg.PRECISION])]:  # fp32 first: the reference
        torch.cuda.reset_peak_memory_stats(device) if cuda else None
        with tempfile.TemporaryDirectory() as out:
            set_seed(cfg.SEED)  # the same initial weights for every precision
            run = type(cfg)(**{**vars(cfg), "PRECISION": precision, "OUT_DIR": out, "STEPS": cfg.BENCH_STEPS,
                               "LOG_EVERY": max(1, cfg.BENCH_STEPS // 10), "GRID_EVERY": 10**9, "RESUME": False})
            runs[precision] = trajectory = np.array(train(run, data, device))
        ms = 1000 / np.median(trajectory[len(trajectory) > 1:, 2])  # past the first check: warm-up, compilation
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB peak" if cuda else "peak memory: CUDA only"
        stray = np.abs(trajectory[:, 1] / runs["fp32"][:, 1] - 1).max()  # the loss trajectory against fp32's
        print(f"benchmark {precision}: {ms:.1f} ms/step, {cfg.BATCH_SIZE * 1000 / ms:.0f} img/s, {peak}, --steps={cfg.STEPS} in "
              f"{cfg.STEPS * ms / 3.6e6:.2f} h | loss vs fp32's: {stray:.1e} " + ("ok" if stray <= cfg.BENCH_TOL else "REFUSED"))
    return runs

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_config(globals(), argv)
    if cfg.SMOKE:  # tiny values for the knobs not passed on the command line: passed ones win
        passed = {a[2:].split("=")[0].upper() for a in argv if a.startswith("--")}
        tiny = dict(WIDTH=8, BLOCKS_PER_STAGE=1, BATCH_SIZE=16, STEPS=20, LOG_EVERY=5, GRID_EVERY=10, CKPT_EVERY=10, BENCH_STEPS=3)
        vars(cfg).update({k: v for k, v in tiny.items() if k not in passed})
        print("smoke: " + " ".join(f"{k.lower()}={getattr(cfg, k)}" + (" (yours)" if k in passed else "") for k in tiny))
    world, rank, local_rank = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    check_config(cfg, world)  # torchrun sets WORLD_SIZE, RANK and LOCAL_RANK
    device = pick_device(cfg.DEVICE)
    if world > 1:  # under torchrun: NCCL between GPUs (one per process), gloo between CPU processes
        if device.type == "cuda":  # one GPU per process; NCCL's collectives run on the current device
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if rank > 0:  # rank 0 alone prints, saves, draws
            sys.stdout = open(os.devnull, "w")
    try:  # fail in a second, not after hours of training, if the checkpoint cannot be written
        os.makedirs(cfg.OUT_DIR, exist_ok=True)
        tempfile.TemporaryFile(dir=cfg.OUT_DIR).close()
    except OSError as e:
        raise SystemExit(f"error: --out_dir={cfg.OUT_DIR} is not writable ({e.strerror or e}); pass another one") from None
    set_seed(cfg.SEED)
    if world > 1 and local_rank > 0:  # each node's first rank downloads and extracts the data, then the others read it
        dist.barrier()
    data = load_images(cfg.DATASET, cfg.DATA_DIR, "train", cfg.IMAGE_SIZE).to(device)  # no host copies per batch
    if world > 1 and local_rank == 0:
        dist.barrier()
    cfg.WIDTH = cfg.WIDTH or (128 if data.shape[1] == 3 else 64)  # the paper's widths and depths
    cfg.BLOCKS_PER_STAGE = cfg.BLOCKS_PER_STAGE or (3 if data.shape[1] == 3 else 2)
    if len(data) < cfg.BATCH_SIZE:
        raise SystemExit(f"error: {cfg.DATASET} has {len(data)} images, fewer than --batch_size={cfg.BATCH_SIZE}")
    print(f"data: {cfg.DATASET} {tuple(data.shape)} uint8 ({data.numel() / 2**20:.0f} MiB), kept on {device}")
    if device.type == "cpu" and cfg.WIDTH >= 64:
        print("note: the paper-size model is meant for a GPU; for a CPU run see the first command in the docstring")
    try:
        return benchmark(cfg, data, device) if cfg.BENCHMARK else train(cfg, data, device, rank, world)
    except torch._dynamo.exc.BackendCompilerFailed as e:  # +compile: inductor needs a C++ compiler (CPU), Triton (GPU)
        raise SystemExit(f"error: torch.compile failed here ({type(e.inner_exception).__name__}); drop +compile from --precision") from None


# ==== shared helpers: the same text in every numbered file (tests/test_shared_helpers.py) ====
# Device, seed, --key=value overrides, log line, progress bar, image grid, an earlier file (uses os, sys, time, np, torch).
def pick_device(name="auto"):  # 'auto' takes cuda, then Apple's mps, then the cpu
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    name = ("cuda" if available["cuda"] else "mps" if available["mps"] else "cpu") if name == "auto" else name
    if not available.get(name.split(":")[0]):
        raise SystemExit(f"error: --device={name} is not available here; use auto, cpu, cuda, cuda:N or mps")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # true fp32 unless a file opts in
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
