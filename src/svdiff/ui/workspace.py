"""The web app's workspace: one folder that holds everything the app reads and writes (subjects, runs, jobs,
pictures, shift files, exports). Every path a page sends is resolved here and refused if it leaves the folder, so
a browser can neither read nor write anywhere else on the machine."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

from ..data.images import IMAGE_SUFFIXES, open_image
from ..errors import SvdiffError
from ..format import read_shift_file

DEFAULT_WORKSPACE = "svdiff-workspace"
# A subject is 3–5 photos; 20 leaves room for a larger set while refusing a dropped photo library.
MAX_IMAGES = 20
# Per uploaded file (also what the web server itself refuses before the upload completes).
MAX_UPLOAD_MB = 20
# Folders of the workspace, by what they hold.
SUBJECTS, CLASS_IMAGES, RUNS, JOBS, CONCEPTS = "subjects", "class-images", "runs", "jobs", "concepts"
GENERATED, EDITS, MERGED, EXPORTS, UPLOADS = "generated", "edits", "merged", "exports", "uploads"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class Workspace:
    def __init__(self, root: str | Path = DEFAULT_WORKSPACE):
        self.root = Path(root).expanduser().resolve()
        if self.root.exists() and not self.root.is_dir():
            raise SvdiffError(f"--workspace {root} exists and is not a folder")
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, text, *, exists: bool = False) -> Path:
        """The absolute path of `text` (relative to the workspace, or absolute inside it); refused outside it,
        symbolic links followed, so a link inside cannot lead out either."""
        text = str(text or "").strip()
        if not text:
            raise SvdiffError("no file or folder given")
        full = (self.root / Path(text).expanduser()).resolve()
        if full != self.root and self.root not in full.parents:
            raise SvdiffError(f"{text} is outside the workspace {self.root}")
        if exists and not full.exists():
            raise SvdiffError(f"{text}: no such file or folder in the workspace")
        return full

    def rel(self, path) -> str:
        """How the app shows a path: relative to the workspace."""
        return Path(path).resolve().relative_to(self.root).as_posix()

    def new_file(self, folder: str, name: str, suffix: str) -> Path:
        """`folder/name` + suffix for a file to write, `name` a plain name (or a path inside the workspace)."""
        text = str(name or "").strip()
        if not text:
            raise SvdiffError("give a name for the file to write")
        path = self.path(text if "/" in text else f"{folder}/{text}")
        if path.suffix != suffix:
            path = path.with_name(path.name + suffix)
        return path

    def stamped(self, folder: str) -> Path:
        """A new folder for one result (a grid, an edit), named by the time."""
        base = self.root / folder / time.strftime("%Y%m%d-%H%M%S")
        path, n = base, 1
        while path.exists():
            path, n = base.with_name(f"{base.name}-{n}"), n + 1
        path.mkdir(parents=True)
        return path

    def shift_files(self) -> list[str]:
        """Every svdiff shift file in the workspace (relative paths): training results, merges, edits' models,
        uploads. Checkpoints' trained state and LoRA exports are left out; so is any file that does not read as a
        shift file."""
        found = []
        for path in sorted(self.root.rglob("*.safetensors")):
            parts = path.relative_to(self.root).parts
            if parts[0] == EXPORTS or any(p.startswith(("checkpoint-", ".")) for p in parts):
                continue
            if not path.resolve().is_relative_to(self.root):  # a symbolic link that leads out
                continue
            try:
                read_shift_file(path)
            except SvdiffError:
                continue
            found.append(self.rel(path))
        return found

    def save_images(self, name: str, files) -> Path:
        """Uploaded images as the subject `name` (a new folder under subjects/); each must read as an image."""
        folder = self.root / SUBJECTS / plain_name(name, "the subject's name")
        files = [Path(f) for f in files or []]
        if not files:
            raise SvdiffError("drop 3–5 photos of the subject (or pick an example subject)")
        if len(files) > MAX_IMAGES:
            raise SvdiffError(f"{len(files)} images: at most {MAX_IMAGES} per subject")
        for f in files:
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                raise SvdiffError(f"{f.name}: not an image file ({', '.join(IMAGE_SUFFIXES)})")
            if f.stat().st_size > MAX_UPLOAD_MB * 2**20:
                raise SvdiffError(f"{f.name}: larger than {MAX_UPLOAD_MB} MB")
            open_image(f)  # an unreadable or hostile file is refused before anything is written
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        for i, f in enumerate(files):
            shutil.copyfile(f, folder / f"{i:02d}{f.suffix.lower()}")
        return folder

    def subjects(self) -> list[str]:
        """The subjects added so far: folders of photos under subjects/ with their prompts beside them."""
        folder = self.root / SUBJECTS
        return sorted(p.stem for p in folder.glob("*.json") if (folder / p.stem).is_dir())


def plain_name(text, what: str) -> str:
    """A name that is one plain file or folder name (letters, digits, '.', '_', '-'), or a one-line error."""
    text = str(text or "").strip()
    if not _NAME.fullmatch(text):
        raise SvdiffError(f"{what} {text!r}: use letters, digits, '.', '_' and '-' (at most 64, no leading '.')")
    return text


def example_subjects() -> dict[str, Path]:
    """The example subject folders of a source checkout (examples/subjects), by name; none in an installed wheel."""
    folder = Path(__file__).resolve().parents[3] / "examples" / "subjects"
    return {p.name: p for p in sorted(folder.iterdir()) if p.is_dir()} if folder.is_dir() else {}
