"""Image folders as a person hands them over: jpg/png/webp, phone photos with an EXIF orientation, RGBA and
greyscale files, a stray text file; and the resize/crop/flip that turns an image into a model input."""

from __future__ import annotations

import errno
import math
import warnings
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import SvdiffError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def image_files(paths) -> list[Path]:
    """The image files among `paths` (files, or folders whose images are taken in name order)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(f for f in path.iterdir() if is_image(f))
        elif path.is_file():
            files.append(path)
        else:
            raise SvdiffError(f"no such image or folder: {path}")
    if not files:
        raise SvdiffError(f"no images found in {', '.join(map(str, paths))}")
    return files


def open_image(path: Path) -> Image.Image:
    """An RGB image the right way up (EXIF orientation applied; alpha composited on white)."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(white, rgba).convert("RGB")
            return im.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as e:
        # a decompression bomb (a small file that claims billions of pixels) is refused by Pillow before decoding
        raise SvdiffError(f"cannot read image {path}: {e}") from None


def open_images(files, skip_unreadable: bool = False) -> list[Image.Image]:
    """Every file opened; unreadable ones are an error, or skipped with a warning when others remain."""
    images = []
    for f in files:
        try:
            images.append(open_image(f))
        except SvdiffError as e:
            if not skip_unreadable:
                raise
            warnings.warn(f"skipping {f}: {e}", stacklevel=2)
    if not images:
        raise SvdiffError(f"none of the {len(files)} images could be read")
    return images


def load_image_folder(folder) -> list[Image.Image]:
    """The readable images of a training folder (unreadable ones skipped with a warning)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SvdiffError(f"image folder {folder} {_why_not_a_folder(folder)}")
    return open_images(image_files([folder]), skip_unreadable=True)


def _why_not_a_folder(path: Path) -> str:
    try:
        path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symbolic link that loops"
        if path.is_symlink():
            return "is a symbolic link to nothing"
        return "does not exist"
    return "is a file, not a folder"


def to_model_input(
    image: Image.Image,
    resolution: int,
    center_crop: bool = True,
    flip: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """3 × resolution × resolution in [-1, 1]: the shorter side resized to `resolution` (bicubic), then a center
    or random crop and, with `flip`, a horizontal flip half of the time (random draws from `generator`)."""
    scale = resolution / min(image.size)
    size = (max(resolution, math.ceil(image.width * scale)), max(resolution, math.ceil(image.height * scale)))
    image = image.resize(size, Image.BICUBIC)
    if center_crop:
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    else:
        left = int(torch.randint(0, size[0] - resolution + 1, (1,), generator=generator))
        top = int(torch.randint(0, size[1] - resolution + 1, (1,), generator=generator))
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip and bool(torch.rand((), generator=generator) < 0.5):
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(resolution, resolution, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1.0
