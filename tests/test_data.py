"""Image folders as people hand them over, and the transform to model inputs."""

import contextlib
import io

import pytest
import torch
from PIL import Image

from svdiff.data.images import load_image_folder, to_model_input
from svdiff.errors import SvdiffError


def _exif_rotated_jpeg(path):
    """A 40×20 JPEG whose EXIF says 'rotate 90°', so it shows as 20×40."""
    im = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    im.save(path, exif=exif)


@pytest.fixture
def folder(tmp_path):
    Image.new("RGB", (32, 24), (0, 128, 255)).save(tmp_path / "a.png")
    Image.new("RGBA", (16, 16), (255, 0, 0, 0)).save(tmp_path / "b.png")  # transparent: white after compositing
    Image.new("L", (20, 20), 90).save(tmp_path / "c.webp")
    _exif_rotated_jpeg(tmp_path / "d.jpg")
    (tmp_path / "e.jpg").write_bytes(b"not an image")
    (tmp_path / "notes.txt").write_text("ignored")
    return tmp_path


def test_folder_loads_every_readable_image_upright_in_rgb(folder):
    with pytest.warns(UserWarning, match="skipping .*e.jpg"):
        images = load_image_folder(folder)
    assert len(images) == 4 and all(im.mode == "RGB" for im in images)
    assert images[1].getpixel((0, 0)) == (255, 255, 255)
    assert images[2].getpixel((0, 0)) == (90, 90, 90)
    assert images[3].size == (20, 40)  # EXIF orientation honoured


@pytest.mark.parametrize("case", ["missing", "empty", "unreadable"])
def test_bad_folders(tmp_path, case):
    folder = tmp_path / "imgs"
    if case != "missing":
        folder.mkdir()
    if case == "unreadable":
        (folder / "x.png").write_bytes(b"\x89PNG broken")
    messages = {"missing": "does not exist", "empty": "no images found", "unreadable": "none of the 1 images"}
    warns = pytest.warns(UserWarning) if case == "unreadable" else contextlib.nullcontext()
    with pytest.raises(SvdiffError, match=messages[case]), warns:
        load_image_folder(folder)


def test_model_input_shape_range_and_crops():
    im = Image.new("RGB", (60, 30))
    im.paste((255, 255, 255), (0, 0, 30, 30))  # left half white, right half black
    x = to_model_input(im, 16)
    assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert x[:, :, 0].mean() > 0.5 and x[:, :, -1].mean() < -0.5  # center crop keeps both halves
    g = torch.Generator().manual_seed(0)
    crops = {tuple(to_model_input(im, 16, center_crop=False, generator=g)[0, 8].tolist()) for _ in range(8)}
    assert len(crops) > 1  # random crops move
    flipped = to_model_input(im, 16, flip=True, generator=torch.Generator().manual_seed(1))
    again = to_model_input(im, 16, flip=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(flipped, again)  # deterministic per generator


def test_png_bytes_roundtrip_exactness():
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (255, 0, 0)).save(buf, format="PNG")
    x = to_model_input(Image.open(buf).convert("RGB"), 16)
    assert torch.equal(x[0], torch.ones(16, 16)) and torch.equal(x[1], -torch.ones(16, 16))
