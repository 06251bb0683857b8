"""Seed control for 05's strong-generalization test (by hand, not a pytest test: it needs two full runs).

--strong_gen trains, per N, model A on training images 0 ... N-1 and model B on N ... 2N-1, and reports the RMS
difference of their log p on A's images. Part of that difference is only the spread between two trainings, which
says nothing about memorization. This script scores A's images (the same images and dequantization draw as
--strong_gen) with the checkpoints of two --strong_gen runs that differ only in --seed, and prints per N:
  A vs B        within each run: the number --strong_gen reports (different data, different seed);
  A vs A'       the same half, another seed: the spread between two trainings on identical data;
  B vs B'       the same, for the halves that never saw these images.
A vs B well above A vs A' would be memorization; the two equal, only training noise.

    python 05_dual_score.py --dataset=mnist --image_size=16 --width=16 --lr=1e-3 --lr_halve_every=1500 \\
        --steps=800 --strong_gen=10,1000,10000 --out_dir=out/05_sg               # then again with
        ... --seed=1 --out_dir=out/05_sg_seed1
    python tests/check_05_seed_control.py --runs=out/05_sg,out/05_sg_seed1 --sizes=10,1000,10000 --image_size=16
"""

import argparse
import math
import os
import types

import torch

# a numbered file as a module (this folder is on sys.path when run)
from check_05_gaussian import load


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="two --strong_gen out_dirs, comma-separated")
    parser.add_argument("--sizes", default="10,1000,10000")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--image_size", type=int, default=16)
    args = parser.parse_args()
    dual, mdsm = load("05_dual_score.py"), load("03_mdsm_train.py")
    cfg = types.SimpleNamespace(
        DATASET=args.dataset, DATA_DIR=args.data_dir, IMAGE_SIZE=args.image_size
    )
    x_train = dual.load_split(cfg, "train")
    name = args.dataset + (str(args.image_size) if args.image_size else "")
    runs = args.runs.split(",")
    for n in (int(s) for s in args.sizes.split(",")):
        x_eval, db = x_train[: min(n, 500)], {}  # as --strong_gen: A's first (up to) 500 images
        for r, run in enumerate(runs):
            for half in "AB":
                path = os.path.join(run, f"{name}_N{n}{half}.pt")
                ckpt = mdsm.load_checkpoint(path, kind="dual-score")
                model = dual.ScoreUNet(**ckpt["model_args"])  # the design it was trained with
                model.load_state_dict(ckpt["model"])
                t_min, t_max = ckpt["config"]["T_MIN"], ckpt["config"]["T_MAX"]
                gen = torch.Generator().manual_seed(1)
                bpd = dual.image_density(model.eval(), x_eval, t_min, t_max, 1, gen)["deq"]
                db[half + "'" * r] = -10 * math.log10(2) * (bpd - 8)  # dB/dim, as --strong_gen
        rms = {
            pair: (db[pair[0]] - db[pair[1]]).pow(2).mean().sqrt().item()
            for pair in (("A", "B"), ("A'", "B'"), ("A", "A'"), ("B", "B'"))
        }
        print(
            f"N = {n} ({len(x_eval)} images of A's half), RMS difference of log p in dB/dim: "
            + ", ".join(f"{a} vs {b} {v:.3f}" for (a, b), v in rms.items())
            + "; mean log p "
            + ", ".join(f"{k} {v.mean():.2f}" for k, v in db.items()),
            flush=True,
        )


if __name__ == "__main__":
    main()
