"""03: bad knobs, bad files, edited checkpoints, resume with new values, failing saves, diverging
runs, interrupted benchmarks. Each case ends in one line naming the cause, never a traceback, and
never costs the last good checkpoint. Tiny data in tmp_path, CPU, seconds."""

import math
import re

import numpy as np
import pytest
import torch
from conftest import load_script
from test_03_mdsm_train import run_tiny, tiny_dataset

m = load_script("03_mdsm_train.py")

BAD_KNOBS = [
    ("batch_size", 0),
    ("batch_size", -3),
    ("steps", 0),
    ("steps", -5),
    ("log_every", 0),
    ("grid_every", 0),
    ("ckpt_every", 0),
    ("lr", -1e-4),
    ("lr", 0.0),
    ("lr", 2.0),
    ("width", -1),
    ("blocks_per_stage", -2),
    ("ema_decay", 1.0),
    ("sigma_min", 2.0),
    ("sigma_min", 1.2),  # = sigma_max: one noise level is not MDSM
    ("sigma0", 0.0),
    ("image_size", 12),
    ("ckpt_minutes", 0.0),
    ("precision", "fp16"),
    ("precision", "bf16+jit"),
    ("sigma_spacing", "cubic"),
    ("beta2", 1.0),
    ("seed", -1),
    ("seed", 2**32),
]


@pytest.mark.parametrize("knob, value", BAD_KNOBS)
def test_every_knob_is_checked_before_any_work(tmp_path, knob, value):
    # before any work: the data set does not even exist and out_dir is never created
    argv = [
        f"--{knob}={value}",
        f"--dataset={tmp_path / 'none.npz'}",
        f"--out_dir={tmp_path / 'o'}",
    ]
    allowed = rf"^error: --{knob}={re.escape(str(value))} is out of range; allowed: "
    with pytest.raises(SystemExit, match=allowed):
        m.main(argv)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "dataset, message",
    [
        ("imagenet", "^error: --dataset=imagenet is out of range; allowed: cifar10, mnist, "),
        ("missing.npz", "missing.npz: file not found$"),
    ],
)
def test_the_dataset_is_checked_before_any_work(tmp_path, dataset, message):
    path = str(tmp_path / dataset) if dataset.endswith(".npz") else dataset
    with pytest.raises(SystemExit, match=message):
        m.main([f"--dataset={path}", f"--out_dir={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()


def test_a_machine_where_torch_compile_fails_gets_one_line_and_no_checkpoint(tmp_path, monkeypatch):
    def no_compiler(graph, example_inputs):  # inductor without a C++ compiler (CPU) or Triton
        raise OSError("no working C++ compiler found")

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn: real_compile(fn, backend=no_compiler))
    message = r"^error: torch.compile failed here \(OSError\); drop \+compile from --precision$"
    with pytest.raises(SystemExit, match=message):
        run_tiny(tmp_path, ["--precision=fp32+compile"])
    assert not (tmp_path / "run" / "ckpt.pt").exists()


def test_smoke_sets_only_the_knobs_you_did_not_pass(tmp_path, capsys):
    ckpt = run_tiny(tmp_path, ["--smoke", "--steps=2"])  # run_tiny passes --width=4 --batch_size=8
    config = ckpt["config"]
    knobs = (config["STEPS"], config["WIDTH"], config["BATCH_SIZE"], config["BLOCKS_PER_STAGE"])
    assert knobs == (2, 4, 8, 1)
    assert "steps=2 (yours)" in capsys.readouterr().out
    out = tmp_path / "smoke"
    m.main([f"--dataset={tiny_dataset(tmp_path)}", "--smoke", "--steps=1", f"--out_dir={out}"])
    assert m.load_checkpoint(str(out / "ckpt.pt"))["config"]["WIDTH"] == 8  # not passed: smoke's


def test_non_square_images_train_and_reload(tmp_path):
    path = tmp_path / "wide.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 256, (16, 16, 24), dtype=np.uint8))
    m.main(
        [f"--dataset={path}", f"--out_dir={tmp_path / 'wide'}", "--width=4", "--blocks_per_stage=1"]
        + ["--batch_size=8", "--steps=2", "--device=cpu"]
    )
    model, ckpt = m.load_model(str(tmp_path / "wide" / "ckpt.pt"))
    # image_size is [height, width] for non-square images; a square model keeps one int, the side
    args = {"in_channels": 1, "width": 4, "blocks_per_stage": 1, "image_size": [16, 24]}
    assert ckpt["model_args"] == args
    assert model(torch.rand(3, 1, 16, 24)).shape == (3,)


def test_bad_array_files_get_one_line(tmp_path):
    (tmp_path / "notes.npz").write_text("these are my images\n")
    with pytest.raises(SystemExit, match=r"notes.npz is not a NumPy file .*np.savez"):
        m.load_images(str(tmp_path / "notes.npz"))
    with pytest.raises(SystemExit, match=r"missing.npz: file not found$"):
        m.load_images(str(tmp_path / "missing.npz"))
    images, test = np.zeros((5, 8, 8), np.uint8), np.zeros((2, 8, 8), np.uint8)
    np.savez(tmp_path / "other_names.npz", images=images, test=test)
    with pytest.raises(SystemExit, match=r"has no x_train array \(it has: images, test\); use"):
        m.load_images(str(tmp_path / "other_names.npz"))
    np.savez(tmp_path / "chw.npz", x_train=np.zeros((5, 3, 16, 16), np.uint8))
    transpose = r"with C = 1 or 3 \(for channels-first \(N, C, H, W\) save x.transpose\(0, 2, 3, 1"
    with pytest.raises(SystemExit, match=transpose):
        m.load_images(str(tmp_path / "chw.npz"))
    np.savez(tmp_path / "odd.npz", x_train=np.zeros((5, 20, 20), np.uint8))
    with pytest.raises(SystemExit, match="sides divisible by 8"):
        m.load_images(str(tmp_path / "odd.npz"))
    x = m.load_images(str(tmp_path / "odd.npz"), image_size=8)  # or let --image_size resize them
    assert x.shape == (5, 1, 8, 8)


@pytest.mark.parametrize(
    "edit", [{"depth": 3}, {"width": None}, {"width": "4"}, {"image_size": "32"}]
)
def test_edited_model_args_get_one_line(tmp_path, edit):
    net = m.EnergyNet(1, 4, 1)
    ckpt = m.make_checkpoint(net, {})
    ckpt["model_args"].update(edit)
    if edit.get("width", 0) is None:
        del ckpt["model_args"]["width"]
    torch.save(ckpt, tmp_path / "edited.pt")
    message = r"has model_args .* which do not build its weights; expected integers"
    with pytest.raises(SystemExit, match=message):
        m.load_model(str(tmp_path / "edited.pt"))


def logged(text, key):
    lines = [line for line in text.splitlines() if line.startswith("step ")]
    return [float(line.split(f"| {key} ")[1].split(" |")[0]) for line in lines]


def test_resume_applies_a_new_lr_and_horizon(tmp_path, capsys):
    run_tiny(tmp_path, ["--steps=4"])
    capsys.readouterr()
    run_tiny(tmp_path, ["--resume", "--steps=8", "--lr=1e-5"])
    out = capsys.readouterr().out
    assert "note: from step 4 on, lr 5e-05 -> 1e-05, steps 4 -> 8" in out
    expected = [m.cosine_lr(s - 1, 1e-5, 1e-6, 8) for s in range(5, 9)]
    assert logged(out, "lr") == pytest.approx(expected, rel=1e-3)
    with pytest.raises(SystemExit, match="holds step 8 .*, more --steps"):
        run_tiny(tmp_path, ["--resume", "--steps=8"])
    ckpt = run_tiny(tmp_path, ["--resume", "--steps=9", "--lr=1e-5", "--beta2=0.99"])
    assert ckpt["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)


def break_loss_from_call(monkeypatch, first_call, factor):
    """Multiply the loss by `factor` from its `first_call`-th evaluation (step) on."""
    real_loss, calls = m.mdsm_loss, []

    def broken_loss(*args):
        calls.append(1)
        return real_loss(*args) * (factor if len(calls) >= first_call else 1.0)

    monkeypatch.setattr(m, "mdsm_loss", broken_loss)


def test_the_nan_advice_works_lower_lr_and_resume(tmp_path, monkeypatch, capsys):
    break_loss_from_call(monkeypatch, 5, math.nan)
    advice = r"^error: the loss became nan by step 5; stopped, the last good checkpoint .*ckpt.pt "
    advice += r"is kept; continue it with a lower lr: --resume --lr=5.0e-06$"
    with pytest.raises(SystemExit, match=advice):
        run_tiny(tmp_path, [])
    monkeypatch.undo()
    capsys.readouterr()
    ckpt = run_tiny(tmp_path, ["--resume", "--lr=5e-6"])  # exactly what the message advises
    assert "resumed at step 3" in capsys.readouterr().out and ckpt["step"] == 6


@pytest.mark.parametrize("factor, first_call, kept", [(300.0, 5, 3), (1e4, 1, None)])
def test_an_exploding_loss_stops_the_run_without_saving(
    tmp_path, monkeypatch, factor, first_call, kept
):
    # finite, not NaN, still divergence: 300x the median of the earlier checks, or (with no
    # earlier check) far above the ~1 per dimension of an untrained net
    break_loss_from_call(monkeypatch, first_call, factor)
    with pytest.raises(SystemExit) as info:
        run_tiny(tmp_path, [])
    message = str(info.value)
    assert re.match(rf"error: the normalized loss became .* by step {first_call}; stopped", message)
    path = tmp_path / "run" / "ckpt.pt"
    if kept:
        assert m.load_checkpoint(str(path))["step"] == kept  # nothing newer saved
        assert "median of the earlier checks" in message and "--resume" in message
    else:  # nothing to resume: the advice is a new start
        assert not path.exists()
        assert "nothing was saved; start again with a lower lr, e.g. --lr=5.0e-06" in message
        assert "--resume" not in message


def test_weights_that_diverge_under_a_finite_loss_are_named(tmp_path, monkeypatch):
    real_lr = m.cosine_lr
    inf_from_step_5 = lambda step, *a: math.inf if step >= 4 else real_lr(step, *a)  # noqa: E731
    monkeypatch.setattr(m, "cosine_lr", inf_from_step_5)
    message = r"^error: the weights became non-finite \(norm (inf|nan)\) by step 5; stopped"
    with pytest.raises(SystemExit, match=message):
        run_tiny(tmp_path, [])  # step 5's loss came from step 4's finite weights


def test_checkpoints_also_follow_the_clock(tmp_path, monkeypatch):
    class Stop(Exception):
        pass

    def stop_at_step_5(i, total, t0, note=""):
        if i == 5:
            raise Stop

    monkeypatch.setattr(m, "progress", stop_at_step_5)
    with pytest.raises(Stop):  # ckpt_every far away, but every check is past 1e-9 minutes
        run_tiny(tmp_path, ["--ckpt_every=1000", "--ckpt_minutes=1e-9", "--log_every=2"])
    assert m.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))["step"] == 4


def test_ctrl_c_in_the_benchmark_exits_130_with_one_line(tmp_path, monkeypatch, capsys):
    def ctrl_c(i, total, t0, note=""):  # the benchmark keeps Python's own Ctrl-C: nothing to save
        raise KeyboardInterrupt

    monkeypatch.setattr(m, "progress", ctrl_c)
    with pytest.raises(SystemExit) as info:
        m.main(
            [f"--dataset={tiny_dataset(tmp_path)}", "--smoke", "--batch_size=8", "--benchmark"]
            + ["--device=cpu", f"--out_dir={tmp_path / 'bench'}"]
        )
    assert info.value.code == 130
    assert capsys.readouterr().out.splitlines()[-1] == "interrupted; nothing saved"


def test_unwritable_out_dir_is_refused_before_loading_data(tmp_path):
    (tmp_path / "a_file").write_text(
        ""
    )  # a folder under a regular file: not writable, even for root
    out = tmp_path / "a_file" / "run"
    with pytest.raises(SystemExit, match=r"--out_dir=.*a_file/run is not writable"):
        m.main([f"--dataset={tiny_dataset(tmp_path)}", f"--out_dir={out}", "--device=cpu"])


def test_a_save_that_fails_halfway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "run" / "ckpt.pt")
    run_tiny(tmp_path, ["--steps=3"])
    before = open(path, "rb").read()
    real_save = torch.save

    def disk_full(obj, target):  # writes part of the file, then the disk is full
        with open(target, "wb") as f:
            f.write(before[:100])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    newer = m.make_checkpoint(m.EnergyNet(1, 4, 1), {}, step=99)
    message = r"could not write .*No space left on device.*previous checkpoint is kept"
    with pytest.raises(SystemExit, match=message):
        m.save_checkpoint(newer, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert open(path, "rb").read() == before and m.load_checkpoint(path)["step"] == 3
    files = sorted(p.name for p in (tmp_path / "run").iterdir() if "ckpt" in p.name)
    assert files == ["ckpt.pt"]  # no partial file
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit, match="could not write .*no checkpoint was written yet"):
        m.save_checkpoint(newer, str(tmp_path / "fresh" / "ckpt.pt"))
    assert not list((tmp_path / "fresh").iterdir())


def test_ema_switched_on_at_resume_starts_from_the_loaded_weights(tmp_path):
    first = run_tiny(tmp_path, ["--steps=3"])  # no EMA saved
    assert "ema" not in first
    second = run_tiny(tmp_path, ["--steps=4", "--resume", "--ema_decay=0.5"])
    # one EMA step from the step-3 weights: ema = 0.5 w3 + 0.5 w4, not a mix with the initial ones
    for k, w4 in second["model"].items():
        expected = 0.5 * first["model"][k] + 0.5 * w4
        assert torch.allclose(second["ema"][k], expected, atol=1e-6), k
