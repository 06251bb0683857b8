"""01 - Score matching on 2-D toys whose score is known in closed form.

(Placeholder header: the lesson itself is being written; see issue 2.)
"""
import numpy as np
import torch

# ---- config: every knob can be overridden with --key=value (see --help) ----
SEED = 0              # random seed for data, initialization and sampling
DEVICE = "cpu"        # auto | cpu | cuda | mps (the toys are faster on the CPU)

# ==== shared helpers: the same text in every numbered file (tests/test_shared_helpers.py) ====
# Device choice, seeding, --key=value overrides, one log format, a progress bar, an image-grid
# saver, and loading an earlier numbered file as a module. Everything else is written once.
import importlib.util
import math
import os
import random
import re
import sys
import time
import types

import numpy as np
import torch


def pick_device(name="auto"):
    """'auto' takes cuda, then Apple mps, then cpu; 'cpu', 'cuda', 'cuda:1', 'mps' force one."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"error: --device={name} is not a device; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device={name} but this torch has no CUDA device; use --device=cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"error: --device={name} but MPS is not available; use --device=cpu")
    return device


def set_seed(seed):
    """Seed Python, NumPy and torch (every device) so a run can be repeated."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _knob_comments(path):
    """NAME -> trailing comment of each `NAME = value  # comment` line of a file (for --help)."""
    comments = {}
    if path and os.path.exists(path):
        for line in open(path, encoding="utf-8"):
            m = re.match(r"^([A-Z][A-Z0-9_]*)\s*=.*?#\s*(.*)$", line)
            if m:
                comments.setdefault(m.group(1), m.group(2).strip())
    return comments


def _cast(key, text, default):
    """Convert an override to the type of its default, or stop with a one-line message."""
    kind = type(default).__name__
    try:
        if isinstance(default, bool):
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(default, int):
            value = float(text.replace("_", ""))  # accepts 300000, 300_000 and 3e5
            if value != int(value):
                raise ValueError
            return int(value)
        if isinstance(default, float):
            return float(text)
        return text
    except ValueError:
        raise SystemExit(f"error: --{key.lower()} expects a value of type {kind} (default {default!r}), got {text!r}")


def parse_config(namespace, argv=None):
    """Resolve a file's UPPER_CASE constants against command-line overrides.

    namespace is the file's globals(); argv defaults to sys.argv[1:]. Accepted forms:
    --key=value, --key value, and a bare --flag for booleans; keys are case-insensitive and
    '-' equals '_'. Each value must parse as the type of its default. Unknown keys stop the run
    with the list of valid ones; --help lists every knob with its default and comment.
    Returns a SimpleNamespace with the same UPPER_CASE names.
    """
    defaults = {k: v for k, v in namespace.items()
                if k.isupper() and not k.startswith("_") and isinstance(v, (bool, int, float, str))}
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        doc = (namespace.get("__doc__") or "").strip().split("\n\n")[0]
        comments = _knob_comments(namespace.get("__file__"))
        print(doc + "\n\noptions (--key=value; defaults shown):")
        for k, v in defaults.items():
            print(f"  {'--' + k.lower() + '=' + str(v):<30} {comments.get(k, '')}")
        raise SystemExit(0)
    config, i = dict(defaults), 0
    while i < len(argv):
        arg, i = argv[i], i + 1
        if not arg.startswith("--"):
            raise SystemExit(f"error: unexpected argument {arg!r}; options look like --key=value (see --help)")
        key, has_value, text = arg[2:].partition("=")
        name = key.replace("-", "_").upper()
        if name not in defaults:
            valid = ", ".join("--" + k.lower() for k in defaults)
            raise SystemExit(f"error: unknown option --{key}. Valid options: {valid}")
        if not has_value:
            if isinstance(defaults[name], bool):
                text = "true"
            elif i < len(argv) and not argv[i].startswith("--"):
                text, i = argv[i], i + 1
            else:
                raise SystemExit(f"error: --{key} needs a value, e.g. --{key.lower()}={defaults[name]}")
        config[name] = _cast(name, text, defaults[name])
    return types.SimpleNamespace(**config)


def show_config(cfg):
    """Print the resolved configuration on one line, so every log starts with what ran."""
    print("config: " + " ".join(f"{k.lower()}={v}" for k, v in vars(cfg).items()), flush=True)


def log_line(step, metrics):
    """The one log format of this repository: 'step 1200 | loss 0.41 | 38.2 it/s'."""
    parts = [f"step {step}"]
    for k, v in metrics.items():
        text = f"{v:.4g}" if isinstance(v, float) else str(v)
        parts.append(f"{text} {k}" if k.endswith("/s") else f"{k} {text}")
    end = "\r\033[K" if sys.stderr.isatty() else ""  # wipe a progress bar drawn on this line
    print(end + " | ".join(parts), flush=True)


def format_time(seconds):
    seconds = int(max(seconds, 0))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress(i, total, t_start, note=""):
    """Redraw a one-line progress bar with elapsed and remaining time (terminals only)."""
    if not sys.stderr.isatty() or (i % max(1, total // 500) and i != total):
        return
    frac = i / max(total, 1)
    elapsed = time.time() - t_start
    remaining = elapsed / frac * (1 - frac) if frac > 0 else 0.0
    bar = "#" * int(30 * frac)
    sys.stderr.write(f"\r[{bar:<30}] {i}/{total} {format_time(elapsed)}<{format_time(remaining)} {note}\033[K")
    if i == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def save_image_grid(images, path, nrow=8, pad=2):
    """Save images (N, C, H, W) with values in [0, 1] (C = 1 or 3) as one PNG grid."""
    import matplotlib.image

    x = images.detach().float().cpu().clamp(0, 1)
    n, c, h, w = x.shape
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    grid = torch.ones(c, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for k in range(n):
        r, q = divmod(k, cols)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = x[k]
    array = grid.permute(1, 2, 0).numpy()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    matplotlib.image.imsave(path, array[..., 0] if c == 1 else array, cmap="gray", vmin=0, vmax=1)


def load_numbered(filename):
    """Import a sibling file such as '03_mdsm_train.py' as a module (a name starting with a
    digit cannot be imported with `import`). Its main() does not run."""
    name = os.path.splitext(filename)[0]
    if name not in sys.modules:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), filename)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
# ==== end of shared helpers ====


def main(argv=None):
    cfg = parse_config(globals(), argv)
    show_config(cfg)


if __name__ == "__main__":
    main()
