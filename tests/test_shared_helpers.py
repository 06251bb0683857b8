"""The shared helper section is copied verbatim into every numbered file. These tests keep the
copies identical and small, and specify the helpers: --key=value overrides, --help, the device
choice and the image grid."""

import glob
import os
import types

import matplotlib.image
import pytest
import torch
from conftest import ROOT

BEGIN = "# ==== shared helpers:"
END = "# ==== end of shared helpers ===="
PLUMBING = "# ==== plumbing: nothing below this line is about the method ===="
FILES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "0[1-9]_*.py")))


def read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def helper_section(name):
    text = read(name)
    assert text.count(BEGIN) == 1 and text.count(END) == 1, f"{name}: helper markers"
    return text[text.index(BEGIN) : text.index(END) + len(END)]


def test_six_lessons_share_one_helper_section_of_at_most_60_lines():
    assert len(FILES) == 6
    reference = helper_section(FILES[0])
    assert len(reference.splitlines()) <= 60
    for name in FILES:
        assert helper_section(name) == reference, (
            f"{name}: helper section differs from {FILES[0]}'s"
        )


@pytest.mark.parametrize("name", FILES)
def test_each_lesson_reads_method_first_then_plumbing_then_helpers(name):
    text = read(name)
    assert text.startswith(('"""', 'r"""')), "a lesson opens with its docstring"
    assert text.count(PLUMBING) == 1, f"{name}: one marked line before the plumbing"
    main_guard = text.index('if __name__ == "__main__":')
    assert text.index(PLUMBING) < text.index(BEGIN) < text.index(END) < main_guard
    assert text[text.index(END) + len(END) : main_guard].strip() == ""
    assert text.index("def main(") < text.index(PLUMBING), "main() is part of the lesson"


def fake_file_globals(tmp_path):
    """A stand-in for a numbered file's globals(): its constants and the file they are read from."""
    source = tmp_path / "demo.py"
    source.write_text(
        "STEPS = 100  # training steps (50 % more is fine)\nLR = 1e-3  # learning rate\n"
    )
    return {
        "__doc__": "Demo file.\n\nMore text.",
        "__file__": str(source),
        "STEPS": 100,
        "LR": 1e-3,
        "DATASET": "toy",
        "RESUME": False,
        "lowercase": 1,
    }


def test_overrides_are_typed_like_their_defaults(script, tmp_path, capsys):
    m = script("01_score_matching.py")
    argv = ["--steps=3e2", "--lr=0.5", "--dataset=cifar10", "--resume"]
    cfg = m.parse_config(fake_file_globals(tmp_path), argv)
    assert cfg == types.SimpleNamespace(STEPS=300, LR=0.5, DATASET="cifar10", RESUME=True)
    assert type(cfg.STEPS) is int and type(cfg.RESUME) is bool
    assert "config: steps=300 lr=0.5 dataset=cifar10 resume=True" in capsys.readouterr().out
    cfg = m.parse_config(fake_file_globals(tmp_path), ["--steps=300_000", "--resume=false"])
    assert cfg.STEPS == 300000 and cfg.RESUME is False and cfg.LR == 1e-3
    assert m.parse_config(fake_file_globals(tmp_path), []).STEPS == 100  # defaults untouched


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--step=3"], ["unknown option --step=3", "valid:", "--steps", "--lr", "--resume"]),
        (["--ste=3"], ["unknown option"]),  # no prefix abbreviations
        (["--STEPS=3"], ["unknown option"]),
        (["steps=3"], ["unknown option steps=3"]),
        (["--steps=1.5"], ["--steps=1.5", "int"]),
        (["--steps=abc"], ["--steps=abc", "int"]),
        (["--steps=1e30"], ["--steps=1e30", "int"]),  # would overflow a 64-bit seed or counter
        (["--steps"], ["--steps", "int"]),
        (["--lr=fast"], ["--lr=fast", "float"]),
        (["--lr=inf"], ["--lr=inf", "float", "finite"]),
        (["--lr=-inf"], ["--lr=-inf", "float", "finite"]),
        (["--lr=nan"], ["--lr=nan", "float", "finite"]),
        (["--resume=maybe"], ["--resume=maybe", "bool"]),
    ],
)
def test_bad_overrides_give_one_line_errors(script, tmp_path, argv, words):
    m = script("01_score_matching.py")
    with pytest.raises(SystemExit) as info:
        m.parse_config(fake_file_globals(tmp_path), argv)
    message = str(info.value)
    assert message.startswith("error:") and "\n" not in message
    for w in words:
        assert w in message


def test_help_shows_the_first_docstring_paragraph_and_the_config_block(script, tmp_path, capsys):
    m = script("01_score_matching.py")
    with pytest.raises(SystemExit) as info:
        m.parse_config(fake_file_globals(tmp_path), ["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "Demo file." in out and "More text" not in out and "--key=value" in out
    assert "STEPS = 100  # training steps (50 % more is fine)" in out
    assert "LR = 1e-3  # learning rate" in out
    assert "config:" not in out  # --help runs nothing


@pytest.mark.parametrize("name", FILES)
def test_every_lesson_has_a_working_help(script, capsys, name):
    m = script(name)
    with pytest.raises(SystemExit) as info:
        m.parse_config(vars(m), ["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "SEED = " in out and "DEVICE = " in out


@pytest.mark.parametrize("name", FILES)
def test_every_knob_has_a_comment(script, name):
    m = script(name)
    lines = read(name).splitlines()
    for key, value in vars(m).items():
        if key.isupper() and isinstance(value, (int, float, str)):
            line = next(li for li in lines if li.startswith(key + " ="))
            assert "#" in line, f"{name}: {key} has no comment for --help"


def test_image_grid_lays_out_enlarged_images_with_white_frames(script, tmp_path):
    m = script("01_score_matching.py")
    path = tmp_path / "grid.png"
    m.save_image_grid(torch.rand(5, 3, 8, 8), str(path), nrow=4)
    img = matplotlib.image.imread(str(path))
    assert img.shape[:2] == (2 * 34, 4 * 34)  # 8x8 images are drawn 32x32, framed by 1 pixel
    x = torch.rand(2, 1, 16, 16)
    m.save_image_grid(x, str(tmp_path / "gray.png"), nrow=2)
    gray = matplotlib.image.imread(str(tmp_path / "gray.png"))
    assert gray.shape[:2] == (34, 2 * 34)
    # the second image's top-left 2x2 block is its first pixel, enlarged (PNG keeps 8 bits)
    for row, col in [(1, 35), (2, 36)]:
        assert abs(gray[row, col, 0] - x[1, 0, 0, 0].item()) < 1 / 255 + 1e-6
    assert abs(gray[1, 33, 0] - 1.0) < 1e-6 and abs(gray[0, 1, 0] - 1.0) < 1e-6  # white frames


def test_device_choice_keeps_true_fp32(script):
    m = script("01_score_matching.py")
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    assert m.pick_device("cpu") == torch.device("cpu")
    # sampling and evaluation run in true fp32 (no TF32 convolutions on CUDA) unless a file opts in
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    with pytest.raises(SystemExit, match="error: --device=tpu"):
        m.pick_device("tpu")
