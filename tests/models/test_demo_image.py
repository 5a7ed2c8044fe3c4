"""The multimodal demo's picture (demo-image.png in `moec demo-checkpoint --layout conditional_generation
--vision`): written deterministically with Pillow, it makes an image prompt on the demo one command, and the run
says the description is noise (random vision weights) as it says it for text."""

import json

import numpy as np
from moec_cli import run_cli
from PIL import Image

from moec.common import demo_note
from moec.models.demo import write_demo_checkpoint
from moec.models.demo_vision import DEMO_IMAGE_FILE, DEMO_IMAGE_HW, write_demo_image


def test_demo_image_is_deterministic_and_a_picture(tmp_path):
    write_demo_image(tmp_path / "a.png")
    write_demo_image(tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    with Image.open(tmp_path / "a.png") as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size[::-1] == DEMO_IMAGE_HW
        pixels = np.asarray(im)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100  # a gradient, not one colour


def test_image_prompt_on_the_demo_says_its_description_is_noise(tmp_path, capsys):
    ckpt = write_demo_checkpoint(tmp_path / "ckpt", layout="conditional_generation", vision=True)
    assert (ckpt / DEMO_IMAGE_FILE).is_file()
    args = ["run", ckpt, "--image", ckpt / DEMO_IMAGE_FILE, "--prompt", "what is it?", "--max-new-tokens", 2]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert demo_note.NOTE in err and demo_note.IMAGE_NOTE in err
    code, _, err = run_cli(["run", ckpt, "--prompt", "what is it?", "--max-new-tokens", 2], capsys)
    assert code == 0 and demo_note.NOTE in err and demo_note.IMAGE_NOTE not in err
    code, out, err = run_cli([*args, "--json"], capsys)  # --json says it as random_weights, stdout stays JSON
    assert code == 0 and json.loads(out)["random_weights"] is True and demo_note.IMAGE_NOTE not in err
    assert json.loads(out)["vision"]["tiles_hw"] == [[2, 2]]
