"""python -m nextstep: generate and edit from the command line."""

import pytest
import torch
from PIL import Image

from nextstep.__main__ import main
from nextstep.pnginfo import read_parameters

from .conftest import TINY


@pytest.fixture(autouse=True)
def keep_thread_count():
    """The command sets torch's thread count for its process; give the test process its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_generate_writes_pngs_with_their_parameters(tmp_path, capsys):
    out = tmp_path / "fox.png"
    code = main(["a red circle", "--model", str(TINY / "model"), "--vae", str(TINY / "vae"), "--size", "64x32",
                 "--num-sampling-steps", "2", "--seed", "5", "--num-images", "2", "--out", str(out)])
    assert code == 0
    paths = [tmp_path / "fox-1.png", tmp_path / "fox-2.png"]
    assert capsys.readouterr().out.split() == [str(p) for p in paths]
    for path in paths:
        assert Image.open(path).size == (64, 32)
        assert read_parameters(path)["seed"] == 5 and read_parameters(path)["num_sampling_steps"] == 2


def test_edit_takes_the_official_edit_defaults(tmp_path):
    out = tmp_path / "edit.png"
    code = main(["make the square green", "--model", str(TINY / "model"), "--vae", str(TINY / "vae"),
                 "--image", str(TINY / "input_edit.png"), "--size", "64x64", "--num-sampling-steps", "2", "--out", str(out)])
    assert code == 0
    stored = read_parameters(out)
    assert stored["edit"] and stored["cfg_img"] == 2.0 and stored["negative_prompt"] == "Copy original image."


def test_errors_are_messages_with_a_nonzero_code(tmp_path, capsys):
    assert main(["x", "--model", str(tmp_path / "missing")]) == 2
    assert "model not found" in capsys.readouterr().err
    assert main(["x", "--model", str(TINY / "model"), "--vae", str(TINY / "vae"), "--size", "50x50"]) == 2
    assert "multiples of 16" in capsys.readouterr().err
