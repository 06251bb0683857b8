"""The shared helper section is copied verbatim into every numbered file; this keeps the copies
identical, and checks the helpers themselves (override parsing, image grids, module loading)."""
import glob
import os
import types

import pytest
import torch

from conftest import ROOT, load_script

BEGIN = "# ==== shared helpers:"
END = "# ==== end of shared helpers ===="


def helper_section(path):
    text = open(path, encoding="utf-8").read()
    assert text.count(BEGIN) == 1 and text.count(END) == 1, f"{path}: helper markers missing or repeated"
    return text[text.index(BEGIN):text.index(END) + len(END)]


def test_every_numbered_file_has_the_same_small_helper_section_at_its_end():
    reference = helper_section(os.path.join(ROOT, "01_score_matching.py"))
    assert len(reference.splitlines()) <= 80
    files = sorted(glob.glob(os.path.join(ROOT, "0[1-9]_*.py")))
    assert len(files) == 6
    for path in files:
        assert helper_section(path) == reference, f"{os.path.basename(path)}: helper section differs from 01's copy"
        text = open(path, encoding="utf-8").read()
        # the section sits just above the main guard, so the lesson starts on the first screen
        between = text[text.index(END) + len(END):text.index('if __name__ == "__main__":')]
        assert between.strip() == "", f"{os.path.basename(path)}: code between the helpers and the main guard"


@pytest.mark.parametrize("name", sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "0[1-9]_*.py"))))
def test_every_file_reads_as_a_lesson_of_at_most_500_lines(name):
    text = open(os.path.join(ROOT, name), encoding="utf-8").read()
    assert len(text.splitlines()) <= 500, f"{name} is longer than 500 lines"
    assert text.index("# The helpers every file repeats") < text.index(BEGIN)  # the one-line pointer under the config


def fake_file_globals(tmp_path):
    """A stand-in for a numbered file's globals(): its constants and the file they are read from."""
    source = tmp_path / "demo.py"
    source.write_text('STEPS = 100   # training steps (50 % more is fine)\nLR = 1e-3   # learning rate\n')
    return {"__doc__": "Demo file.\n\nMore text.", "__file__": str(source),
            "STEPS": 100, "LR": 1e-3, "DATASET": "toy", "RESUME": False, "lowercase": 1}


def test_overrides_are_type_checked(script, tmp_path, capsys):
    m = script("01_score_matching.py")
    cfg = m.parse_config(fake_file_globals(tmp_path), ["--steps=3e2", "--lr", "0.5", "--dataset=cifar10", "--resume"])
    assert cfg == types.SimpleNamespace(STEPS=300, LR=0.5, DATASET="cifar10", RESUME=True)
    assert "config: steps=300 lr=0.5 dataset=cifar10 resume=True" in capsys.readouterr().out
    cfg = m.parse_config(fake_file_globals(tmp_path), ["--steps=300_000", "--resume=false"])
    assert cfg.STEPS == 300000 and cfg.RESUME is False and cfg.LR == 1e-3
    assert m.parse_config(fake_file_globals(tmp_path), []).STEPS == 100  # defaults untouched


@pytest.mark.parametrize("argv, words", [
    (["--step=3"], ["unrecognized arguments: --step=3", "valid options:", "--steps", "--lr", "--dataset", "--resume"]),
    (["--ste=3"], ["unrecognized arguments"]),  # prefix abbreviations are off
    (["--STEPS=3"], ["unrecognized arguments"]),
    (["--steps=1.5"], ["--steps", "int", "1.5"]),
    (["--steps=abc"], ["--steps", "int", "abc"]),
    (["--lr=fast"], ["--lr", "float", "fast"]),
    (["--resume=maybe"], ["--resume", "bool", "maybe"]),
    (["--steps"], ["--steps", "expected one argument"]),
    (["steps=3"], ["unrecognized arguments: steps=3"]),
])
def test_bad_overrides_give_one_line_errors(script, tmp_path, argv, words):
    m = script("01_score_matching.py")
    with pytest.raises(SystemExit) as info:
        m.parse_config(fake_file_globals(tmp_path), argv)
    message = str(info.value)
    assert message.startswith("error:") and "\n" not in message
    for w in words:
        assert w in message


def test_help_lists_every_knob_with_its_comment(script, tmp_path, capsys):
    m = script("01_score_matching.py")
    with pytest.raises(SystemExit) as info:
        m.parse_config(fake_file_globals(tmp_path), ["--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps long help lines
    assert "Demo file." in out and "More text" not in out
    for text in ("--steps int", "training steps (50 % more is fine) [default: 100]", "--lr float",
                 "learning rate [default: 0.001]", "--dataset str", "[default: toy]", "--resume [bool]"):
        assert text in out
    assert "--lowercase" not in out


@pytest.mark.parametrize("name", sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "0[1-9]_*.py"))))
def test_every_file_has_a_working_help(script, capsys, name):
    m = script(name)
    with pytest.raises(SystemExit) as info:
        m.parse_config(vars(m), ["--help"])
    assert info.value.code == 0 and "--seed int" in capsys.readouterr().out


def test_image_grid_and_seed(script, tmp_path):
    m = script("01_score_matching.py")
    m.set_seed(0)
    a = torch.rand(3)
    m.set_seed(0)
    assert torch.equal(a, torch.rand(3))
    path = tmp_path / "grid.png"
    m.save_image_grid(torch.rand(5, 3, 8, 8), str(path), nrow=4)
    import matplotlib.image
    img = matplotlib.image.imread(str(path))
    assert img.shape[:2] == (2 * 34 + 2, 4 * 34 + 2)  # 8x8 images are drawn 32x32 (nearest neighbour)
    x = torch.rand(2, 1, 16, 16)
    m.save_image_grid(x, str(tmp_path / "gray.png"), nrow=2, pad=1)
    gray = matplotlib.image.imread(str(tmp_path / "gray.png"))
    assert gray.shape[:2] == (1 + 32 + 1, 1 + 2 * 33)
    # the second image's top-left 2x2 block is its first pixel, enlarged (PNG keeps 8 bits)
    assert abs(gray[1, 34, 0] - x[1, 0, 0, 0].item()) < 1 / 255 + 1e-6
    assert abs(gray[2, 35, 0] - x[1, 0, 0, 0].item()) < 1 / 255 + 1e-6
    assert abs(gray[1, 33, 0] - 1.0) < 1e-6  # the white gap between images


def test_load_numbered_shares_the_module(script):
    m = script("01_score_matching.py")
    assert m.load_numbered("01_score_matching.py") is m
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    assert m.pick_device("cpu") == torch.device("cpu")
    # sampling and evaluation run in true fp32 (no TF32 convolutions on CUDA) unless a file opts in
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    with pytest.raises(SystemExit):
        m.pick_device("tpu")
