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


def test_every_numbered_file_has_the_same_helper_section():
    reference = helper_section(os.path.join(ROOT, "01_score_matching.py"))
    files = sorted(glob.glob(os.path.join(ROOT, "0[1-9]_*.py")))
    assert files
    for path in files:
        assert helper_section(path) == reference, f"{os.path.basename(path)}: helper section differs from 01's copy"


def fake_file_globals():
    return {"__doc__": "Demo file.\n\nMore text.", "__file__": None,
            "STEPS": 100, "LR": 1e-3, "DATASET": "toy", "RESUME": False, "lowercase": 1}


def test_overrides_are_type_checked(script):
    m = script("01_score_matching.py")
    cfg = m.parse_config(fake_file_globals(), ["--steps=3e2", "--lr", "0.5", "--dataset=cifar10", "--resume"])
    assert cfg == types.SimpleNamespace(STEPS=300, LR=0.5, DATASET="cifar10", RESUME=True)
    cfg = m.parse_config(fake_file_globals(), ["--STEPS=7", "--resume=false"])
    assert cfg.STEPS == 7 and cfg.RESUME is False and cfg.LR == 1e-3


@pytest.mark.parametrize("argv, words", [
    (["--step=3"], ["unknown option --step", "--steps", "--lr", "--dataset", "--resume"]),
    (["--steps=1.5"], ["--steps", "int", "1.5"]),
    (["--lr=fast"], ["--lr", "float", "fast"]),
    (["--resume=maybe"], ["--resume", "bool"]),
    (["--steps"], ["--steps needs a value"]),
    (["steps=3"], ["unexpected argument"]),
])
def test_bad_overrides_give_one_line_errors(script, argv, words):
    m = script("01_score_matching.py")
    with pytest.raises(SystemExit) as info:
        m.parse_config(fake_file_globals(), argv)
    message = str(info.value)
    assert message.startswith("error:") and "\n" not in message
    for w in words:
        assert w in message


def test_help_lists_every_knob(script, capsys):
    m = script("01_score_matching.py")
    with pytest.raises(SystemExit) as info:
        m.parse_config(fake_file_globals(), ["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for knob in ("--steps=100", "--lr=0.001", "--dataset=toy", "--resume=False"):
        assert knob in out


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
    assert img.shape[:2] == (2 * 10 + 2, 4 * 10 + 2)
    m.save_image_grid(torch.rand(2, 1, 8, 8), str(tmp_path / "gray.png"))


def test_load_numbered_shares_the_module(script):
    m = script("01_score_matching.py")
    assert m.load_numbered("01_score_matching.py") is m
    assert m.pick_device("cpu") == torch.device("cpu")
    with pytest.raises(SystemExit):
        m.pick_device("tpu")
